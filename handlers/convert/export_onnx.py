"""`export` format onnx, in a worker: a Hugging Face model (adapters merged first) to an ONNX artifact,
validated with onnxruntime against torch in the same request.

The artifact is a directory (the registry writes its manifest.json inside): model.onnx (+ model.onnx.data
past 1 GiB of weights), config.json and the tokenizer and sentence-transformers files of the source,
genai_config.json for decoders (ONNX Runtime GenAI), and a README.md model card. A decoder takes and
returns the KV cache; an encoder returns last_hidden_state and sentence_embedding (runtimes/onnx/export.py).

Order: check every input (nothing is written before all are known to fit), then inside the registry's
temporary directory: merge, load, trace and save, validate (float32 bars: logits within 1e-4, cosine
>= 0.9999; a miss is verification_failed), optionally quantize to int8 and measure its drift, write the
card. Intermediates live in a scratch folder there, so a failure or a cancel leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import msgspec

from handlers.context import Context
from handlers.convert.export import check_weights, model_kind, model_stem, resolve_adapters, resolve_model
from protocol import messages as m
from protocol.errors import RpcError

SCRATCH = ".work"
MODEL_FILE = "model.onnx"
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data", ".gguf",
                  ".mlpackage")
_SKIP_NAMES = {"README.md", "manifest.json", ".gitattributes", "model.safetensors.index.json",
               "pytorch_model.bin.index.json"}
_SKIP_DIRS = {"onnx", "openvino", "coreml", ".git", SCRATCH}
_TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "merges.txt",
                    "vocab.json", "tokenizer.model", "sentencepiece.bpe.model", "spiece.model", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json"}


def export_onnx(params: m.ExportParams, ctx: Context) -> m.ExportResult:
    started = time.perf_counter()
    quantization = _check_params(params)
    _destination(ctx, params, "model")  # a taken output or a bad name: refused before any work
    model = resolve_model(ctx, params.model, "params.model")
    if model_kind(model.path) != "hf":
        raise RpcError.failed("unsupported_model", f"{model.path} is not a Hugging Face model directory (config.json "
                              "and safetensors weights); ONNX export starts from one", path=str(model.path))
    check_weights(model.path, params.options)
    from runtimes.onnx.export import kind_of

    kind = kind_of(_read_json(model.path / "config.json"))  # unsupported_model, listing what is supported
    adapters = resolve_adapters(ctx, params.adapters, model)
    stem = model_stem(model)
    name, dest = _destination(ctx, params, stem, quantization)
    parents = list(dict.fromkeys(x for x in [model.artifact_id, *(a.artifact_id for a in adapters)] if x))
    warnings: list[str] = []
    ctx.check_cancelled()
    with ctx.services.registry.write_artifact("onnx", dest, name=name, params=msgspec.to_builtins(params),
                                              parents=parents, run_id=getattr(ctx, "run_id", None)) as pending:
        root = Path(pending.path)
        built = _fill(ctx, params, model, kind, adapters, quantization, root, stem, parents, warnings, started)
        pending.metrics, pending.extra_manifest = built["metrics"], built["manifest"]
        ctx.progress("write", 2, 3, "hashing and registering")
    ctx.progress("write", 3, 3, f"registered {pending.record.id}")
    final = Path(pending.record.path)
    files = [m.ExportedFile(role=_role(p.name), path=str(p), size_bytes=p.stat().st_size)
             for p in sorted(final.rglob("*")) if p.is_file()]
    return m.ExportResult(artifact=m.Artifact(**pending.record.to_dict()), format="onnx", path=str(final / MODEL_FILE),
                          outtype="f32", quantization=quantization, files=files,
                          seconds=round(time.perf_counter() - started, 3), warnings=warnings,
                          validation=built["validation"], quantization_report=built["quantization_report"])


def _check_params(params: m.ExportParams) -> str | None:
    for field in ("context_length", "prefill_length", "functions"):
        if getattr(params, field) is not None:
            raise RpcError.invalid_params(f"params.{field}", "applies to format coreml only; leave it out for onnx")
    if params.system is not None:
        raise RpcError.invalid_params("params.system", "is written into a GGUF Modelfile; leave it out for onnx")
    if params.outtype not in ("auto", "f32"):
        raise RpcError.invalid_params("params.outtype", "ONNX export writes float32 (validated against torch in float32): "
                                                        "use auto or f32, and quantization: \"int8\" to shrink it")
    quantization = params.quantization
    if quantization is not None and (not isinstance(quantization, str) or quantization.lower() != "int8"):
        raise RpcError.invalid_params("params.quantization", "for onnx, \"int8\" (onnxruntime's dynamic int8 "
                                                             "quantization) or leave it out")
    if params.merge and not params.adapters:
        raise RpcError.invalid_params("params.merge", "merge: true needs adapters to merge")
    if params.adapters and not params.merge:
        raise RpcError.invalid_params("params.merge", "an ONNX graph holds its weights: adapters are merged into it; "
                                                      "pass merge: true with them")
    return "int8" if quantization is not None else None


def _destination(ctx: Context, params: m.ExportParams, stem: str, quantization: str | None = None) -> tuple[str, Path]:
    from handlers.outputs import destination

    run = (getattr(ctx, "run_id", None) or f"local-{int(time.time())}").removeprefix("run-")
    label = "onnx-int8" if quantization else "onnx"
    return destination(ctx.services, "onnx", output=params.output, name=params.name, default_name=f"{stem}-{label}-{run}")


def _reporter(ctx: Context, stage: str) -> Any:
    def report(step: int, total: int, message: str) -> None:
        ctx.check_cancelled()
        ctx.progress(stage, step, total, message)

    return report


def _fill(ctx: Context, params: m.ExportParams, model: Any, kind: str, adapters: list, quantization: str | None,
          root: Path, stem: str, parents: list[str], warnings: list[str], started: float) -> dict[str, Any]:
    """Everything written into the artifact's temporary directory."""
    from runtimes.onnx import export as onnx_export

    scratch = root / SCRATCH
    scratch.mkdir()
    source = model.path
    if adapters:
        from runtimes.hf.merge import merge_adapters

        ctx.progress("merge", 0, 1, f"merging {len(adapters)} adapter(s) into {model.reference}")
        source = scratch / "merged"
        merge_adapters(model.path, [(a.path, a.weight) for a in adapters], source, dtype="f32",
                       progress=_reporter(ctx, "merge"), cancelled=ctx.cancelled, allow_pickle=params.options.allow_pickle)
    ctx.check_cancelled()
    ctx.progress("load", 0, 1, f"loading {model.reference} in float32")
    torch_model = onnx_export.load_model(source, kind, trust_remote_code=params.options.trust_remote_code,
                                         allow_pickle=params.options.allow_pickle)
    threads = params.options.n_threads
    if threads:
        import torch

        torch.set_num_threads(threads)
    pooling = None
    if kind == "encoder":
        from runtimes.hf.embeddings import default_pooling

        pooling = default_pooling(source, False)
    float_path = (scratch if quantization else root) / MODEL_FILE
    ctx.check_cancelled()
    ctx.progress("export", 0, 1, f"tracing the {kind} with torch.onnx (dynamo)")
    exported = onnx_export.export_model(torch_model, kind, float_path, pooling=pooling,
                                        progress=lambda s, t, msg: ctx.progress("export", s, t, msg),
                                        cancelled=ctx.cancelled.is_set)
    ctx.check_cancelled()
    tokenizer = _copy_side_files(source, root)
    ctx.progress("validate", 0, 1, "running the graph in onnxruntime against torch (float32)")
    check = _check(torch_model, tokenizer, float_path, kind, pooling, threads)
    if not check["passed"]:
        measures = ({"max_abs_logit_diff": max(check["logits_max_abs_diff_no_past"], check["logits_max_abs_diff_with_past"]),
                     "tolerance": check["tolerance"]} if kind == "decoder"
                    else {"cosine_min": check["cosine_min"], "cosine_floor": check["cosine_floor"]})
        raise RpcError.failed("verification_failed", _missed(check), **measures, validation=check)
    validation: dict[str, Any] = {"onnxruntime": _version("onnxruntime"), "float32": check}
    report = None
    if quantization:
        from runtimes.onnx.quantize import quantize_int8

        ctx.check_cancelled()
        ctx.progress("quantize", 0, 1, "dynamic int8 quantization with onnxruntime")
        report = quantize_int8(float_path, root / MODEL_FILE, external_data=len(exported.files) > 1)
        report["source_size_bytes"] = sum((scratch / f).stat().st_size for f in exported.files)
        report["ratio"] = round(report["size_bytes"] / report["source_size_bytes"], 4)
        ctx.progress("validate", 0, 1, "measuring the int8 graph's drift against torch")
        drift = {k: v for k, v in _check(torch_model, tokenizer, root / MODEL_FILE, kind, pooling, threads).items()
                 if k not in ("passed", "tolerance", "cosine_floor")}
        validation["int8"] = drift
        report["drift"] = drift
        note = _drift_note(drift)
        if note:
            warnings.append(note)
            ctx.log("warning", note, drift)
    del torch_model
    ctx.progress("validate", 1, 1, "validated")
    shutil.rmtree(scratch)
    ctx.check_cancelled()
    ctx.progress("write", 0, 3, "writing the configuration files")
    if kind == "decoder":
        _write_genai_config(root, exported)
    files = [MODEL_FILE] + ([MODEL_FILE + ".data"] if (root / (MODEL_FILE + ".data")).exists() else [])
    size = sum((root / f).stat().st_size for f in files)
    metrics = {"size_bytes": size, "parameters": exported.parameters, "seconds": round(time.perf_counter() - started, 3),
               **_headline(check, "")}
    if quantization:
        metrics.update(_headline(validation["int8"], "int8_"), ratio=report["ratio"])
    manifest = {
        "format": "onnx", "model_file": MODEL_FILE, "model_files": files, "graph": kind, "opset": onnx_export.OPSET,
        "inputs": exported.inputs, "outputs": exported.outputs, "pooling": exported.pooling, "outtype": "f32",
        "quantization": quantization, "validation": validation, "exporter": f"torch.onnx (dynamo) {_version('torch')}",
        "onnx_versions": onnx_versions(),
        "base_model": {"reference": model.reference, "path": str(model.path), "source": model.source},
        "adapters": [{"reference": a.reference, "artifact": a.artifact_id, "path": str(a.path), "weight": a.weight,
                      "merged": True} for a in adapters],
    }
    ctx.progress("write", 1, 3, "writing the model card")
    _write_card(ctx, root, stem, model, kind, exported, adapters, quantization, validation, metrics, parents)
    return {"metrics": metrics, "manifest": manifest, "validation": validation, "quantization_report": report}


def _check(torch_model: Any, tokenizer: Any, path: Path, kind: str, pooling: str | None, threads: int | None) -> dict:
    from runtimes.onnx import validate

    if kind == "decoder":
        return validate.check_decoder(torch_model, path, threads=threads)
    return validate.check_encoder(torch_model, tokenizer, path, pooling or "mean", threads=threads)


def _missed(check: dict[str, Any]) -> str:
    if check["kind"] == "decoder":
        worst = max(check["logits_max_abs_diff_no_past"], check["logits_max_abs_diff_with_past"])
        return (f"the ONNX graph's logits differ from torch's by up to {worst:.3g} (the bar is {check['tolerance']:g} in "
                "float32); the export is not kept. Please report the model's config.json")
    return (f"the ONNX graph's sentence embeddings reach cosine {check['cosine_min']:.6f} against torch's (the bar is "
            f"{check['cosine_floor']}); the export is not kept. Please report the model's config.json")


def _drift_note(drift: dict[str, Any]) -> str | None:
    if drift["kind"] == "encoder" and drift["cosine_min"] < 0.99:
        return (f"int8 drift: sentence embeddings reach cosine {drift['cosine_min']:.4f} against float32 torch (lowest of "
                f"{drift['texts']} texts); keep the float32 export where retrieval quality matters")
    if drift["kind"] == "decoder" and drift["top1_agreement"] < 0.99:
        return (f"int8 drift: the most likely next token agrees with float32 torch at {drift['top1_agreement']:.1%} of "
                "positions; keep the float32 export where exactness matters")
    return None


def _headline(check: dict[str, Any], prefix: str) -> dict[str, float]:
    if check["kind"] == "decoder":
        return {f"{prefix}logits_max_abs_diff": max(check["logits_max_abs_diff_no_past"],
                                                    check["logits_max_abs_diff_with_past"]),
                f"{prefix}top1_agreement": check["top1_agreement"]}
    return {f"{prefix}cosine_min": check["cosine_min"]}


def _copy_side_files(source: Path, root: Path) -> Any:
    """config.json, tokenizer and sentence-transformers files beside the graph; returns the tokenizer (encoders)."""
    for item in sorted(source.iterdir()):
        if item.name in _SKIP_NAMES or item.name.startswith(".") or item.suffix in _SKIP_SUFFIXES:
            continue
        if item.is_dir():
            if item.name not in _SKIP_DIRS and not any(p.suffix in _SKIP_SUFFIXES for p in item.rglob("*")):
                shutil.copytree(item, root / item.name)
        elif item.is_file():
            shutil.copy2(item, root / item.name)
    try:
        import transformers

        return transformers.AutoTokenizer.from_pretrained(root, local_files_only=True)
    except Exception:  # noqa: BLE001 - a model without a tokenizer exports; encoders say so in validation
        return None


def _write_genai_config(root: Path, exported: Any) -> None:
    """ONNX Runtime GenAI's description of the decoder's inputs and outputs, and the search defaults."""
    config = _read_json(root / "config.json")
    generation = _read_json(root / "generation_config.json")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

    def token(key: str) -> Any:
        value = generation.get(key, text.get(key))
        return value if value is not None else text.get("eos_token_id")

    context = int(text.get("max_position_embeddings") or 2048)
    genai = {
        "model": {
            "type": text.get("model_type"), "bos_token_id": token("bos_token_id"), "eos_token_id": token("eos_token_id"),
            "pad_token_id": token("pad_token_id"), "vocab_size": exported.io["vocab_size"], "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE, "head_size": exported.io["head_dim"], "hidden_size": text.get("hidden_size"),
                "num_attention_heads": text.get("num_attention_heads"),
                "num_key_value_heads": exported.io["num_key_value_heads"], "num_hidden_layers": exported.layers,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": context, "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": False, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1,
                   "top_p": 1.0},
    }
    (root / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n", encoding="utf-8")


def _role(name: str) -> str:
    if name.startswith(MODEL_FILE):
        return "model"
    if name == "README.md":
        return "model_card"
    return "tokenizer" if name in _TOKENIZER_FILES else "other"


def _write_card(ctx: Context, root: Path, stem: str, model: Any, kind: str, exported: Any, adapters: list,
                quantization: str | None, validation: dict[str, Any], metrics: dict[str, Any], parents: list[str]) -> None:
    from runtimes import model_card
    from runtimes.onnx.export import OPSET
    from sidecar.registry import library_versions

    files = [(str(p.relative_to(root)), _role(p.name), p.stat().st_size) for p in sorted(root.rglob("*")) if p.is_file()]
    label = "int8 ONNX" if quantization else "ONNX"
    summary = [f"format: ONNX (opset {OPSET}), `{MODEL_FILE}` ({model_card.human_size(metrics['size_bytes'])}), "
               f"a {'decoder with KV-cache inputs and outputs' if kind == 'decoder' else 'sentence encoder'}",
               f"made from `{model.reference}` ({model.source}: `{model.path}`) with torch.onnx (dynamo)"]
    if adapters:
        summary.append("adapters, merged into the weights: " + ", ".join(
            f"`{a.reference}`" + (f" × {a.weight}" if a.weight != 1.0 else "") for a in adapters))
    io = (f"- inputs: {', '.join(f'`{n}`' for n in exported.inputs[:3])}"
          + (f", `past_key_values.N.key/value` (N = 0..{exported.layers - 1})" if kind == "decoder"
             else (f", `{exported.inputs[3]}`" if len(exported.inputs) > 3 else "")) + "\n"
          + ("- outputs: `logits`, `present.N.key/value`; a past of length 0 is a valid first call" if kind == "decoder"
             else f"- outputs: `last_hidden_state`, `sentence_embedding` ({exported.pooling} pooling, L2-normalized)"))
    sections = [("Graph", io), ("Validation", _validation_text(validation))]
    sections.append(("How to run", _usage(kind, root)))
    text = model_card.render(title=f"{stem} ({label})", summary=summary, files=files,
                             ancestors=model_card.lineage(ctx.services.registry, parents), sections=sections,
                             versions={**{k: v for k, v in library_versions().items()
                                          if k in ("mlsidecar", "torch", "transformers", "peft")}, **onnx_versions()})
    (root / "README.md").write_text(text, encoding="utf-8")


def _validation_text(validation: dict[str, Any]) -> str:
    lines = [f"Measured with onnxruntime {validation['onnxruntime']} against the torch model, in this export:"]
    for label, check in (("float32", validation["float32"]), ("int8", validation.get("int8"))):
        if not check:
            continue
        if check["kind"] == "decoder":
            lines.append(f"- {label}: logits max |diff| {check['logits_max_abs_diff_no_past']:.3g} with an empty past, "
                         f"{check['logits_max_abs_diff_with_past']:.3g} with a past; top-1 agreement "
                         f"{check['top1_agreement']:.1%}")
        else:
            lines.append(f"- {label}: sentence_embedding cosine >= {check['cosine_min']:.6f} over {check['texts']} texts")
    return "\n".join(lines)


def _usage(kind: str, root: Path) -> str:
    if kind == "decoder":
        snippet = ["import numpy as np, onnxruntime as ort", "s = ort.InferenceSession('model.onnx')",
                   "past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)",
                   "        for i in s.get_inputs() if i.name.startswith('past_key_values.')}",
                   "ids = np.array([[1, 2, 3]], np.int64)",
                   "out = s.run(None, {'input_ids': ids, 'attention_mask': np.ones_like(ids),",
                   "                   'position_ids': np.arange(3)[None], **past})",
                   "logits, present = out[0], out[1:]  # feed present back as past_key_values.N.*"]
        request = {"method": "generate", "params": {"model": "<this directory>", "runtime": "onnxruntime",
                                                    "prompt": "Once upon a time"}}
    else:
        snippet = ["import onnxruntime as ort", "from transformers import AutoTokenizer",
                   "tok = AutoTokenizer.from_pretrained('.')", "s = ort.InferenceSession('model.onnx')",
                   "feeds = dict(tok(['Hello'], return_tensors='np'))",
                   "names = {i.name for i in s.get_inputs()}",
                   "vectors = s.run(['sentence_embedding'], {k: v for k, v in feeds.items() if k in names})[0]"]
        request = {"method": "embed", "params": {"model": "<this directory>", "runtime": "onnxruntime", "input": "Hello"}}
    return "\n".join(["With onnxruntime, from this directory:", "", "```python", *snippet, "```", "",
                      "With mlsidecar:", "", "```json", json.dumps(request), "```"])


def onnx_versions() -> dict[str, str]:
    """What the registry's library list leaves out."""
    found = {name: _version(name) for name in ("onnx", "onnxruntime", "onnxscript")}
    return {k: v for k, v in found.items() if v}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
