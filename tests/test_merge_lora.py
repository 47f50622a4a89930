"""runtimes/hf/merge.py and merge_verify.py held to peft: the streamed merge equals
`merge_and_unload` tensor for tensor, loads in plain transformers, and refuses what it cannot
merge faithfully before writing anything.

Adapters are peft's own, random (init_lora_weights=False: A and B both random, DoRA magnitudes
scaled away from their initial norms), so every adapted tensor really changes; the reference is
peft with each adapter's weight set through LoraLayer.set_scale, as `generate` applies them.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from runtimes.base import UnsupportedModel
from runtimes.hf.merge import merge_adapters
from runtimes.peft_adapter import AdapterMismatch
from runtimes.tiny import build_tiny_model

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
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


def make_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, magnitude: float = 1.5, **config: Any) -> Path:
    """A random peft adapter; DoRA magnitudes multiplied by `magnitude` so DoRA differs from LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(magnitude)
    peft_model.save_pretrained(out_dir)
    return out_dir


def peft_merged(base_dir: Path, adapters: list[tuple[Path, float]]) -> Any:
    """The reference: every adapter loaded, activated in order at its weight, merged by peft."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    names = [f"adapter{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(base, str(adapters[0][0]), adapter_name=names[0])
    for name, (path, _) in zip(names[1:], adapters[1:]):
        model.load_adapter(str(path), adapter_name=name)
    model.base_model.set_adapter(names)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, (_, weight) in zip(names, adapters):
                module.set_scale(name, weight)
    return model.merge_and_unload().eval()


def weights(model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def assert_equals_peft(base_dir: Path, adapters: list[tuple[Path, float]], out: Path) -> dict[str, Any]:
    """Merged weights == peft's merge_and_unload within 1e-6, and every adapted tensor changed."""
    stats = merge_adapters(base_dir, adapters, out)
    ours, theirs = weights(out), peft_merged(base_dir, adapters).state_dict()
    base = weights(base_dir)
    assert set(ours) == set(base) and set(theirs) >= set(ours)
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype and tensor.shape == theirs[name].shape, name
        assert float((tensor - theirs[name]).abs().max()) <= 1e-6, name
    changed = {name for name in ours if not ours[name].equal(base[name])}
    assert len(changed) == stats["merged_tensors"] > 0
    return stats


# ---------------------------------------------------------------------------------------------
# Equal to peft


def test_one_adapter_equals_merge_and_unload_and_loads_in_transformers(tiny_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    seen: list[tuple[int, int, str]] = []
    out = tmp_path / "merged"
    stats = merge_adapters(tiny_dir, [(adapter, 1.0)], out, progress=lambda *event: seen.append(event))
    assert stats["tensors"] == 21 and stats["merged_tensors"] == 14 and stats["shards"] == 1 and stats["dtype"] == "f32"
    assert [event[0] for event in seen] == list(range(1, 22)) and all(event[1] == 21 for event in seen)
    assert_equals_peft(tiny_dir, [(adapter, 1.0)], tmp_path / "again")

    # Everything but the weights comes along: config, generation config, tokenizer, chat template.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_dir.iterdir())
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tiny_dir / name).read_bytes()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_dir).chat_template is not None
    ids = torch.tensor([tokenizer("Once upon a time the fox")["input_ids"]])
    with torch.no_grad():
        expected = peft_merged(tiny_dir, [(adapter, 1.0)])(ids).logits
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)


def test_two_adapters_at_weights_half_and_one(tiny_dir: Path, tmp_path: Path) -> None:
    first = make_adapter(tiny_dir, tmp_path / "first", r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    second = make_adapter(tiny_dir, tmp_path / "second", seed=1, r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    stats = assert_equals_peft(tiny_dir, [(first, 0.5), (second, 1.0)], tmp_path / "merged")
    assert stats["merged_tensors"] == 14 and stats["adapters"] == 2
    # The weights matter: at 1.0 and 1.0 the result differs.
    other = merge_adapters(tiny_dir, [(first, 1.0), (second, 1.0)], tmp_path / "other")
    assert other["merged_tensors"] == 14
    a, b = weights(tmp_path / "merged"), weights(tmp_path / "other")
    assert not a["model.layers.0.mlp.gate_proj.weight"].equal(b["model.layers.0.mlp.gate_proj.weight"])


def test_dora_equals_merge_and_unload(tiny_dir: Path, tmp_path: Path) -> None:
    dora = make_adapter(tiny_dir, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj"])
    assert_equals_peft(tiny_dir, [(dora, 1.0)], tmp_path / "merged")
    # With a LoRA adapter before it, at other weights: peft's DoRA norm is taken on the unmerged base.
    lora = make_adapter(tiny_dir, tmp_path / "lora", seed=2, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    assert_equals_peft(tiny_dir, [(lora, 0.7), (dora, 0.5)], tmp_path / "mixed")


def test_rslora_patterns_and_embedding_adapters(tiny_dir: Path, tmp_path: Path) -> None:
    """rslora (alpha/sqrt(r)), a per-module rank and alpha, and LoRA on embed_tokens and lm_head (untied)."""
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", r=8, lora_alpha=16, use_rslora=True, rank_pattern={"k_proj": 4},
                           alpha_pattern={"down_proj": 32}, target_modules=[*ALL_LINEAR, "embed_tokens", "lm_head"])
    stats = assert_equals_peft(tiny_dir, [(adapter, 0.8)], tmp_path / "merged")
    assert stats["merged_tensors"] == 16


def test_fan_in_fan_out_conv1d(tmp_path: Path) -> None:
    """GPT-2 keeps its linear weights [in, out] (Conv1D): peft's fan_in_fan_out transposes the delta."""
    import torch
    import transformers

    base = tmp_path / "gpt2"
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(base)
    lora = make_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    dora = make_adapter(base, tmp_path / "dora", seed=1, r=4, lora_alpha=8, target_modules=["c_proj"], fan_in_fan_out=True,
                        use_dora=True)
    assert_equals_peft(base, [(lora, 1.0), (dora, 0.5)], tmp_path / "merged")


def test_dtypes_and_shards(tiny_dir: Path, tmp_path: Path) -> None:
    """bf16/f16: the float32 merge rounded once; config.json says so. A small shard limit splits the
    weights across files with an index, which transformers loads to the same model."""
    import torch
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    merge_adapters(tiny_dir, [(adapter, 1.0)], tmp_path / "f32")
    exact = weights(tmp_path / "f32")
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("f16", torch.float16)):
        stats = merge_adapters(tiny_dir, [(adapter, 1.0)], tmp_path / dtype, dtype=dtype)
        assert stats["dtype"] == dtype
        rounded = weights(tmp_path / dtype)
        assert all(rounded[k].dtype == torch_dtype and rounded[k].equal(exact[k].to(torch_dtype)) for k in exact)
        assert json.loads((tmp_path / dtype / "config.json").read_text())["torch_dtype"] == str(torch_dtype).split(".")[1]

    stats = merge_adapters(tiny_dir, [(adapter, 1.0)], tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert stats["shards"] == len(files) >= 3 and sorted(set(index["weight_map"].values())) == files
    assert set(index["weight_map"]) == set(exact) and index["metadata"]["total_size"] == stats["bytes"]
    assert all(t.equal(exact[k]) for k, t in weights(tmp_path / "sharded").items())
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "f32", dtype=torch.float32).state_dict()
    many = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32).state_dict()
    assert all(one[k].equal(many[k]) for k in one)


def test_pickle_base_needs_allow_pickle(tiny_dir: Path, tmp_path: Path) -> None:
    import torch

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dir, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(weights(tiny_dir), pickled / "pytorch_model.bin")
    with pytest.raises(UnsupportedModel, match="allow_pickle") as refused:
        merge_adapters(pickled, [(adapter, 1.0)], tmp_path / "refused")
    assert refused.value.error_detail["hint"] == "options.allow_pickle" and not (tmp_path / "refused").exists()
    merge_adapters(pickled, [(adapter, 1.0)], tmp_path / "from_pickle", allow_pickle=True)
    merge_adapters(tiny_dir, [(adapter, 1.0)], tmp_path / "from_safetensors")
    assert not list((tmp_path / "from_pickle").glob("*.bin"))
    a, b = weights(tmp_path / "from_pickle"), weights(tmp_path / "from_safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Verification


def test_verification_passes_a_merge_and_catches_a_wrong_one(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from runtimes.hf.merge_verify import VerificationFailed, verify_merge

    lora = make_adapter(tiny_dir, tmp_path / "lora", r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    dora = make_adapter(tiny_dir, tmp_path / "dora", seed=1, r=4, lora_alpha=8, use_dora=True, target_modules=["v_proj"])
    adapters = [(lora, 0.5), (dora, 1.0)]
    merge_adapters(tiny_dir, adapters, tmp_path / "merged")
    result = verify_merge(tiny_dir, adapters, tmp_path / "merged", dtype="f32")
    assert result["probes"] == 4 and result["dtype"] == "float32" and result["max_abs_logit_diff"] <= 1e-4
    # bf16 passes its own, looser tolerance.
    merge_adapters(tiny_dir, adapters, tmp_path / "bf16", dtype="bf16")
    assert verify_merge(tiny_dir, adapters, tmp_path / "bf16", dtype="bf16")["max_abs_logit_diff"] > 1e-4

    # The same merge at the wrong weight, and one tensor off by a little: both refused.
    merge_adapters(tiny_dir, [(lora, 1.0), (dora, 1.0)], tmp_path / "wrong")
    with pytest.raises(VerificationFailed, match="differ from the base with the adapters unmerged"):
        verify_merge(tiny_dir, adapters, tmp_path / "wrong", dtype="f32")
    tensors = load_file(str(tmp_path / "merged" / "model.safetensors"))
    tensors["model.layers.1.self_attn.v_proj.weight"][0, 0] += 0.01
    save_file(tensors, str(tmp_path / "merged" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VerificationFailed) as failed:
        verify_merge(tiny_dir, adapters, tmp_path / "merged", dtype="f32")
    assert failed.value.error_kind == "verification_failed" and failed.value.error_detail["max_abs_logit_diff"] > 1e-4


# ---------------------------------------------------------------------------------------------
# Refusals: nothing is written


def write_adapter(out_dir: Path, config: dict[str, Any], tensors: dict[str, Any]) -> Path:
    """A hand-made adapter directory, for the cases peft will not build."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    return out_dir


def lora_pair(module: str, rank: int, n_in: int, n_out: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    return {f"base_model.model.{module}.lora_A.weight": rng.standard_normal((rank, n_in), dtype=np.float32),
            f"base_model.model.{module}.lora_B.weight": rng.standard_normal((n_out, rank), dtype=np.float32)}


def test_an_adapter_for_another_base_is_a_mismatch_naming_both(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    wrong_shape = write_adapter(tmp_path / "wide", {}, lora_pair("model.layers.0.self_attn.q_proj", 4, 96, 96))
    with pytest.raises(AdapterMismatch, match="different base model") as refused:
        merge_adapters(tiny_dir, [(wrong_shape, 1.0)], out)
    assert refused.value.error_kind == "adapter_mismatch"
    assert refused.value.error_detail["adapter"] == str(wrong_shape) and refused.value.error_detail["model"] == str(tiny_dir)
    missing = write_adapter(tmp_path / "deep", {}, lora_pair("model.layers.7.self_attn.q_proj", 4, 64, 64))
    with pytest.raises(AdapterMismatch, match="model.layers.7.self_attn.q_proj, which model .* does not have"):
        merge_adapters(tiny_dir, [(missing, 1.0)], out)

    # Same shapes, another model by name: an HF id the base's HF cache path contradicts.
    cached = tmp_path / "hub" / "models--acme--tiny-base" / "snapshots" / "0123abc"
    shutil.copytree(tiny_dir, cached)
    named = write_adapter(tmp_path / "named", {"base_model_name_or_path": "acme/tiny-instruct"},
                          lora_pair("model.layers.0.self_attn.q_proj", 4, 64, 64))
    with pytest.raises(AdapterMismatch, match="trained on acme/tiny-instruct, but the model is acme/tiny-base"):
        merge_adapters(cached, [(named, 1.0)], out)
    same = write_adapter(tmp_path / "same", {"base_model_name_or_path": "ACME/tiny-base"},
                         lora_pair("model.layers.0.self_attn.q_proj", 4, 64, 64))
    assert merge_adapters(cached, [(same, 1.0)], tmp_path / "fine")["merged_tensors"] == 1
    assert not out.exists()


def test_a_copy_of_the_embedding_that_differs_is_a_mismatch(tiny_dir: Path, tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import load_file

    embed = "base_model.model.model.embed_tokens"
    rng = np.random.default_rng(1)
    pair = {f"{embed}.lora_embedding_A": rng.standard_normal((4, 768), dtype=np.float32),
            f"{embed}.lora_embedding_B": rng.standard_normal((64, 4), dtype=np.float32)}
    own = load_file(str(tiny_dir / "model.safetensors"))["model.embed_tokens.weight"]
    good = write_adapter(tmp_path / "good", {"target_modules": ["embed_tokens"]}, {**pair, f"{embed}.base_layer.weight": own})
    assert merge_adapters(tiny_dir, [(good, 1.0)], tmp_path / "merged")["merged_tensors"] == 1
    bad = write_adapter(tmp_path / "bad", {"target_modules": ["embed_tokens"]}, {**pair, f"{embed}.base_layer.weight": own + 1})
    with pytest.raises(AdapterMismatch, match="carries its own model.embed_tokens.weight"):
        merge_adapters(tiny_dir, [(bad, 1.0)], tmp_path / "out")


@pytest.mark.parametrize(("config", "tensors", "message"), [
    ({"peft_type": "IA3"}, {}, "only LoRA adapters"),
    ({"modules_to_save": ["lm_head"]}, {}, "modules_to_save"),
    ({"lora_bias": True}, {}, "LoRA biases"),
    ({"init_lora_weights": "pissa"}, {}, "init_lora_weights='pissa'"),
    ({"alora_invocation_tokens": [5]}, {}, "activated LoRA"),
    ({"rank_pattern": {"q_proj": 8}}, {}, "rank 4 in the weights but 8"),
    ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": [1.0] * 64},
     "DoRA magnitude vectors, but use_dora is false"),
    ({}, {"base_model.model.model.layers.0.self_attn.q_proj.bias": [0.0] * 64}, "trains biases"),
])
def test_what_cannot_be_merged_faithfully_is_refused(tiny_dir: Path, tmp_path: Path, config: dict, tensors: dict,
                                                    message: str) -> None:
    import numpy as np

    extra = {key: np.asarray(value, dtype=np.float32) for key, value in tensors.items()}
    adapter = write_adapter(tmp_path / "adapter", config, {**lora_pair("model.layers.0.self_attn.q_proj", 4, 64, 64), **extra})
    with pytest.raises(UnsupportedModel, match=message) as refused:
        merge_adapters(tiny_dir, [(adapter, 1.0)], tmp_path / "out")
    assert refused.value.error_kind == "unsupported_model" and not (tmp_path / "out").exists()


def test_tied_embeddings_and_quantized_bases_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    tied, quantized = tmp_path / "tied", tmp_path / "quantized"
    for path, change in ((tied, {"tie_word_embeddings": True}), (quantized, {"quantization_config": {"quant_method": "gptq"}})):
        shutil.copytree(tiny_dir, path)
        (path / "config.json").write_text(json.dumps({**config, **change}))
    head = write_adapter(tmp_path / "head", {"target_modules": ["lm_head"]}, lora_pair("lm_head", 4, 64, 768))
    with pytest.raises(UnsupportedModel, match="ties its input and output embeddings"):
        merge_adapters(tied, [(head, 1.0)], tmp_path / "out")
    with pytest.raises(UnsupportedModel, match=r"quantized \(gptq\)"):
        merge_adapters(quantized, [(head, 1.0)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_and_a_cancel_stop_the_merge(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from the shard writer propagates as itself (the sidecar maps it to disk_full); a cancel
    stops between tensors with how far it got. The caller (write_artifact) removes the directory."""
    from protocol.errors import Cancelled
    from runtimes.hf import merge
    from sidecar.failures import error_from_exception

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    real_write = merge._ShardWriter.write
    calls = {"n": 0}

    def full(self: Any, name: str, tensor: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "model.safetensors"))
        return real_write(self, name, tensor)

    monkeypatch.setattr(merge._ShardWriter, "write", full)
    with pytest.raises(OSError) as raised:
        merge_adapters(tiny_dir, [(adapter, 1.0)], tmp_path / "out")
    error = error_from_exception(raised.value)
    assert error.code == -32803 and error.data["kind"] == "disk_full" and error.data["retryable"]
    monkeypatch.undo()

    ticks = iter(range(100))
    with pytest.raises(Cancelled) as cancelled:
        merge_adapters(tiny_dir, [(adapter, 1.0)], tmp_path / "cancelled", cancelled=lambda: next(ticks) >= 7)
    assert cancelled.value.partial == {"stage": "merge", "tensors_done": 7, "tensors": 21}
