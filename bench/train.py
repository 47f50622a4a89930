"""Training benchmark: our sidecar's `train` (LoRA) against TRL's SFTTrainer, in one run.

    python bench/train.py                    # default: 2,000 examples, 3 runs each (long on 2 cores: see README)
    python bench/train.py --quick            # smoke run: 200 examples, 1 run each
    python bench/train.py --only baseline    # TRL alone (e.g. while `train` is not there yet)
    python bench/train.py --runs 5 --examples 600 --only both

The model: SmolLM2-135M's shape with seeded random weights, the HF directory bench/generate.py builds (reused
from its cache), copied once into bench/results/train-cache/<version>/model with a ChatML chat template (the
one builtin:tiny uses, runtimes/tiny.py) in tokenizer_config.json and, as builtin:tiny does, <|endoftext|> kept
as the tokenizer's eos_token while generation_config.json's eos_token_id becomes [0, 2], so generation stops
at <|im_end|> as well as at <|endoftext|>.

The data: `--examples` (2,000) chat examples in OpenAI `messages` JSONL, generated from a seed: a system turn in
about 30%, two user/assistant exchanges in `--two-turn` (10%), the rest one exchange. The answers follow the
question (repeat a word list, reverse it, say a word n times, count, sort numbers, spell a word, answer from a
small fact table), so the loss can drop, and their lengths are skewed (most a few tokens, a few hundreds), so
padding matters. Validation: `--val-examples` (200) more from the same generator (another seed), all with one
answer, so both sides' losses there cover exactly the same tokens.

What runs (the sides alternate order run by run; same data, seed and hyperparameters; medians over `--runs`):

- ours: `python -m sidecar` (MLSIDECAR_HOME a temporary directory, MLSIDECAR_ALLOWED_ROOTS the cache and the
  work directory) driven over its pipes with sidecar/client.py; one `train` request per run: LoRA r 16, alpha 32,
  dropout 0, all-linear, batch 8, no accumulation, lr 2e-4 linear, no warm-up, no weight decay, max_grad_norm 1,
  one epoch, max_seq_length 1024, packing on, no evaluation or checkpoints during training, gradient
  checkpointing as `--gradient-checkpointing` (off). Its numbers: metrics.tokens / metrics.train_s,
  metrics.peak_rss_bytes (the worker's peak RSS), metrics.val_loss, and the adapter at artifact.path.
- baseline: TRL's SFTTrainer in a fresh `python bench/train.py --baseline-worker` process (so its peak RSS is
  its own): the same model loaded in float32, peft LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
  target_modules="all-linear", task_type="CAUSAL_LM"), SFTConfig with the same hyperparameters, TRL's
  batching defaults (padding to the longest in the batch, no packing, padding_free False), max_length 1024,
  bf16 False and gradient_checkpointing as for ours (TRL's own defaults are True for both; we compare like
  with like: float32, same checkpointing), use_cpu, dataloader_num_workers 0, no eval or saving during
  training, report_to none, torch threads `--threads`. The data goes in TRL's conversational
  prompt/completion format (prompt = the messages before the last assistant message, completion = that
  message), so TRL computes the loss on the completion only. Real tokens = the sum of attention_mask over
  every training batch (a wrapper around TRL's collator, which also counts the padded and the loss tokens);
  train time = trainer.train() wall time (model load and TRL's tokenization happen before); peak RSS =
  VmHWM of that process at its end (after trainer.evaluate() on the validation set, TRL's own val loss).

Both adapters are then scored by one evaluator in this process: base model + the PEFT adapter (peft), for each
validation example the cross-entropy of the assistant answer's tokens (its content and the <|im_end|> that
closes it) given everything before, averaged over all those tokens. The val-loss target uses it; each tool's
own number is reported too. Note: in two-turn training examples ours trains both answers, TRL (prompt/
completion) only the last one; `--two-turn 0` makes both train exactly the same tokens.

Targets: training tokens/s >= 1.5x the baseline's; peak RSS <= the baseline's; validation loss <= 1.05x the
baseline's. It prints a table and a JSON document (also written to bench/results/train.json). The exit code
is 0 even when a target is missed or ours could not run: it is a measurement; look for FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "train.json"
CACHE = ROOT / "bench" / "results" / "train-cache"
sys.path.insert(0, str(ROOT))

from bench.generate import CACHE as GENERATE_CACHE  # noqa: E402
from bench.generate import build_assets  # noqa: E402
from bench.report import fmt, git_commit, print_aligned, verdict  # noqa: E402
from protocol.version import PROTOCOL_VERSION  # noqa: E402
from runtimes.tiny import CHAT_TEMPLATE  # noqa: E402 - the same ChatML template as builtin:tiny
from sidecar.client import SidecarError, SidecarProcess  # noqa: E402

TRAIN_VERSION = "train-v1"  # bump whenever the copied model directory changes
IM_END_ID = 2

SPEED_TARGET = 1.5  # ours / baseline, real tokens per second
RSS_TARGET = 1.0  # ours / baseline, peak RSS
VAL_LOSS_TARGET = 1.05  # ours / baseline, independent evaluator

# The hyperparameters both sides use (the names are our protocol's; baseline_worker maps them onto SFTConfig).
HYPER: dict[str, Any] = {
    "method": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear",
    "batch_size": 8, "gradient_accumulation": 1, "learning_rate": 2e-4, "lr_schedule": "linear", "warmup_steps": 0,
    "weight_decay": 0.0, "max_grad_norm": 1.0, "epochs": 1, "max_seq_length": 1024,
}
PROGRESS_EVERY_S = 20.0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- the model


def build_model(cache_dir: Path, rebuild: bool) -> dict[str, Any]:
    """bench/generate.py's HF directory (built there once), copied once with a chat template; atomic."""
    base = cache_dir / TRAIN_VERSION
    model_dir = base / "model"
    if rebuild and model_dir.exists():
        shutil.rmtree(model_dir)
    info_path = base / "build.json"
    if not (model_dir / "model.safetensors").exists():
        GENERATE_CACHE.mkdir(parents=True, exist_ok=True)
        source = build_assets(GENERATE_CACHE.resolve(), [], False)  # no GGUF: only the HF directory
        _log(f"copying the model into {model_dir} with a ChatML chat template (once) ...")
        base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="model-", dir=base))
        try:
            for item in Path(source["hf_dir"]).iterdir():
                try:
                    os.link(item, staging / item.name)  # the 540 MB of weights once on disk, when possible
                except OSError:
                    shutil.copy2(item, staging / item.name)
            for name in ("tokenizer_config.json", "generation_config.json"):  # edited below: own copies, not links
                shutil.copy2(Path(source["hf_dir"]) / name, staging / f"{name}.tmp")
                os.replace(staging / f"{name}.tmp", staging / name)
            tokenizer_config = json.loads((staging / "tokenizer_config.json").read_text(encoding="utf-8"))
            # As builtin:tiny (runtimes/tiny.py): the ChatML template; <|endoftext|> stays the eos_token (a document's
            # end) and generation stops at either <|endoftext|> or <|im_end|> (generation_config below).
            tokenizer_config["chat_template"] = CHAT_TEMPLATE
            _write_json(staging / "tokenizer_config.json", tokenizer_config)
            generation = json.loads((staging / "generation_config.json").read_text(encoding="utf-8"))
            generation["eos_token_id"] = [0, IM_END_ID]
            _write_json(staging / "generation_config.json", generation)
            if model_dir.exists():
                shutil.rmtree(model_dir)
            staging.rename(model_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _write_json(info_path, {"version": TRAIN_VERSION, "source": source.get("version"), "source_dir": source["hf_dir"],
                                "parameters": source.get("parameters")})
    info: dict[str, Any] = json.loads(info_path.read_text()) if info_path.exists() else {}
    info["model_dir"] = str(model_dir)
    info["model_bytes"] = (model_dir / "model.safetensors").stat().st_size
    return info


# ----------------------------------------------------------------------------- the data

_WORDS = (
    "apple river stone green house cloud window garden yellow bread music paper silver winter summer forest "
    "candle mirror orange little table planet ocean bridge rabbit thunder honey castle pencil shadow circle "
    "market morning evening basket mountain valley number letter flower button ladder kitten dragon island "
    "rocket violin marble feather lemon copper pepper meadow harbor lantern"
).split()
_FACTS = [  # (country, capital, colour of its flag, its animal): a small made-up table to learn
    ("Valdoria", "Merenth", "blue", "heron"), ("Ostrava Minor", "Kelb", "red", "lynx"), ("Tirnelle", "Sopra", "green", "otter"),
    ("Quenmark", "Hallow", "white", "falcon"), ("Brisca", "Doru", "black", "bison"), ("Amberlay", "Fenwick", "gold", "fox"),
    ("Corvania", "Ysel", "purple", "raven"), ("Mistral Isles", "Port Anse", "silver", "seal"), ("Delmarch", "Rook", "orange", "badger"),
    ("Sunhollow", "Emberly", "yellow", "lark"), ("Nordvik", "Isgard", "grey", "wolf"), ("Palenque Alta", "Cima", "teal", "condor"),
    ("Westerhall", "Lune", "brown", "stag"), ("Kirrin", "Ashby", "pink", "crane"), ("Ferrow", "Tallis", "navy", "boar"),
    ("Umbria Nova", "Sant Olm", "crimson", "viper"),
]
_SYSTEM = ["You are a helpful assistant.", "You are a careful assistant. Follow the instruction exactly.",
           "Answer in as few words as possible.", "You are a precise assistant that never adds commentary."]


def _items(rng: random.Random) -> int:
    """How many items an answer lists: skewed, most a few, a few many."""
    r = rng.random()
    if r < 0.55:
        return rng.randint(1, 5)
    if r < 0.87:
        return rng.randint(6, 16)
    if r < 0.975:
        return rng.randint(17, 40)
    return rng.randint(41, 100)


def _exchange(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair; the answer follows from the question."""
    kind = rng.choices(["repeat", "reverse", "times", "count", "sort", "spell", "fact"], weights=[3, 2, 2, 2, 1, 2, 3])[0]
    if kind == "fact":
        country, capital, colour, animal = rng.choice(_FACTS)
        q, a = rng.choice([
            (f"What is the capital of {country}?", f"The capital of {country} is {capital}."),
            (f"Which city is the capital of {country}?", f"{capital}."),
            (f"What colour is the flag of {country}?", f"The flag of {country} is {colour}."),
            (f"What is the national animal of {country}?", f"The national animal of {country} is the {animal}."),
            (f"Tell me about {country}.", f"{country} has its capital in {capital}, a {colour} flag and the {animal} as its animal."),
        ])
        return q, a
    n = _items(rng)
    if kind == "repeat":
        words = [rng.choice(_WORDS) for _ in range(n)]
        return rng.choice(["Repeat after me: ", "Say exactly this: ", "Copy these words: "]) + " ".join(words), " ".join(words)
    if kind == "reverse":
        words = [rng.choice(_WORDS) for _ in range(n)]
        return rng.choice(["Reverse the order of these words: ", "Say these words backwards: "]) + " ".join(words), " ".join(words[::-1])
    if kind == "times":
        word = rng.choice(_WORDS)
        return rng.choice([f"Say {word} {n} times.", f"Write the word {word} {n} times."]), " ".join([word] * n)
    if kind == "count":
        start = rng.randint(0, 200)
        if rng.random() < 0.7:
            return f"Count from {start} to {start + n - 1}.", ", ".join(str(start + i) for i in range(n))
        return f"Count down from {start + n - 1} to {start}.", ", ".join(str(start + n - 1 - i) for i in range(n))
    if kind == "sort":
        numbers = [rng.randint(0, 99) for _ in range(min(n, 30))]
        return "Sort these numbers: " + " ".join(map(str, numbers)), " ".join(map(str, sorted(numbers)))
    word = rng.choice(_WORDS)
    return rng.choice([f"Spell {word}.", f"How do you spell {word}?"]), "-".join(word)


def make_examples(count: int, seed: int, two_turn: float, system: float = 0.3) -> list[dict[str, Any]]:
    """count deterministic chat examples (same arguments, same list) in OpenAI `messages` form."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        messages: list[dict[str, str]] = []
        if rng.random() < system:
            messages.append({"role": "system", "content": rng.choice(_SYSTEM)})
        for _ in range(2 if rng.random() < two_turn else 1):
            question, answer = _exchange(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"messages": messages})
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(partial, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def encode_example(tokenizer: Any, messages: list[dict[str, str]]) -> dict[str, Any]:
    """The conversation's ids through the chat template, and where the last answer (content + <|im_end|>) lies."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    ids = tokenizer.encode(full, add_special_tokens=False)
    if ids[:len(prompt_ids)] != prompt_ids:
        raise RuntimeError(f"the prompt does not tokenize as a prefix of the conversation: {full!r}")
    end = ids.index(IM_END_ID, len(prompt_ids)) + 1
    answers = sum(len(tokenizer.encode(m["content"], add_special_tokens=False)) + 1 for m in messages if m["role"] == "assistant")
    return {"ids": ids, "answer_start": len(prompt_ids), "answer_end": end, "answer_tokens_all_turns": answers}


def data_stats(tokenizer: Any, rows: list[dict[str, Any]], batch_size: int, seed: int) -> dict[str, Any]:
    encoded = [encode_example(tokenizer, r["messages"]) for r in rows]
    lengths = [len(e["ids"]) for e in encoded]
    answers = [e["answer_end"] - e["answer_start"] for e in encoded]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)  # an estimate: the padding of random batches (TRL's real figure is measured)
    padded = sum(max(lengths[i] for i in order[s:s + batch_size]) * len(order[s:s + batch_size]) for s in range(0, len(order), batch_size))

    def quantiles(xs: list[int]) -> dict[str, float]:
        xs = sorted(xs)
        return {"mean": round(statistics.fmean(xs), 1), "median": xs[len(xs) // 2], "p90": xs[int(len(xs) * 0.9)],
                "p99": xs[min(len(xs) - 1, int(len(xs) * 0.99))], "max": xs[-1], "min": xs[0]}

    return {
        "examples": len(rows), "tokens": sum(lengths), "tokens_per_example": quantiles(lengths),
        "last_answer_tokens": quantiles(answers), "answer_tokens_all_turns": sum(e["answer_tokens_all_turns"] for e in encoded),
        "last_answer_tokens_total": sum(answers),
        "with_system": sum(1 for r in rows if r["messages"][0]["role"] == "system"),
        "two_turn": sum(1 for r in rows if sum(m["role"] == "assistant" for m in r["messages"]) > 1),
        "over_max_seq_length": sum(1 for n in lengths if n > HYPER["max_seq_length"]),
        "padding_fraction_estimate_random_batches": round(1 - sum(lengths) / padded, 3),
    }


def prepare_data(cache_dir: Path, examples: int, val_examples: int, seed: int, two_turn: float) -> dict[str, Any]:
    data_dir = cache_dir / TRAIN_VERSION / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{examples}-s{seed}-t{two_turn:g}"
    train_path, val_path = data_dir / f"train-{tag}.jsonl", data_dir / f"val-{val_examples}-s{seed}.jsonl"
    write_jsonl(train_path, make_examples(examples, seed, two_turn))
    write_jsonl(val_path, make_examples(val_examples, seed + 1_000_003, two_turn=0.0))  # one answer each
    return {"train": str(train_path), "validation": str(val_path)}


# ----------------------------------------------------------------------------- the machine's load


class Load:
    """CPU used by other processes during a run: /proc/stat busy time minus this process tree's (this process and
    its reaped children, the live sidecar with its reaped workers, and its live children), in CPUs."""

    def __init__(self, hz: int = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100) -> None:
        self.hz = hz
        self.available = Path("/proc/stat").exists()

    @staticmethod
    def _proc_ticks(pid: int, with_children: bool) -> int:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if with_children else 0)
        except (OSError, IndexError, ValueError):
            return 0

    def _tree(self, sidecar_pid: int | None) -> float:
        times = os.times()
        seconds = times.user + times.system + times.children_user + times.children_system
        if sidecar_pid:
            ticks = self._proc_ticks(sidecar_pid, True)
            for task in Path(f"/proc/{sidecar_pid}/task").glob("*/children"):
                try:
                    ticks += sum(self._proc_ticks(int(c), True) for c in task.read_text().split())
                except OSError:
                    pass
            seconds += ticks / self.hz
        return seconds

    def snapshot(self, sidecar_pid: int | None = None) -> tuple[float, float, float] | None:
        if not self.available:
            return None
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, _steal = values
        return time.perf_counter(), (user + nice + system + irq + softirq) / self.hz, self._tree(sidecar_pid)

    @staticmethod
    def foreign(before: tuple | None, after: tuple | None) -> dict[str, float]:
        if before is None or after is None or after[0] <= before[0]:
            return {}
        seconds = after[0] - before[0]
        return {"foreign_cpus": round(max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / seconds), 3)}


LOAD = Load()


# ----------------------------------------------------------------------------- ours


def ours_params(model_dir: str, data: dict[str, str], output: Path, seed: int, gradient_checkpointing: bool) -> dict[str, Any]:
    return {"model": model_dir, "data": data["train"], "validation": data["validation"], **HYPER, "seed": seed,
            "eval_every": None, "checkpoint_every": None, "packing": True, "gradient_checkpointing": gradient_checkpointing,
            "output": str(output)}


def run_ours(sidecar: SidecarProcess, params: dict[str, Any], label: str) -> dict[str, Any]:
    """One `train` request; progress lines now and then; the result's metrics and artifact."""
    last = {"at": 0.0}
    started = time.perf_counter()

    def on_event(message: dict[str, Any]) -> None:
        if message.get("method") != "$/progress":
            return
        now = time.perf_counter()
        if now - last["at"] < PROGRESS_EVERY_S:
            return
        last["at"] = now
        p = message.get("params") or {}
        metrics = p.get("metrics") or {}
        parts = [f"[{label}] {now - started:6.0f}s {p.get('stage', '')}"]
        if p.get("step") is not None:
            parts.append(f"step {p['step']}/{p.get('total') or '?'}")
        for key, form in (("loss", "loss {:.3f}"), ("lr", "lr {:.2e}"), ("tokens_per_s", "{:.0f} tok/s"), ("eta_s", "eta {:.0f}s")):
            if isinstance(metrics.get(key), (int, float)):
                parts.append(form.format(metrics[key]))
        if not metrics and p.get("message"):
            parts.append(str(p["message"])[:80])
        _log(" ".join(parts))

    before = LOAD.snapshot(sidecar.proc.pid)
    result = sidecar.request("train", params, on_event=on_event)
    wall = time.perf_counter() - started
    metrics = result["metrics"]
    tokens, train_s = int(metrics["tokens"]), float(metrics["train_s"])
    return {
        **LOAD.foreign(before, LOAD.snapshot(sidecar.proc.pid)),
        "request_s": round(wall, 2), "train_s": train_s, "tokens": tokens,
        "tokens_per_s": tokens / train_s if train_s > 0 else 0.0, "reported_tokens_per_s": metrics.get("tokens_per_s"),
        "trained_tokens": metrics.get("trained_tokens"), "peak_rss_bytes": int(metrics["peak_rss_bytes"]),
        "own_val_loss": metrics.get("val_loss"), "train_loss": metrics.get("train_loss"), "steps": metrics.get("steps"),
        "examples": metrics.get("examples"), "adapter": result["artifact"]["path"], "stopped": result.get("stopped"),
    }


def ours_failure(exc: BaseException) -> dict[str, Any]:
    """What to say when `train` cannot run: not there yet, or failed."""
    if isinstance(exc, SidecarError):
        detail = exc.error.get("data") or {}
        if exc.code == -32601:
            return {"status": "unavailable", "reason": f"the sidecar has no `train` method (method not found): {exc}"}
        if "No module named 'handlers.train'" in str(exc):
            return {"status": "unavailable", "reason": "`train` is in the contract but not implemented yet (no handlers/train.py)"}
        return {"status": "failed", "reason": str(exc), "kind": detail.get("kind"), "detail": detail.get("detail")}
    return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}


# ----------------------------------------------------------------------------- the baseline (TRL)


def run_baseline(spec: dict[str, Any], workdir: Path, label: str) -> dict[str, Any]:
    """The baseline in a fresh process (its peak RSS its own); returns what it wrote."""
    spec_path = workdir / f"{label}-spec.json"
    result_path = workdir / f"{label}-result.json"
    _write_json(spec_path, {**spec, "result": str(result_path), "label": label})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    before = LOAD.snapshot()
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--baseline-worker", str(spec_path)],
                          cwd=str(ROOT), env=env, stdout=sys.stderr, check=False)  # our stdout carries the JSON
    wall = time.perf_counter() - started
    load = LOAD.foreign(before, LOAD.snapshot())
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"the baseline process exited with {proc.returncode} (its stderr is above)")
    result = json.loads(result_path.read_text())
    return {**load, "process_s": round(wall, 2), **result}


def baseline_worker(spec_path: Path) -> int:
    """Runs in its own process: TRL SFTTrainer, one epoch, then TRL's own evaluation and the adapter saved."""
    spec = json.loads(spec_path.read_text())
    label = spec["label"]
    import torch

    torch.set_num_threads(spec["threads"])
    import datasets
    import transformers
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    hyper = spec["hyper"]

    def prompt_completion(path: str) -> Any:
        rows = []
        for row in read_jsonl(Path(path)):
            messages = row["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            rows.append({"prompt": messages[:last], "completion": [messages[last]]})
        return datasets.Dataset.from_list(rows)

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, local_files_only=True)
    config = SFTConfig(
        output_dir=str(Path(spec["output"]) / "trainer"), seed=spec["seed"],
        per_device_train_batch_size=hyper["batch_size"], gradient_accumulation_steps=hyper["gradient_accumulation"],
        learning_rate=hyper["learning_rate"], lr_scheduler_type=hyper["lr_schedule"], warmup_steps=hyper["warmup_steps"],
        weight_decay=hyper["weight_decay"], max_grad_norm=hyper["max_grad_norm"], num_train_epochs=hyper["epochs"],
        max_length=hyper["max_seq_length"], packing=False, padding_free=False,  # TRL's defaults for batching
        bf16=False, gradient_checkpointing=spec["gradient_checkpointing"],  # like ours: float32, same checkpointing
        eval_strategy="no", save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, logging_steps=10,
    )
    lora = LoraConfig(r=hyper["lora_rank"], lora_alpha=hyper["lora_alpha"], lora_dropout=hyper["lora_dropout"],
                      target_modules=hyper["target_modules"], task_type="CAUSAL_LM")

    class Progress(TrainerCallback):
        last = 0.0

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            now = time.perf_counter()
            if logs and "loss" in logs and now - self.last >= PROGRESS_EVERY_S:
                self.last = now
                elapsed = now - train_started
                rate = counter.real / elapsed if elapsed > 0 else 0.0
                eta = elapsed / state.global_step * (state.max_steps - state.global_step) if state.global_step else 0.0
                _log(f"[{label}] {elapsed:6.0f}s train step {state.global_step}/{state.max_steps} loss {logs['loss']:.3f} "
                     f"lr {logs.get('learning_rate', 0.0):.2e} {rate:.0f} tok/s eta {eta:.0f}s")

    trainer = SFTTrainer(model=model, args=config, train_dataset=prompt_completion(spec["train"]),
                         eval_dataset=prompt_completion(spec["validation"]), processing_class=tokenizer,
                         peft_config=lora, callbacks=[Progress()])
    trainer.remove_callback(PrinterCallback)  # its log dicts every 10 steps; Progress prints a compact line instead
    setup_s = time.perf_counter() - started
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    rss_before_train = _vm_hwm()
    train_started = time.perf_counter()
    output = trainer.train()
    train_s = time.perf_counter() - train_started
    counts = counter.snapshot()
    rss_after_train = _vm_hwm()
    own = trainer.evaluate()
    adapter = Path(spec["output"]) / "adapter"
    trainer.model.save_pretrained(str(adapter))
    result = {
        "train_s": train_s, "setup_s": round(setup_s, 2), "tokens": counts["real"], "padded_tokens": counts["padded"],
        "trained_tokens": counts["trained"], "batches": counts["batches"],
        "padding_fraction": 1 - counts["real"] / counts["padded"] if counts["padded"] else 0.0,
        "tokens_per_s": counts["real"] / train_s, "padded_tokens_per_s": counts["padded"] / train_s,
        "peak_rss_bytes": _vm_hwm(), "peak_rss_after_train_bytes": rss_after_train, "peak_rss_before_train_bytes": rss_before_train,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "own_val_loss": own.get("eval_loss"), "train_loss": output.training_loss, "steps": output.global_step,
        "adapter": str(adapter), "threads": torch.get_num_threads(), "optim": str(config.optim),
        "completion_only_loss": getattr(trainer, "completion_only_loss", None), "padding_free": getattr(trainer, "padding_free", None),
    }
    _write_json(Path(spec["result"]), result)
    return 0


class CountingCollator:
    """TRL's collator, counting what every batch holds: real (attention_mask), padded and loss tokens."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.real = self.padded = self.trained = self.batches = 0

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.inner(features)
        self.real += int(batch["attention_mask"].sum())
        self.padded += int(batch["input_ids"].numel())
        self.trained += int((batch["labels"][:, 1:] != -100).sum())  # the tokens a loss is computed on
        self.batches += 1
        return batch

    def snapshot(self) -> dict[str, int]:
        return {"real": self.real, "padded": self.padded, "trained": self.trained, "batches": self.batches}


def _vm_hwm() -> int:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it cannot inherit the parent's, across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- the independent evaluator


class Evaluator:
    """Base model + a PEFT adapter; the mean cross-entropy over every validation answer's tokens (content and the
    closing <|im_end|>), given all that precedes it. One code path for both sides' adapters."""

    def __init__(self, model_dir: str, validation: str, threads: int, batch_size: int = 8) -> None:
        import torch
        from transformers import AutoTokenizer

        torch.set_num_threads(threads)
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        encoded = [encode_example(self.tokenizer, r["messages"]) for r in read_jsonl(Path(validation))]
        encoded.sort(key=lambda e: len(e["ids"]))
        self.batches = [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]

    def loss(self, adapter: str | None) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM

        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32, local_files_only=True)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        total, count = 0.0, 0
        with torch.inference_mode():
            for batch in self.batches:
                width = max(len(e["ids"]) for e in batch)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                labels = torch.full((len(batch), width), -100, dtype=torch.long)
                for row, e in enumerate(batch):
                    ids[row, :len(e["ids"])] = torch.tensor(e["ids"])
                    mask[row, :len(e["ids"])] = 1
                    labels[row, e["answer_start"]:e["answer_end"]] = ids[row, e["answer_start"]:e["answer_end"]]
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                         ignore_index=-100, reduction="sum")
                total += float(loss)
                count += int((labels[:, 1:] != -100).sum())
        del model
        return {"val_loss": total / count, "tokens": count, "seconds": round(time.perf_counter() - started, 2)}


# ----------------------------------------------------------------------------- results


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("tokens_per_s", "train_s", "tokens", "trained_tokens", "peak_rss_bytes", "val_loss", "own_val_loss",
            "train_loss", "padding_fraction", "padded_tokens", "foreign_cpus")
    return {"runs": len(runs), **{f"median_{k}": _median(runs, k) for k in keys}}


def _fmt(value: Any, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "MiB":
        return f"{value / 2 ** 20:,.0f} MiB"
    if unit == "loss":
        return f"{value:.4f}"
    if unit == "tokens":
        return f"{value:,.0f}"
    if unit == "%":
        return f"{value * 100:.1f}%"
    return fmt(value, unit)


def build_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    ours, base = results.get("ours", {}).get("summary"), results.get("baseline", {}).get("summary")
    ours_ok = bool(ours and ours["runs"])
    base_ok = bool(base and base["runs"])
    ours_missing = base_ok and not ours_ok and results.get("ours", {}).get("status") != "not run"  # asked for, but failed
    rows: list[dict[str, Any]] = []

    def value(side: dict[str, Any] | None, key: str) -> Any:
        return side.get(f"median_{key}") if side else None

    def target_row(metric: str, key: str, unit: str, target: str, check: Any) -> None:
        o, b = value(ours, key), value(base, key)
        ratio = o / b if (o is not None and b) else None
        paired = [p[key] for p in results.get("paired", []) if p.get(key) is not None]
        note = f"paired-run median {statistics.median(paired):.3f}" if len(paired) > 1 else ""
        rows.append({"metric": metric, "unit": unit, "ours": o, "baseline": b, "ratio": ratio, "target": target,
                     "note": note, "pass": check(ratio) if ratio is not None else (False if ours_missing else None)})

    target_row("training tokens/s (real tokens, median)", "tokens_per_s", "tok/s", f">= {SPEED_TARGET:g}x baseline",
               lambda r: r >= SPEED_TARGET)
    target_row("peak RSS (training process)", "peak_rss_bytes", "MiB", f"<= {RSS_TARGET:g}x baseline", lambda r: r <= RSS_TARGET)
    target_row("val loss after 1 epoch (one evaluator)", "val_loss", "loss", f"<= {VAL_LOSS_TARGET:g}x baseline",
               lambda r: r <= VAL_LOSS_TARGET)
    if rows[-1]["ratio"] is not None and rows[-1]["ratio"] < 2 - VAL_LOSS_TARGET:
        rows[-1]["note"] = (rows[-1]["note"] + "; " if rows[-1]["note"] else "") + "ours > 5% lower: check both train the same tokens"
    for metric, key, unit in (("val loss, each tool's own number", "own_val_loss", "loss"),
                              ("training loss, each tool's own number", "train_loss", "loss"),
                              ("train time (training loop)", "train_s", "s"),
                              ("real tokens processed", "tokens", "tokens"),
                              ("loss tokens (trained)", "trained_tokens", "tokens")):
        o, b = value(ours, key), value(base, key)
        rows.append({"metric": metric, "unit": unit, "ours": o, "baseline": b, "ratio": o / b if (o is not None and b) else None,
                     "target": "(info)", "pass": None})
    if base_ok:
        rows.append({"metric": "padding in the baseline's batches", "unit": "%", "ours": None, "baseline": value(base, "padding_fraction"),
                     "ratio": None, "target": "(info)", "pass": None,
                     "note": f"{value(base, 'padded_tokens'):,.0f} tokens computed for {value(base, 'tokens'):,.0f} real"})
    if results.get("base_val_loss") is not None:
        rows.append({"metric": "val loss before training (base model)", "unit": "loss", "ours": results["base_val_loss"],
                     "baseline": results["base_val_loss"], "ratio": None, "target": "(info: both should drop well below)", "pass": None})
    if value(ours, "foreign_cpus") is not None or value(base, "foreign_cpus") is not None:
        loads = [r["foreign_cpus"] for side in ("ours", "baseline") for r in results.get(side, {}).get("runs", []) if "foreign_cpus" in r]
        rows.append({"metric": "machine: other processes' CPU use during runs", "unit": "cpus", "ours": value(ours, "foreign_cpus"),
                     "baseline": value(base, "foreign_cpus"), "ratio": None, "note": f"max {max(loads):.2f}",
                     "target": "(info: > 0.2 means noisy numbers)", "pass": None})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = []
    for row in rows:
        ratio = f"{row['ratio']:.3f}" if row.get("ratio") is not None else ""
        if row.get("note"):
            ratio += f"; {row['note']}" if ratio else row["note"]
        ratio = ratio or "-"
        cells.append((row["metric"], _fmt(row["ours"], row["unit"]), _fmt(row["baseline"], row["unit"]), ratio, row["target"], verdict(row)))
    print_aligned(("metric", "ours", "baseline", "ratio", "target", "result"), cells, rows)


def environment(threads: int) -> dict[str, Any]:
    from importlib.metadata import version

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
                            "cpus": os.cpu_count(), "our_protocol_version": PROTOCOL_VERSION, "baseline_torch_threads": threads}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu_model"] = platform.processor() or None
    for package in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "tokenizers", "safetensors", "numpy"):
        try:
            info[f"{package}_version"] = version(package)
        except Exception:  # noqa: BLE001
            info[f"{package}_version"] = None
    info["env"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    info["git_commit"] = git_commit(ROOT)
    return info


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 examples, 1 run each")
    parser.add_argument("--runs", type=int, help="runs per side (default 3; --quick 1)")
    parser.add_argument("--examples", type=int, help="training examples (default 2000; --quick 200)")
    parser.add_argument("--val-examples", type=int, default=200, help="validation examples (default 200)")
    parser.add_argument("--two-turn", type=float, default=0.1, help="share of two-exchange training examples (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed, the same for both sides (default 0)")
    parser.add_argument("--only", choices=("baseline", "ours", "both"), default="both", help="which side(s) to run")
    parser.add_argument("--threads", type=int, default=_default_threads(),
                        help="torch threads for the baseline and the evaluator (default: the usable CPUs, as torch picks for ours)")
    parser.add_argument("--gradient-checkpointing", choices=("off", "on"), default="off",
                        help="gradient checkpointing for both sides (default off; TRL's own default is on)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE, help=f"model and data (default {CACHE.relative_to(ROOT)})")
    parser.add_argument("--rebuild", action="store_true", help="copy the model again")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (adapters, logs)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results file (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--no-json", action="store_true", help="do not print the JSON document (it is still written)")
    parser.add_argument("--baseline-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_worker:
        return baseline_worker(args.baseline_worker)
    # SIGTERM unwinds like Ctrl-C: the baseline process is killed, the sidecar closed and the work directory removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    config = {
        "runs": args.runs or (1 if args.quick else 3), "examples": args.examples or (200 if args.quick else 2000),
        "val_examples": args.val_examples, "two_turn": args.two_turn, "seed": args.seed, "only": args.only,
        "threads": args.threads, "gradient_checkpointing": args.gradient_checkpointing == "on", "quick": args.quick,
        "hyper": HYPER, "ours_packing": True, "baseline_packing": False,
    }
    sides = ["ours", "baseline"] if args.only == "both" else [args.only]
    results: dict[str, Any] = {"benchmark": "train", "config": config, "environment": environment(args.threads),
                               "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    wall = time.perf_counter()
    cache_dir = args.cache_dir.resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(cache_dir, args.rebuild)
    results["model"] = model
    data = prepare_data(cache_dir, config["examples"], config["val_examples"], config["seed"], config["two_turn"])
    results["data"] = dict(data)

    evaluator = Evaluator(model["model_dir"], data["validation"], args.threads)
    results["data"]["train_stats"] = data_stats(evaluator.tokenizer, read_jsonl(Path(data["train"])), HYPER["batch_size"], config["seed"])
    results["data"]["validation_stats"] = data_stats(evaluator.tokenizer, read_jsonl(Path(data["validation"])), HYPER["batch_size"], config["seed"])
    stats = results["data"]["train_stats"]
    per = stats["tokens_per_example"]
    _log(f"data: {stats['examples']} training examples, {stats['tokens']:,} tokens (per example mean {per['mean']}, median "
         f"{per['median']}, p90 {per['p90']}, max {per['max']}); last answers mean {stats['last_answer_tokens']['mean']}, "
         f"median {stats['last_answer_tokens']['median']}, max {stats['last_answer_tokens']['max']} tokens; "
         f"{stats['with_system']} with a system turn, {stats['two_turn']} two-turn; padding in random batches of "
         f"{HYPER['batch_size']} about {stats['padding_fraction_estimate_random_batches'] * 100:.0f}%; validation "
         f"{results['data']['validation_stats']['examples']} examples, {results['data']['validation_stats']['tokens']:,} tokens")
    base_eval = evaluator.loss(None)
    results["base_val_loss"] = base_eval["val_loss"]
    _log(f"val loss of the untrained model: {base_eval['val_loss']:.4f} over {base_eval['tokens']} answer tokens ({base_eval['seconds']} s)")

    workdir = Path(tempfile.mkdtemp(prefix="mlsidecar-bench-train-"))
    env = dict(os.environ)
    env["MLSIDECAR_HOME"] = str(workdir / "home")
    env["MLSIDECAR_ALLOWED_ROOTS"] = os.pathsep.join([str(cache_dir), str(workdir)])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.pop("MLSIDECAR_LOG_LEVEL", None)
    stderr_path = workdir / "sidecar-stderr.log"
    stderr = open(stderr_path, "ab")  # noqa: SIM115 - closed below
    sidecar: SidecarProcess | None = None
    results["ours"] = {"status": "not run" if "ours" not in sides else "ok", "runs": []}
    results["baseline"] = {"status": "not run" if "baseline" not in sides else "ok", "runs": []}
    try:
        if "ours" in sides:
            sidecar = SidecarProcess([], env=env, cwd=str(ROOT), stderr=stderr)
            sidecar.request("initialize", {"protocolVersion": PROTOCOL_VERSION, "clientInfo": {"name": "bench/train"}})
        for run in range(config["runs"]):
            order = sides if run % 2 == 0 else sides[::-1]
            for side in order:
                label = f"{side} run {run + 1}/{config['runs']}"
                if side == "ours":
                    if results["ours"]["status"] != "ok":
                        continue
                    assert sidecar is not None
                    _log(f"[{label}] train over the sidecar's pipes ...")
                    try:
                        record = run_ours(sidecar, ours_params(model["model_dir"], data, workdir / f"ours-{run + 1}", config["seed"],
                                                               config["gradient_checkpointing"]), label)
                    except (SidecarError, EOFError, KeyError, TypeError, ValueError) as exc:
                        results["ours"].update(ours_failure(exc))
                        stderr.flush()
                        tail = "\n".join(stderr_path.read_text(errors="replace").splitlines()[-15:])
                        _log(f"[{label}] OURS DID NOT RUN: {results['ours']['reason']}" + (f"\n--- sidecar stderr (last lines) ---\n{tail}" if tail else ""))
                        continue
                else:
                    _log(f"[{label}] TRL SFTTrainer in a fresh process ...")
                    spec = {"model": model["model_dir"], "train": data["train"], "validation": data["validation"], "hyper": HYPER,
                            "seed": config["seed"], "threads": args.threads, "gradient_checkpointing": config["gradient_checkpointing"],
                            "output": str(workdir / f"baseline-{run + 1}")}
                    record = run_baseline(spec, workdir, f"baseline-{run + 1}")
                try:
                    scored = evaluator.loss(record["adapter"])
                    record["val_loss"], record["val_tokens"] = scored["val_loss"], scored["tokens"]
                except Exception as exc:  # noqa: BLE001 - an adapter the evaluator cannot read is a result, not a crash
                    record["val_loss"], record["val_error"] = None, f"{type(exc).__name__}: {exc}"
                    _log(f"[{label}] the evaluator could not score the adapter at {record['adapter']}: {record['val_error']}")
                results[side]["runs"].append(record)
                own = record.get("own_val_loss")
                scored_loss = record["val_loss"]
                _log(f"[{label}] {record['tokens']:,} real tokens in {record['train_s']:.1f} s = {record['tokens_per_s']:.1f} tok/s; "
                     f"peak RSS {record['peak_rss_bytes'] / 2 ** 20:,.0f} MiB; val loss "
                     f"{scored_loss if scored_loss is None else round(scored_loss, 4)} (evaluator), {own if own is None else round(own, 4)} (own)"
                     + (f"; padding {record['padding_fraction'] * 100:.1f}%" if "padding_fraction" in record else ""))
    finally:
        if sidecar is not None:
            sidecar.close()
        stderr.close()
        if args.keep:
            _log(f"kept the work directory {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for side in ("ours", "baseline"):
        results[side]["summary"] = summarize(results[side]["runs"])
    results["paired"] = [
        {key: (o[key] / b[key] if o.get(key) is not None and b.get(key) else None) for key in ("tokens_per_s", "peak_rss_bytes", "val_loss")}
        for o, b in zip(results["ours"]["runs"], results["baseline"]["runs"])
    ]
    results["wall_s"] = round(time.perf_counter() - wall, 2)
    rows = build_rows(results)
    results["summary"] = rows
    results["all_targets_met"] = bool(results["ours"]["runs"] and results["baseline"]["runs"]) and all(r["pass"] is not False for r in rows)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    document = json.dumps(results, indent=2)
    args.output.write_text(document + "\n")
    if not args.no_json:
        print(document)
    print()
    env_info = results["environment"]
    print(f"Training benchmark ({env_info.get('cpu_model')}, {env_info.get('cpus_usable', env_info['cpus'])} usable CPUs, "
          f"{args.threads} torch threads, {config['runs']} run(s) per side, {stats['examples']} examples / "
          f"{stats['tokens']:,} tokens, LoRA r {HYPER['lora_rank']} all-linear, batch {HYPER['batch_size']}, 1 epoch, "
          f"wall {results['wall_s']} s); JSON: {args.output}")
    if results["ours"]["status"] not in ("ok", "not run"):
        print(f"OURS: {results['ours']['status'].upper()}: {results['ours']['reason']}")
    print_table(rows)
    loads = {side: results[side]["summary"].get("median_foreign_cpus") for side in ("ours", "baseline")}
    if all(v is not None for v in loads.values()) and (max(loads.values()) > 0.2):
        print(f"Note: other processes used {loads['ours']:.2f} CPUs during our runs and {loads['baseline']:.2f} during the "
              "baseline's (median): on a small machine that slows OpenMP far more than its share, so the tokens/s ratio is "
              "unreliable; rerun on a quiet machine.")
    if not (results["ours"]["runs"] and results["baseline"]["runs"]):
        print("No target was judged: " + ("only the baseline ran." if results["baseline"]["runs"] else
                                          "only ours ran." if results["ours"]["runs"] else "nothing ran."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
