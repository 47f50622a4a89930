"""The export-friendly decoder (runtimes/coreml/decoder.py) against transformers, per architecture.

Small random models (hidden 64, 2 layers, vocab 300) with every norm and bias randomized, so a
missed (1 + w) offset, bias or norm shows; sliding windows shorter than the prompts, so a wrong
window shows. In float32: the logits equal transformers' within 1e-4 on several prompts, in one
pass without the cache, and through the cache the way the Core ML functions run (prefill chunks
padded to a fixed length, the last chunk moved back so it ends inside the context, then decode
steps). Then embed's pooling and the refusals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

VOCAB = 300
TOLERANCE = 1e-4
DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            max_position_embeddings=256, initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama-bias": ("LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True,
                                        "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 64}}),
    "mistral": ("MistralForCausalLM", {"sliding_window": 6}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 32, "tie_word_embeddings": True}),
    "gemma2": ("Gemma2ForCausalLM", {**GEMMA, "attn_logit_softcapping": 20.0, "final_logit_softcapping": 15.0}),
    "gemma3": ("Gemma3ForCausalLM", {**GEMMA, "layer_types": ["sliding_attention", "full_attention"],
                                     "final_logit_softcapping": 15.0, "rope_parameters": {
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                         "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}),
    "phi3": ("Phi3ForCausalLM", {"sliding_window": 7}),
    "phi3-partial": ("Phi3ForCausalLM", {"partial_rotary_factor": 0.5}),
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def save_random_model(out: Path, model_class: str, seed: int = 0, **config: Any) -> Any:
    """A random model saved as float32 safetensors; returns transformers' copy (eager attention)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config_class = getattr(transformers, "Gemma3TextConfig" if model_class == "Gemma3ForCausalLM"
                           else model_class.replace("ForCausalLM", "Config"))
    model = getattr(transformers, model_class)(config_class(**{"vocab_size": VOCAB, **DIMS, **config})).eval()
    unit = 0.0 if model_class.startswith("Gemma") else 1.0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name.lower() and name.endswith(".weight"):
                parameter.normal_(unit, 0.3)
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(out)
    return getattr(transformers, model_class).from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()


def prompts(count: int = 3, seed: int = 1) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(length)] for length in (5, 19, 33)[:count]]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp(request.param)
    model_class, config = CASES[request.param]
    return out, save_random_model(out, model_class, **config)


def hf_logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def test_logits_without_cache_equal_transformers(case: tuple[Path, Any]) -> None:
    import torch

    from runtimes.coreml.decoder import load_decoder

    path, model = case
    decoder = load_decoder(path, context_length=64)
    for ids in prompts():
        with torch.no_grad():
            ours = decoder.logits(decoder.hidden(torch.tensor([ids], dtype=torch.int32),
                                                 torch.zeros(1, dtype=torch.int32), use_cache=False))[0]
        expected = hf_logits(model, ids)
        assert ours.shape == expected.shape
        assert (ours - expected).abs().max().item() < TOLERANCE, ids


def run_with_cache(decoder: Any, ids: list[int], chunk: int, steps: list[int]) -> list[Any]:
    """As a Core ML app drives prefill and decode: the prompt in padded chunks of `chunk` tokens,
    the last chunk moved back to end inside the context; then one decode call per new token.
    Returns the logits after the prompt and after each step."""
    import torch

    from runtimes.coreml.decoder import Step

    step = Step(decoder)
    context = decoder.context_length
    decoder.reset_cache()
    out = []
    with torch.no_grad():
        done = 0
        while done < len(ids):
            start = min(done, context - chunk)
            piece = ids[start:start + chunk]
            padded = piece + [0] * (chunk - len(piece))
            logits = step(torch.tensor([padded], dtype=torch.int32), torch.tensor([start], dtype=torch.int32),
                          torch.tensor([len(piece)], dtype=torch.int32))
            done = start + len(piece)
        out.append(logits[0, 0])
        for index, token in enumerate(steps):
            logits = step(torch.tensor([[token]], dtype=torch.int32), torch.tensor([len(ids) + index], dtype=torch.int32))
            out.append(logits[0, 0])
    return out


@pytest.mark.parametrize("chunk", [8, 16])
def test_logits_with_cache_equal_transformers(case: tuple[Path, Any], chunk: int) -> None:
    import torch

    from runtimes.coreml.decoder import load_decoder

    path, model = case
    decoder = load_decoder(path, context_length=40, cache_dtype=torch.float32)
    for ids in prompts():
        new = [7, 123, 42, 299, 3][: 40 - len(ids)]
        ours = run_with_cache(decoder, ids, chunk, new)
        expected = hf_logits(model, ids + new)
        for index, logits in enumerate(ours):
            position = len(ids) - 1 + index
            assert (logits - expected[position]).abs().max().item() < TOLERANCE, (ids, position)


def test_cache_is_written_in_place(case: tuple[Path, Any]) -> None:
    """Only the chunk's slots change: what Core ML's slice update on the state does."""
    import torch

    from runtimes.coreml.decoder import Step, load_decoder

    path, _ = case
    decoder = load_decoder(path, context_length=32, cache_dtype=torch.float32)
    before = decoder.key_cache.clone()
    with torch.no_grad():
        Step(decoder)(torch.tensor([[1, 2, 3, 4]], dtype=torch.int32), torch.tensor([10], dtype=torch.int32),
                      torch.tensor([4], dtype=torch.int32))
    changed = (decoder.key_cache != before).any(dim=(0, 1, 3))
    assert changed.nonzero().flatten().tolist() == [10, 11, 12, 13]


def test_embed_pools_only_the_real_tokens(case: tuple[Path, Any]) -> None:
    """Padding does not move the embedding; it is the normalised mean of transformers' last hidden states."""
    import torch

    from runtimes.coreml.decoder import Embed, load_decoder

    path, model = case
    decoder = load_decoder(path, context_length=32)
    ids = prompts(2)[1]
    with torch.no_grad():
        padded = Embed(decoder)(torch.tensor([ids + [5] * (24 - len(ids))], dtype=torch.int32),
                                torch.tensor([len(ids)], dtype=torch.int32))[0]
        exact = Embed(decoder)(torch.tensor([ids], dtype=torch.int32), torch.tensor([len(ids)], dtype=torch.int32))[0]
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0].mean(0)
    reference = hidden / hidden.norm()
    assert abs(padded.norm().item() - 1.0) < 1e-5
    assert (padded - exact).abs().max().item() < 1e-5
    assert (padded - reference).abs().max().item() < 1e-4


def test_rmsnorm_is_float16_safe() -> None:
    """Values whose squares overflow float16 normalise finitely and correctly in float16 arithmetic."""
    import torch

    from runtimes.coreml.decoder import RMSNorm

    norm = RMSNorm(64, 1e-6, 0.0)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = torch.randn(1, 3, 64) * 3000.0
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    norm.compute_dtype = torch.float16
    with torch.no_grad():
        ours = norm(x.half())
    assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
    assert (ours.float() - expected).abs().max().item() < 2e-2
    assert not torch.isfinite(x.half().pow(2).mean(-1)).all()  # the naive form overflows


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    import json

    from runtimes.base import UnsupportedModel
    from runtimes.coreml.decoder import SUPPORTED_ARCHITECTURES, read_spec

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModel) as info:
        read_spec(tmp_path)
    assert "GPT2LMHeadModel" in str(info.value)
    for name in SUPPORTED_ARCHITECTURES:
        assert name in str(info.value)


def test_sequence_dependent_rope_is_refused(tmp_path: Path) -> None:
    from runtimes.base import UnsupportedModel
    from runtimes.coreml.decoder import read_spec

    save_random_model(tmp_path, "LlamaForCausalLM", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                                     "factor": 2.0})
    with pytest.raises(UnsupportedModel, match="dynamic"):
        read_spec(tmp_path)
