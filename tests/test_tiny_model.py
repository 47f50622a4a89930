"""builtin:tiny must be a real, loadable, deterministic HF checkpoint that other tests can rely on."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

from runtimes.tiny import CORPUS_PATH, TINY_VERSION, build_tiny_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
}
PROMPTS = [
    "Once upon a time, a wise owl lived near the field",  # verbatim from the corpus
    "The race began, and the hare ran far ahead.",
    "In winter, the forest is quiet and white with snow.",
    '"Good morning, dear crow," said the fox.',
]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, dict, list[tuple[int, int, str]]]:
    """Build once for the whole module; the build also must not disturb global torch state."""
    out_dir = tmp_path_factory.mktemp("tiny_a")
    calls: list[tuple[int, int, str]] = []
    rng_before = torch.get_rng_state()
    metrics = build_tiny_model(out_dir, progress=lambda step, total, msg: calls.append((step, total, msg)))
    assert torch.equal(torch.get_rng_state(), rng_before), "build must restore the global RNG"
    assert torch.get_default_dtype() == torch.float32
    return out_dir, metrics, calls


@pytest.fixture(scope="module")
def loaded(built) -> tuple:
    out_dir = built[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
    model.eval()
    return tokenizer, model


def test_import_is_cheap() -> None:
    code = "import sys, runtimes.tiny; print(sorted({'torch', 'transformers', 'tokenizers'} & set(sys.modules)))"
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_files_and_metrics(built) -> None:
    out_dir, metrics, calls = built
    assert EXPECTED_FILES <= {p.name for p in out_dir.iterdir()}
    assert not list(out_dir.glob("*.bin")) and not list(out_dir.glob("*.pt")), "safetensors only"
    assert metrics["version"] == TINY_VERSION
    assert metrics["train_steps"] > 0 and metrics["params"] > 0
    assert metrics["final_loss"] < 2.5, metrics
    assert calls and calls[-1][0] == calls[-1][1] == metrics["train_steps"]
    assert len(calls) <= metrics["train_steps"] // 2, "progress should be throttled"


def test_loads_with_transformers(loaded) -> None:
    tokenizer, model = loaded
    config = model.config
    assert config.model_type == "llama"
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert config.tie_word_embeddings is False
    assert not torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert config.vocab_size == len(tokenizer)
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == config.eos_token_id
    # generation stops at the end of a document or of a chat turn
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    text = "The tortoise won the race, and the hare was surprised! 123 ünïcode"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level round trip


def test_chat_template(loaded) -> None:
    tokenizer, _ = loaded
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me a fable."}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nTell me a fable.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without_prompt == rendered.removesuffix("<|im_start|>assistant\n")
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == 3 and ids.count(end) == 2  # chat markers stay single tokens


def test_greedy_output_uses_corpus_words(loaded) -> None:
    tokenizer, model = loaded
    corpus = CORPUS_PATH.read_text(encoding="utf-8")
    vocabulary = set(_words(corpus))
    prompt = PROMPTS[0]
    assert prompt in corpus
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    words = _words(completion)
    assert len(words) >= 5, completion
    known = sum(w in vocabulary for w in words) / len(words)
    assert known >= 0.7, (known, completion)


def test_greedy_steps_have_no_ties(loaded) -> None:
    tokenizer, model = loaded
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            for _ in range(16):
                logits = model(input_ids=ids).logits[0, -1]
                top2 = torch.topk(logits, 2).values
                assert (top2[0] - top2[1]).item() > 1e-4, (prompt, tokenizer.decode(ids[0]))
                ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)


def test_build_is_deterministic(built, tmp_path: pathlib.Path) -> None:
    first = built[0]
    build_tiny_model(tmp_path)
    for name in sorted(EXPECTED_FILES):
        assert (tmp_path / name).read_bytes() == (first / name).read_bytes(), name
