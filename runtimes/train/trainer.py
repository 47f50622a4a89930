"""The training loop: LoRA, DoRA, QLoRA or full fine-tuning of a causal LM, one process or DDP.

Why it is faster than a stock Trainer on the same data: packed micro-batches (no padding, and
attention confined to each example), logits computed only where a loss is taken, in chunks whose
gradients are formed on the spot (runtimes/train/chunked_loss.py), and nothing else in the loop (no
per-step dataloader machinery, no full-vocabulary logits of prompt tokens).

Why a resumed run ends bit-identical to an uninterrupted one: the data order is a pure function of
the seed and the epoch, the learning rate is a pure function of the step, and a checkpoint holds
the weights, AdamW's moments, the gradients accumulated so far and every process's RNG state.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from runtimes import cpu_share
from runtimes.train.batches import PlanOptions, collate, count_targets, plan_epoch, plan_eval


class UnsupportedDevice(Exception):
    error_kind = "unsupported_device"


@dataclass
class TrainConfig:
    """The resolved parameters (handlers/train.py merges defaults, preset, checkpoint and request)."""

    method: str = "lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: Any = "all-linear"
    max_seq_length: int = 2048
    batch_size: int = 8
    batch_tokens: int | None = None
    packing: bool = True
    gradient_accumulation: int = 1
    learning_rate: float = 2e-4
    lr_schedule: str = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    epochs: float = 1.0
    max_steps: int | None = None
    gradient_checkpointing: bool = False
    seed: int = 42
    eval_every: int | None = None
    early_stopping_patience: int | None = None
    checkpoint_every: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    n_threads: int | None = None  # options.n_threads: used as given; otherwise the cores other programs leave us

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})


class Reporter(Protocol):
    def progress(self, stage: str, step: int | None = None, total: int | None = None, message: str | None = None,
                 metrics: dict[str, float] | None = None) -> None: ...

    def log(self, level: str, message: str, data: dict[str, Any] | None = None) -> None: ...

    def cancel_requested(self) -> bool: ...


class SilentReporter:
    """What ranks other than 0 report to: nobody (rank 0 speaks for the run)."""

    def progress(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def cancel_requested(self) -> bool:
        return False


@dataclass
class TrainData:
    train: list[Any]  # TokenizedExample-like: input_ids, loss_mask
    validation: list[Any]
    pad_id: int


@dataclass
class Outcome:
    model: Any  # PeftModel or the full model, trained
    stopped: str  # completed | max_steps | early_stopping | cancelled
    step: int
    total_steps: int
    history: list[dict[str, Any]]
    checkpoints: list[str]
    metrics: dict[str, Any]
    last_checkpoint: str | None = None


@dataclass
class Cursor:
    """Where the run stands: optimizer steps done, and the micro-batch the next step starts at."""

    step: int = 0
    epoch: int = 0
    index: int = 0
    micro_done: int = 0  # micro-batches of the current step already in the gradients
    partial_loss: float = 0.0  # their loss sum, tokens and trained tokens (for the step's log line)
    partial_tokens: int = 0
    partial_trained: int = 0


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    warmup = config.warmup_steps if config.warmup_steps is not None else math.ceil(config.warmup_ratio * total)
    if warmup and step < warmup:
        return config.learning_rate * (step + 1) / warmup
    if config.lr_schedule == "constant":
        return config.learning_rate
    progress = (step - warmup) / max(1, total - warmup)
    if config.lr_schedule == "linear":
        return config.learning_rate * max(0.0, 1.0 - progress)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class LossModule:
    """Sum of token cross-entropies of a micro-batch; an nn.Module so DDP can wrap it."""

    def __new__(cls, model: Any) -> Any:
        import torch

        class _Loss(torch.nn.Module):
            def __init__(self, wrapped: Any) -> None:
                super().__init__()
                self.wrapped = wrapped

            def forward(self, input_ids: Any, position_ids: Any, attention_mask: Any, segments: Any, predict_at: Any,
                        targets: Any) -> Any:
                return causal_lm_loss_sum(self.wrapped, input_ids, position_ids, attention_mask, segments, predict_at, targets)

        return _Loss(model)


def _base_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def causal_lm_loss_sum(model: Any, input_ids: Any, position_ids: Any, attention_mask: Any, segments: Any, predict_at: Any,
                       targets: Any) -> Any:
    import torch

    from runtimes.train.chunked_loss import linear_cross_entropy_sum

    base = _base_model(model)
    extra = {"packed_segments": segments} if segments is not None else {}
    head = base.get_output_embeddings()
    plain_head = type(head) is torch.nn.Linear and not _has_logit_transform(base.config)
    if plain_head:
        hidden = base.get_decoder()(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                    use_cache=False, **extra).last_hidden_state
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, predict_at)
        return linear_cross_entropy_sum(picked, head.weight, head.bias, targets)
    logits = base(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False, **extra).logits
    picked = logits.reshape(-1, logits.shape[-1]).index_select(0, predict_at).float()
    return torch.nn.functional.cross_entropy(picked, targets, reduction="sum")


def _has_logit_transform(config: Any) -> bool:
    """Models whose logits are not just the head's output (soft-capping, scaling) take the stock path."""
    return bool(getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None))


def load_trainable_model(model_path: Path, config: TrainConfig, packed_attention: bool) -> tuple[Any, str, str]:
    """The model with LoRA/DoRA layers (or all weights trainable), on its device; (model, device, dtype)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from runtimes.train.packed_attention import register
    from runtimes.hf.lm import check_model_dir, pick_device, pick_dtype

    raw_config = check_model_dir(Path(model_path), config.allow_pickle)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device, raw_config)
    if device == "cpu" and dtype == "float16":
        dtype = "float32"  # CPU float16 training is slow and unstable
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "use_safetensors": None if config.allow_pickle else True,
                              "trust_remote_code": config.trust_remote_code,
                              "attn_implementation": register() if packed_attention else "sdpa"}
    if config.method == "qlora":
        if device != "cuda":
            raise UnsupportedDevice(f"QLoRA needs a CUDA GPU (bitsandbytes 4-bit); this run's device is {device}. "
                                    "Use method 'lora' (or 'dora') instead")
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UnsupportedDevice("QLoRA needs the bitsandbytes package: pip install bitsandbytes") from None
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft asks transformers
    model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
    if config.method != "qlora":
        model.to(device)
    model.config.use_cache = False
    if config.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if config.method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=config.target_modules, use_dora=config.method == "dora", bias="none",
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    if config.gradient_checkpointing:
        _base_model(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, device, dtype


def run_training(model_path: Path, config: TrainConfig, data: TrainData, reporter: Reporter, *, run_dir: Path,
                 resume_from: Path | None = None, state_extra: dict[str, Any] | None = None, rank: int = 0,
                 world_size: int = 1) -> Outcome:
    import torch

    torch.manual_seed(config.seed)
    model, device, dtype = load_trainable_model(model_path, config, packed_attention=config.packing)
    loop = _Loop(model, device, dtype, config, data, reporter, run_dir, state_extra or {}, rank, world_size)
    if resume_from is not None:
        loop.resume(resume_from)
    with cpu_share.job(config.n_threads) as loop.threads:
        return loop.run()


class _Loop:
    def __init__(self, model: Any, device: str, dtype: str, config: TrainConfig, data: TrainData, reporter: Reporter,
                 run_dir: Path, state_extra: dict[str, Any], rank: int, world_size: int) -> None:
        import torch

        self.model, self.device, self.dtype, self.config, self.data = model, device, dtype, config, data
        self.reporter, self.run_dir, self.state_extra = reporter, run_dir, state_extra
        self.rank, self.world_size = rank, world_size
        self.threads: cpu_share.Job | None = None  # set by run_training: the job's claim on the CPU
        self.named = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.param_names = {id(p): name for name, p in self.named.items()}
        self.optimizer = torch.optim.AdamW(list(self.named.values()), lr=config.learning_rate,
                                           weight_decay=config.weight_decay, betas=(0.9, 0.999), eps=1e-8)
        loss_module = LossModule(model)
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(loss_module, device_ids=[torch.cuda.current_device()] if device == "cuda" else None)
        else:
            self.forward = loss_module
        self.lengths = [len(example.input_ids) for example in data.train]
        self.options = PlanOptions(config.batch_size, config.batch_tokens, config.packing, world_size)
        self._plans: dict[int, list[list[list[int]]]] = {}
        self.micro_per_epoch = len(self.plan(0))
        if self.micro_per_epoch == 0:
            raise ValueError("no training examples left to train on")
        by_epochs = math.ceil(config.epochs * self.micro_per_epoch / config.gradient_accumulation)
        self.total_steps = max(1, config.max_steps if config.max_steps else by_epochs)
        self.cursor = Cursor()
        self.history: list[dict[str, Any]] = []
        self.checkpoints: list[str] = []
        self.tokens = 0
        self.trained_tokens = 0
        self.examples = 0
        self.train_s = 0.0
        self.best_val: float | None = None
        self.evals_without_gain = 0
        self.last_val: float | None = None
        self.steps_this_session = 0  # for the ETA: steps timed since this process started

    # ----- data

    def plan(self, epoch: int) -> list[list[list[int]]]:
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(self.lengths, self.config.seed, epoch, self.options)}
        return self._plans[epoch]

    def step_batches(self, epoch: int, index: int) -> list[tuple[int, int, list[list[int]]]]:
        """The micro-batches of the optimizer step starting at (epoch, index): [(epoch, index, shards)]."""
        out = []
        for _ in range(self.config.gradient_accumulation):
            plan = self.plan(epoch)
            if index >= len(plan):
                epoch, index = epoch + 1, 0
                plan = self.plan(epoch)
            out.append((epoch, index, plan[index]))
            index += 1
        return out

    # ----- resume and checkpoints

    def resume(self, path: Path) -> None:
        import torch

        from runtimes.train.checkpoint import load_checkpoint, read_state

        state = read_state(path)
        grads, rngs = load_checkpoint(path, named_trainable=self.named, optimizer=self.optimizer, param_names=self.param_names)
        self.cursor = Cursor(**state["cursor"])
        self.history = state.get("history", [])
        self.checkpoints = state.get("checkpoints", [])
        self.tokens, self.trained_tokens = int(state.get("tokens", 0)), int(state.get("trained_tokens", 0))
        self.examples = int(state.get("examples", 0))
        self.train_s = float(state.get("train_s", 0.0))
        self.best_val, self.last_val = state.get("best_val"), state.get("last_val")
        self.evals_without_gain = int(state.get("evals_without_gain", 0))
        for name, grad in grads.items():
            self.named[name].grad = grad.to(self.named[name].device)
        if len(rngs) == self.world_size:
            torch.set_rng_state(rngs[self.rank])
        else:
            self.reporter.log("warning", f"the checkpoint was written by {len(rngs)} processes and this run has "
                                         f"{self.world_size}: dropout draws differ from an uninterrupted run")

    def checkpoint(self, reason: str) -> str | None:
        """Every rank joins (RNG states are gathered); rank 0 writes. Returns the path on rank 0."""
        import torch

        rng = torch.get_rng_state()
        rngs = [rng]
        if self.world_size > 1:
            import torch.distributed as dist

            rngs = [torch.empty_like(rng) for _ in range(self.world_size)]
            dist.all_gather(rngs, rng)
        if self.rank != 0:
            return None
        self.reporter.progress("checkpoint", self.cursor.step, self.total_steps, f"writing a checkpoint ({reason})")
        grads = {name: p.grad for name, p in self.named.items() if p.grad is not None} if self.cursor.micro_done else None
        suffix = f"-micro-{self.cursor.micro_done:03d}" if self.cursor.micro_done else ""
        dest = self.run_dir / "checkpoints" / f"step-{self.cursor.step:06d}{suffix}"
        from runtimes.train.checkpoint import save_checkpoint

        path = str(dest)
        checkpoints = self.checkpoints + [path] if path not in self.checkpoints else list(self.checkpoints)
        state = {"cursor": vars(self.cursor).copy(), "history": self.history, "checkpoints": checkpoints,
                 "tokens": self.tokens, "trained_tokens": self.trained_tokens, "examples": self.examples, "train_s": self.train_s,
                 "best_val": self.best_val, "last_val": self.last_val, "evals_without_gain": self.evals_without_gain,
                 "total_steps": self.total_steps, "reason": reason, **self.state_extra}
        adapter_saver = None if self.config.method == "full" else (lambda target: self.model.save_pretrained(str(target)))
        save_checkpoint(dest, trainable=self.named, optimizer=self.optimizer, param_names=self.param_names, grads=grads,
                        rng_states=rngs, state=state, save_adapter=adapter_saver)
        self.checkpoints = checkpoints
        return path

    # ----- the loop

    def run(self) -> Outcome:
        config = self.config
        stopped = "completed" if not config.max_steps else "max_steps"
        cancelled = False
        started = time.monotonic()
        self.reporter.progress("train", self.cursor.step, self.total_steps, "training")
        while self.cursor.step < self.total_steps:
            if self.threads is not None and self.device == "cpu":
                self.threads.apply_to(cpu_share.TORCH)  # fewer threads while other programs keep cores busy
            step_started = time.monotonic()
            batches = self.step_batches(self.cursor.epoch, self.cursor.index)
            step_targets = sum(count_targets(self.data.train, shard) for _, _, shards in batches for shard in shards)
            loss_sum, tokens, trained = self.cursor.partial_loss, self.cursor.partial_tokens, self.cursor.partial_trained
            for position, (epoch, index, shards) in enumerate(batches):
                if position < self.cursor.micro_done:
                    continue
                last = position == len(batches) - 1
                value, batch_tokens, batch_trained = self.micro_step(shards[self.rank], step_targets, sync=last)
                loss_sum += value
                tokens += batch_tokens
                trained += batch_trained
                self.examples += sum(len(shard) for shard in shards)
                self.cursor.micro_done = position + 1
                self.cursor.partial_loss, self.cursor.partial_tokens, self.cursor.partial_trained = loss_sum, tokens, trained
                if not last and self.world_size == 1 and self.cancel_requested():
                    cancelled = True
                    break
            if cancelled:
                self.train_s += time.monotonic() - step_started
                break
            grad_norm = self.optimizer_step()
            self.train_s += time.monotonic() - step_started
            totals = self.all_sum([loss_sum, float(tokens), float(trained)])
            self.tokens += int(totals[1])
            self.trained_tokens += int(totals[2])
            epoch, index, _ = batches[-1]
            self.cursor = Cursor(self.cursor.step + 1, epoch, index + 1)
            row = self.record(totals[0] / max(1, step_targets), grad_norm, started)
            if config.eval_every and self.cursor.step % config.eval_every == 0 and self.cursor.step < self.total_steps:
                if self.evaluate(row):
                    stopped = "early_stopping"
                    break
            if config.checkpoint_every and self.cursor.step % config.checkpoint_every == 0 and self.cursor.step < self.total_steps:
                self.checkpoint("every")
            if self.cancel_requested():
                cancelled = True
                break
        last_checkpoint = None
        if cancelled:
            last_checkpoint = self.checkpoint("cancelled")
            stopped = "cancelled"
        elif self.data.validation and (not self.history or self.history[-1].get("val_loss") is None):
            self.evaluate(self.history[-1] if self.history else {"step": self.cursor.step})
        return Outcome(self.model, stopped, self.cursor.step, self.total_steps, self.history, self.checkpoints,
                       self.summary(), last_checkpoint)

    def cancel_requested(self) -> bool:
        flag = self.reporter.cancel_requested()
        if self.world_size == 1:
            return flag
        return self.all_sum([1.0 if flag else 0.0])[0] > 0

    def micro_step(self, indices: list[int], step_targets: int, *, sync: bool) -> tuple[float, int, int]:
        import torch

        batch = collate(self.data.train, indices, self.config.packing, self.data.pad_id)
        scale = self.world_size / max(1, step_targets)
        context = self.forward.no_sync() if (self.world_size > 1 and not sync) else contextlib.nullcontext()
        with context:
            if batch.tokens == 0:  # this process got no example (a short last batch): join the collective with zero loss
                batch = collate(self.data.train, [0], self.config.packing, self.data.pad_id)
                loss = self.call_forward(batch) * 0.0
            else:
                loss = self.call_forward(batch)
            (loss * scale).backward()
        return float(loss.detach()), batch.tokens, int(batch.targets.numel())

    def call_forward(self, batch: Any) -> Any:
        device = self.device
        mask = batch.attention_mask.to(device) if batch.attention_mask is not None else None
        return self.forward(batch.input_ids.to(device), batch.position_ids.to(device), mask, batch.segments,
                            batch.predict_at.to(device), batch.targets.to(device))

    def optimizer_step(self) -> float | None:
        import torch

        params = list(self.named.values())
        grad_norm = None
        if self.config.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.cursor.step, self.total_steps, self.config)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def record(self, loss: float, grad_norm: float | None, started: float) -> dict[str, Any]:
        step = self.cursor.step
        tokens_per_s = self.tokens / self.train_s if self.train_s > 0 else 0.0
        row = {"step": step, "epoch": round(self.epochs_done(), 4), "loss": loss,
               "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm, "tokens": self.tokens,
               "tokens_per_s": round(tokens_per_s, 2), "elapsed_s": round(self.train_s, 3), "val_loss": None}
        self.history.append(row)
        self.steps_this_session += 1
        eta = (time.monotonic() - started) / self.steps_this_session * (self.total_steps - step)
        metrics = {"loss": round(loss, 5), "lr": row["lr"], "epoch": row["epoch"], "tokens_per_s": row["tokens_per_s"],
                   "eta_s": round(eta, 1), "peak_rss_bytes": float(peak_rss_bytes())}
        if grad_norm is not None:
            metrics["grad_norm"] = round(grad_norm, 5)
        gpu = self.peak_gpu_bytes()
        if gpu is not None:
            metrics["peak_gpu_bytes"] = float(gpu)
        if self.last_val is not None:
            metrics["val_loss"] = round(self.last_val, 5)
        self.reporter.progress("train", step, self.total_steps, f"step {step}/{self.total_steps} loss {loss:.4f}", metrics)
        return row

    def epochs_done(self) -> float:
        return self.cursor.epoch + self.cursor.index / self.micro_per_epoch

    def peak_gpu_bytes(self) -> int | None:
        if self.device != "cuda":
            return None
        import torch

        return int(torch.cuda.max_memory_allocated())

    def evaluate(self, row: dict[str, Any]) -> bool:
        """Validation loss into `row`; True when early stopping says stop."""
        val = self.validation_loss()
        if val is None:
            return False
        row["val_loss"] = val
        self.last_val = val
        self.reporter.progress("train", self.cursor.step, self.total_steps, f"validation loss {val:.4f}",
                               {"val_loss": round(val, 5), "loss": round(row.get("loss") or float("nan"), 5)})
        if self.best_val is None or val < self.best_val:
            self.best_val, self.evals_without_gain = val, 0
            return False
        self.evals_without_gain += 1
        patience = self.config.early_stopping_patience
        return bool(patience and self.evals_without_gain >= patience)

    def validation_loss(self) -> float | None:
        import torch

        examples = self.data.validation
        if not examples:
            return None
        lengths = [len(example.input_ids) for example in examples]
        budget = max(self.config.batch_tokens or 0, self.config.max_seq_length, max(lengths))
        total, count = 0.0, 0
        self.model.eval()
        try:
            with torch.no_grad():
                for shards in plan_eval(lengths, budget, self.world_size):
                    batch = collate(examples, shards[self.rank], self.config.packing, self.data.pad_id)
                    if batch.tokens == 0:
                        continue
                    total += float(causal_lm_loss_sum(self.model, batch.input_ids.to(self.device), batch.position_ids.to(self.device),
                                                      None if batch.attention_mask is None else batch.attention_mask.to(self.device),
                                                      batch.segments, batch.predict_at.to(self.device), batch.targets.to(self.device)))
                    count += int(batch.targets.numel())
        finally:
            self.model.train()
        total, count = self.all_sum([total, float(count)])
        return total / count if count else None

    def summary(self) -> dict[str, Any]:
        losses = [row["loss"] for row in self.history if row.get("loss") is not None]
        return {
            "train_loss": losses[-1] if losses else None,
            "val_loss": self.last_val,
            "best_val_loss": self.best_val,
            "steps": self.cursor.step,
            "epochs": round(self.epochs_done(), 4),
            "examples": self.examples,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "tokens_per_s": round(self.tokens / self.train_s, 2) if self.train_s else 0.0,
            "train_s": round(self.train_s, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_gpu_bytes": self.peak_gpu_bytes(),
        }
