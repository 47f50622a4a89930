"""`export` with format coreml, in a worker: a causal LM to one multifunction .mlpackage (prefill,
decode, embed) with a stateful KV cache, optionally compressed; `quantize` with format coreml
(handlers/convert/quantize_coreml.py) runs the same pipeline with its quantization.

The artifact is a directory (the registry writes its manifest.json inside) holding
`<name>.mlpackage`, the tokenizer files (tokenizer.json, tokenizer_config.json, the chat template,
...) and a README.md model card; `output` names that directory, as for GGUF, and the result's
`path` is the package inside it. Everything is checked before anything is written (lengths against
the model, the quantization combination, the destination), then written inside the registry's
temporary directory: adapters merged into a scratch folder there (runtimes.hf.merge), each
function converted (and compressed) into scratch packages, assembled into the package, the scratch
folder removed before the rename. A failure, a cancel or a full disk leaves nothing behind.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from handlers.context import Context
from handlers.convert.export import SCRATCH, check_weights, file_stem, model_kind, model_stem, resolve_adapters, resolve_model
from protocol import messages as m
from protocol.errors import Cancelled, RpcError

DEFAULT_CONTEXT = 512
DEFAULT_PREFILL = 64
DEFAULT_FUNCTIONS = ("prefill", "decode")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "vocab.txt", "merges.txt", "vocab.json",
                   "generation_config.json", "config.json")


@dataclass
class Job:
    """What the export will do, settled before anything is written."""

    model: Any  # sidecar.models.ResolvedModel
    adapters: list[Any]  # handlers.convert.export.Adapter
    context_length: int
    prefill_length: int
    functions: tuple[str, ...]
    plan: Any  # runtimes.coreml.compress.Plan | None
    quantization: dict[str, Any] | None
    name: str
    dest: Path
    stem: str
    params: dict[str, Any]
    parents: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def export_coreml(params: m.ExportParams, ctx: Context) -> m.ExportResult:
    started = time.perf_counter()
    if params.outtype not in ("auto", "f16"):
        raise RpcError.invalid_params("params.outtype", "Core ML packages compute in float16: use auto or f16 "
                                                        "(compress with `quantization`)")
    if params.quantization is not None and not isinstance(params.quantization, m.CoreMLQuantization):
        raise RpcError.invalid_params("params.quantization", 'for coreml, an object such as {"mode": "palettize", '
                                                             '"nbits": 4} or {"mode": "linear", "dtype": "int8"}')
    if params.system is not None:
        raise RpcError.invalid_params("params.system", "applies to gguf (the Modelfile) only")
    quantization = msgspec.to_builtins(params.quantization) if params.quantization is not None else None
    job = plan_job(ctx, params.model, params.adapters, params.context_length, params.prefill_length, params.functions,
                   quantization, "params.quantization", params.output, params.name, msgspec.to_builtins(params),
                   params.options)
    built = run_job(job, ctx)
    return m.ExportResult(artifact=built["artifact"], format="coreml", path=built["path"], outtype="f16",
                          quantization=job.plan.label() if job.plan else None, files=built["files"],
                          seconds=round(time.perf_counter() - started, 3), warnings=job.warnings, spec=built["spec"],
                          quantization_report=built["quantization_report"])


# --------------------------------------------------------------------------------------------
# Checking


def plan_job(ctx: Context, reference: str, adapter_refs: list[m.AdapterRef], context_length: int | None,
             prefill_length: int | None, functions: list[str] | None, quantization: dict[str, Any] | None,
             quantization_field: str, output: str | None, name: str | None, params: dict[str, Any],
             options: m.LoadOptions, parents: list[str] | None = None) -> Job:
    from runtimes.coreml import compress
    from runtimes.coreml.decoder import read_spec

    chosen = tuple(functions) if functions is not None else DEFAULT_FUNCTIONS
    if not chosen:
        raise RpcError.invalid_params("params.functions", "name at least one of prefill, decode, embed")
    if len(set(chosen)) != len(chosen):
        raise RpcError.invalid_params("params.functions", f"{list(chosen)} names a function twice")
    for field_name, value in (("params.context_length", context_length), ("params.prefill_length", prefill_length)):
        if value is not None and value < 1:
            raise RpcError.invalid_params(field_name, f"must be a positive number of tokens (got {value})")
    plan = None
    if quantization is not None:
        try:
            plan = compress.parse(quantization, quantization_field)
        except compress.InvalidQuantization as exc:
            raise RpcError.invalid_params(exc.field, str(exc)) from None
    _destination(ctx, output, name, "model", "X")  # a taken output or a bad name: refused before any work
    model = resolve_model(ctx, reference, "params.model")
    if model_kind(model.path) != "hf":
        raise RpcError.failed("unsupported_model", f"{model.path} is not a Hugging Face model directory (config.json and "
                              "safetensors weights); Core ML export starts from one", path=str(model.path))
    check_weights(model.path, options)
    if not any(model.path.glob("*.safetensors")):
        raise RpcError.failed("unsupported_model", f"{model.path} has only pickle weights; the Core ML export reads "
                              "safetensors (merge_lora or save_pretrained writes them)", path=str(model.path))
    from runtimes.coreml.encoder import is_encoder, read_encoder_spec

    encoder = is_encoder(model.path)
    if encoder:  # BertModel: one embed function over enumerated input lengths up to context_length
        if functions is not None and chosen != ("embed",):
            raise RpcError.invalid_params("params.functions", "an encoder (BertModel) exports only embed")
        if prefill_length is not None:
            raise RpcError.invalid_params("params.prefill_length", "an encoder has no prefill chunk: its input lengths "
                                          "are enumerated buckets (16, 32, ...) up to context_length")
        chosen = ("embed",)
        spec = read_encoder_spec(model.path)
    else:
        spec = read_spec(model.path)  # UnsupportedModel (unsupported_model) lists the architectures it covers
    context = context_length or min(DEFAULT_CONTEXT, spec.max_positions)
    if context > spec.max_positions:
        raise RpcError.invalid_params("params.context_length", f"{context} is beyond the model's "
                                      f"max_position_embeddings ({spec.max_positions}); at most {spec.max_positions}")
    prefill = context if encoder else prefill_length or min(DEFAULT_PREFILL, context)
    if prefill > context:
        raise RpcError.invalid_params("params.prefill_length", f"{prefill} exceeds context_length ({context}): a chunk "
                                      f"must fit in the cache; at most {context}")
    adapters = resolve_adapters(ctx, adapter_refs, model)
    stem = model_stem(model)
    label = plan.label() if plan else "f16"
    requested_name = name
    name, dest = _destination(ctx, output, name, stem, label)
    parents = list(dict.fromkeys([x for x in [*(parents or []), model.artifact_id,
                                              *(a.artifact_id for a in adapters)] if x]))
    return Job(model, adapters, context, prefill, chosen, plan, quantization, name, dest,
               file_stem(requested_name, output, dest, stem), params, parents)


def _destination(ctx: Context, output: str | None, name: str | None, stem: str, label: str) -> tuple[str, Path]:
    from handlers.outputs import destination

    run = (getattr(ctx, "run_id", None) or f"local-{int(time.time())}").removeprefix("run-")
    return destination(ctx.services, "coreml", output=output, name=name, default_name=f"{stem}-coreml-{label}-{run}")


# --------------------------------------------------------------------------------------------
# Running


def run_job(job: Job, ctx: Context) -> dict[str, Any]:
    services = ctx.services
    ctx.check_cancelled()
    with services.registry.write_artifact("coreml", job.dest, name=job.name, params=job.params, parents=job.parents,
                                          run_id=getattr(ctx, "run_id", None)) as pending:
        info = _fill(job, ctx, pending)  # a full disk is an OSError that sidecar/failures.py names disk_full
    ctx.progress("write", 3, 3, f"registered {pending.record.id}")
    dest = Path(pending.record.path)
    files = [m.ExportedFile(role=_role(n, info["package"]), path=str(dest / n), size_bytes=_size(dest / n))
             for n in info["names"]]
    return {"artifact": m.Artifact(**pending.record.to_dict()), "path": str(dest / info["package"]), "files": files,
            "spec": info["spec"], "quantization_report": info["quantization_report"], "size_bytes": info["size_bytes"]}


def _fill(job: Job, ctx: Context, pending: Any) -> dict[str, Any]:
    from runtimes.coreml import convert

    root = Path(pending.path)
    scratch = root / SCRATCH
    scratch.mkdir()
    model_dir = job.model.path
    if job.adapters:
        model_dir = _merge(job, ctx, scratch / "merged")
    package = f"{job.stem}.mlpackage"

    def progress(stage: str, step: int, total: int, message: str) -> None:
        ctx.check_cancelled()
        ctx.progress(stage, step, total, message)

    request = convert.Request(model_dir, root / package, scratch / "functions", job.context_length, job.prefill_length,
                              job.functions, job.plan, progress, ctx.cancelled)
    try:
        result = convert.export(request)
        report = None
        if job.plan is not None:
            ctx.progress("report", 0, 1, "measuring the compression's accuracy cost (decompressed weights in torch)")
            from runtimes.coreml.report import accuracy

            if result["architecture"] == "BertModel":
                from runtimes.coreml.report import encoder_accuracy

                report = encoder_accuracy(model_dir, result["packages"]["embed"])
            else:
                report = accuracy(model_dir, result["packages"][job.functions[0]], job.context_length, result["spec"])
            report.update(uncompressed=result["uncompressed"], fallbacks=result["fallbacks"])
            _warn_uncompressed(job, ctx, result)
    except convert.ConvertCancelled:
        raise Cancelled({}) from None
    ctx.check_cancelled()
    for item in TOKENIZER_FILES:
        if (model_dir / item).is_file():
            shutil.copy2(model_dir / item, root / item)
    shutil.rmtree(scratch)
    description = result["description"]
    spec = {**description, "architecture": result["architecture"], "context_length": job.context_length,
            "prefill_length": job.prefill_length, "deployment_target": "iOS18/macOS15", "compute_precision": "float16",
            "parameters": result["parameters"], "timings": result["timings"],
            "tokenizer_files": sorted(item for item in TOKENIZER_FILES if (root / item).is_file())}
    size = description["size_bytes"]
    source_bytes = sum(p.stat().st_size for p in job.model.path.glob("*.safetensors"))
    pending.metrics = {"size_bytes": size, "weight_bytes": description["weight_bytes"], "source_size_bytes": source_bytes,
                       "seconds": result["seconds"],
                       **({k: report[k] for k in ("logit_max_abs_diff", "perplexity", "perplexity_base", "cosine_min")
                           if k in report} if report else {})}
    pending.extra_manifest = {
        "format": "coreml", "model_file": package, "quantization": job.quantization,
        "quantization_label": job.plan.label() if job.plan else None,
        "base_model": {"reference": job.model.reference, "path": str(job.model.path), "source": job.model.source},
        "adapters": [{"reference": a.reference, "artifact": a.artifact_id, "path": str(a.path), "weight": a.weight,
                      "merged": True} for a in job.adapters],
        "coreml": {"context_length": job.context_length, "prefill_length": job.prefill_length,
                   "functions": list(job.functions)},
        "spec": spec, "quantization_report": report,
    }
    ctx.progress("write", 1, 3, "writing the model card")
    _write_card(job, ctx, root, package, spec, report)
    ctx.progress("write", 2, 3, "hashing and registering")
    return {"names": sorted(p.name for p in root.iterdir()), "package": package, "spec": spec,
            "quantization_report": report, "size_bytes": size}


def _merge(job: Job, ctx: Context, out: Path) -> Path:
    from runtimes.hf.merge import merge_adapters

    ctx.progress("merge", 0, 1, f"merging {len(job.adapters)} adapter(s) into {job.model.reference}")

    def report(step: int, total: int, message: str) -> None:
        ctx.check_cancelled()
        ctx.progress("merge", step, total, message)

    merge_adapters(job.model.path, [(a.path, a.weight) for a in job.adapters], out, dtype="f32", progress=report,
                   cancelled=ctx.cancelled)
    ctx.check_cancelled()
    return out


def _warn_uncompressed(job: Job, ctx: Context, result: dict[str, Any]) -> None:
    matrices = [u for u in result["uncompressed"] if len(u["shape"]) >= 2]
    if matrices:
        message = (f"{len(matrices)} weight matrices were left uncompressed: "
                   + ", ".join(f"{u['name']} ({u['reason']})" for u in matrices[:5]))
        job.warnings.append(message)
        ctx.log("warning", message, {"uncompressed": matrices[:50]})
    if result["fallbacks"]:
        message = (f"{len(result['fallbacks'])} weight matrices do not divide into the requested groups or blocks, "
                   "so they were compressed at the same bits with a coarser granularity: "
                   + ", ".join(f"{f['name']} {f['wanted']} -> {f['used']}" for f in result["fallbacks"][:5]))
        job.warnings.append(message)
        ctx.log("warning", message, {"fallbacks": result["fallbacks"]})


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _role(name: str, package: str) -> str:
    if name == package:
        return "model"
    if name == "README.md":
        return "model_card"
    return "tokenizer" if name in TOKENIZER_FILES and name not in ("config.json", "generation_config.json") else "other"


# --------------------------------------------------------------------------------------------
# The model card


def _write_card(job: Job, ctx: Context, root: Path, package: str, spec: dict[str, Any], report: dict[str, Any] | None) -> None:
    from runtimes import model_card
    from sidecar.registry import library_versions

    files = [(p.name, _role(p.name, package), _size(p)) for p in sorted(root.iterdir())]
    summary = [f"format: Core ML ML Program, `{package}` ({model_card.human_size(spec['size_bytes'])}), "
               f"iOS 18 / macOS 15, float16 compute",
               f"made from `{job.model.reference}` ({job.model.source}: `{job.model.path}`), {spec['architecture']}",
               f"functions: {', '.join(job.functions)}; context {job.context_length} tokens, prefill chunk "
               f"{job.prefill_length} tokens"]
    if job.adapters:
        summary.append("adapters, merged into the weights: " + ", ".join(f"`{a.reference}`" for a in job.adapters))
    sections = [("Functions", _functions_table(spec))]
    if report:
        cost = (f"- logits against the uncompressed weights: max |diff| {report['logit_max_abs_diff']}, perplexity "
                f"{report['perplexity']} vs {report['perplexity_base']} over {report['tokens']} tokens"
                if "perplexity" in report else
                f"- embeddings against the uncompressed weights: cosine >= {report['cosine_min']} on "
                f"{report['sentences']} sentences")
        body = [f"- {job.plan.label()}: `{job_quantization_text(job)}`", cost,
                f"- left float16: {len(report['uncompressed'])} tensors "
                f"({sum(1 for u in report['uncompressed'] if len(u['shape']) >= 2)} of them matrices)"]
        sections.append(("Compression", "\n".join(body)))
    sections.append(("How to run", _usage(job, package)))
    text = model_card.render(title=f"{job.stem} (Core ML{', ' + job.plan.label() if job.plan else ''})", summary=summary,
                             files=files, ancestors=model_card.lineage(ctx.services.registry, job.parents),
                             sections=sections, versions={k: v for k, v in library_versions().items()
                                                          if k in ("mlsidecar", "coremltools", "torch", "transformers")})
    (root / "README.md").write_text(text, encoding="utf-8")


def job_quantization_text(job: Job) -> str:
    import json

    return json.dumps(job.quantization, separators=(",", ":"))


def _functions_table(spec: dict[str, Any]) -> str:
    lines = ["| function | inputs | outputs | states |", "|---|---|---|---|"]
    show = lambda items: ", ".join(f"`{i['name']}` {i['dtype']} {i['shape']}" for i in items) or "-"  # noqa: E731
    for name, fn in spec["functions"].items():
        lines.append(f"| {name} | {show(fn['inputs'])} | {show(fn['outputs'])} | {show(fn['states'])} |")
    return "\n".join(lines)


def _usage(job: Job, package: str) -> str:
    return "\n".join([
        "Load one function per MLModel (MLModelConfiguration.functionName), make one state with "
        "`makeState()` and pass it to prefill and decode; every input is int32:",
        "",
        f"- prefill: `input_ids` [1, {job.prefill_length}] (pad the end), `position` = index of its first token, "
        "`length` = real tokens in it; returns the last real token's `logits`. A chunk must end inside the context: "
        f"start the last one at min(position, {job.context_length} - {job.prefill_length}) (re-written positions get the same "
        "keys and values).",
        "- decode: `input_ids` [1, 1], `position`; returns `logits` [1, 1, vocab].",
        "- embed: `input_ids` [1, prefill_length], `length`; returns the L2-normalised mean of the last hidden states.",
        "",
        "See clients/swift/Samples/CoreMLChat in mlsidecar for a complete Swift loop.",
    ])
