"""Our GGUF writer (runtimes/gguf/export.py) judged by llama.cpp itself.

A GGUF can load and still answer wrong (a missed Q/K permutation, a pre-tokenizer whose regex
splits differently, a bos flag llama.cpp defaults the other way). So every check here runs the
converted file in llama-cpp-python and compares with transformers on the original checkpoint:
the same prompt token ids, the same greedy continuation, the same rendered chat prompt.

f32 comparisons run llama.cpp with a float32 KV cache: its default float16 cache alone moves
logits by ~1e-2 on random weights, which would hide (or fake) a converter bug. The f16 test
keeps the default cache, as a deployment would.
"""

from __future__ import annotations

import ctypes
import io
import json
from pathlib import Path
from typing import Any

import pytest

from runtimes.base import UnsupportedModel
from runtimes.gguf.export import convert_to_gguf
from runtimes.tiny import CORPUS_PATH, build_tiny_model

GGML_TYPE_F32 = 0  # for type_k / type_v: an exact (float32) KV cache
NEW_TOKENS = 32

PROMPTS = [  # from, or close to, the tiny model's corpus
    "In autumn, the leaves in the village turn red and gold",
    "One afternoon the wind and the sun had an argument about",
    '"Let us see who can take the coat from the grasshopper," said',
    "The moral of the story is that",
    "Early in the afternoon, a hare came out to look around. Then a cat",
]
TOKENIZER_TEXTS = PROMPTS + [
    "Numbers: 7, 42, 1234567 and 3.14159 -- also 2024-01-31!",
    "Punctuation?! (yes); [no] {maybe} <tag> a/b\\c @#$%^&*_+=~`|",
    "Ünïcödé: naïve café, 日本語のテキスト, Привет мир, emoji 🦊🐦✨",
    "line one\nline two\n\n\nafter blank lines\r\nwindows\ttab   three spaces  ",
    "It's, we'll, I'd, they've, you're, she'S, WE'LL",
    "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n",
]


# ---------------------------------------------------------------------------------------------
# Shared helpers


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    """These models are tiny: one torch thread is faster, and on a busy 2-core machine two
    spinning threads make the tiny build and the argmax loops 5-30x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def llama(path: Path, **options: Any) -> Any:
    from llama_cpp import Llama

    settings = {"n_ctx": 512, "verbose": False, "logits_all": False, "seed": 1234,
                "n_threads": 1, "n_threads_batch": 1, **options}  # one thread: see one_torch_thread
    return Llama(str(path), **settings)


def llama_greedy(llm: Any, prompt_ids: list[int], count: int) -> list[int]:
    """Greedy (temp 0, top_k 1, no repeat penalty) through llama.cpp's own sampler chain;
    Llama.generate does not stop at EOS, so exactly `count` tokens come back."""
    tokens: list[int] = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        tokens.append(int(token))
        if len(tokens) == count:
            break
    return tokens


def hf_greedy(model: Any, prompt_ids: list[int], count: int) -> list[int]:
    """Plain argmax with the KV cache: no generation config (EOS stop, min length) can interfere."""
    import torch

    tokens: list[int] = []
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(count):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def gguf_fields(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(key -> python value, tensor name -> ReaderTensor) as gguf-py reads the file back."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {tensor.name: tensor for tensor in reader.tensors}


def save_random_model(out_dir: Path, model_class: str, vocab_size: int, seed: int = 0, dtype: str = "float32",
                      **config: Any) -> Any:
    """A small random model whose logits are peaked enough (init 0.2) to make argmax meaningful."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config_class = getattr(transformers, model_class.replace("ForCausalLM", "Config"))
    dims = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, max_position_embeddings=256, initializer_range=0.2)
    model = getattr(transformers, model_class)(config_class(vocab_size=vocab_size, **{**dims, **config})).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)  # nonzero biases, so a wrong bias layout shows
    if dtype == "float32":
        model.save_pretrained(out_dir)
        return model
    model.to(getattr(torch, dtype)).save_pretrained(out_dir)
    # Reload rather than .float(): the cast also rounded the rotary inv_freq buffer, which
    # from_pretrained recomputes exactly (as llama.cpp does); the weights come back widened.
    return getattr(transformers, model_class).from_pretrained(out_dir, dtype=torch.float32).eval()


def max_logit_difference(gguf_path: Path, model: Any, ids: list[int]) -> float:
    import numpy as np
    import torch

    llm = llama(gguf_path, logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    return float(np.abs(ours - reference).max())


# ---------------------------------------------------------------------------------------------
# builtin:tiny (byte-level BPE, GQA, untied head): the main parity checks


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    build_tiny_model(out)
    return out


@pytest.fixture(scope="module")
def tiny_hf(tiny_dir: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def tiny_expected(tiny_hf: tuple[Any, Any]) -> dict[str, tuple[list[int], list[int]]]:
    """prompt -> (HF prompt ids, transformers' greedy continuation), computed once."""
    tokenizer, model = tiny_hf
    expected = {}
    for prompt in PROMPTS:
        prompt_ids = tokenizer(prompt)["input_ids"]
        expected[prompt] = (prompt_ids, hf_greedy(model, prompt_ids, NEW_TOKENS))
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    paths = {dtype: out / f"tiny-{dtype}.gguf" for dtype in ("f32", "f16")}
    for dtype, path in paths.items():
        convert_to_gguf(tiny_dir, path, dtype=dtype)
    return paths


@pytest.fixture(scope="module")
def tiny_llm_f32(tiny_gguf: dict[str, Path]) -> Any:
    return llama(tiny_gguf["f32"], type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)


def test_tokenization_matches_hf(tiny_llm_f32: Any, tiny_hf: tuple[Any, Any]) -> None:
    """gpt-2 pre-tokenizer, merges, control tokens and add_bos=false all as the HF tokenizer."""
    tokenizer, _ = tiny_hf
    for text in TOKENIZER_TEXTS:
        ours = tiny_llm_f32.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert ours == tokenizer(text)["input_ids"], text


def test_f32_greedy_tokens_equal_transformers(tiny_llm_f32: Any, tiny_expected: dict) -> None:
    for prompt, (prompt_ids, expected) in tiny_expected.items():
        assert tiny_llm_f32.tokenize(prompt.encode("utf-8"), add_bos=True, special=True) == prompt_ids
        assert llama_greedy(tiny_llm_f32, prompt_ids, NEW_TOKENS) == expected, prompt


def test_f16_loads_and_mostly_matches(tiny_gguf: dict[str, Path], tiny_expected: dict) -> None:
    llm = llama(tiny_gguf["f16"])  # default (f16) KV cache, as deployed
    full_matches = 0
    for prompt, (prompt_ids, expected) in tiny_expected.items():
        ours = llama_greedy(llm, prompt_ids, NEW_TOKENS)
        assert ours[0] == expected[0], prompt
        full_matches += ours == expected
    print(f"f16 GGUF: {full_matches}/{len(PROMPTS)} prompts give the same {NEW_TOKENS} greedy tokens")
    assert full_matches >= len(PROMPTS) - 1


def test_metadata_and_layout(tiny_dir: Path, tiny_gguf: dict[str, Path]) -> None:
    import gguf

    fields, tensors = gguf_fields(tiny_gguf["f16"])
    config = json.loads((tiny_dir / "config.json").read_text())
    expected = {
        "general.architecture": "llama",
        "general.file_type": 1,
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": config["hidden_size"],
        "llama.block_count": config["num_hidden_layers"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.rope.dimension_count": config["hidden_size"] // config["num_attention_heads"],
        "llama.vocab_size": config["vocab_size"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
    }
    assert {key: fields.get(key) for key in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # the three added specials are control
    assert len(fields["tokenizer.ggml.merges"]) > 0
    assert "output.weight" in tensors  # builtin:tiny has an untied head
    for name, tensor in tensors.items():
        want = gguf.GGMLQuantizationType.F32 if len(tensor.shape) == 1 else gguf.GGMLQuantizationType.F16
        assert tensor.tensor_type == want, name


def test_progress_and_metadata_override(tiny_dir: Path, tmp_path: Path) -> None:
    seen: list[tuple[int, int, str]] = []
    stats = convert_to_gguf(tiny_dir, tmp_path / "named.gguf", dtype="f32", progress=lambda *a: seen.append(a),
                            metadata={"general.name": "tiny test", "general.source.url": "builtin:tiny"})
    fields, _ = gguf_fields(tmp_path / "named.gguf")
    assert fields["general.name"] == "tiny test" and fields["general.source.url"] == "builtin:tiny"
    assert [done for done, _, _ in seen] == list(range(1, stats["tensors"] + 1))
    assert stats["bytes"] == (tmp_path / "named.gguf").stat().st_size and stats["vocab_size"] == 768
    with pytest.raises(ValueError):
        convert_to_gguf(tiny_dir, tmp_path / "bad.gguf", metadata={"tokenizer.ggml.model": "x"})


def test_chat_template_renders_like_transformers(tiny_llm_f32: Any, tiny_hf: tuple[Any, Any]) -> None:
    """The embedded template gives transformers' prompt, both through llama-cpp-python's Jinja
    formatter and through llama.cpp's own (C++) template engine."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tokenizer, _ = tiny_hf
    messages = [
        {"role": "system", "content": "You tell short fables."},
        {"role": "user", "content": "Tell me about the fox and the crow."},
        {"role": "assistant", "content": "The crow sat in a tree with some cheese."},
    ]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    template = tiny_llm_f32.metadata["tokenizer.chat_template"]
    eos = tiny_llm_f32._model.token_get_text(tiny_llm_f32.token_eos())
    bos = tiny_llm_f32._model.token_get_text(tiny_llm_f32.token_bos())
    rendered = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)(messages=messages).prompt
    assert rendered == expected

    native_template = llama_cpp.llama_model_chat_template(tiny_llm_f32.model, None)
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages]
    )
    buffer = ctypes.create_string_buffer(4096)
    length = llama_cpp.llama_chat_apply_template(native_template, chat, len(messages), True, buffer, len(buffer))
    assert buffer.raw[:length].decode("utf-8") == expected


# ---------------------------------------------------------------------------------------------
# SentencePiece ("llama" vocab): a locally trained BPE tokenizer.model with a random Llama

SP_TEXTS = [
    "The fox ran to the river.",
    "Hello world  12 ☃\nnext line",
    "Ünïcödé 日本語 — it's 3.14!",
    "a\n\nb\tc   d",
    "In autumn, the leaves in the village turn red and gold",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any, Any]:
    import sentencepiece
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("sp")
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS_PATH.read_text(encoding="utf-8").splitlines()), model_writer=proto,
        model_type="bpe", vocab_size=600, byte_fallback=True, split_digits=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(proto.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
    }))
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = save_random_model(out, "LlamaForCausalLM", len(tokenizer), bos_token_id=1, eos_token_id=2,
                              tie_word_embeddings=True)
    convert_to_gguf(out, out / "sp.gguf", dtype="f32")
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    return out / "sp.gguf", tokenizer, model, processor


def test_sentencepiece_vocab_metadata(sp_model: tuple[Path, Any, Any, Any]) -> None:
    path, tokenizer, _, _ = sp_model
    fields, _ = gguf_fields(path)
    assert fields["tokenizer.ggml.model"] == "llama"
    assert len(fields["tokenizer.ggml.scores"]) == len(fields["tokenizer.ggml.tokens"]) == len(tokenizer)
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [2, 3, 3]  # <unk>, <s>, </s>
    assert types.count(6) == 256  # byte_fallback pieces <0x00>..<0xFF>
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.ggml.add_bos_token"] is True


def test_sentencepiece_tokenization(sp_model: tuple[Path, Any, Any, Any]) -> None:
    path, tokenizer, _, processor = sp_model
    llm = llama(path, vocab_only=True)
    for text in SP_TEXTS:
        ours = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        assert ours == tokenizer(text)["input_ids"], text
        assert ours == [1] + processor.encode(text), text
    # A leading space: llama.cpp follows sentencepiece ("▁" dummy prefix + "▁"), while
    # transformers 5's converted Metaspace tokenizer folds the two; pin llama.cpp to sentencepiece.
    text = " leading space"
    assert llm.tokenize(text.encode("utf-8"), add_bos=False) == processor.encode(text)


def test_sentencepiece_greedy_tokens_equal_transformers(sp_model: tuple[Path, Any, Any, Any]) -> None:
    path, tokenizer, model, _ = sp_model
    llm = llama(path, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    for prompt in SP_TEXTS[:3]:
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert llama_greedy(llm, prompt_ids, 16) == hf_greedy(model, prompt_ids, 16), prompt


# ---------------------------------------------------------------------------------------------
# Other layouts and tokenizers, on small random models (logits compared directly)


@pytest.mark.parametrize(
    ("model_class", "config", "dtype", "gguf_arch"),
    [
        ("Qwen2ForCausalLM", {"tie_word_embeddings": True}, "float32", "qwen2"),  # q/k/v biases, no permute
        ("LlamaForCausalLM", {"attention_bias": True}, "float32", "llama"),  # permuted q/k biases
        ("LlamaForCausalLM", {"head_dim": 32}, "float32", "llama"),  # head_dim != hidden / heads
        ("MistralForCausalLM", {"sliding_window": None}, "bfloat16", "llama"),  # bf16 checkpoint
    ],
)
def test_architectures_match_transformers_logits(tiny_dir: Path, tmp_path: Path, model_class: str,
                                                 config: dict[str, Any], dtype: str, gguf_arch: str) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    model = save_random_model(tmp_path, model_class, 768, dtype=dtype, **config)
    stats = convert_to_gguf(tmp_path, tmp_path / "model.gguf", dtype="f32")
    assert stats["gguf_architecture"] == gguf_arch
    ids = [5, 300, 17, 42, 99, 7, 250, 3, 600, 12, 40, 41]
    assert max_logit_difference(tmp_path / "model.gguf", model, ids) < 1e-3


@pytest.mark.parametrize("flavour", ["smollm", "llama-bpe", "qwen2"])
def test_byte_level_pre_tokenizers(tmp_path: Path, flavour: str) -> None:
    """Each tokenizer.json pre-tokenizer we map must split exactly as llama.cpp's namesake."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from runtimes.gguf.export import _LLAMA3_REGEX, _QWEN2_REGEX

    gpt2_regex_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    plain_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    pre = {
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2_regex_level]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_REGEX), "isolated"), plain_level]),
        "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_REGEX), "isolated"), plain_level]),
    }[flavour]
    backend = Tokenizer(models.BPE(ignore_merges=flavour == "llama-bpe"))
    backend.pre_tokenizer, backend.decoder = pre, decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS_PATH.read_text(encoding="utf-8").split("\n\n\n") + TOKENIZER_TEXTS * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tokenizer.save_pretrained(tmp_path)
    save_random_model(tmp_path, "LlamaForCausalLM", backend.get_vocab_size(), hidden_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, intermediate_size=32)

    assert convert_to_gguf(tmp_path, tmp_path / "model.gguf", dtype="f32")["tokenizer_pre"] == flavour
    llm = llama(tmp_path / "model.gguf", vocab_only=True)
    for text in TOKENIZER_TEXTS + ["A1B22C333D4444 99999 1,000,000", "x  \n  y", "   spaces   everywhere   "]:
        ours = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert ours == tokenizer(text, add_special_tokens=False)["input_ids"], text


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
          "num_hidden_layers": 1, "intermediate_size": 96, "vocab_size": 8,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
    ],
)
def test_unsupported_models_are_refused(tmp_path: Path, config: dict[str, Any], named: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match=named):
        convert_to_gguf(tmp_path, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
