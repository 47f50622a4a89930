"""Our PEFT LoRA -> GGUF adapter writer (runtimes/gguf/lora.py) judged by llama.cpp itself.

An adapter file can load and still answer wrong (lora_b of Q/K not permuted like the base's rows,
an alpha that llama.cpp divides by the wrong rank, an embedding factor transposed the wrong way).
So the checks here run base GGUF + adapter GGUF in llama-cpp-python and compare with transformers
running the same base with the adapter merged by peft: the same greedy continuation, at
lora_scale 1 and 0.5 (peft's set_scale before merging), and different from the base's own, so
a converter that silently drops the adapter fails. Everything runs in float32 (weights, adapter
and llama.cpp's KV cache), as in test_gguf_parity.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from runtimes.base import UnsupportedModel
from runtimes.gguf.export import _permute_for_rope, convert_to_gguf
from runtimes.gguf.lora import convert_lora_to_gguf
from runtimes.tiny import build_tiny_model

GGML_TYPE_F32 = 0  # for type_k / type_v: an exact (float32) KV cache
NEW_TOKENS = 24
PROMPTS = [  # from, or close to, the tiny model's corpus
    "In autumn, the leaves in the village turn red and gold",
    "One afternoon the wind and the sun had an argument about",
    "The moral of the story is that",
]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    """Tiny models: one torch thread is faster, and on a busy 2-core machine much faster."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    build_tiny_model(out)
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_gguf") / "base.gguf"
    convert_to_gguf(tiny_dir, out, dtype="f32")
    return out


@pytest.fixture(scope="module")
def tokenize(tiny_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    return lambda text: tokenizer(text)["input_ids"]


def make_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, boost: float = 3.0, **config: Any) -> Path:
    """A random peft LoRA adapter (A and B both random: init_lora_weights=False), its factors
    multiplied by `boost` so the adapter clearly changes greedy output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.mul_(boost)
    peft_model.save_pretrained(out_dir)
    return out_dir


def base_model(base_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def merged_model(base_dir: Path, adapter_dir: Path, scale: float = 1.0) -> Any:
    """The reference: peft merges the adapter (at `scale` times its configured scale) into the base."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    peft_model = PeftModel.from_pretrained(base_model(base_dir), adapter_dir)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", scale)
    return peft_model.merge_and_unload().eval()


def llama(base_gguf: Path, adapter_gguf: Path | None = None, scale: float = 1.0, **options: Any) -> Any:
    from llama_cpp import Llama

    settings = {"n_ctx": 512, "verbose": False, "seed": 1234, "n_threads": 1, "n_threads_batch": 1,
                "type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32, **options}
    if adapter_gguf is not None:
        settings.update(lora_path=str(adapter_gguf), lora_scale=scale)
    return Llama(str(base_gguf), **settings)


def llama_greedy(llm: Any, prompt_ids: list[int], count: int = NEW_TOKENS) -> list[int]:
    """Greedy through llama.cpp's own sampler chain; Llama.generate does not stop at EOS."""
    tokens: list[int] = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        tokens.append(int(token))
        if len(tokens) == count:
            break
    llm.reset()
    return tokens


def hf_greedy(model: Any, prompt_ids: list[int], count: int = NEW_TOKENS) -> list[int]:
    """Plain argmax with the KV cache: no generation config (EOS stop, min length) can interfere."""
    import torch

    tokens: list[int] = []
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(count):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def assert_parity(base_dir: Path, base_gguf: Path, adapter_dir: Path, adapter_gguf: Path, prompts: list[list[int]],
                  scale: float = 1.0) -> list[list[int]]:
    """llama.cpp(base GGUF + adapter GGUF) == transformers(base + peft merge), token for token,
    and != the base alone on every prompt. Returns the adapted continuations."""
    reference = merged_model(base_dir, adapter_dir, scale)
    plain = base_model(base_dir)
    llm = llama(base_gguf, adapter_gguf, scale)
    results = []
    for ids in prompts:
        expected = hf_greedy(reference, ids)
        got = llama_greedy(llm, ids)
        assert got == expected, f"scale {scale}: llama.cpp {got} != peft merge {expected}"
        assert expected != hf_greedy(plain, ids), "the adapter does not change the output: the test cannot fail"
        results.append(got)
    return results


def write_adapter(out_dir: Path, config: dict[str, Any], tensors: dict[str, Any]) -> Path:
    """A hand-made adapter directory (config + safetensors), for the cases peft will not build."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    full = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **config}
    (out_dir / "adapter_config.json").write_text(json.dumps(full))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    return out_dir


def lora_pair(prefix: str, rank: int, n_in: int, n_out: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    return {f"base_model.model.{prefix}.lora_A.weight": rng.standard_normal((rank, n_in), dtype=np.float32),
            f"base_model.model.{prefix}.lora_B.weight": rng.standard_normal((n_out, rank), dtype=np.float32)}


# ---------------------------------------------------------------------------------------------
# Parity with peft


@pytest.fixture(scope="module")
def plain_adapter(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """r=8, alpha=16 on every linear layer of every block: the common fine-tuning adapter."""
    root = tmp_path_factory.mktemp("plain_adapter")
    adapter = make_adapter(tiny_dir, root / "adapter", r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    seen: list[tuple[int, int, str]] = []
    stats = convert_lora_to_gguf(adapter, tiny_dir, root / "adapter.gguf",
                                 progress=lambda done, total, message: seen.append((done, total, message)))
    assert seen and seen[-1][0] == seen[-1][1] == stats["tensors"]
    return adapter, root / "adapter.gguf", stats


def test_adapter_matches_peft_merge_at_scale_1_and_half(tiny_dir: Path, tiny_gguf: Path, tokenize: Any,
                                                        plain_adapter: tuple[Path, Path, dict]) -> None:
    adapter, adapter_gguf, stats = plain_adapter
    assert stats["modules"] == 14 and stats["tensors"] == 28 and stats["alpha"] == 16.0
    assert stats["ranks"] == [8] and stats["folded_modules"] == 0
    prompts = [tokenize(text) for text in PROMPTS]
    full = assert_parity(tiny_dir, tiny_gguf, adapter, adapter_gguf, prompts, scale=1.0)
    half = assert_parity(tiny_dir, tiny_gguf, adapter, adapter_gguf, prompts, scale=0.5)
    assert full != half, "lora_scale had no effect"


def test_file_layout_is_what_llama_cpp_reads(tiny_dir: Path, plain_adapter: tuple[Path, Path, dict]) -> None:
    """Header keys, and each factor's layout: lora_a = PEFT's A [r, in], lora_b = PEFT's B [out, r]
    (GGUF dims reversed), with lora_b's rows permuted for rope on Q and K only."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    adapter, adapter_gguf, _ = plain_adapter
    reader = gguf.GGUFReader(str(adapter_gguf))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 16.0
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    parts = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(tensors) == {f"blk.{i}.{p}.weight.lora_{x}" for i in range(2) for p in parts for x in "ab"}

    peft = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1.self_attn"
    q_a, q_b = peft[f"{prefix}.q_proj.lora_A.weight"], peft[f"{prefix}.q_proj.lora_B.weight"]
    assert list(tensors["blk.1.attn_q.weight.lora_a"].shape) == [64, 8]  # ne: [in, r]
    assert list(tensors["blk.1.attn_q.weight.lora_b"].shape) == [8, 64]  # ne: [r, out]
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight.lora_a"].data, q_a)
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight.lora_b"].data, _permute_for_rope(q_b, 4))
    np.testing.assert_array_equal(tensors["blk.1.attn_k.weight.lora_b"].data,
                                  _permute_for_rope(peft[f"{prefix}.k_proj.lora_B.weight"], 2))  # kv heads
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight.lora_b"].data, peft[f"{prefix}.v_proj.lora_B.weight"])


def test_rslora_rank_and_alpha_patterns_embeddings_and_head(tiny_dir: Path, tiny_gguf: Path, tokenize: Any,
                                                            tmp_path: Path) -> None:
    """rslora (alpha/sqrt(r)), a per-module rank and alpha, and LoRA on embed_tokens and lm_head
    (untied): the scales llama.cpp cannot express directly are folded into lora_b."""
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", seed=1, r=8, lora_alpha=16, use_rslora=True,
                           rank_pattern={"k_proj": 4}, alpha_pattern={"down_proj": 32},
                           target_modules=[*ALL_LINEAR, "embed_tokens", "lm_head"])
    stats = convert_lora_to_gguf(adapter, tiny_dir, tmp_path / "adapter.gguf")
    assert stats["ranks"] == [4, 8] and stats["use_rslora"]
    assert stats["folded_modules"] == 4  # k_proj (rank 4) and down_proj (alpha 32) in both blocks
    assert {"token_embd", "output"} <= set(stats["targets"])
    prompts = [tokenize(text) for text in PROMPTS]
    assert_parity(tiny_dir, tiny_gguf, adapter, tmp_path / "adapter.gguf", prompts, scale=1.0)
    assert_parity(tiny_dir, tiny_gguf, adapter, tmp_path / "adapter.gguf", prompts[:1], scale=0.5)


def test_qwen2_adapter_is_written_unpermuted(tiny_dir: Path, tokenize: Any, tmp_path: Path) -> None:
    """Qwen2's GGUF keeps HF's Q/K row order (NEOX rope) and has q/k/v biases: the adapter too."""
    import torch
    import transformers

    base = tmp_path / "qwen2"
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=768, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=512,
                                      initializer_range=0.2, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(base)
    for path in tiny_dir.iterdir():  # the tiny model's tokenizer (768 tokens) fits this vocabulary
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(path, base)
    convert_to_gguf(base, tmp_path / "base.gguf", dtype="f32")
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    stats = convert_lora_to_gguf(adapter, base, tmp_path / "adapter.gguf")
    assert stats["gguf_architecture"] == "qwen2"
    assert_parity(base, tmp_path / "base.gguf", adapter, tmp_path / "adapter.gguf", [tokenize(PROMPTS[0])])


def test_f16_adapter_stays_close(tiny_dir: Path, tiny_gguf: Path, tokenize: Any,
                                 plain_adapter: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """dtype='f16' halves the file; llama.cpp's logits stay close to the float32 merge. Not exact:
    besides the rounded factors, ggml multiplies f16 weights with activations rounded to f16, and
    this boosted random adapter amplifies both (up to ~5% of the adapter's effect on a logit)."""
    import gguf
    import numpy as np
    import torch

    adapter, _, f32_stats = plain_adapter
    stats = convert_lora_to_gguf(adapter, tiny_dir, tmp_path / "adapter.gguf", dtype="f16")
    assert stats["bytes"] < f32_stats["bytes"] * 0.6
    reader = gguf.GGUFReader(str(tmp_path / "adapter.gguf"))
    assert {tensor.tensor_type for tensor in reader.tensors} == {gguf.GGMLQuantizationType.F16}

    ids = tokenize(PROMPTS[0])
    llm = llama(tiny_gguf, tmp_path / "adapter.gguf", logits_all=True)
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        reference = merged_model(tiny_dir, adapter)(torch.tensor([ids])).logits[0].numpy()
        plain = base_model(tiny_dir)(torch.tensor([ids])).logits[0].numpy()
    error, effect = float(np.abs(ours - reference).max()), float(np.abs(reference - plain).max())
    assert error < 0.1 * effect, (error, effect)
    assert (ours.argmax(-1) == reference.argmax(-1)).mean() >= 0.9


# ---------------------------------------------------------------------------------------------
# Refusals: what a llama.cpp LoRA cannot express fails loudly and writes nothing


def test_dora_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_dir, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(UnsupportedModel, match="DoRA"):
        convert_lora_to_gguf(adapter, tiny_dir, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
    # The magnitude vectors alone (a config that lost its flag) are refused as well.
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["use_dora"] = False
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="DoRA"):
        convert_lora_to_gguf(adapter, tiny_dir, tmp_path / "out.gguf")


def test_modules_to_save_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_dir, tmp_path / "mts", r=4, lora_alpha=8, target_modules=["q_proj"],
                           modules_to_save=["lm_head"])
    with pytest.raises(UnsupportedModel, match="modules_to_save"):
        convert_lora_to_gguf(adapter, tiny_dir, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_unsupported_targets_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    # A module llama.cpp has no tensor for.
    adapter = write_adapter(tmp_path / "unknown", {"target_modules": ["q_proj", "rotary_proj"]}, {
        **lora_pair("model.layers.0.self_attn.q_proj", 4, 64, 64),
        **lora_pair("model.layers.0.self_attn.rotary_proj", 4, 64, 64),
    })
    with pytest.raises(UnsupportedModel, match=r"no llama\.cpp tensor.*rotary_proj"):
        convert_lora_to_gguf(adapter, tiny_dir, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()

    # lm_head on a base with tied embeddings: llama.cpp runs the head from token_embd.
    tied = tmp_path / "tied_base"
    shutil.copytree(tiny_dir, tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    adapter = write_adapter(tmp_path / "head", {"target_modules": ["lm_head"]}, lora_pair("lm_head", 4, 64, 768))
    with pytest.raises(UnsupportedModel, match="ties its input and output embeddings"):
        convert_lora_to_gguf(adapter, tied, tmp_path / "out.gguf")


@pytest.mark.parametrize(("config", "message"), [
    ({"peft_type": "IA3"}, "only LoRA adapters"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"alora_invocation_tokens": [5, 6]}, "activated LoRA"),
    ({"lora_bias": True}, "LoRA biases"),
    ({"rank_pattern": {"q_proj": 8}}, "rank 4 in the weights but 8"),
])
def test_inexpressible_configs_are_refused(tiny_dir: Path, tmp_path: Path, config: dict, message: str) -> None:
    adapter = write_adapter(tmp_path / "adapter", config, lora_pair("model.layers.0.self_attn.q_proj", 4, 64, 64))
    with pytest.raises(UnsupportedModel, match=message):
        convert_lora_to_gguf(adapter, tiny_dir, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_adapter_for_another_base_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "other", {}, lora_pair("model.layers.0.self_attn.q_proj", 4, 96, 96))
    with pytest.raises(UnsupportedModel, match="different base model"):
        convert_lora_to_gguf(adapter, tiny_dir, tmp_path / "out.gguf")
    # peft's saved copy of the base embedding (save_embedding_layers) must be the base's own.
    import numpy as np

    rng = np.random.default_rng(1)
    embed = "base_model.model.model.embed_tokens"
    pair = {f"{embed}.lora_embedding_A": rng.standard_normal((4, 768), dtype=np.float32),
            f"{embed}.lora_embedding_B": rng.standard_normal((64, 4), dtype=np.float32)}
    for rows, message in ((768, "values differ from the base"), (800, "resized vocabulary")):
        copy = {f"{embed}.base_layer.weight": rng.standard_normal((rows, 64), dtype=np.float32)}
        adapter = write_adapter(tmp_path / f"embed{rows}", {"target_modules": ["embed_tokens"]}, {**pair, **copy})
        with pytest.raises(UnsupportedModel, match=message):
            convert_lora_to_gguf(adapter, tiny_dir, tmp_path / "out.gguf")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "pickle" / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(UnsupportedModel, match="pickle"):
        convert_lora_to_gguf(tmp_path / "pickle", tiny_dir, tmp_path / "out.gguf")
