"""Generation benchmark: our sidecar's `generate` against the engines called directly, in one run.

    python bench/generate.py            # default run: about 2-3 minutes on 2 cores (the first run also builds
                                        # the model, about a minute more)
    python bench/generate.py --quick    # smoke run: 2 runs of 32 new tokens, about 30 s
    python bench/generate.py --omp-wait-policy library-default   # OpenMP as users run it (see below)
    python bench/generate.py --runs 3 --only llama.cpp --gguf both

The model: a Llama-architecture causal LM with SmolLM2-135M's dimensions (hidden 576, 30 layers, 9 heads,
3 KV heads, intermediate 1536, vocab 49152, tied embeddings, 2048 positions, rope_theta 100000) and seeded
random weights, saved as a Hugging Face directory (float32 safetensors) with a byte-level BPE tokenizer
trained to the full 49152 tokens (on runtimes/data/tiny_corpus.txt plus seeded made-up words, so every id
the model can pick decodes to text), and converted to GGUF (f32; --gguf f16/both) with our own
runtimes.gguf.export.convert_to_gguf. Built once into bench/results/generate-cache/ (git-ignored), reused.

What it measures (medians over several runs; every run uses a fresh 128-token prompt, the same one for all
sides, so no side reuses a KV-cache prefix; the sides' runs are interleaved, the order alternating, so a
change in the machine's load hits them alike; ratios are also given as the median of per-run pairs):

1. llama.cpp: `python -m sidecar --allow-root <cache>` (MLSIDECAR_HOME = a temporary directory) driven
   over its real pipes with the repository's client (sidecar/client.py): models/load of the GGUF with
   options {n_ctx: 512, n_threads: 2}, then `generate` with max_tokens 128, temperature 0, ignore_eos,
   streaming on. Decode tokens/s as the host sees it = (n - 1) / (response - first `$/token`); time to
   first token = first `$/token` - request sent. Baseline: llama-cpp-python in this process,
   Llama(path, n_ctx=512, n_threads=2, verbose=False), Llama.generate on the same prompt ids with the
   sampling settings the sidecar passes, timed the same way (first yielded token, last token).
   Targets: decode tokens/s >= 0.97x direct; TTFT overhead (ours - direct, the median of per-pair
   differences over the runs plus --ttft-runs extra pairs with max_tokens 1) <= 5 ms. Also reported: the TTFT spent outside the engine, measured inside one run (host
   TTFT - the sidecar's own prompt_eval_ms, free of the prefill's run-to-run noise), and the time from the
   last `$/token` to the response.
2. transformers (float32, CPU): the sidecar's generate on the HF directory against transformers'
   `model.generate(input_ids, max_new_tokens=128, do_sample=False)` in this process on the same model and
   prompt. Tokens/s = new tokens / total time (request sent -> response for ours; the generate call for
   the baseline); decode-only tokens/s as above (the baseline's first token is timed by a streamer whose
   put() only reads the clock). Target: ours >= 1.0x HF generate (total); decode-only is reported too.

Both sides' outputs are kept: the sidecar returns text, so the direct side's token ids are turned into text
with the same detokenization the sidecar applies (UTF-8 over llama.cpp's token bytes; runtimes.text.
HfDetokenizer for transformers) and the texts must be identical, with the same completion token count.

Fairness, and why each sample records `sleeps_per_token` and `foreign_cpus`: both engines parallelize with
OpenMP, whose barrier behaviour depends on how many threads have called into the engine (DirectThread has
the details): one calling thread -> spinning barriers (fastest on idle CPUs, collapses to a few tokens/s
when other processes compete for them); several -> sleeping barriers (the reverse). The direct side loads
and runs on one thread; the sidecar, after the overlapping warm-up requests a long-lived sidecar sees
(overlap_warmup), decodes on whichever pool thread is free. So by default both sides run with
OMP_WAIT_POLICY=PASSIVE (the sleeping regime, whatever the threads), which compares the sidecar's own
overhead like for like and keeps the run short when other processes load the CPUs;
--omp-wait-policy library-default leaves libgomp's default, as users run it. The table shows each side's
regime and flags ratios taken across different regimes. `foreign_cpus` is the CPU time other processes
used during the sample (from /proc/stat, minus this process and the sidecar).

It prints a table (metric, ours, baseline, ratio, target, PASS/FAIL) and a JSON document, also written to
bench/results/generate.json. The exit code is 0 even when a target is missed: it is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "generate.json"
CACHE = ROOT / "bench" / "results" / "generate-cache"
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.report import fmt, print_aligned, verdict  # noqa: E402
from protocol.version import PROTOCOL_VERSION  # noqa: E402
from sidecar.client import SidecarError, SidecarProcess  # noqa: E402

# ----------------------------------------------------------------------------- the model

BUILD_VERSION = "smollm2-135m-shape-random-v1"  # bump whenever anything below changes the built files
SEED = 1234
VOCAB_SIZE = 49152
MODEL_DIMS: dict[str, Any] = {  # SmolLM2-135M's config.json
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "max_position_embeddings": 2048,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
}
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CORPUS_PATH = ROOT / "runtimes" / "data" / "tiny_corpus.txt"

N_CTX = 512
N_THREADS = 2

DECODE_RATIO_TARGET = 0.97
TTFT_OVERHEAD_TARGET_S = 0.005
HF_RATIO_TARGET = 1.0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _made_up_text(rng: random.Random, lines: int) -> list[str]:
    """Seeded pronounceable nonsense: enough distinct words for BPE to learn 49k merges."""
    consonants = list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "st", "tr", "br", "gr", "pl"]
    vowels = list("aeiou") + ["ai", "ea", "ou", "io"]

    def word() -> str:
        stem = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 4)))
        return stem + (rng.choice(consonants) if rng.random() < 0.5 else "")

    out = []
    for _ in range(lines):
        words = [word() for _ in range(rng.randint(6, 16))]
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + rng.choice(".,!?;"))
    return out


def _train_tokenizer() -> Any:
    """Byte-level BPE (GPT-2 pre-tokenizer, as builtin:tiny) with exactly VOCAB_SIZE tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = random.Random(SEED)
    made_up = _made_up_text(rng, 20_000)
    texts = CORPUS_PATH.read_text(encoding="utf-8").split("\n\n\n") + ["\n".join(made_up[i:i + 20]) for i in range(0, len(made_up), 20)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"the tokenizer reached {tokenizer.get_vocab_size()} tokens, not {VOCAB_SIZE}")
    return tokenizer


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                                               "single_word": False, "special": True} for t in SPECIAL_TOKENS},
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_DIMS["max_position_embeddings"],
    })
    _write_json(out_dir / "special_tokens_map.json", {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
                                                      "additional_special_tokens": SPECIAL_TOKENS[1:]})


def _save_model(out_dir: Path) -> int:
    """config.json, generation_config.json and one float32 model.safetensors; returns the parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, hidden_act="silu", initializer_range=0.02,
                         attention_bias=False, mlp_bias=False, use_cache=True, **MODEL_DIMS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    saved = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    saved.setdefault("architectures", ["LlamaForCausalLM"])
    saved.setdefault("torch_dtype", "float32")
    theta = (saved.get("rope_parameters") or {}).get("rope_theta", saved.get("rope_theta"))
    if theta != MODEL_DIMS["rope_theta"]:
        raise RuntimeError(f"config.json records rope_theta {theta}, not {MODEL_DIMS['rope_theta']}")
    _write_json(out_dir / "config.json", dict(sorted(saved.items())))
    # Tied embeddings: lm_head.weight is the embedding matrix; safetensors stores it once, as save_pretrained does.
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items() if name != "lm_head.weight"}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return sum(p.numel() for p in model.parameters())


def build_assets(cache_dir: Path, gguf_dtypes: list[str], rebuild: bool) -> dict[str, Any]:
    """The HF directory and the GGUF files, built once (atomically) and reused."""
    from runtimes.gguf.export import convert_to_gguf

    base = cache_dir / BUILD_VERSION
    hf_dir = base / "hf"
    if rebuild and base.exists():
        shutil.rmtree(base)
    info_path = base / "build.json"
    info: dict[str, Any] = json.loads(info_path.read_text()) if info_path.exists() else {}
    if not (hf_dir / "model.safetensors").exists():
        _log(f"building the model into {hf_dir} (once) ...")
        started = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix="hf-", dir=cache_dir if cache_dir.exists() else None))
        try:
            tokenizer = _train_tokenizer()
            _save_tokenizer(tokenizer, staging)
            info["parameters"] = _save_model(staging)
            base.mkdir(parents=True, exist_ok=True)
            if hf_dir.exists():
                shutil.rmtree(hf_dir)
            staging.rename(hf_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        info["hf_build_s"] = round(time.perf_counter() - started, 2)
        info["version"] = BUILD_VERSION
        for stale in base.glob("*.gguf"):
            stale.unlink()
        info.pop("gguf", None)
    info.setdefault("gguf", {})
    for dtype in gguf_dtypes:
        path = base / f"model-{dtype}.gguf"
        if not path.exists():
            _log(f"converting to GGUF {dtype} with runtimes.gguf.export.convert_to_gguf ...")
            partial = path.with_suffix(".gguf.partial")
            stats = convert_to_gguf(hf_dir, partial, dtype=dtype)
            partial.rename(path)
            info["gguf"][dtype] = stats
    _write_json(info_path, info)
    info["hf_dir"] = str(hf_dir)
    info["gguf_paths"] = {dtype: str(base / f"model-{dtype}.gguf") for dtype in gguf_dtypes}
    info["hf_bytes"] = (hf_dir / "model.safetensors").stat().st_size
    return info


# ----------------------------------------------------------------------------- prompts


def make_prompts(hf_tokenizer: Any, llama: Any, count: int, length: int) -> list[dict[str, Any]]:
    """`count` distinct prompt strings that tokenize to exactly `length` ids, identically with the HF
    tokenizer and with llama.cpp's (from the GGUF), each starting differently (no shared KV prefix)."""
    text = CORPUS_PATH.read_text(encoding="utf-8")
    ids = hf_tokenizer.encode(text, add_special_tokens=False, verbose=False)  # the whole corpus: no length warning
    prompts: list[dict[str, Any]] = []
    used_first: set[int] = set()
    start = 0
    stride = max(1, (len(ids) - length) // (count + 1))
    while len(prompts) < count:
        if start + length > len(ids):
            raise RuntimeError(f"could not find {count} prompts of {length} tokens in {CORPUS_PATH}")
        window = ids[start:start + length]
        candidate = hf_tokenizer.decode(window, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        hf_ids = hf_tokenizer.encode(candidate, add_special_tokens=False)
        ll_ids = [int(t) for t in llama.tokenize(candidate.encode("utf-8"), add_bos=False, special=True)]
        if hf_ids == window and ll_ids == window and window[0] not in used_first and "\n\n\n" not in candidate:
            prompts.append({"text": candidate, "ids": window})
            used_first.add(window[0])
            start += stride
        else:
            start += 1
    return prompts


# ----------------------------------------------------------------------------- the machine's load


class CpuMeter:
    """CPU used by other processes while a sample runs: /proc/stat's busy time minus this process's and the
    sidecar's own (whole thread groups), in CPUs; and the hypervisor's steal. Linux only; None elsewhere."""

    def __init__(self) -> None:
        self.pids = [os.getpid()]
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = Path("/proc/stat").exists()

    def _ours(self) -> int:
        total = 0
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime, all threads
            except (OSError, IndexError, ValueError):
                pass
        return total

    def snapshot(self) -> tuple[float, int, int, int] | None:
        if not self.available:
            return None
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = values
        return time.perf_counter(), user + nice + system + irq + softirq, steal, self._ours()

    def load(self, before: tuple | None, after: tuple | None) -> dict[str, float]:
        if before is None or after is None or after[0] <= before[0]:
            return {}
        seconds = after[0] - before[0]
        foreign = ((after[1] - before[1]) - (after[3] - before[3])) / self.hz / seconds
        return {"foreign_cpus": max(0.0, foreign), "steal_cpus": (after[2] - before[2]) / self.hz / seconds}


METER = CpuMeter()


# ----------------------------------------------------------------------------- the sidecar side


def sidecar_generate(sidecar: SidecarProcess, params: dict[str, Any]) -> dict[str, Any]:
    """One streamed generate request; host-side clock at send, first `$/token` and the response."""
    switches = EngineSwitches.count(sidecar.proc.pid)
    pieces: list[str] = []
    marks: dict[str, float] = {}
    clock = time.perf_counter

    def on_event(message: dict[str, Any]) -> None:
        if message.get("method") == "$/token":
            marks["last"] = now = clock()
            marks.setdefault("first", now)
            pieces.append(message["params"]["text"])

    before = METER.snapshot()
    sent = clock()
    request_id = sidecar.start("generate", params)
    response = sidecar.wait_response(request_id, on_event)
    ended = clock()
    load = METER.load(before, METER.snapshot())
    switches_after = EngineSwitches.count(sidecar.proc.pid)
    if "error" in response:
        raise SidecarError(response["error"])
    result = response["result"]
    n = result["usage"]["completion_tokens"]
    first = marks.get("first", ended)
    timings = result.get("timings") or {}
    return {
        **load,
        **_sleeps(switches, switches_after, n),
        "ttft_s": first - sent,
        # in-run, so free of the prefill's run-to-run noise: the host's TTFT minus the sidecar's own
        # prompt_eval_ms (model.stream() called -> first token), i.e. everything outside the engine
        "ttft_outside_engine_s": (first - sent) - timings.get("prompt_eval_ms", 0.0) / 1000,
        "tail_s": ended - marks.get("last", ended),  # last $/token -> response
        "total_s": ended - sent,
        "decode_s": ended - first,
        "tokens": n,
        "prompt_tokens": result["usage"]["prompt_tokens"],
        "tokens_per_s": n / (ended - sent),
        "decode_tokens_per_s": (n - 1) / (ended - first) if n > 1 and ended > first else 0.0,
        "events": len(pieces),
        "text": result["text"],
        "streamed_equals_text": "".join(pieces) == result["text"],
        "finish_reason": result["finish_reason"],
        "sidecar_timings": timings,
    }


# ----------------------------------------------------------------------------- the direct sides


class DirectThread:
    """The direct side loads and runs each engine on one dedicated, long-lived thread: the way a program that
    calls the library itself works, and the arrangement in which exactly one thread is an OpenMP master.

    Why it matters: both engines parallelize with OpenMP (llama.cpp's CPU backend on the system libgomp, torch
    on its bundled copy), and ggml's per-op barrier *is* an OpenMP barrier. libgomp spins at barriers (about
    300k iterations) while it manages no more threads than there are CPUs, and throttles to ~100 spins then a
    futex sleep once it manages more, which happens as soon as a second thread has called into the engine
    (each calling thread gets its own team). Spinning is the faster regime on an idle machine and collapses
    when other processes want the CPUs; sleeping is the reverse. Each sample records the regime it ran in
    (`sleeps_per_token`, see EngineSwitches)."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct")

    def call(self, fn: Any, *args: Any) -> Any:
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        self._pool.shutdown()


class EngineSwitches:
    """Voluntary context switches of every thread of a process (/proc/PID/task/*/status): an OpenMP team that
    spins at ggml's barriers makes ~0 per token, one that sleeps there hundreds (one per op)."""

    @staticmethod
    def count(pid: int) -> int | None:
        total = 0
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return None
        for tid in tasks:
            try:
                for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
                        break
            except OSError:
                pass
        return total


def _sleeps(before: int | None, after: int | None, tokens: int) -> dict[str, float]:
    if before is None or after is None or tokens <= 0:
        return {}
    return {"sleeps_per_token": (after - before) / tokens}


def llama_direct(llama: Any, prompt_ids: list[int], max_tokens: int) -> dict[str, Any]:
    """Llama.generate in-process with the sampling settings the sidecar passes for temperature 0."""
    from runtimes.text import Utf8Stream

    clock = time.perf_counter
    tokens: list[int] = []
    first = None
    switches = EngineSwitches.count(os.getpid())
    before = METER.snapshot()
    started = clock()
    generator = llama.generate(prompt_ids, top_k=40, top_p=0.95, min_p=0.05, temp=0.0, repeat_penalty=1.0, reset=True)
    for token in generator:
        if first is None:
            first = clock()
        tokens.append(int(token))
        if len(tokens) >= max_tokens:
            break
    ended = clock()
    load = METER.load(before, METER.snapshot())
    load.update(_sleeps(switches, EngineSwitches.count(os.getpid()), len(tokens)))
    generator.close()
    utf8 = Utf8Stream()
    text = "".join(utf8.feed(llama.detokenize([t])) for t in tokens) + utf8.flush()
    n = len(tokens)
    first = first or ended
    return {**load, "ttft_s": first - started, "total_s": ended - started, "decode_s": ended - first, "tokens": n,
            "tokens_per_s": n / (ended - started), "decode_tokens_per_s": (n - 1) / (ended - first) if n > 1 else 0.0,
            "text": text, "ids": tokens}


class _FirstTokenClock:
    """A transformers streamer that only reads the clock: put() gets the prompt first, then each token."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def hf_direct(model: Any, tokenizer: Any, prompt_ids: list[int], max_tokens: int) -> dict[str, Any]:
    import torch

    from runtimes.text import HfDetokenizer

    input_ids = torch.tensor([prompt_ids])
    attention_mask = torch.ones_like(input_ids)
    streamer = _FirstTokenClock()
    clock = time.perf_counter
    switches = EngineSwitches.count(os.getpid())
    before = METER.snapshot()
    started = clock()
    output = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_tokens, do_sample=False,
                            streamer=streamer)
    ended = clock()
    load = METER.load(before, METER.snapshot())
    load.update(_sleeps(switches, EngineSwitches.count(os.getpid()), max_tokens))
    new_ids = [int(t) for t in output[0, len(prompt_ids):]]
    detok = HfDetokenizer(tokenizer)
    text = "".join(detok.feed(t) for t in new_ids) + detok.flush()
    n = len(new_ids)
    first = streamer.first or ended
    return {**load, "ttft_s": first - started, "total_s": ended - started, "decode_s": ended - first, "tokens": n,
            "tokens_per_s": n / (ended - started), "decode_tokens_per_s": (n - 1) / (ended - first) if n > 1 else 0.0,
            "text": text, "ids": new_ids}


# ----------------------------------------------------------------------------- the sections

OVERLAP_WARMUP = True  # --no-overlap-warmup turns it off


def overlap_warmup(sidecar: SidecarProcess, params: dict[str, Any], text: str, rounds: int = 4, concurrent: int = 3) -> dict[str, Any]:
    """Bring the sidecar to the state of a long-lived one: a host that sends overlapping requests (a generate
    while another is decoding, an embed, a models/load...) makes the sidecar's thread pool grow, and later
    decoding loops land on whichever pool thread is idle. A fresh sidecar that only ever saw one request at a
    time can still be on its first thread, which flatters it (see DirectThread for why threads matter)."""
    if not OVERLAP_WARMUP:
        return {"done": False}
    for _ in range(rounds):
        ids = [sidecar.start("generate", {**params, "max_tokens": 2, "prompt": text[:40 + j]}) for j in range(concurrent)]
        for request_id in ids:
            response = sidecar.wait_response(request_id)
            if "error" in response:
                raise SidecarError(response["error"])
    try:
        threads = len(os.listdir(f"/proc/{sidecar.proc.pid}/task"))
    except OSError:
        threads = None
    return {"done": True, "rounds": rounds, "concurrent": concurrent, "sidecar_threads_after": threads}



def _summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("ttft_s", "total_s", "decode_s", "tokens_per_s", "decode_tokens_per_s", "ttft_outside_engine_s", "tail_s",
            "foreign_cpus", "steal_cpus", "sleeps_per_token")
    out: dict[str, Any] = {f"median_{k}": statistics.median(s[k] for s in samples) for k in keys if samples and k in samples[0]}
    out["runs"] = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in s.items() if k not in ("text", "ids")}
                   for s in samples]
    return out


def _paired(ours: list[dict[str, Any]], direct: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-run comparisons (each pair ran back to back on the same prompt): less sensitive to load drift."""
    decode = [o["decode_tokens_per_s"] / d["decode_tokens_per_s"] for o, d in zip(ours, direct)]
    total = [o["tokens_per_s"] / d["tokens_per_s"] for o, d in zip(ours, direct)]
    ttft = [o["ttft_s"] - d["ttft_s"] for o, d in zip(ours, direct)]
    return {
        "decode_ratio_median": statistics.median(decode), "decode_ratio_runs": [round(x, 4) for x in decode],
        "total_ratio_median": statistics.median(total), "total_ratio_runs": [round(x, 4) for x in total],
        "ttft_difference_median_s": statistics.median(ttft), "ttft_difference_runs_s": [round(x, 5) for x in ttft],
    }


def _compare(ours: list[dict[str, Any]], direct: list[dict[str, Any]]) -> dict[str, Any]:
    identical = [o["text"] == d["text"] and o["tokens"] == d["tokens"] for o, d in zip(ours, direct)]
    first_bad = next((i for i, ok in enumerate(identical) if not ok), None)
    out: dict[str, Any] = {
        "identical": all(identical),
        "identical_runs": sum(identical),
        "runs": len(identical),
        "method": "sidecar text vs the direct side's token ids detokenized as the sidecar does; same token count",
        "sample_text": direct[0]["text"][:120] if direct else "",
        "sample_ids": direct[0]["ids"][:16] if direct else [],
    }
    if first_bad is not None:
        o, d = ours[first_bad]["text"], direct[first_bad]["text"]
        at = next((i for i, (a, b) in enumerate(zip(o, d)) if a != b), min(len(o), len(d)))
        out["first_difference"] = {"run": first_bad, "char": at, "ours": o[max(0, at - 20):at + 40],
                                   "direct": d[max(0, at - 20):at + 40], "ours_tokens": ours[first_bad]["tokens"],
                                   "direct_tokens": direct[first_bad]["tokens"]}
    return out


def bench_llama(sidecar: SidecarProcess, runner: DirectThread, gguf: str, dtype: str, prompts: list[dict[str, Any]],
                runs: int, max_tokens: int, ttft_runs: int) -> dict[str, Any]:
    from llama_cpp import Llama

    options = {"n_ctx": N_CTX, "n_threads": N_THREADS}
    started = time.perf_counter()
    loaded = sidecar.request("models/load", {"model": gguf, "runtime": "llama.cpp", "options": options, "keep_alive": -1})
    sidecar_load_s = time.perf_counter() - started
    started = time.perf_counter()
    llama = runner.call(lambda: Llama(gguf, n_ctx=N_CTX, n_threads=N_THREADS, verbose=False))
    direct_load_s = time.perf_counter() - started
    params = {"model": gguf, "runtime": "llama.cpp", "options": options, "max_tokens": max_tokens, "temperature": 0.0,
              "ignore_eos": True, "stream": True, "seed": 0, "keep_alive": -1}
    try:
        for prompt in prompts[:1]:  # warm-up, unmeasured: first-call costs on both sides
            runner.call(llama_direct, llama, prompt["ids"], max_tokens)
            sidecar_generate(sidecar, {**params, "prompt": prompt["text"]})
        warmup = overlap_warmup(sidecar, params, prompts[0]["text"])
        ours: list[dict[str, Any]] = []
        direct: list[dict[str, Any]] = []
        for i in range(runs):
            prompt = prompts[1 + i]
            _log(f"    llama.cpp {dtype} run {i + 1}/{runs}")
            order = ("direct", "ours") if i % 2 == 0 else ("ours", "direct")
            for side in order:
                if side == "direct":
                    direct.append(runner.call(llama_direct, llama, prompt["ids"], max_tokens))
                else:
                    sample = sidecar_generate(sidecar, {**params, "prompt": prompt["text"]})
                    if sample["prompt_tokens"] != len(prompt["ids"]):
                        raise RuntimeError(f"the sidecar saw {sample['prompt_tokens']} prompt tokens, not {len(prompt['ids'])}")
                    ours.append(sample)
        # Time to first token only (max_tokens 1): more pairs, cheaply, for a difference of a few ms
        # against a prefill whose run-to-run noise is ~10 ms when other processes load the machine.
        ttft_pairs: list[tuple[float, float]] = [(o["ttft_s"], d["ttft_s"]) for o, d in zip(ours, direct)]
        for j in range(ttft_runs):
            prompt = prompts[1 + runs + j]
            first_ours = j % 2 == 1
            if first_ours:
                ours_ttft = sidecar_generate(sidecar, {**params, "max_tokens": 1, "prompt": prompt["text"]})["ttft_s"]
            direct_ttft = runner.call(llama_direct, llama, prompt["ids"], 1)["ttft_s"]
            if not first_ours:
                ours_ttft = sidecar_generate(sidecar, {**params, "max_tokens": 1, "prompt": prompt["text"]})["ttft_s"]
            ttft_pairs.append((ours_ttft, direct_ttft))
    finally:
        llama.close()
        sidecar.request("models/unload", {"model": gguf, "runtime": "llama.cpp"})
    differences = [o - d for o, d in ttft_pairs]
    ttft = {"pairs": len(ttft_pairs), "extra_ttft_only_pairs": ttft_runs,
            "median_ours_s": statistics.median(o for o, _ in ttft_pairs),
            "median_direct_s": statistics.median(d for _, d in ttft_pairs),
            "median_paired_difference_s": statistics.median(differences),
            "differences_s": [round(x, 5) for x in differences]}
    return {
        "gguf": gguf, "dtype": dtype, "gguf_bytes": Path(gguf).stat().st_size,
        "load_s": {"sidecar_models_load": round(sidecar_load_s, 3), "direct": round(direct_load_s, 3)},
        "sidecar_model": loaded, "overlap_warmup": warmup,
        "ours": _summary(ours), "direct": _summary(direct), "paired": _paired(ours, direct), "ttft": ttft,
        "outputs": _compare(ours, direct),
    }


def bench_transformers(sidecar: SidecarProcess, runner: DirectThread, hf_dir: str, prompts: list[dict[str, Any]],
                       runs: int, max_tokens: int) -> dict[str, Any]:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    options = {"device": "cpu", "dtype": "float32"}
    started = time.perf_counter()
    loaded = sidecar.request("models/load", {"model": hf_dir, "runtime": "transformers", "options": options, "keep_alive": -1})
    sidecar_load_s = time.perf_counter() - started
    started = time.perf_counter()
    model = runner.call(lambda: transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                                               local_files_only=True).eval())
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model.generation_config.eos_token_id = None  # the sidecar side runs with ignore_eos: both make exactly max_tokens
    direct_load_s = time.perf_counter() - started
    params = {"model": hf_dir, "runtime": "transformers", "options": options, "max_tokens": max_tokens, "temperature": 0.0,
              "ignore_eos": True, "stream": True, "seed": 0, "keep_alive": -1}
    try:
        for prompt in prompts[:1]:  # warm-up, unmeasured
            runner.call(hf_direct, model, tokenizer, prompt["ids"], max_tokens)
            sidecar_generate(sidecar, {**params, "prompt": prompt["text"]})
        warmup = overlap_warmup(sidecar, params, prompts[0]["text"])
        ours: list[dict[str, Any]] = []
        direct: list[dict[str, Any]] = []
        for i in range(runs):
            prompt = prompts[1 + i]
            _log(f"    transformers run {i + 1}/{runs}")
            order = ("direct", "ours") if i % 2 == 0 else ("ours", "direct")
            for side in order:
                if side == "direct":
                    direct.append(runner.call(hf_direct, model, tokenizer, prompt["ids"], max_tokens))
                else:
                    sample = sidecar_generate(sidecar, {**params, "prompt": prompt["text"]})
                    if sample["prompt_tokens"] != len(prompt["ids"]):
                        raise RuntimeError(f"the sidecar saw {sample['prompt_tokens']} prompt tokens, not {len(prompt['ids'])}")
                    ours.append(sample)
    finally:
        del model
        sidecar.request("models/unload", {"model": hf_dir, "runtime": "transformers"})
    return {
        "hf_dir": hf_dir, "dtype": "float32", "torch_threads_direct": runner.call(torch.get_num_threads),
        "load_s": {"sidecar_models_load": round(sidecar_load_s, 3), "direct": round(direct_load_s, 3)},
        "sidecar_model": loaded, "overlap_warmup": warmup,
        "ours": _summary(ours), "direct": _summary(direct), "paired": _paired(ours, direct),
        "outputs": _compare(ours, direct),
    }


# ----------------------------------------------------------------------------- report


SLEEPING_AT = 50  # thread sleeps per token from which a side counts as in the sleeping-barrier regime


def same_regime(ours: dict[str, Any], direct: dict[str, Any]) -> bool | None:
    a, b = ours.get("median_sleeps_per_token"), direct.get("median_sleeps_per_token")
    return None if a is None or b is None else (a >= SLEEPING_AT) == (b >= SLEEPING_AT)


def _regime_note(ours: dict[str, Any], direct: dict[str, Any]) -> str:
    return "; OpenMP REGIMES DIFFER" if same_regime(ours, direct) is False else ""


def build_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    loads: list[float] = []
    for dtype, section in (results.get("llama_cpp") or {}).items():
        ours, direct, paired = section["ours"], section["direct"], section["paired"]
        base = "llama-cpp-python direct"
        ratio = ours["median_decode_tokens_per_s"] / direct["median_decode_tokens_per_s"]
        rows.append({"metric": f"llama.cpp {dtype}: decode tokens/s (host view)", "unit": "tok/s",
                     "ours": ours["median_decode_tokens_per_s"], "baseline": direct["median_decode_tokens_per_s"],
                     "baseline_label": base, "ratio": ratio, "ratio_label": "ours/direct",
                     "note": f"paired-run median {paired['decode_ratio_median']:.3f}{_regime_note(ours, direct)}",
                     "like_for_like": same_regime(ours, direct),
                     "target": f">= {DECODE_RATIO_TARGET:g}x direct", "pass": ratio >= DECODE_RATIO_TARGET})
        ttft = section["ttft"]
        overhead = ttft["median_paired_difference_s"]
        rows.append({"metric": f"llama.cpp {dtype}: time to first token ({ttft['pairs']} pairs)", "unit": "s",
                     "ours": ttft["median_ours_s"], "baseline": ttft["median_direct_s"], "baseline_label": base,
                     "ratio": None, "ratio_label": "", "extra": f"{overhead * 1000:+.2f} ms (paired median){_regime_note(ours, direct)}",
                     "like_for_like": same_regime(ours, direct),
                     "target": f"overhead <= {TTFT_OVERHEAD_TARGET_S * 1000:g} ms", "pass": overhead <= TTFT_OVERHEAD_TARGET_S})
        rows.append({"metric": f"llama.cpp {dtype}: TTFT outside the engine (in-run)", "unit": "s",
                     "ours": ours["median_ttft_outside_engine_s"], "baseline": 0.0, "baseline_label": "direct: none",
                     "ratio": None, "ratio_label": "", "extra": "host TTFT - sidecar prompt_eval_ms",
                     "target": "(info)", "pass": None})
        rows.append({"metric": f"llama.cpp {dtype}: last $/token -> response", "unit": "s",
                     "ours": ours["median_tail_s"], "baseline": 0.0, "baseline_label": "direct: none",
                     "ratio": None, "ratio_label": "", "target": "(info)", "pass": None})
        rows += _regime_row(f"llama.cpp {dtype}", ours, direct, base)
        ratio = ours["median_tokens_per_s"] / direct["median_tokens_per_s"]
        rows.append({"metric": f"llama.cpp {dtype}: tokens/s incl. prefill", "unit": "tok/s",
                     "ours": ours["median_tokens_per_s"], "baseline": direct["median_tokens_per_s"],
                     "baseline_label": base, "ratio": ratio, "ratio_label": "ours/direct",
                     "target": "(info)", "pass": None})
        outputs = section["outputs"]
        rows.append({"metric": f"llama.cpp {dtype}: greedy output identical", "unit": "runs",
                     "ours": outputs["identical_runs"], "baseline": outputs["runs"], "baseline_label": "runs",
                     "ratio": None, "ratio_label": "", "target": "all runs identical", "pass": outputs["identical"]})
        loads += [r.get("foreign_cpus", 0.0) for r in ours["runs"] + direct["runs"]]
    section = results.get("transformers")
    if section:
        ours, direct, paired = section["ours"], section["direct"], section["paired"]
        base = "HF model.generate"
        ratio = ours["median_tokens_per_s"] / direct["median_tokens_per_s"]
        rows.append({"metric": "transformers f32: tokens/s incl. prefill", "unit": "tok/s",
                     "ours": ours["median_tokens_per_s"], "baseline": direct["median_tokens_per_s"],
                     "baseline_label": base, "ratio": ratio, "ratio_label": "ours/HF",
                     "note": f"paired-run median {paired['total_ratio_median']:.3f}{_regime_note(ours, direct)}",
                     "like_for_like": same_regime(ours, direct),
                     "target": f">= {HF_RATIO_TARGET:g}x HF generate", "pass": ratio >= HF_RATIO_TARGET})
        ratio = ours["median_decode_tokens_per_s"] / direct["median_decode_tokens_per_s"]
        rows.append({"metric": "transformers f32: decode tokens/s", "unit": "tok/s",
                     "ours": ours["median_decode_tokens_per_s"], "baseline": direct["median_decode_tokens_per_s"],
                     "baseline_label": base, "ratio": ratio, "ratio_label": "ours/HF",
                     "note": f"paired-run median {paired['decode_ratio_median']:.3f}", "target": "(info)", "pass": None})
        rows.append({"metric": "transformers f32: time to first token", "unit": "s",
                     "ours": ours["median_ttft_s"], "baseline": direct["median_ttft_s"], "baseline_label": base,
                     "ratio": ours["median_ttft_s"] / direct["median_ttft_s"], "ratio_label": "ours/HF",
                     "target": "(info)", "pass": None})
        rows.append({"metric": "transformers f32: last $/token -> response", "unit": "s",
                     "ours": ours["median_tail_s"], "baseline": 0.0, "baseline_label": "direct: none",
                     "ratio": None, "ratio_label": "", "target": "(info)", "pass": None})
        rows += _regime_row("transformers f32", ours, direct, base)
        outputs = section["outputs"]
        rows.append({"metric": "transformers f32: greedy output identical", "unit": "runs",
                     "ours": outputs["identical_runs"], "baseline": outputs["runs"], "baseline_label": "runs",
                     "ratio": None, "ratio_label": "", "target": "all runs identical", "pass": outputs["identical"]})
        loads += [r.get("foreign_cpus", 0.0) for r in ours["runs"] + direct["runs"]]
    if loads:
        rows.append({"metric": "machine: other processes' CPU use during samples", "unit": "cpus",
                     "ours": statistics.median(loads), "baseline": max(loads), "baseline_label": "max",
                     "ratio": None, "ratio_label": "", "extra": "median (of 2 CPUs)" if os.cpu_count() == 2 else "median",
                     "target": "(info: > 0.2 means noisy numbers)", "pass": None})
    return rows


def _regime_row(label: str, ours: dict[str, Any], direct: dict[str, Any], base: str) -> list[dict[str, Any]]:
    if "median_sleeps_per_token" not in ours or "median_sleeps_per_token" not in direct:
        return []
    return [{"metric": f"{label}: thread sleeps per token (OpenMP regime)", "unit": "n",
             "ours": ours["median_sleeps_per_token"], "baseline": direct["median_sleeps_per_token"], "baseline_label": base,
             "ratio": None, "ratio_label": "", "extra": f"< {SLEEPING_AT}: spinning barriers; 100s: sleeping",
             "target": "(info: same regime = fair)", "pass": None}]


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = []
    for row in rows:
        unit = row["unit"]
        baseline = f"{fmt(row['baseline'], unit)} ({row['baseline_label']})"
        ratio = f"{row['ratio']:.3f} ({row['ratio_label']})" if row["ratio"] is not None else row.get("extra", "-")
        if row.get("note"):
            ratio += f"; {row['note']}"
        cells.append((row["metric"], fmt(row["ours"], unit), baseline, ratio, row["target"], verdict(row)))
    print_aligned(("metric", "ours", "baseline", "ratio", "target", "result"), cells, rows)
    if any(r.get("like_for_like") is False for r in rows):
        print("Note: the sidecar and the direct call ran in different OpenMP barrier regimes (thread sleeps per token), "
              "so those ratios measure libgomp's wait policy as much as the sidecar; the default --omp-wait-policy "
              "passive compares like with like. See bench/README.md.")


def environment() -> dict[str, Any]:
    info = report.environment(ROOT, ("torch", "transformers", "tokenizers", "llama_cpp_python", "gguf", "safetensors", "numpy"),
                              our_protocol_version=PROTOCOL_VERSION)
    try:
        import llama_cpp

        info["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except Exception:  # noqa: BLE001
        pass
    info["openmp_env"] = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run: 2 runs of 32 new tokens")
    parser.add_argument("--runs", type=int, help="measured runs per side (default 5; --quick 2)")
    parser.add_argument("--max-tokens", type=int, help="new tokens per request (default 128; --quick 32)")
    parser.add_argument("--ttft-runs", type=int, help="extra time-to-first-token pairs (max_tokens 1) for llama.cpp (default 10; --quick 4)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    parser.add_argument("--gguf", choices=("f32", "f16", "both"), default="f32",
                        help="GGUF file type(s) for the llama.cpp section (default f32)")
    parser.add_argument("--omp-wait-policy", choices=("passive", "library-default"), default="passive",
                        help="OMP_WAIT_POLICY for both sides. passive (default): both in the sleeping-barrier regime, "
                             "so the ratios measure the sidecar, not libgomp; library-default: leave it unset, as users "
                             "run it (the sides may then differ in regime; the table says so)")
    parser.add_argument("--no-overlap-warmup", action="store_true",
                        help="skip the overlapping warm-up requests (measure a sidecar that only saw sequential requests)")
    parser.add_argument("--only", choices=("llama.cpp", "transformers"), action="append", help="run only this section (repeatable)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE, help=f"where the model is built (default {CACHE.relative_to(ROOT)})")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the model and GGUF files")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results file (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--no-json", action="store_true", help="do not print the JSON document (it is still written)")
    args = parser.parse_args(argv)

    config = {
        "runs": args.runs or (2 if args.quick else 5),
        "max_tokens": args.max_tokens or (32 if args.quick else 128),
        "ttft_runs": args.ttft_runs if args.ttft_runs is not None else (4 if args.quick else 10),
        "prompt_tokens": args.prompt_tokens,
        "n_ctx": N_CTX, "n_threads": N_THREADS,
        "gguf": ["f32", "f16"] if args.gguf == "both" else [args.gguf],
        "quick": args.quick,
        "omp_wait_policy": args.omp_wait_policy,
        "overlap_warmup": not args.no_overlap_warmup,
        "sections": args.only or ["llama.cpp", "transformers"],
        "model_dims": MODEL_DIMS,
    }
    if config["prompt_tokens"] + config["max_tokens"] > N_CTX:
        parser.error(f"--prompt-tokens + --max-tokens must fit n_ctx {N_CTX}")
    if args.omp_wait_policy == "passive":  # before torch or llama_cpp is imported; the sidecar inherits it
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    global OVERLAP_WARMUP
    OVERLAP_WARMUP = not args.no_overlap_warmup
    results: dict[str, Any] = {"benchmark": "generate", "config": config, "environment": environment(),
                               "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    wall = time.perf_counter()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    assets = build_assets(args.cache_dir.resolve(), config["gguf"], args.rebuild)
    results["model"] = {k: v for k, v in assets.items() if k != "gguf_paths"}

    import transformers
    from llama_cpp import Llama

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(assets["hf_dir"], local_files_only=True)
    vocab_only = Llama(next(iter(assets["gguf_paths"].values())), vocab_only=True, verbose=False)
    prompts = make_prompts(hf_tokenizer, vocab_only, 1 + config["runs"] + config["ttft_runs"], config["prompt_tokens"])
    vocab_only.close()
    results["prompts"] = {"count": len(prompts), "tokens": config["prompt_tokens"],
                          "same_ids_hf_and_llama_cpp": True, "first": prompts[0]["text"][:80]}

    workdir = Path(tempfile.mkdtemp(prefix="mlsidecar-bench-gen-"))
    env = dict(os.environ)
    env["MLSIDECAR_HOME"] = str(workdir / "home")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.pop("MLSIDECAR_LOG_LEVEL", None)
    stderr_path = workdir / "stderr.log"
    stderr = open(stderr_path, "ab")  # noqa: SIM115 - closed below
    sidecar = SidecarProcess(["--allow-root", str(args.cache_dir.resolve())], env=env, cwd=str(ROOT), stderr=stderr)
    METER.pids.append(sidecar.proc.pid)
    runner = DirectThread()
    try:
        sidecar.request("initialize", {"protocolVersion": PROTOCOL_VERSION, "clientInfo": {"name": "bench/generate"}})
        if "llama.cpp" in config["sections"]:
            results["llama_cpp"] = {}
            for dtype in config["gguf"]:
                _log(f"[llama.cpp {dtype}] {config['runs']} runs x (direct, sidecar), {config['max_tokens']} tokens each ...")
                results["llama_cpp"][dtype] = bench_llama(sidecar, runner, assets["gguf_paths"][dtype], dtype, prompts,
                                                          config["runs"], config["max_tokens"], config["ttft_runs"])
        if "transformers" in config["sections"]:
            _log(f"[transformers f32] {config['runs']} runs x (HF generate, sidecar), {config['max_tokens']} tokens each ...")
            results["transformers"] = bench_transformers(sidecar, runner, assets["hf_dir"], prompts, config["runs"], config["max_tokens"])
    except Exception:
        stderr.flush()
        tail = "\n".join(stderr_path.read_text(errors="replace").splitlines()[-30:])
        if tail:
            _log("--- stderr of the sidecar (last lines) ---\n" + tail)
        raise
    finally:
        runner.close()
        sidecar.close()
        stderr.close()
        shutil.rmtree(workdir, ignore_errors=True)
    results["wall_s"] = round(time.perf_counter() - wall, 2)
    rows = build_rows(results)
    results["summary"] = rows
    results["all_targets_met"] = all(r["pass"] is not False for r in rows)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    document = json.dumps(results, indent=2)
    args.output.write_text(document + "\n")
    if not args.no_json:
        print(document)
    print()
    env_info = results["environment"]
    print(f"Generation benchmark ({env_info['python']}, {env_info.get('cpus_usable', env_info['cpus'])} usable CPUs, "
          f"{config['runs']} runs, {config['prompt_tokens']}-token prompts, {config['max_tokens']} new tokens, "
          f"wall {results['wall_s']} s); JSON: {args.output}")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
