"""The built-in tiny model, `builtin:tiny`: a Llama-architecture causal LM built locally in seconds.

Tests, demos and first runs need a real model without downloading one. This module trains a
byte-level BPE tokenizer and a ~0.2M-parameter Llama (GQA, untied head) on a small bundled corpus,
deterministically, and writes it in the Hugging Face layout so every runtime (transformers, peft,
GGUF, Core ML, ONNX converters) can treat it like any downloaded checkpoint.

Provenance of `data/tiny_corpus.txt`: original text written for this project (simple fables and
nature sketches in the style of Aesop retellings, produced from our own templates with a seeded
generator). It contains no third-party text and is dedicated to the public domain (CC0 1.0).

Heavy libraries are imported inside `build_tiny_model`, so importing this module is cheap.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

from runtimes import cpu_share

TINY_VERSION = "tiny-v2"  # bump whenever anything below changes the built bytes

CORPUS_PATH = pathlib.Path(__file__).parent / "data" / "tiny_corpus.txt"
STORY_SEPARATOR = "\n\n\n"  # stories in the corpus are separated by two blank lines

EOS_TOKEN = "<|endoftext|>"  # also bos and pad: one id keeps converters simple
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]  # ids 0, 1, 2
VOCAB_SIZE = 768

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MODEL_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA, so converters must handle kv heads != heads
    "intermediate_size": 192,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,  # separate lm_head, the harder case for converters
    "rms_norm_eps": 1e-5,
}

SEED = 1234
TRAIN_STEPS = 300
BATCH_SIZE = 16
SEQ_LEN = 64
LEARNING_RATE = 3e-3
WARMUP_STEPS = 20
PROGRESS_EVERY = 10

ProgressFn = Callable[[int, int, str], None]


def build_tiny_model(out_dir: pathlib.Path, progress: ProgressFn | None = None) -> dict:
    """Build builtin:tiny into out_dir (an existing empty directory) and return metrics.

    Deterministic: the same library versions on the same machine give bit-identical files.
    Global torch state touched here (RNG, default dtype, grad mode) is restored on return.
    """
    import torch

    out_dir = pathlib.Path(out_dir)
    started = time.perf_counter()
    text = CORPUS_PATH.read_text(encoding="utf-8")
    tokenizer = _train_tokenizer(text)
    token_ids = _encode_corpus(tokenizer, text)

    previous_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float32)
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(SEED)
            model = _new_model(tokenizer.get_vocab_size())
            final_loss = _pretrain(model, token_ids, progress)
    finally:
        torch.set_default_dtype(previous_dtype)
    _save_model(model, out_dir)
    _save_tokenizer(tokenizer, out_dir)

    return {
        "version": TINY_VERSION,
        "final_loss": final_loss,
        "params": sum(p.numel() for p in model.parameters()),
        "train_steps": TRAIN_STEPS,
        "train_tokens": TRAIN_STEPS * BATCH_SIZE * SEQ_LEN,
        "corpus_tokens": len(token_ids),
        "vocab_size": tokenizer.get_vocab_size(),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _train_tokenizer(text: str) -> Any:
    """Byte-level BPE like GPT-2/Llama-3 style models, so any input text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.split(STORY_SEPARATOR), trainer=trainer)
    return tokenizer


def _encode_corpus(tokenizer: Any, text: str) -> list[int]:
    """One token stream with <|endoftext|> after every story, as in ordinary pretraining."""
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(text.split(STORY_SEPARATOR)):
        ids.extend(encoding.ids)
        ids.append(eos_id)
    return ids


def _new_model(vocab_size: int) -> Any:
    """A seeded, freshly initialised LlamaForCausalLM (the caller has set the RNG)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        hidden_act="silu",
        initializer_range=0.02,
        attention_bias=False,
        mlp_bias=False,
        use_cache=True,
        **MODEL_DIMS,
    )
    model = LlamaForCausalLM(config)
    # <|im_end|> ends a chat answer, <|endoftext|> a document: either stops generation.
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=[0, 2], pad_token_id=0)
    return model


def _pretrain(model: Any, token_ids: list[int], progress: ProgressFn | None) -> float:
    """Brief AdamW pretraining on random windows of the corpus; returns the last-step loss."""
    import torch

    data = torch.tensor(token_ids, dtype=torch.long)
    sampler = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    model.train()
    loss_value = float("nan")
    threads_before = torch.get_num_threads()  # per calling thread; restored for whoever computes here next
    try:
        with cpu_share.job() as share:
            for step in range(1, TRAIN_STEPS + 1):
                share.apply_to(cpu_share.TORCH)  # fewer threads while other programs keep cores busy
                for group in optimizer.param_groups:
                    group["lr"] = _learning_rate(step)
                starts = torch.randint(0, len(data) - SEQ_LEN, (BATCH_SIZE,), generator=sampler)
                batch = torch.stack([data[s : s + SEQ_LEN] for s in starts.tolist()])
                loss = model(input_ids=batch, labels=batch).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_value = loss.item()
                if progress is not None and (step % PROGRESS_EVERY == 0 or step == TRAIN_STEPS):
                    progress(step, TRAIN_STEPS, f"pretraining builtin:tiny, loss {loss_value:.3f}")
    finally:
        torch.set_num_threads(threads_before)
    model.eval()
    return loss_value


def _learning_rate(step: int) -> float:
    """Linear warm-up then cosine decay to 10%: stable and quick for a few hundred steps."""
    if step <= WARMUP_STEPS:
        return LEARNING_RATE * step / WARMUP_STEPS
    done = (step - WARMUP_STEPS) / (TRAIN_STEPS - WARMUP_STEPS)
    return LEARNING_RATE * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * done)))


def _save_model(model: Any, out_dir: pathlib.Path) -> None:
    """config.json, generation_config.json and one float32 model.safetensors (no pickle).

    Written directly rather than with save_pretrained, which shows a progress bar on stderr."""
    from safetensors.torch import save_file

    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    # transformers 5 nests rope_theta under rope_parameters; older readers (transformers 4,
    # llama.cpp's converter) expect it at the top level, and 5 accepts both.
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    config.setdefault("rope_theta", MODEL_DIMS["rope_theta"])
    config.setdefault("torch_dtype", "float32")
    config.setdefault("architectures", ["LlamaForCausalLM"])  # what loaders and converters dispatch on
    _write_json(out_dir / "config.json", dict(sorted(config.items())))
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def _save_tokenizer(tokenizer: Any, out_dir: pathlib.Path) -> None:
    """Write the tokenizer files by hand so the layout does not depend on the transformers
    version (5.x would move the template to chat_template.jinja and drop special_tokens_map)."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    added_tokens_decoder = {
        str(tokenizer.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_DIMS["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    special_tokens_map = {
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "additional_special_tokens": [IM_START, IM_END],
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special_tokens_map)


def _write_json(path: pathlib.Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
