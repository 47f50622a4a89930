"""`export` (format gguf) in a worker: a model, optionally with adapters, to a GGUF artifact, and the
pipeline `quantize` (handlers/convert/quantize.py) shares.

The artifact is a directory (the registry writes its manifest.json inside) holding
`<name>.<TYPE>.gguf`, one `<adapter>.lora.gguf` per adapter kept separate, the Ollama `Modelfile`
and a `README.md` model card; `output` names that directory and the result's `path` is the main
.gguf inside it. In one job: resolve, check (nothing is written before every input is known to
fit), then optionally merge the adapters (runtimes.hf.merge), convert to GGUF (runtimes.gguf.export),
optionally quantize (runtimes.gguf.quantize), convert the separate adapters (runtimes.gguf.lora),
write the Modelfile and the card. Everything is written inside the registry's temporary directory,
intermediates in a scratch folder there that is removed before the rename, so a failure, a cancel
or a full disk leaves nothing behind.

"auto" outtype follows llama.cpp's converter: bf16 for a bf16 checkpoint, f16 otherwise (f32
checkpoints included: f32 doubles the file for differences below what sampling notices; ask for
f32 when exactness matters). With `quantization`, outtype is the precision quantized from and
the file kept is the quantized one.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec

from handlers.context import Context
from handlers.outputs import destination
from protocol import messages as m
from protocol.errors import Cancelled, RpcError
from runtimes import model_card
from runtimes.gguf.export import convert_to_gguf
from runtimes.gguf.modelfile import GgufChat, build_modelfile
from runtimes.gguf.quantize import QuantizeCancelled, canonical_type, inspect_gguf, quantize_gguf
from sidecar.registry import library_versions

SCRATCH = ".work"  # inside the artifact's temporary directory; removed before it is renamed into place
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "vocab_size")


@dataclass
class Adapter:
    reference: str
    path: Path
    weight: float
    artifact_id: str | None
    file: str | None = None  # the GGUF LoRA written for it, when kept separate


@dataclass
class Plan:
    """What the job will do, settled before anything is written."""

    model: Any  # sidecar.models.ResolvedModel
    gguf_source: Path | None  # the source is already a GGUF (quantize only)
    adapters: list[Adapter]
    merge: bool
    outtype: str  # f32 | f16 | bf16 | q8_0: the converted precision (with quantization: what is quantized from)
    quantization: str | None
    modelfile: bool
    system: str | None
    name: str
    dest: Path
    stem: str  # file names inside the artifact
    params: dict[str, Any]
    options: m.LoadOptions
    warnings: list[str] = field(default_factory=list)
    modelfile_info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.quantization or self.outtype.upper()


@dataclass
class Built:
    artifact: m.Artifact
    main: Path
    files: list[m.ExportedFile]
    source_bytes: int
    warnings: list[str]


# --------------------------------------------------------------------------------------------
# export


def export(params: m.ExportParams, ctx: Context) -> m.ExportResult:
    """One method, one exporter per format (handlers/convert/export_coreml.py, handlers/convert/export_onnx.py)."""
    if params.format == "coreml":
        from handlers.convert.export_coreml import export_coreml

        return export_coreml(params, ctx)
    if params.format == "onnx":
        from handlers.convert.export_onnx import export_onnx

        return export_onnx(params, ctx)
    return export_gguf(params, ctx)


def export_gguf(params: m.ExportParams, ctx: Context) -> m.ExportResult:
    started = time.perf_counter()
    for name in ("context_length", "prefill_length", "functions"):
        if getattr(params, name) is not None:
            raise RpcError.invalid_params(f"params.{name}", "applies to format coreml only; leave it out for gguf")
    if params.quantization is not None and not isinstance(params.quantization, str):
        raise RpcError.invalid_params("params.quantization", "for gguf, a quantization type name such as Q4_K_M")
    quantization = _quant_type(params.quantization, "params.quantization") if params.quantization else None
    if quantization and params.outtype == "q8_0":
        raise RpcError.invalid_params("params.outtype", "with `quantization`, outtype is the precision quantized from: "
                                                        "auto, f32, f16 or bf16 (q8_0 is itself quantized)")
    if params.merge and not params.adapters:
        raise RpcError.invalid_params("params.merge", "merge: true needs adapters to merge")
    _destination(ctx, params.output, params.name, "model", "X")  # a taken output or a bad name: refused before any work
    model = resolve_model(ctx, params.model, "params.model")
    if model_kind(model.path) != "hf":
        hint = ("it is a PEFT adapter: give its base as `model` and it in `adapters`"
                if (model.path / "adapter_config.json").is_file() else "to quantize a GGUF file use the quantize method")
        raise RpcError.failed("unsupported_model", f"{model.path} is not a Hugging Face model directory (config.json and "
                              f"weights); {hint}", path=str(model.path))
    check_weights(model.path, params.options)
    stem = model_stem(model)
    outtype = auto_outtype(model.path) if params.outtype == "auto" else params.outtype
    label = quantization or outtype.upper()
    name, dest = _destination(ctx, params.output, params.name, stem, label)
    adapters = resolve_adapters(ctx, params.adapters, model)
    plan = Plan(model, None, adapters, params.merge, outtype, quantization, params.modelfile, params.system, name, dest,
                file_stem(params.name, params.output, dest, stem), msgspec.to_builtins(params), params.options)
    built = build(plan, ctx)
    return m.ExportResult(artifact=built.artifact, format="gguf", path=str(built.main), outtype=outtype,
                          quantization=quantization, files=built.files, seconds=round(time.perf_counter() - started, 3),
                          warnings=built.warnings)


# --------------------------------------------------------------------------------------------
# Checking the inputs (shared with quantize)


def _quant_type(name: str, field_name: str) -> str:
    try:
        return canonical_type(name)
    except ValueError as exc:
        raise RpcError.invalid_params(field_name, str(exc)) from None


def resolve_model(ctx: Context, reference: str, field_name: str) -> Any:
    """The resolved reference; one given as a path (or the built-in) still counts as the artifact it is."""
    import dataclasses

    ctx.progress("resolve", 0, 1, f"resolving {reference}")

    def progress(step: int, total: int, message: str) -> None:
        ctx.check_cancelled()
        ctx.progress("resolve", step, total, message)

    try:
        model = ctx.services.models.resolve(reference, progress)
    except Exception as exc:  # noqa: BLE001 - keep the kind, say which field
        exc.args = (f"{field_name}: {exc}",)
        raise
    if model.artifact_id is None:
        home = model.path if model.path.is_dir() else model.path.parent  # a GGUF file inside a GGUF artifact
        manifest = _read_json(home / "manifest.json")
        named = model.path.is_dir() or manifest.get("model_file") == model.path.name
        record = ctx.services.registry.get_artifact(manifest["id"]) if named and isinstance(manifest.get("id"), str) else None
        if record is not None and Path(record.path).resolve() == home.resolve():
            model = dataclasses.replace(model, artifact_id=record.id)
    return model


def model_kind(path: Path) -> str:
    """'hf' (config.json), 'gguf' (a .gguf file, or a GGUF artifact directory), or 'other'."""
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    if (path.is_file() and path.suffix == ".gguf") or (path.is_dir() and main_gguf(path) is not None):
        return "gguf"
    return "other"


def main_gguf(path: Path) -> Path | None:
    """The model file of a GGUF path: the file itself, or the one a GGUF artifact's manifest names."""
    if path.is_file():
        return path
    manifest = _read_json(path / "manifest.json")
    named = manifest.get("model_file")
    if isinstance(named, str) and (path / named).is_file():
        return path / named
    models = [p for p in sorted(path.glob("*.gguf")) if not p.name.endswith(".lora.gguf")]
    return models[0] if len(models) == 1 else None


def check_weights(model_dir: Path, options: m.LoadOptions) -> None:
    """The model-directory checks every method shares (safetensors, or pickle only when allowed)."""
    from runtimes.hf.lm import check_model_dir

    check_model_dir(model_dir, options.allow_pickle)


def auto_outtype(model_dir: Path) -> str:
    config = _read_json(model_dir / "config.json")
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
    return "bf16" if dtype == "bfloat16" else "f16"


def model_stem(model: Any) -> str:
    """A file-name stem for the model: the built-in's name, an artifact's name, the directory's or file's name."""
    if model.reference.startswith("builtin:"):
        raw = model.reference
    elif model.artifact_id:
        raw = _read_json(model.path / "manifest.json").get("name") or model.path.name
    else:
        raw = model.path.stem if model.path.is_file() else model.path.name
    raw = raw.removeprefix("builtin:")
    raw = re.sub(r"\.(F32|F16|BF16|Q\d\w*)$", "", raw, flags=re.IGNORECASE)  # tiny.F16 -> tiny
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.") or "model"


def file_stem(name: str | None, output: str | None, dest: Path, stem: str) -> str:
    return name if name else dest.name if output else stem


def _destination(ctx: Context, output: str | None, name: str | None, stem: str, label: str) -> tuple[str, Path]:
    run = (getattr(ctx, "run_id", None) or f"local-{int(time.time())}").removeprefix("run-")
    return destination(ctx.services, "gguf", output=output, name=name, default_name=f"{stem}-{label}-{run}")


def resolve_adapters(ctx: Context, refs: list[m.AdapterRef], model: Any) -> list[Adapter]:
    adapters = []
    for index, ref in enumerate(refs):
        field_name = f"params.adapters[{index}].adapter"
        resolved = resolve_model(ctx, ref.adapter, field_name)
        if not (resolved.path / "adapter_config.json").is_file():
            raise RpcError.failed("adapter_invalid", f"{field_name}: {resolved.path} is not a PEFT adapter directory "
                                  "(no adapter_config.json)", path=str(resolved.path))
        adapter = Adapter(ref.adapter, resolved.path, ref.weight, resolved.artifact_id)
        _check_base(ctx, adapter, model, field_name)
        adapters.append(adapter)
    return adapters


def _check_base(ctx: Context, adapter: Adapter, model: Any, field_name: str) -> None:
    """The adapter's recorded base (its manifest, else adapter_config.json) against the model: other
    dimensions, or other weights where both have manifests, are adapter_mismatch. Shapes are checked
    again, tensor by tensor, by the merge and the GGUF LoRA writer."""
    manifest = _read_json(adapter.path / "manifest.json")
    base_info = manifest.get("base_model") if isinstance(manifest.get("base_model"), dict) else {}
    recorded = base_info.get("path") or _read_json(adapter.path / "adapter_config.json").get("base_model_name_or_path")
    base_ref = base_info.get("reference") or recorded
    if not recorded or not (Path(recorded) / "config.json").is_file():
        return
    base = Path(recorded)
    if base.resolve() == model.path.resolve():
        return
    ours, theirs = _shape(model.path), _shape(base)
    mismatch = None
    if ours != theirs:
        differ = ", ".join(f"{k} {theirs.get(k)} vs {ours.get(k)}" for k in _SHAPE_KEYS if ours.get(k) != theirs.get(k))
        mismatch = f"its base has other dimensions ({differ})"
    else:
        our_hashes, their_hashes = _weight_hashes(model.path), _weight_hashes(base)
        if our_hashes and their_hashes and our_hashes != their_hashes:
            mismatch = "its base has the same dimensions but other weights"
    if mismatch:
        raise RpcError.failed("adapter_mismatch", f"{field_name}: adapter {adapter.reference} was trained on {base_ref} "
                              f"({base}), not on {model.reference} ({model.path}): {mismatch}; export it with its own base",
                              adapter=adapter.reference, adapter_base=str(base_ref), model=model.reference)
    ctx.log("warning", f"adapter {adapter.reference} was trained on {base_ref}; {model.reference} has the same "
                       "dimensions, so it is applied to it")


def _shape(model_dir: Path) -> dict[str, Any]:
    config = _read_json(model_dir / "config.json")
    return {key: config.get(key) for key in _SHAPE_KEYS}


def _weight_hashes(model_dir: Path) -> dict[str, str]:
    files = _read_json(model_dir / "manifest.json").get("files") or []
    return {f["path"]: f["sha256"] for f in files if isinstance(f, dict) and str(f.get("path", "")).endswith(".safetensors")}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------------------------
# The pipeline


def _reporter(ctx: Context, stage: str, what: str = "") -> Any:
    def report(step: int, total: int, message: str) -> None:
        ctx.check_cancelled()  # between tensors: a cancelled job stops here, and its files go with the temp dir
        ctx.progress(stage, step, total, f"{what}{message}")

    return report


def build(plan: Plan, ctx: Context) -> Built:
    """Run the plan inside the registry's atomic writer; returns the registered artifact and its files."""
    started = time.perf_counter()
    services = ctx.services
    parents = list(dict.fromkeys([x for x in [plan.model.artifact_id, *(a.artifact_id for a in plan.adapters)] if x]))
    run_id = getattr(ctx, "run_id", None)
    ctx.check_cancelled()
    with services.registry.write_artifact("gguf", plan.dest, name=plan.name, params=plan.params, parents=parents,
                                          run_id=run_id) as pending:
        names, main, source_bytes = _fill(plan, ctx, pending, parents, started)
    ctx.progress("write", 3, 3, f"registered {pending.record.id}")
    dest = Path(pending.record.path)
    files = [m.ExportedFile(role=_role(n, main.name), path=str(dest / n), size_bytes=(dest / n).stat().st_size)
             for n in names]
    return Built(m.Artifact(**pending.record.to_dict()), dest / main.name, files, source_bytes, plan.warnings)


def _fill(plan: Plan, ctx: Context, pending: Any, parents: list[str], started: float) -> tuple[list[str], Path, int]:
    """Everything written into the artifact's temporary directory; returns its file names."""
    services = ctx.services
    root = Path(pending.path)
    scratch = root / SCRATCH
    scratch.mkdir()
    main = root / f"{plan.stem}.{plan.label}.gguf"
    stats = _make_main(plan, ctx, scratch, main)
    if stats.get("sha256"):
        pending.record_digest(main, stats["sha256"])
    adapter_dir = stats.pop("base_dir")
    for adapter in plan.adapters if not plan.merge else []:
        _write_adapter(plan, ctx, adapter, adapter_dir, root)
    shutil.rmtree(scratch)
    ctx.check_cancelled()
    ctx.progress("write", 0, 3, "writing the Modelfile")
    if plan.modelfile:
        _write_modelfile(plan, ctx, main, root, stats.pop("info"))
    ctx.progress("write", 1, 3, "writing the model card")
    source_bytes = stats["source_bytes"]
    metrics = {"size_bytes": main.stat().st_size, "source_size_bytes": source_bytes,
               "ratio": round(main.stat().st_size / source_bytes, 4) if source_bytes else None,
               "seconds": round(time.perf_counter() - started, 3), **stats["metrics"]}
    pending.metrics = metrics
    pending.extra_manifest = {
        "format": "gguf", "model_file": main.name, "outtype": plan.outtype, "quantization": plan.quantization,
        "base_model": {"reference": plan.model.reference, "path": str(plan.model.path), "source": plan.model.source},
        "adapters": [{"reference": a.reference, "artifact": a.artifact_id, "path": str(a.path), "weight": a.weight,
                      "merged": plan.merge, "file": a.file} for a in plan.adapters],
        "modelfile": plan.modelfile_info or None,
    }
    _write_card(plan, services, root, main, metrics, parents)
    ctx.progress("write", 2, 3, "hashing and registering")
    return sorted(p.name for p in root.iterdir()), main, source_bytes


def _make_main(plan: Plan, ctx: Context, scratch: Path, main: Path) -> dict[str, Any]:
    """The main GGUF: (merge,) convert, (quantize). Returns the source size, metrics and the HF
    directory separate adapters are converted against."""
    metrics: dict[str, Any] = {}
    if plan.gguf_source is not None:
        source, source_bytes, base_dir = plan.gguf_source, plan.gguf_source.stat().st_size, None
    else:
        base_dir = plan.model.path
        source_bytes = sum(p.stat().st_size for p in base_dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        if not any(base_dir.glob("*.safetensors")):
            base_dir = _safetensors_copy(plan, ctx, scratch / "safetensors")
        hf_dir = base_dir
        if plan.merge:
            hf_dir = _merge(plan, ctx, base_dir, scratch / "merged")
        source = main if plan.quantization is None else scratch / f"source.{plan.outtype}.gguf"
        ctx.progress("convert", 0, 1, f"converting {plan.model.reference} to GGUF {plan.outtype}")
        stats = convert_to_gguf(hf_dir, source, dtype=plan.outtype, progress=_reporter(ctx, "convert"),
                                metadata={"general.name": plan.stem})
        metrics.update(parameters=stats.get("parameters"), tensors=stats.get("tensors"))
    if plan.quantization is not None:
        ctx.progress("quantize", 0, 1, f"quantizing to {plan.quantization} with llama.cpp")
        try:
            # the tokens and template (quantizing keeps them) are read from the source while llama.cpp works
            result = quantize_gguf(source, main, plan.quantization, threads=plan.options.n_threads or 0,
                                   progress=lambda s, t, msg: ctx.progress("quantize", s, t, msg), cancelled=ctx.cancelled,
                                   alongside=lambda: inspect_gguf(source, tensor_types=False))
        except QuantizeCancelled:
            raise Cancelled({}) from None
        metrics.update(tensors=result["tensors"], quantize_seconds=result["seconds"],
                       fallback_tensors=len(result["fallbacks"]))
        _report_fallbacks(plan, ctx, result["fallbacks"], result["tensors"])
        if source != plan.gguf_source:
            source.unlink()
        info = replace(result["alongside"], tensor_types=result["tensor_types"])
        sha256 = result["sha256"]  # made while llama.cpp wrote the file: the registry need not read it again
    else:
        sha256 = None
        info = inspect_gguf(main)  # as llama.cpp reads it: tensor types here, tokens and template for the Modelfile
    metrics["tensor_types"] = info.tensor_types
    return {"source_bytes": source_bytes, "metrics": metrics, "base_dir": base_dir, "info": info,
            "sha256": sha256}


def _report_fallbacks(plan: Plan, ctx: Context, fallbacks: list[dict[str, Any]], total: int) -> None:
    if not fallbacks:
        return
    used = sorted({f"{f['wanted']} -> {f['used']}" for f in fallbacks})
    message = (f"{len(fallbacks)} of {total} tensors have rows whose length does not divide into the "
               f"{fallbacks[0]['block']}-value blocks of {plan.quantization}'s types, so llama.cpp stored them in a "
               f"fallback type ({', '.join(used)}); the file is valid, a little larger and more precise than "
               f"{plan.quantization} proper")
    plan.warnings.append(message)
    ctx.log("warning", message, {"fallbacks": fallbacks[:50]})


def _safetensors_copy(plan: Plan, ctx: Context, out: Path) -> Path:
    """A pickle checkpoint (allowed by the request) rewritten as safetensors, so the converters read it."""
    import transformers

    ctx.progress("convert", 0, 1, "loading the pickle checkpoint (options.allow_pickle) to rewrite it as safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        plan.model.path, use_safetensors=False, dtype="auto", trust_remote_code=plan.options.trust_remote_code,
        local_files_only=True)
    model.save_pretrained(out)
    del model
    for item in plan.model.path.iterdir():
        if item.is_file() and item.suffix not in _WEIGHT_SUFFIXES and not (out / item.name).exists() \
                and not item.name.endswith(".index.json"):
            shutil.copy2(item, out / item.name)
    ctx.check_cancelled()
    return out


def _merge(plan: Plan, ctx: Context, base_dir: Path, out: Path) -> Path:
    from runtimes.hf.merge import merge_adapters

    ctx.progress("merge", 0, 1, f"merging {len(plan.adapters)} adapter(s) into {plan.model.reference}")
    merge_adapters(base_dir, [(a.path, a.weight) for a in plan.adapters], out, dtype="auto",
                   progress=_reporter(ctx, "merge"), cancelled=ctx.cancelled)
    ctx.check_cancelled()
    return out


def _write_adapter(plan: Plan, ctx: Context, adapter: Adapter, base_dir: Path, root: Path) -> None:
    from runtimes.gguf.lora import convert_lora_to_gguf

    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", adapter.artifact_id or adapter.path.name).strip("-.") or "adapter"
    name, n = f"{stem}.lora.gguf", 1
    while (root / name).exists():
        n += 1
        name = f"{stem}-{n}.lora.gguf"
    ctx.progress("adapter", 0, 1, f"converting adapter {adapter.reference} to a GGUF LoRA")
    convert_lora_to_gguf(adapter.path, base_dir, root / name, dtype="f32" if plan.outtype == "f32" else "f16",
                         progress=_reporter(ctx, "adapter", f"{adapter.reference}: "))
    adapter.file = name


def _write_modelfile(plan: Plan, ctx: Context, main: Path, root: Path, info: Any) -> None:
    adapters = [(a.file, a.weight) for a in plan.adapters if a.file]
    chat = GgufChat(info.chat_template, info.bos_token, info.eos_token, info.add_bos, info.control_tokens, info.eog_tokens)
    built = build_modelfile(main.name, chat, adapters=adapters, system=plan.system)
    (root / "Modelfile").write_text(built.text, encoding="utf-8")
    plan.modelfile_info = {"family": built.family, "stops": built.stops}
    for warning in built.warnings:
        plan.warnings.append(warning)
        ctx.log("warning", warning)


def _role(name: str, main: str) -> str:
    if name == main:
        return "model"
    if name.endswith(".lora.gguf"):
        return "adapter"
    return {"Modelfile": "modelfile", "README.md": "model_card"}.get(name, "other")


# --------------------------------------------------------------------------------------------
# The model card


def _write_card(plan: Plan, services: Any, root: Path, main: Path, metrics: dict[str, Any], parents: list[str]) -> None:
    files = [(p.name, _role(p.name, main.name), p.stat().st_size) for p in sorted(root.iterdir()) if p.is_file()]
    summary = [f"format: GGUF, `{main.name}` ({model_card.human_size(metrics['size_bytes'])})",
               f"made from `{plan.model.reference}` ({plan.model.source}: `{plan.model.path}`)"]
    if plan.adapters:
        how = "merged into the weights" if plan.merge else "kept as separate GGUF LoRA files"
        summary.append("adapters, " + how + ": " + ", ".join(
            f"`{a.reference}`" + (f" × {a.weight}" if a.weight != 1.0 else "") for a in plan.adapters))
    sections = []
    if plan.quantization:
        ratio = f", {metrics['ratio']:.3f} of the source's {model_card.human_size(metrics['source_size_bytes'])}" \
            if metrics.get("ratio") else ""
        body = [f"- type: {plan.quantization}, by llama.cpp's quantizer (llama_model_quantize), from {plan.outtype}"
                if plan.gguf_source is None else f"- type: {plan.quantization}, by llama.cpp's quantizer (llama_model_quantize)",
                f"- size: {model_card.human_size(metrics['size_bytes'])}{ratio}",
                "- tensor types: " + ", ".join(f"{k} × {v}" for k, v in metrics.get("tensor_types", {}).items())]
        if metrics.get("fallback_tensors"):
            body.append(f"- {metrics['fallback_tensors']} tensors were stored in a fallback type: their rows do not "
                        "divide into the type's blocks")
        sections.append(("Quantization", "\n".join(body)))
    else:
        sections.append(("Precision", f"- {plan.outtype} ({model_card.human_size(metrics['size_bytes'])}); tensor types: "
                         + ", ".join(f"{k} × {v}" for k, v in metrics.get("tensor_types", {}).items())))
    sections.append(("How to run", _usage(plan, main)))
    text = model_card.render(title=f"{plan.stem} ({plan.label} GGUF)", summary=summary, files=files,
                             ancestors=model_card.lineage(services.registry, parents), sections=sections,
                             versions={k: v for k, v in library_versions().items()
                                       if k in ("mlsidecar", "gguf", "llama_cpp_python", "transformers", "peft")})
    (root / "README.md").write_text(text, encoding="utf-8")


def _usage(plan: Plan, main: Path) -> str:
    loras = " ".join(f"--lora-scaled {a.file} {a.weight:g}" if a.weight != 1.0 else f"--lora {a.file}"
                     for a in plan.adapters if a.file)
    lines = ["With llama.cpp, from this directory:", "", "```sh",
             f"llama-cli -m {main.name}{' ' + loras if loras else ''} -cnv", "```", ""]
    if plan.modelfile:
        ollama_name = re.sub(r"[^a-z0-9._-]+", "-", plan.stem.lower()).strip("-.") or "model"
        lines += ["With Ollama, from this directory:", "", "```sh", f"ollama create {ollama_name} -f Modelfile",
                  f"ollama run {ollama_name}", "```", ""]
    lines += ["With mlsidecar:", "", "```json",
              json.dumps({"method": "generate", "params": {"model": f"<this directory>/{main.name}",
                                                           "messages": [{"role": "user", "content": "Hello"}]}}),
              "```"]
    return "\n".join(lines)
