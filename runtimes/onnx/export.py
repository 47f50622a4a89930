"""Hugging Face model -> ONNX graph with torch.onnx's dynamo exporter, in the layout the ecosystem reads.

Why not optimum-onnx: its only release (0.1.0) pins transformers < 4.58 and we run transformers 5, so
we export with torch.onnx (dynamo=True, `dynamic_shapes`; the TorchScript exporter is deprecated).
The dynamo exporter takes flat tensors, so a small wrapper module takes the past as (key, value)
pairs, builds the DynamicCache inside, and returns the present flat again.

Names follow optimum (what onnxruntime, ONNX Runtime GenAI and transformers.js hosts look for):
- decoder: input_ids, attention_mask, position_ids, past_key_values.N.key/value -> logits,
  present.N.key/value; axes batch_size, sequence_length, past_sequence_length and
  "past_sequence_length + sequence_length". A past of length 0 is a valid first call.
- encoder: input_ids, attention_mask (and token_type_ids where the model has them) ->
  last_hidden_state and sentence_embedding (pooled as the model was trained, L2-normalized).

Tracing runs the model's Python once; a hook on every layer reports progress and stops the trace
when the job is cancelled. The translation to ONNX that follows (most of the time) has no hooks, so
a watcher thread raises Cancelled inside the exporting thread when the job is cancelled: a cancel
lands within a fraction of a second, well inside the worker's grace period, and the registry's
temporary directory goes with the exception.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.errors import Cancelled
from runtimes.base import ProgressFn, UnsupportedModel

# model_type values exported and validated; anything else is refused before work starts. Every export is
# also measured against torch in the same request, so an architecture that drifts fails there.
DECODERS = ("gemma", "granite", "llama", "mistral", "olmo2", "phi3", "qwen2", "qwen3")
ENCODERS = ("bert", "distilbert", "electra", "mpnet", "roberta", "xlm-roberta")
OPSET = 18  # the exporter's own opset; onnxruntime >= 1.14, onnxruntime-web and ONNX Runtime GenAI run it
EXTERNAL_DATA_BYTES = 1 << 30  # past this the weights go to model.onnx.data (protobuf stops at 2 GiB)
TOTAL_AXIS = "past_sequence_length + sequence_length"


@dataclass
class Exported:
    kind: str  # "decoder" | "encoder"
    inputs: list[str]
    outputs: list[str]
    files: list[str]
    layers: int = 0
    pooling: str | None = None
    parameters: int = 0
    io: dict[str, Any] = field(default_factory=dict)  # per-layer cache shape for the decoder


def supported() -> dict[str, list[str]]:
    return {"decoders": list(DECODERS), "encoders": list(ENCODERS)}


def kind_of(config: dict[str, Any]) -> str:
    """"decoder" or "encoder" for a config.json we export; UnsupportedModel (listing what is) otherwise."""
    model_type = str(config.get("model_type") or "")
    architectures = [str(a) for a in config.get("architectures") or []]
    listed = f"decoders {', '.join(DECODERS)}; encoders {', '.join(ENCODERS)}"
    if model_type in DECODERS and (not architectures or any(a.endswith("ForCausalLM") for a in architectures)):
        return "decoder"
    if model_type in ENCODERS:
        return "encoder"
    raise UnsupportedModel(f"ONNX export does not cover model_type {model_type or '(none)'!r} "
                           f"({', '.join(architectures) or 'no architectures'}); supported: {listed}",
                           model_type=model_type, supported=supported())


def check_cache_layout(model: Any) -> None:
    """Only full-attention layers: a sliding or chunked cache would need a different past layout."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = model.config.get_text_config(decoder=True)
    layer_types, _ = get_layer_types_and_kwargs(config)
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise UnsupportedModel(f"this {config.model_type} model has {', '.join(other)} layers; ONNX export with a KV "
                               "cache covers full-attention layers only", model_type=config.model_type, layer_types=other)


def load_model(model_dir: Path, kind: str, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> Any:
    """The torch model in float32 on CPU, eager attention (the graph validated in float32 against it)."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    auto = transformers.AutoModelForCausalLM if kind == "decoder" else transformers.AutoModel
    model = auto.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=not allow_pickle or None,
                                 trust_remote_code=trust_remote_code, local_files_only=True, attn_implementation="eager")
    model.eval()
    if kind == "decoder":
        check_cache_layout(model)
    return model


# ------------------------------------------------------------------------------------------------------
# Wrappers the exporter traces


def _decoder_wrapper(model: Any) -> Any:
    import torch
    from transformers import DynamicCache

    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, past):  # noqa: ANN001 - traced
            cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past])
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{cache_arg: cache})
            present = getattr(out, "cache", None) or out["past_key_values"]
            flat = [t for layer in present.layers for t in (layer.keys, layer.values)]
            return (out.logits, *flat)

    return Decoder().eval()


def takes_token_types(model: Any) -> bool:
    return "token_type_ids" in inspect.signature(model.forward).parameters


def _encoder_wrapper(model: Any, pooling: str) -> Any:
    import torch

    from runtimes.hf.embeddings import pool_hidden

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):  # noqa: ANN001 - traced
            extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
            pooled = pool_hidden(hidden, attention_mask, pooling)
            return hidden, torch.nn.functional.normalize(pooled, p=2, dim=1)

    return Encoder().eval()


def _layer_list(model: Any) -> Any:
    import torch

    count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    return []


@contextlib.contextmanager
def _layer_hooks(model: Any, progress: ProgressFn | None, cancelled: Callable[[], bool] | None):
    layers = list(_layer_list(model))

    def hook(index: int) -> Callable[..., None]:
        def before(*_: Any) -> None:
            if cancelled is not None and cancelled():
                raise Cancelled({})
            if progress is not None:
                progress(index, len(layers), f"tracing layer {index + 1} of {len(layers)}")
        return before

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------------
# The export


def export_model(model: Any, kind: str, out: Path, *, pooling: str | None = None, progress: ProgressFn | None = None,
                 cancelled: Callable[[], bool] | None = None) -> Exported:
    """Write out (model.onnx, plus model.onnx.data past EXTERNAL_DATA_BYTES) for a model from load_model."""
    import torch

    parameters = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if kind == "decoder":
        wrapper, args, dynamic, inputs, outputs, info = _decoder_spec(model)
    else:
        wrapper, args, dynamic, inputs, outputs, info = _encoder_spec(model, pooling or "mean")
    with _layer_hooks(model, progress, cancelled), _interrupt_on_cancel(cancelled), warnings.catch_warnings(), \
            torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(wrapper, args, dynamic_shapes=dynamic, input_names=inputs,
                                        output_names=outputs, dynamo=True, optimize=True, opset_version=OPSET,
                                        verbose=False, report=False)
        except Exception as exc:
            if cancelled is not None and cancelled():
                raise Cancelled({}) from None
            if _is_cancel(exc):
                raise Cancelled({}) from None
            raise
    if cancelled is not None and cancelled():
        raise Cancelled({})
    if kind == "decoder":
        _rename_axis(program, "attention_mask", 1, TOTAL_AXIS)
    external = weight_bytes > EXTERNAL_DATA_BYTES
    program.save(out, external_data=external)
    files = [out.name] + ([out.name + ".data"] if external and (out.parent / (out.name + ".data")).exists() else [])
    return Exported(kind, inputs, outputs, files, layers=info.get("layers", 0), pooling=pooling if kind == "encoder" else None,
                    parameters=parameters, io=info)


@contextlib.contextmanager
def _interrupt_on_cancel(cancelled: Callable[[], bool] | None, poll_s: float = 0.2):
    """Raise Cancelled in this thread, asynchronously, once cancelled() turns true while inside the block."""
    if cancelled is None:
        yield
        return
    target = ctypes.c_ulong(threading.get_ident())
    done = threading.Event()
    lock = threading.Lock()
    fired: list[bool] = []

    def watch() -> None:
        while not done.wait(poll_s):
            if cancelled():
                with lock:
                    if not done.is_set():
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(target, ctypes.py_object(Cancelled))
                        fired.append(True)
                return

    def stop() -> None:
        with lock:
            done.set()
        if fired:  # one not delivered yet must not surface later, somewhere outside this block
            ctypes.pythonapi.PyThreadState_SetAsyncExc(target, None)
        watcher.join()

    watcher = threading.Thread(target=watch, name="onnx-export-cancel", daemon=True)
    watcher.start()
    try:
        yield
    except BaseException:
        stop()
        raise
    stop()
    if fired:
        raise Cancelled({})


def _is_cancel(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Cancelled):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _decoder_spec(model: Any) -> tuple:
    import torch
    from torch.export import Dim

    batch, past_len, seq = 2, 4, 3  # not 0 or 1: the tracer would specialize on those
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, past_len + seq), generator=generator)
    with torch.no_grad():
        first = model(input_ids=ids[:, :past_len], use_cache=True)
    cache = getattr(first, "cache", None) or first["past_key_values"]
    past = [(layer.keys.detach().clone(), layer.values.detach().clone()) for layer in cache.layers]
    layers = len(past)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq).unsqueeze(0).expand(batch, -1).contiguous()
    b, s, p = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    dynamic = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: Dim.AUTO}, "position_ids": {0: b, 1: s},
               "past": [({0: b, 2: p}, {0: b, 2: p}) for _ in range(layers)]}
    kv = [f"past_key_values.{i}.{part}" for i in range(layers) for part in ("key", "value")]
    present = [f"present.{i}.{part}" for i in range(layers) for part in ("key", "value")]
    key = past[0][0]
    info = {"layers": layers, "num_key_value_heads": int(key.shape[1]), "head_dim": int(key.shape[3]),
            "vocab_size": int(vocab)}
    return (_decoder_wrapper(model), (ids[:, past_len:], mask, positions, past), dynamic,
            ["input_ids", "attention_mask", "position_ids", *kv], ["logits", *present], info)


def _encoder_spec(model: Any, pooling: str) -> tuple:
    import torch
    from torch.export import Dim

    batch, seq = 2, 5
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, -2:] = 0  # a padded row, so the trace keeps the masked paths
    b, s = Dim("batch_size"), Dim("sequence_length")
    args: tuple = (ids, mask)
    dynamic: dict[str, Any] = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}}
    inputs = ["input_ids", "attention_mask"]
    if takes_token_types(model):
        args += (torch.zeros(batch, seq, dtype=torch.long),)
        dynamic["token_type_ids"] = {0: b, 1: s}
        inputs.append("token_type_ids")
    info = {"hidden_size": int(model.config.hidden_size)}
    return (_encoder_wrapper(model, pooling), args, dynamic, inputs, ["last_hidden_state", "sentence_embedding"], info)


def _rename_axis(program: Any, name: str, axis: int, label: str) -> None:
    """The exporter names an AUTO axis s<N>; hosts read the ecosystem's name."""
    import onnx_ir as ir

    for value in program.model.graph.inputs:
        if value.name == name and value.shape is not None:
            dims = list(value.shape.dims)
            dims[axis] = ir.SymbolicDim(label)
            value.shape = ir.Shape(dims)
