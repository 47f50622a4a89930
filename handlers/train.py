"""`train`: fine-tune a model on the user's data in a worker process, and register what it made.

Parameters are resolved in layers: the defaults, then a preset, then (when resuming) the
checkpoint's own parameters, then what the request names. A resumed run may change only what does
not alter the trajectory (length, evaluation, checkpoints, output); anything else is refused, so
"resume" always means the run the checkpoint came from.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec

from handlers.context import Context
from protocol import messages as m
from protocol.errors import Cancelled, RpcError

DEFAULTS: dict[str, Any] = {
    "validation": None, "validation_split": 0.1, "preset": None, "method": "lora", "lora_rank": 16, "lora_alpha": 32.0,
    "lora_dropout": 0.05, "target_modules": "all-linear", "loss_on": "auto", "chat_template": None, "max_seq_length": 2048,
    "batch_size": 8, "batch_tokens": None, "packing": True, "gradient_accumulation": 1, "learning_rate": 2e-4,
    "lr_schedule": "cosine", "warmup_steps": None, "warmup_ratio": 0.03, "weight_decay": 0.0, "max_grad_norm": 1.0,
    "epochs": 1.0, "max_steps": None, "gradient_checkpointing": False, "seed": 42, "eval_every": None,
    "early_stopping_patience": None, "checkpoint_every": None, "strict": False, "resume_from": None, "output": None,
    "name": None, "distributed": {"processes": 1, "backend": "auto"}, "options": {},
}

PRESETS: dict[str, dict[str, Any]] = {
    # seconds on a laptop CPU: for demos and smoke tests
    "quick": {"method": "lora", "lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "max_steps": 30, "batch_size": 4,
              "learning_rate": 1e-3, "warmup_steps": 3, "max_seq_length": 512, "eval_every": 10, "validation_split": 0.1},
    # a real 0.5-3B model: the settings most LoRA recipes converge on
    "quality": {"method": "lora", "lora_rank": 16, "lora_alpha": 32.0, "lora_dropout": 0.05, "epochs": 3.0,
                "batch_size": 4, "gradient_accumulation": 4, "learning_rate": 2e-4, "warmup_ratio": 0.03,
                "lr_schedule": "cosine", "max_seq_length": 2048, "gradient_checkpointing": True, "eval_every": 50,
                "early_stopping_patience": 3, "checkpoint_every": 100},
}

# What a resumed run may change: none of it alters the trajectory up to the checkpoint.
# (Not the number of processes: it changes how an epoch is cut into micro-batches.)
RESUMABLE_CHANGES = {"max_steps", "epochs", "eval_every", "early_stopping_patience", "checkpoint_every", "output", "name",
                     "resume_from", "strict"}


def resolve_params(params: m.TrainParams, checkpoint_params: dict[str, Any] | None) -> dict[str, Any]:
    explicit = msgspec.to_builtins(params)
    if "distributed" in explicit:
        explicit["distributed"] = {**DEFAULTS["distributed"], **explicit["distributed"]}
    resolved = dict(DEFAULTS)
    preset = explicit.get("preset", (checkpoint_params or {}).get("preset"))
    if preset:
        resolved.update(PRESETS[preset])
    if checkpoint_params:
        resolved.update(checkpoint_params)
        for key, value in explicit.items():
            if key not in RESUMABLE_CHANGES and key in checkpoint_params and checkpoint_params[key] != value:
                raise RpcError.invalid_params(f"params.{key}", f"the checkpoint was trained with {key}={checkpoint_params[key]!r}; a resumed "
                                                   f"run keeps it (leave {key} out, or start a new run without resume_from)")
    resolved.update(explicit)
    resolved["preset"] = preset
    resolved["distributed"] = {**DEFAULTS["distributed"], **(resolved.get("distributed") or {})}
    _check(resolved)
    return resolved


def _check(p: dict[str, Any]) -> None:
    if not p.get("model"):
        raise RpcError.invalid_params("params.model", "required: a model reference (builtin:tiny, a directory, an artifact id or an HF id)")
    if not p.get("data"):
        raise RpcError.invalid_params("params.data", "required: a dataset file (JSONL, JSON, CSV, TSV or Parquet)")
    positive = ["lora_rank", "max_seq_length", "batch_size", "gradient_accumulation"]
    for key in positive:
        if int(p[key]) < 1:
            raise RpcError.invalid_params(f"params.{key}", f"must be at least 1, got {p[key]}")
    for key in ("batch_tokens", "max_steps", "eval_every", "checkpoint_every", "early_stopping_patience", "warmup_steps"):
        if p[key] is not None and int(p[key]) < (0 if key == "warmup_steps" else 1):
            raise RpcError.invalid_params(f"params.{key}", f"must be a positive integer or null, got {p[key]}")
    if not 0.0 <= float(p["validation_split"]) < 1.0:
        raise RpcError.invalid_params("params.validation_split", f"must be in [0, 1), got {p['validation_split']}")
    if not 0.0 <= float(p["lora_dropout"]) < 1.0:
        raise RpcError.invalid_params("params.lora_dropout", f"must be in [0, 1), got {p['lora_dropout']}")
    if float(p["learning_rate"]) <= 0:
        raise RpcError.invalid_params("params.learning_rate", f"must be positive, got {p['learning_rate']}")
    if float(p["epochs"]) <= 0 and not p["max_steps"]:
        raise RpcError.invalid_params("params.epochs", "must be positive (or give max_steps)")
    if p["batch_tokens"] is not None and p["batch_tokens"] < p["max_seq_length"]:
        raise RpcError.invalid_params("params.batch_tokens", f"must be at least max_seq_length ({p['max_seq_length']}) so every example fits")
    processes = int(p["distributed"].get("processes", 1))
    if not 1 <= processes <= 64:
        raise RpcError.invalid_params("params.distributed.processes", f"must be between 1 and 64, got {processes}")
    if p["early_stopping_patience"] and not p["eval_every"]:
        raise RpcError.invalid_params("params.early_stopping_patience", "needs eval_every (early stopping watches the validation loss)")


class _Reporter:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def progress(self, stage: str, step: int | None = None, total: int | None = None, message: str | None = None,
                 metrics: dict[str, float] | None = None) -> None:
        self.ctx.progress(stage, step, total, message, metrics)

    def log(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.ctx.log(level, message, data)

    def cancel_requested(self) -> bool:
        return self.ctx.cancelled.is_set()


def train(params: m.TrainParams, ctx: Context) -> m.TrainResult:
    from runtimes.train.checkpoint import read_state

    services = ctx.services
    checkpoint: Path | None = None
    checkpoint_state: dict[str, Any] | None = None
    resume = None if params.resume_from is msgspec.UNSET else params.resume_from
    if resume:
        checkpoint = services.paths.check(Path(resume).expanduser())
        checkpoint_state = read_state(checkpoint)
    p = resolve_params(params, checkpoint_state["params"] if checkpoint_state else None)
    lora_path = (p.get("options") or {}).get("lora_path")
    if lora_path:
        services.paths.check(Path(lora_path).expanduser())  # containment before anything else, even for a refused field
        raise RpcError.invalid_params("params.options.lora_path", "applies to GGUF models on llama.cpp (generate, embed); "
                                      "train fine-tunes Hugging Face models: leave it out")
    p["resume_from"] = str(checkpoint) if checkpoint else None

    _output_path(services, p, ctx)  # refuse a taken output before spending minutes on training
    ctx.progress("resolve", 0, 1, f"resolving {p['model']}")
    model = services.models.resolve(p["model"], lambda step, total, message: ctx.progress("resolve", step, total, message))
    from runtimes.hf.lm import check_model_dir

    check_model_dir(model.path, bool((p.get("options") or {}).get("allow_pickle")))  # before minutes of tokenizing
    data = _load_data(p, ctx, model.path, checkpoint_state)
    ctx.check_cancelled()

    run_id = getattr(ctx, "run_id", None) or f"local-{int(time.time())}"
    run_dir = services.config.home / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    state_extra = {"params": p, "model_path": str(model.path), "datasets": data.hashes}
    outcome = _run(model.path, p, data.tokenized, ctx, run_dir, checkpoint, state_extra)
    files = _write_reports(run_dir, outcome, p)
    if outcome.stopped == "cancelled":
        raise Cancelled({"checkpoint": outcome.last_checkpoint, "step": outcome.step, "total": outcome.total_steps,
                         "run_id": run_id, "run_dir": str(run_dir)})
    artifact = _register(services, ctx, p, model, outcome, data, run_id)
    return m.TrainResult(artifact=artifact, run_id=run_id, stopped=outcome.stopped, metrics=m.TrainMetrics(**outcome.metrics),
                         files=files, checkpoints=outcome.checkpoints, params=p)


class _Data:
    def __init__(self, tokenized: Any, hashes: dict[str, str], tokenizer: Any) -> None:
        self.tokenized, self.hashes, self.tokenizer = tokenized, hashes, tokenizer


def _load_data(p: dict[str, Any], ctx: Context, model_path: Path, checkpoint_state: dict[str, Any] | None) -> _Data:
    from handlers.datasets import open_dataset
    from runtimes.train.sft_data import split_examples
    from runtimes.train.sft_tokenize import end_of_turn_id, load_tokenizer, stop_token_ids, tokenize_examples
    from runtimes.train.trainer import TrainData

    loaded = {}
    for role in ("data", "validation"):
        if p[role] is not None:
            ctx.progress("data", 0, 1, f"reading the {role} file")
            dataset = open_dataset(msgspec.convert(p[role], m.DatasetArg), ctx, strict=bool(p["strict"]), field=f"params.{role}")
            _report_problems(ctx, role, dataset.path, dataset.problems)
            loaded[role] = dataset
    hashes = {role: dataset.sha256 for role, dataset in loaded.items()}
    if checkpoint_state and checkpoint_state.get("datasets") and checkpoint_state["datasets"] != hashes:
        raise RpcError.failed("dataset_invalid", "the data changed since the checkpoint was written (its sha256 differs); "
                              "resume needs the same files, or start a new run without resume_from",
                              checkpoint=checkpoint_state["datasets"], now=hashes)
    train_examples = loaded["data"].examples
    val_examples = loaded["validation"].examples if "validation" in loaded else []
    if "validation" not in loaded and p["validation_split"] > 0:
        if len(train_examples) >= 10:
            train_examples, val_examples = split_examples(train_examples, p["validation_split"], p["seed"])
        else:
            ctx.log("info", f"{len(train_examples)} examples are too few to hold some out for validation; training on all of them")
    tokenizer = load_tokenizer(model_path)
    total = len(train_examples) + len(val_examples)
    kwargs = {"chat_template": p["chat_template"], "loss_on": p["loss_on"], "max_seq_length": p["max_seq_length"],
              "stop_ids": stop_token_ids(tokenizer, model_path)}
    tokenized = {}
    for role, examples, offset in (("data", train_examples, 0), ("validation", val_examples, len(train_examples))):
        def on_progress(done: int, offset: int = offset) -> None:
            ctx.progress("tokenize", offset + done, total, f"tokenized {offset + done}/{total}")
            ctx.check_cancelled({"tokenized": offset + done})

        tokens, problems = tokenize_examples(examples, tokenizer, on_progress=on_progress, **kwargs)
        if problems and p["strict"]:
            raise RpcError.failed("dataset_invalid", f"{role}: {len(problems)} examples cannot be trained on (strict mode): " +
                                  "; ".join(f"row {x.row}: {x.reason}" for x in problems[:5]),
                                  problems=[{"row": x.row, "reason": x.reason} for x in problems[:10]])
        _report_problems(ctx, role, None, problems)
        fallbacks = [t.row for t in tokens if getattr(t, "fallback", False)]
        if fallbacks:
            ctx.log("warning", f"{role}: the chat template cannot be split turn by turn for {len(fallbacks)} conversations; "
                               "only their last assistant answer is trained", {"rows": fallbacks[:100]})
        tokenized[role] = tokens
    if not tokenized["data"]:
        raise RpcError.failed("dataset_invalid", "no example of the data can be trained on (see the $/log lines for why)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)
    return _Data(TrainData(tokenized["data"], tokenized["validation"], pad_id), hashes, tokenizer)


def _report_problems(ctx: Context, role: str, path: Path | None, problems: list[Any]) -> None:
    if not problems:
        return
    rows = [{"row": x.row, "reason": x.reason} for x in problems[:100]]
    where = f" of {path.name}" if path else ""
    first = "; ".join(f"row {x.row}: {x.reason}" for x in problems[:3])
    ctx.log("warning", f"{role}: skipped {len(problems)} rows{where} ({first}{'; ...' if len(problems) > 3 else ''})",
            {"role": role, "skipped": len(problems), "rows": rows})


def _run(model_path: Path, p: dict[str, Any], data: Any, ctx: Context, run_dir: Path, checkpoint: Path | None,
         state_extra: dict[str, Any]) -> Any:
    from runtimes.train.trainer import TrainConfig, run_training

    config = TrainConfig.from_params({**p, **(p.get("options") or {})})
    world_size = int(p["distributed"]["processes"])
    reporter = _Reporter(ctx)
    ctx.progress("load", 0, 1, f"loading {p['model']} for {p['method']} training")
    if world_size == 1:
        return run_training(model_path, config, data, reporter, run_dir=run_dir, resume_from=checkpoint, state_extra=state_extra)
    return _run_distributed(model_path, config, data, reporter, run_dir, checkpoint, state_extra, world_size,
                            p["distributed"].get("backend", "auto"))


def _run_distributed(model_path: Path, config: Any, data: Any, reporter: _Reporter, run_dir: Path, checkpoint: Path | None,
                     state_extra: dict[str, Any], world_size: int, backend: str) -> Any:
    import torch.distributed as dist

    from runtimes.train import distributed as ddp
    from runtimes.hf.lm import pick_device
    from runtimes.train.trainer import run_training

    backend = ddp.pick_backend(backend, pick_device(config.device))
    port = ddp.free_port()
    spec = run_dir / "distributed.json"
    ddp.write_spec(spec, model_path=model_path, config=config, data=data, run_dir=run_dir, resume_from=checkpoint,
                   state_extra=state_extra, world_size=world_size, port=port, backend=backend)
    reporter.log("info", f"training with {world_size} processes (DDP, {backend})")
    ranks = ddp.launch_ranks(spec, world_size)
    try:
        ddp.init_group(0, world_size, port, backend)
        try:
            return run_training(model_path, config, data, reporter, run_dir=run_dir, resume_from=checkpoint,
                                state_extra=state_extra, rank=0, world_size=world_size)
        finally:
            dist.destroy_process_group()
    finally:
        codes = ddp.stop_ranks(ranks)
        spec.unlink(missing_ok=True)
        if any(codes):
            reporter.log("warning", f"distributed ranks exited with codes {codes}")


def _write_reports(run_dir: Path, outcome: Any, p: dict[str, Any]) -> m.TrainFiles:
    from runtimes.train.report import plot_loss, write_metrics

    csv_path, json_path = write_metrics(run_dir, outcome.history, {**outcome.metrics, "stopped": outcome.stopped})
    png = plot_loss(run_dir, outcome.history, f"{p['method']} on {Path(p['data'] if isinstance(p['data'], str) else p['data']['path']).name} ({p['model']})")
    return m.TrainFiles(run_dir=str(run_dir), metrics_csv=str(csv_path), metrics_json=str(json_path),
                        loss_curve_png=str(png) if png else None)


def _output_path(services: Any, p: dict[str, Any], ctx: Context) -> tuple[str, str, Path]:
    from handlers.outputs import destination

    kind = "model" if p["method"] == "full" else "adapter"
    name, dest = destination(services, f"{kind}s", output=p["output"], name=p["name"],
                             default_name=f"{kind}-{getattr(ctx, 'run_id', None) or int(time.time())}")
    return kind, name, dest


def _register(services: Any, ctx: Context, p: dict[str, Any], model: Any, outcome: Any, data: _Data, run_id: str) -> m.Artifact:
    kind, name, dest = _output_path(services, p, ctx)
    parents = [model.artifact_id] if getattr(model, "artifact_id", None) else []
    ctx.progress("save", 0, 1, f"writing the {kind} to {dest}")
    with services.registry.write_artifact(kind, dest, name=name, params=p, parents=parents, run_id=run_id) as pending:
        if kind == "model":
            from runtimes.train.trainer import _base_model

            _base_model(outcome.model).save_pretrained(str(pending.path), safe_serialization=True)
            data.tokenizer.save_pretrained(str(pending.path))
        else:
            outcome.model.save_pretrained(str(pending.path))
        pending.metrics = dict(outcome.metrics, stopped=outcome.stopped)
        pending.extra_manifest = {"base_model": {"reference": p["model"], "path": str(model.path), "source": model.source},
                                  "datasets": data.hashes}
    ctx.progress("save", 1, 1, f"registered {pending.record.id}")
    return m.Artifact(**pending.record.to_dict())
