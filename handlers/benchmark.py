"""`benchmark` in a worker: models side by side, each measured in a process of its own, one report.

Order of work: every path field is checked against the roots first (output, texts, then each model
reference through the resolver), then the meaning of the params (runtimes, lengths against each
model's context), and only then is anything measured. A model that cannot be resolved or loaded
fails its own row, never the run. The golden reference runs first, so the others can be compared
with its transcripts and embeddings. The report (report.json, report.md, chart.png) is registered as
an artifact of kind `benchmark`; every row is compared with the newest earlier row of the same key.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from handlers.context import Context
from protocol import messages as m
from protocol.errors import Cancelled, RpcError

REPORT_HISTORY = 200  # earlier benchmark artifacts searched for the previous run of a row


def _check_numbers(params: m.BenchmarkParams) -> None:
    checks = [
        ("models", bool(params.models), "give at least one model"),
        ("threads", params.threads is None or params.threads >= 1, "must be at least 1"),
        ("batch_size", params.batch_size >= 1, "must be at least 1"),
        ("ubatch_size", 1 <= params.ubatch_size <= params.batch_size, "must be between 1 and batch_size"),
        ("prompt_tokens", all(n >= 1 for n in params.prompt_tokens), "every length must be at least 1"),
        ("gen_tokens", all(n >= 1 for n in params.gen_tokens), "every length must be at least 1"),
        ("repetitions", params.repetitions >= 1, "must be at least 1"),
        ("warmup", params.warmup >= 0, "must be 0 or more"),
    ]
    if params.perplexity is not None:
        p = params.perplexity
        checks += [("perplexity.context", p.context >= 4, "must be at least 4"),
                   ("perplexity.stride", p.method == "chunks" or 1 <= p.stride <= p.context,
                    "must be between 1 and context (for the sliding method)"),
                   ("perplexity.max_tokens", p.max_tokens is None or p.max_tokens >= 2, "must be at least 2")]
    if params.golden is not None:
        checks += [("golden.prompts", bool(params.golden.prompts) and all(params.golden.prompts), "give at least one non-empty prompt"),
                   ("golden.tokens", params.golden.tokens >= 1, "must be at least 1")]
    if params.embed is not None:
        checks += [("embed.batch_size", params.embed.batch_size >= 1, "must be at least 1"),
                   ("embed.texts", not isinstance(params.embed.texts, list) or (params.embed.texts and all(params.embed.texts)),
                    "give at least one non-empty text")]
    for field, ok, reason in checks:
        if not ok:
            raise RpcError.invalid_params(f"params.{field}", reason)
    labels = [model.label or model.model for model in params.models]
    for index, label in enumerate(labels):
        if labels.index(label) != index:
            raise RpcError.invalid_params(f"params.models[{index}].label", f"{label!r} names two models; give each a unique label")


def _input_file(ctx: Context, path: str, field: str) -> Path:
    checked = ctx.services.paths.check(Path(path).expanduser())
    if not checked.exists():
        raise RpcError.failed("file_not_found", f"{field}: {checked} does not exist; give an existing UTF-8 text file", path=str(checked))
    if not checked.is_file():
        raise RpcError.failed("dataset_invalid", f"{field}: {checked} is not a regular file; give a UTF-8 text file", path=str(checked))
    return checked


def _failure(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, RpcError):
        return {"kind": (exc.data or {}).get("kind", "invalid_params"), "message": exc.message, "code": exc.code}
    kind = getattr(exc, "error_kind", None)
    if kind is None:
        raise exc
    return {"kind": kind, "message": str(exc), "code": -32803}


class _Model:
    """One row to measure: what the request said and what it resolved to."""

    def __init__(self, index: int, spec: m.BenchmarkModel, label: str) -> None:
        self.index, self.spec, self.label = index, spec, label
        self.path: Path | None = None
        self.artifact_id: str | None = None
        self.runtime: str | None = None
        self.adapters: list[tuple[Path, float]] = []
        self.error: dict[str, Any] | None = None


def _resolve(ctx: Context, models: list[_Model], reference: str | None) -> Any:
    """Resolve every model and adapter; a path outside the roots fails the request, anything else the row."""
    from handlers.convert.export import resolve_model

    refused: BaseException | None = None

    def attempt(field: str, ref: str) -> Any:
        nonlocal refused
        try:
            return resolve_model(ctx, ref, field)
        except Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted below
            if getattr(exc, "error_kind", None) == "path_not_allowed":
                refused = refused or exc
                return None
            raise

    for model in models:
        try:
            resolved = attempt(f"params.models[{model.index}].model", model.spec.model)
            if resolved is not None:
                model.path, model.artifact_id = resolved.path, resolved.artifact_id
            for j, adapter in enumerate(model.spec.adapters):
                found = attempt(f"params.models[{model.index}].adapters[{j}].adapter", adapter.adapter)
                if found is not None:
                    model.adapters.append((found.path, adapter.weight))
        except Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - the row fails, the run goes on
            model.error = _failure(exc)
    extra = None
    if reference is not None and reference not in {model.label for model in models}:
        extra = attempt("params.golden.reference", reference)
    if refused is not None:
        raise refused
    return extra


def _runtime_for(path: Path, requested: str, field: str) -> tuple[str, Path]:
    """(runtime, the file or directory it loads); -32602 naming the field when the runtime cannot load the format."""
    from handlers.convert.export import main_gguf, model_kind
    from runtimes.registry import _RUNTIMES

    kind = model_kind(path)
    onnx = (path.is_dir() and (path / "model.onnx").is_file()) or path.suffix == ".onnx"
    if requested == "onnxruntime" and "onnxruntime" not in _RUNTIMES:
        raise RpcError.invalid_params(field, "the onnxruntime runtime is not available in this build; use transformers "
                                             "or llama.cpp")
    if onnx and requested in ("auto", "onnxruntime") and "onnxruntime" in _RUNTIMES:
        return "onnxruntime", path  # an ONNX export holds config.json too: the graph decides
    if requested == "onnxruntime":
        raise RpcError.invalid_params(field, f"onnxruntime cannot load {path.name}: it is not an ONNX export (a directory "
                                             "with model.onnx); use runtime auto")
    if kind == "hf" and requested in ("auto", "transformers"):
        return "transformers", path
    if kind == "gguf" and requested in ("auto", "llama.cpp"):
        return "llama.cpp", main_gguf(path) or path
    if requested == "auto" or kind == "other":
        from runtimes.base import UnsupportedModel

        raise UnsupportedModel(f"{path} is neither a Hugging Face model directory (config.json) nor a GGUF file", path=str(path))
    fmt = "a Hugging Face model directory" if kind == "hf" else "a GGUF file"
    fits = "transformers" if kind == "hf" else "llama.cpp"
    raise RpcError.invalid_params(field, f"{requested} cannot load {path.name}: it is {fmt}; use runtime {fits} (or auto)")


def _context_length(path: Path, runtime: str) -> int | None:
    try:
        if runtime == "llama.cpp":
            from runtimes.llama_cpp.lm import read_header

            return read_header(path).context_length
        home = path if path.is_dir() else path.parent
        config = json.loads((home / "config.json").read_text(encoding="utf-8"))
        value = config.get("max_position_embeddings") or config.get("n_positions")
        return int(value) if value else None
    except Exception:  # noqa: BLE001 - a file that cannot be read fails its row when it is loaded
        return None


def _check_lengths(params: m.BenchmarkParams, model: _Model) -> None:
    limit = _context_length(model.path, model.runtime)  # type: ignore[arg-type]
    if not limit:
        return
    wanted = [("params.prompt_tokens", n) for n in params.prompt_tokens] + [("params.gen_tokens", n) for n in params.gen_tokens]
    if params.perplexity is not None:
        wanted.append(("params.perplexity.context", params.perplexity.context))
    for field, n in wanted:
        if n > limit:
            raise RpcError.failed("prompt_too_long", f"{field}: {n} tokens do not fit the context of {model.label} "
                                  f"({limit} tokens); use at most {limit}", field=field, tokens=n, limit=limit, model=model.label)


def _settings(params: m.BenchmarkParams) -> m.BenchmarkSettings:
    from runtimes.bench.isolate import effective_wait_policy
    from runtimes.bench.machine import cpu_count

    return m.BenchmarkSettings(threads=params.threads or cpu_count(), omp_wait_policy=effective_wait_policy(params.omp_wait_policy),
                               batch_size=params.batch_size, ubatch_size=params.ubatch_size,
                               prompt_tokens=list(params.prompt_tokens), gen_tokens=list(params.gen_tokens),
                               repetitions=params.repetitions, warmup=params.warmup, seed=params.seed)


def _key(model: _Model, settings: m.BenchmarkSettings) -> str:
    """The model's identity and the settings that change the numbers (not lengths: tests pair by name)."""
    identity = {"model": model.artifact_id or str(model.path or model.spec.model), "runtime": model.runtime,
                "adapters": [[str(p), w] for p, w in model.adapters], "device": model.spec.device, "dtype": model.spec.dtype,
                "threads": settings.threads, "omp_wait_policy": settings.omp_wait_policy, "batch_size": settings.batch_size,
                "ubatch_size": settings.ubatch_size}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _size(path: Path | None) -> int | None:
    if path is None or not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "manifest.json")


def _row(model: _Model, settings: m.BenchmarkSettings, measured: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "label": model.label, "model": model.spec.model, "path": str(model.path) if model.path else None,
        "runtime": model.runtime, "status": "failed" if model.error else "ok", "error": model.error,
        "adapters": [str(p) for p, _ in model.adapters], "device": None, "dtype": None, "size_bytes": _size(model.path),
        "load_s": None, "peak_rss_bytes": None, "gpu_memory_bytes": None, "speed": [], "latency": None, "perplexity": None,
        "parity": None, "embed": None, "settings": msgspec.to_builtins(settings), "machine": None,
        "key": _key(model, settings), "change": None,
    }
    if measured:
        row.update({k: v for k, v in measured.items() if k in row})
    return row


def _embed_texts(ctx: Context, embed: m.BenchmarkEmbed) -> list[str]:
    if isinstance(embed.texts, list):
        return list(embed.texts)
    path = _input_file(ctx, embed.texts, "params.embed.texts")
    texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise RpcError.failed("input_empty", f"params.embed.texts: {path} has no non-empty line", path=str(path))
    return texts


class _Run:
    """The measurements, model after model, each in its own process."""

    def __init__(self, ctx: Context, params: m.BenchmarkParams, settings: m.BenchmarkSettings, scratch: Path) -> None:
        from runtimes.bench.isolate import child_env

        self.ctx, self.params, self.settings, self.scratch = ctx, params, settings, scratch
        self.env = child_env(settings.threads, params.omp_wait_policy)
        self.rows: dict[int, dict[str, Any]] = {}
        self.transcripts: list[dict[str, Any]] | None = None
        self.embed_reference: str | None = None

    def spec(self, model: _Model, *, speed: bool, golden_reference: bool, embed_texts: list[str] | None,
             embed_reference: bool, ppl: Path | None) -> dict[str, Any]:
        p, g, e = self.params.perplexity, self.params.golden, self.params.embed
        spec: dict[str, Any] = {"label": model.label, "path": str(model.path), "runtime": model.runtime,
                                "adapters": [[str(a), w] for a, w in model.adapters], "device": model.spec.device,
                                "dtype": model.spec.dtype, "settings": msgspec.to_builtins(self.settings), "speed": speed}
        if p is not None and ppl is not None:
            spec["perplexity"] = {"path": str(ppl), "method": p.method, "context": p.context, "stride": p.stride,
                                  "max_tokens": p.max_tokens}
        if g is not None and (golden_reference or self.transcripts is not None):
            spec["golden"] = {"prompts": list(g.prompts), "tokens": g.tokens, "reference": g.reference,
                              "transcripts": None if golden_reference else self.transcripts}
        if e is not None and embed_texts is not None and (embed_reference or self.embed_reference):
            vectors = self.scratch / "reference.npy"
            spec["embed"] = {"texts": embed_texts, "batch_size": e.batch_size, "reference": self.embed_reference or model.label,
                             "save": str(vectors) if embed_reference else None,
                             "reference_vectors": None if embed_reference else str(vectors)}
        return spec

    def measure(self, model: _Model, spec: dict[str, Any], position: int, count: int) -> dict[str, Any] | None:
        from runtimes.bench.isolate import ChildCancelled, run_child

        ctx = self.ctx
        ctx.check_cancelled(self.partial())
        ctx.progress("model", position, count, f"measuring {model.label} on {model.runtime} (model {position + 1} of {count})")

        def relay(p: dict[str, Any]) -> None:
            ctx.progress(p["stage"], p["step"], p["total"], p["message"])

        try:
            answer = run_child(spec, self.env, relay, ctx.cancelled)
        except ChildCancelled:
            raise Cancelled(self.partial()) from None
        if "error" in answer:
            error = answer["error"]
            model.error = {"kind": error["kind"], "message": error["message"], "code": -32803}
            ctx.log("warning", f"{model.label}: {error['message']}", {"label": model.label, "kind": error["kind"],
                                                                     "detail": error.get("detail") or {}})
            return None
        result = answer["result"]
        machine = result.get("machine") or {}
        if machine.get("busy"):
            ctx.log("warning", f"{model.label}: {machine['note']}", {"label": model.label, "foreign_cpus": machine["foreign_cpus"]})
        return result

    def partial(self) -> dict[str, Any]:
        return {"rows": [self.rows[i] for i in sorted(self.rows)]}


def _previous_rows(services: Any) -> list[tuple[str, float, dict[str, Any]]]:
    found = []
    for record in services.registry.list_artifacts(kind="benchmark", limit=REPORT_HISTORY):
        try:
            report = json.loads((Path(record.path) / "report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found += [(record.id, record.created, row) for row in report.get("rows", []) if isinstance(row, dict)]
    return found


def benchmark(params: m.BenchmarkParams, ctx: Context) -> m.BenchmarkResult:
    from handlers.outputs import destination

    started = time.perf_counter()
    services = ctx.services
    _check_numbers(params)
    run_id = getattr(ctx, "run_id", None) or f"local-{int(time.time())}"
    name, dest = destination(services, "benchmarks", output=params.output, name=params.name, default_name=f"benchmark-{run_id}")
    ppl_path = services.paths.check(Path(params.perplexity.data).expanduser()) if params.perplexity else None
    if params.embed is not None and isinstance(params.embed.texts, str):
        services.paths.check(Path(params.embed.texts).expanduser())
    models = [_Model(i, spec, spec.label or spec.model) for i, spec in enumerate(params.models)]
    reference_label = params.golden.reference if params.golden else None
    extra = _resolve(ctx, models, reference_label)
    if params.perplexity is not None:
        ppl_path = _input_file(ctx, params.perplexity.data, "params.perplexity.data")
    embed_texts = _embed_texts(ctx, params.embed) if params.embed is not None else None
    for model in models:
        if model.error is None and model.path is not None:
            try:
                model.runtime, model.path = _runtime_for(model.path, model.spec.runtime, f"params.models[{model.index}].runtime")
            except RpcError:
                raise
            except Exception as exc:  # noqa: BLE001 - an unloadable format fails its row
                model.error = _failure(exc)
                continue
            if model.adapters and model.runtime != "transformers":
                raise RpcError.invalid_params(f"params.models[{model.index}].adapters", "unmerged adapters apply on transformers; "
                                              f"for {model.runtime}, export the model with the adapter merged (export with "
                                              "merge: true) or benchmark it on the Hugging Face model")
            _check_lengths(params, model)
    reference: _Model | None = None
    if extra is not None:
        reference = _Model(-1, m.BenchmarkModel(model=reference_label or ""), reference_label or "reference")
        reference.path, reference.artifact_id = extra.path, extra.artifact_id
        reference.runtime, reference.path = _runtime_for(extra.path, "auto", "params.golden.reference")

    settings = _settings(params)
    with tempfile.TemporaryDirectory(prefix="mlsidecar-bench-") as scratch:
        run = _Run(ctx, params, settings, Path(scratch))
        _measure_all(run, models, reference, reference_label, embed_texts, ppl_path)
        rows = [run.rows[i] for i in sorted(run.rows)]
    ctx.check_cancelled(run.partial())
    from runtimes.bench.report import change, markdown

    previous = _previous_rows(services)
    for row in rows:
        row["change"] = change(row, previous)
    table = markdown(rows, msgspec.to_builtins(settings))
    return _write(ctx, params, name, dest, rows, table, settings, models, run_id, started)


def _measure_all(run: _Run, models: list[_Model], reference: _Model | None, reference_label: str | None,
                 embed_texts: list[str] | None, ppl_path: Path | None) -> None:
    """The golden/embedding reference first (a row of its own, or a reference-only process), then the rest."""
    order = sorted(models, key=lambda model: model.label != reference_label)
    embed_reference = reference_label if run.params.golden else next((x.label for x in models if x.error is None), None)
    count = len(models) + (reference is not None)
    position = 0
    if reference is not None:
        spec = run.spec(reference, speed=False, golden_reference=True, embed_texts=embed_texts,
                        embed_reference=embed_texts is not None, ppl=None)
        spec.pop("perplexity", None)
        result = run.measure(reference, spec, position, count)
        position += 1
        _take_reference(run, reference.label, result)
    for model in order:
        measured = None
        if model.error is None:
            is_golden = model.label == reference_label
            is_embed = model.label == embed_reference and run.embed_reference is None
            spec = run.spec(model, speed=True, golden_reference=is_golden, embed_texts=embed_texts, embed_reference=is_embed,
                            ppl=ppl_path)
            measured = run.measure(model, spec, position, count)
            if is_golden or is_embed:
                _take_reference(run, model.label, measured)
        position += 1
        run.rows[model.index] = _row(model, run.settings, measured)
    run.ctx.progress("model", count, count, f"measured {len(models)} models")


def _take_reference(run: _Run, label: str, result: dict[str, Any] | None) -> None:
    if result is None:
        run.ctx.log("warning", f"the reference {label} could not be measured: parity and embedding agreement are left out")
        return
    if result.get("golden") is not None:
        run.transcripts = result["golden"]
    if result.get("embed") is not None:
        run.embed_reference = label


def _write(ctx: Context, params: m.BenchmarkParams, name: str, dest: Path, rows: list[dict[str, Any]], table: str,
           settings: m.BenchmarkSettings, models: list[_Model], run_id: str, started: float) -> m.BenchmarkResult:
    from runtimes.bench.chart import plot

    services = ctx.services
    parents = list(dict.fromkeys(x.artifact_id for x in models if x.artifact_id))
    ctx.progress("report", 0, 1, f"writing the report to {dest}")
    with services.registry.write_artifact("benchmark", dest, name=name, params=msgspec.to_builtins(params), parents=parents,
                                          run_id=run_id) as pending:
        report = {"id": pending.id, "created": time.time(), "settings": msgspec.to_builtins(settings), "rows": rows}
        (pending.path / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (pending.path / "report.md").write_text(table, encoding="utf-8")
        chart = plot(rows, pending.path / "chart.png", f"benchmark {pending.id}")
        pending.metrics = {"models": len(rows), "failed": sum(r["status"] == "failed" for r in rows),
                           **{f"{r['label']}:{s['test']}_tps": s["mean_tps"] for r in rows for s in r["speed"]}}
    ctx.progress("report", 1, 1, f"registered {pending.record.id}")
    files = m.BenchmarkFiles(report_json=str(dest / "report.json"), report_md=str(dest / "report.md"),
                             chart_png=str(dest / "chart.png") if chart else None)
    return m.BenchmarkResult(artifact=m.Artifact(**pending.record.to_dict()), rows=[msgspec.convert(r, m.BenchmarkRow) for r in rows],
                             markdown=table, settings=settings, files=files, seconds=round(time.perf_counter() - started, 3))
