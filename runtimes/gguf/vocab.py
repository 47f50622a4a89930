"""The tokenizer of an HF model directory as llama.cpp's vocab keys, read from the files directly.

Which llama.cpp tokenizer runs each kind, and what it cannot reproduce (refused, not approximated):
- tokenizer.model, SentencePiece BPE -> "llama" (scores, byte tokens). llama.cpp applies no
  normalization to it, so a model with a precompiled normalizer or remove_extra_whitespaces is
  refused.
- tokenizer.model, SentencePiece unigram -> "t5" (llama.cpp's Viterbi unigram tokenizer, with the
  model's precompiled normalizer). It has no byte fallback, so a byte_fallback model is refused.
- tokenizer.json byte-level BPE -> "gpt2" with the llama.cpp pre-tokenizer whose regex splits
  identically (gpt-2, smollm, llama-bpe, qwen2).
- tokenizer.json WordPiece (BERT) -> "bert": tokens in llama.cpp's phantom-space form (a word-initial
  piece gets "\u2581", a "##" continuation loses the prefix), lowercase/strip_accents from the
  BertNormalizer.
Special ids, add_bos/add_eos and the chat template come from the tokenizer files (then config.json).
SentencePiece files are parsed from the protobuf wire format, so conversion needs no sentencepiece.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes.base import UnsupportedModel

# gguf.TokenType values (llama.cpp's token attributes).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PHANTOM_SPACE = "\u2581"


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "gpt2", "llama", "t5" or "bert"
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/sep/pad/mask
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | list[dict[str, str]] | None = None
    extra: list[tuple[Any, ...]] = field(default_factory=list)  # (GGUFWriter method, *arguments)


def read_vocab(model_dir: Path, config: dict[str, Any], n_vocab: int) -> Vocab:
    """SentencePiece when tokenizer.model exists (as llama.cpp's converter prefers), else the
    BPE or WordPiece model in tokenizer.json; other tokenizers are refused."""
    tokenizer_config = read_json_if(model_dir / "tokenizer_config.json")
    tokenizer_json = read_json_if(model_dir / "tokenizer.json")
    kind = (tokenizer_json.get("model") or {}).get("type")
    if (model_dir / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(model_dir / "tokenizer.model", tokenizer_config, n_vocab)
        default_add_bos = vocab.model == "llama"  # LlamaTokenizer's default; T5-style unigram adds none
    elif kind == "BPE":
        vocab, default_add_bos = _bpe_vocab(tokenizer_json, n_vocab), False
    elif kind == "WordPiece":
        vocab, default_add_bos = _wordpiece_vocab(tokenizer_json, n_vocab), True
    elif tokenizer_json:
        raise UnsupportedModel(f"tokenizer.json model {kind!r} is not supported without tokenizer.model "
                               "(only byte-level BPE and WordPiece)")
    else:
        raise UnsupportedModel(f"{model_dir} has neither tokenizer.json nor tokenizer.model")
    token_ids = {token: i for i, token in enumerate(vocab.tokens)}
    if vocab.model == "bert":  # the phantom-space rewrite leaves control tokens ([CLS], ...) as they were
        token_ids = {token: i for i, token in enumerate(vocab.tokens) if vocab.types[i] == CONTROL}
    vocab.special_ids = _special_ids(model_dir, tokenizer_config, config, token_ids)
    if vocab.model == "bert":  # llama.cpp's BERT tokenizer opens with bos and closes with sep: [CLS] ... [SEP]
        cls = vocab.special_ids.pop("cls", None)
        if cls is not None:
            vocab.special_ids.setdefault("bos", cls)
        if "sep" in vocab.special_ids:
            vocab.special_ids.setdefault("eos", vocab.special_ids["sep"])
    vocab.special_ids.pop("cls", None)  # GGUF has no cls key
    post = _post_processor_flags(tokenizer_json, vocab.special_ids)
    vocab.add_bos = _flag(tokenizer_config.get("add_bos_token"), post.get("add_bos"), default_add_bos)
    vocab.add_eos = _flag(tokenizer_config.get("add_eos_token"), post.get("add_eos"), False)
    vocab.chat_template = _chat_template(model_dir, tokenizer_config)
    return vocab


def add_to_writer(writer: Any, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)  # always explicit: llama.cpp's defaults differ per model
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    for method, *arguments in vocab.extra:
        getattr(writer, method)(*arguments)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _flag(*choices: bool | None) -> bool:
    return next(bool(choice) for choice in choices if choice is not None)


def _base_tokens(model_vocab: dict[str, int], added: list[dict[str, Any]], n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens by id, padded to the embedding rows; added tokens are control when special."""
    too_big = [t for t, i in model_vocab.items() if i >= n_vocab]
    if too_big:
        raise UnsupportedModel(f"tokenizer has {len(too_big)} token(s) beyond the model's {n_vocab} embeddings")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for token, token_id in model_vocab.items():
        tokens[token_id], types[token_id] = token, NORMAL
    for token in added:
        if token["id"] < n_vocab:
            tokens[token["id"]] = token["content"]
            types[token["id"]] = CONTROL if token.get("special") else USER_DEFINED
    return tokens, types


# Byte-level BPE ------------------------------------------------------------------------------

# Pre-tokenizer regexes of tokenizer.json, by the llama.cpp pre-tokenizer that splits identically.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRES = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
_IGNORES_MERGES = {"llama-bpe"}  # llama.cpp sets ignore_merges for these pre types only


def _bpe_vocab(tokenizer_json: dict[str, Any], n_vocab: int) -> Vocab:
    model = tokenizer_json["model"]
    if model.get("byte_fallback"):
        raise UnsupportedModel("tokenizer.json BPE with byte_fallback (SentencePiece-style) needs its tokenizer.model")
    normalizer = tokenizer_json.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":  # llama.cpp applies no normalizer; NFC is a no-op on NFC text
        raise UnsupportedModel(f"tokenizer.json normalizer {normalizer.get('type')!r} is not supported")
    pre = _pre_tokenizer_name(tokenizer_json.get("pre_tokenizer"))
    if bool(model.get("ignore_merges")) != (pre in _IGNORES_MERGES):
        raise UnsupportedModel(
            f"tokenizer.json ignore_merges={model.get('ignore_merges')} differs from llama.cpp's {pre!r} pre-tokenizer"
        )
    tokens, types = _base_tokens(model["vocab"], tokenizer_json.get("added_tokens") or [], n_vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return Vocab(model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges)


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """The llama.cpp pre-tokenizer whose split regexes equal this tokenizer.json's pre_tokenizer."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None:
        raise UnsupportedModel(f"tokenizer.json pre_tokenizer {kinds or None} is not byte-level BPE")
    if byte_level.get("add_prefix_space"):
        raise UnsupportedModel("byte-level BPE with add_prefix_space=true is not supported (llama.cpp adds none)")
    uses_gpt2_regex = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and uses_gpt2_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and uses_gpt2_regex:
        return "smollm"  # SmolLM/SmolLM2: single digits, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not uses_gpt2_regex:
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if regex in _SPLIT_PRES and split.get("behavior") == "Isolated" and not split.get("invert"):
            return _SPLIT_PRES[regex]
    raise UnsupportedModel(f"tokenizer.json pre_tokenizer {json.dumps(pre)[:200]} has no known llama.cpp equivalent")


# WordPiece -----------------------------------------------------------------------------------


def _wordpiece_vocab(tokenizer_json: dict[str, Any], n_vocab: int) -> Vocab:
    """llama.cpp's "bert" vocab. Its tokenizer splits like BertPreTokenizer after BertNormalizer
    (clean text, CJK characters apart, optional lowercase and accent stripping), then matches the
    longest phantom-space pieces; an HF setup it does not mirror is refused."""
    model = tokenizer_json["model"]
    normalizer = tokenizer_json.get("normalizer") or {}
    pre = (tokenizer_json.get("pre_tokenizer") or {}).get("type")
    if model.get("continuing_subword_prefix", "##") != "##":
        raise UnsupportedModel(f"WordPiece prefix {model['continuing_subword_prefix']!r} is not supported (only ##)")
    if normalizer.get("type") != "BertNormalizer" or pre != "BertPreTokenizer":
        raise UnsupportedModel(f"WordPiece with normalizer {normalizer.get('type')!r} and pre_tokenizer {pre!r} is "
                               "not supported (only BertNormalizer + BertPreTokenizer)")
    if not normalizer.get("clean_text", True) or not normalizer.get("handle_chinese_chars", True):
        raise UnsupportedModel("WordPiece without clean_text or handle_chinese_chars is not supported")
    lowercase = bool(normalizer.get("lowercase", True))
    strip_accents = lowercase if normalizer.get("strip_accents") is None else bool(normalizer["strip_accents"])
    tokens, types = _base_tokens(model["vocab"], tokenizer_json.get("added_tokens") or [], n_vocab)
    tokens = [token if kind == CONTROL else token[2:] if token.startswith("##") else PHANTOM_SPACE + token
              for token, kind in zip(tokens, types)]
    return Vocab(model="bert", pre="default", tokens=tokens, types=types, extra=[
        ("add_bool", "tokenizer.ggml.normalizer.lowercase", lowercase),
        ("add_bool", "tokenizer.ggml.normalizer.strip_accents", strip_accents),
    ])


# Special tokens, flags, template -------------------------------------------------------------


def _special_ids(model_dir: Path, tokenizer_config: dict[str, Any], config: dict[str, Any],
                 token_ids: dict[str, int]) -> dict[str, int]:
    """bos/eos/unk/sep/pad/mask (and cls) ids: by token text from the tokenizer files, else the
    ids in config.json."""
    special_map = read_json_if(model_dir / "special_tokens_map.json")
    found: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "sep", "pad", "mask", "cls"):
        value = tokenizer_config.get(f"{kind}_token") or special_map.get(f"{kind}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in token_ids:
            found[kind] = token_ids[value]
            continue
        fallback = config.get(f"{kind}_token_id")
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        if isinstance(fallback, int) and 0 <= fallback < config.get("vocab_size", 0):
            found[kind] = fallback
    return found


def _post_processor_flags(tokenizer_json: dict[str, Any], special_ids: dict[str, int]) -> dict[str, bool]:
    """Whether tokenizer.json's TemplateProcessing puts bos first / eos last on a single text."""
    if not tokenizer_json:
        return {}
    post = tokenizer_json.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    template = next((s for s in steps if s.get("type") == "TemplateProcessing"), None)
    if template is None:
        return {"add_bos": False, "add_eos": False}
    items = template.get("single") or []
    specials = template.get("special_tokens") or {}

    def special_id(item: dict[str, Any]) -> int | None:
        token = (item.get("SpecialToken") or {}).get("id")
        ids = (specials.get(token) or {}).get("ids") or []
        return ids[0] if ids else None

    first, last = (special_id(items[0]), special_id(items[-1])) if items else (None, None)
    return {
        "add_bos": first is not None and first == special_ids.get("bos"),
        "add_eos": last is not None and last == special_ids.get("eos"),
    }


def _chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | list[dict[str, str]] | None:
    template = tokenizer_config.get("chat_template")
    if template:
        return template
    jinja = model_dir / "chat_template.jinja"  # where transformers 5 saves it
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    return read_json_if(model_dir / "chat_template.json").get("chat_template")


# SentencePiece -----------------------------------------------------------------------------


def _sentencepiece_vocab(path: Path, tokenizer_config: dict[str, Any], n_vocab: int) -> Vocab:
    """Every piece with its score and type: "llama" for BPE models, "t5" for unigram ones."""
    model = _parse_sentencepiece(path.read_bytes())
    if model["treat_whitespace_as_suffix"] or not model["escape_whitespaces"]:
        raise UnsupportedModel("SentencePiece models with treat_whitespace_as_suffix or without escape_whitespaces "
                               "are not supported")
    pieces = model["pieces"]
    extra: list[tuple[Any, ...]] = []
    if model["model_type"] == 2:  # trainer_spec.model_type: 1 unigram, 2 bpe, 3 word, 4 char
        kind = "llama"
        if model["charsmap"] or model["remove_extra_whitespaces"]:
            raise UnsupportedModel("SentencePiece BPE with a normalization rule or remove_extra_whitespaces is not "
                                   "supported: llama.cpp's tokenizer for it does not normalize")
    elif model["model_type"] == 1:
        kind = "t5"
        if any(piece_type == BYTE for _, _, piece_type in pieces):
            raise UnsupportedModel("SentencePiece unigram with byte_fallback is not supported: llama.cpp's unigram "
                                   "tokenizer has no byte fallback")
        extra.append(("add_remove_extra_whitespaces", model["remove_extra_whitespaces"]))
        if model["charsmap"]:
            extra.append(("add_precompiled_charsmap", model["charsmap"]))
    else:
        name = {3: "word", 4: "char"}.get(model["model_type"], str(model["model_type"]))
        raise UnsupportedModel(f"SentencePiece {name} models are not supported (only BPE and unigram)")
    if len(pieces) > n_vocab:
        raise UnsupportedModel(f"tokenizer.model has {len(pieces)} pieces but the model only {n_vocab} embeddings")
    tokens = [piece for piece, _, _ in pieces] + [f"[PAD{i}]" for i in range(len(pieces), n_vocab)]
    scores = [score for _, score, _ in pieces] + [-1000.0] * (n_vocab - len(pieces))
    types = [piece_type for _, _, piece_type in pieces] + [UNUSED] * (n_vocab - len(pieces))
    for token_id, added in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        index = int(token_id)
        if index < n_vocab and (index >= len(pieces) or tokens[index] != added["content"]):
            tokens[index] = added["content"]
            types[index] = CONTROL if added.get("special") else USER_DEFINED
            scores[index] = -1000.0
    add_prefix = tokenizer_config.get("add_prefix_space")
    return Vocab(model=kind, pre="default", tokens=tokens, types=types, scores=scores, extra=extra,
                 add_space_prefix=model["add_dummy_prefix"] if add_prefix is None else bool(add_prefix))


# (message field, sub-field) -> (our key, protobuf default) for the scalar settings we read.
_SPM_SETTINGS = {
    (2, 3): ("model_type", 1), (2, 24): ("treat_whitespace_as_suffix", 0),
    (3, 2): ("charsmap", b""), (3, 3): ("add_dummy_prefix", 1), (3, 4): ("remove_extra_whitespaces", 1),
    (3, 5): ("escape_whitespaces", 1),
}


def _parse_sentencepiece(blob: bytes) -> dict[str, Any]:
    """The fields we need from a sentencepiece ModelProto, read straight from the protobuf wire
    format: pieces=1{piece=1, score=2, type=3}, trainer_spec=2{model_type=3,
    treat_whitespace_as_suffix=24}, normalizer_spec=3{precompiled_charsmap=2, add_dummy_prefix=3,
    remove_extra_whitespaces=4, escape_whitespaces=5}."""
    pieces: list[tuple[str, float, int]] = []
    found = {key: default for key, default in _SPM_SETTINGS.values()}
    for number, value in _proto_fields(blob):
        if number == 1:
            piece, score, kind = "", 0.0, NORMAL
            for sub, sub_value in _proto_fields(value):
                if sub == 1:
                    piece = sub_value.decode("utf-8")
                elif sub == 2:
                    score = struct.unpack("<f", sub_value)[0]
                elif sub == 3:
                    kind = sub_value
            pieces.append((piece, score, kind))
        elif number in (2, 3):
            for sub, sub_value in _proto_fields(value):
                if (number, sub) in _SPM_SETTINGS:
                    found[_SPM_SETTINGS[number, sub][0]] = sub_value
    settings = {key: value if key in ("model_type", "charsmap") else bool(value) for key, value in found.items()}
    return {"pieces": pieces, **settings}


def _proto_fields(blob: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) pairs of one protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(blob):
        key, pos = _varint(blob, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(blob, pos)
        elif wire == 1:
            value, pos = blob[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(blob, pos)
            value, pos = blob[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = blob[pos:pos + 4], pos + 4
        else:
            raise UnsupportedModel(f"tokenizer.model is not a SentencePiece model (protobuf wire type {wire})")
        yield number, value


def _varint(blob: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = blob[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def read_json_if(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}
