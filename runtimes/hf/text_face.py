"""The text side of a model that carries a Hugging Face tokenizer, shared by the transformers and onnxruntime runtimes.

A plain mixin (no fields, no __init__): the dataclasses that use it declare `tokenizer`, `config`
and `path` themselves, and generate (handlers/generate.py) reads only these methods.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from runtimes.base import UnsupportedModel


class NoChatTemplate(UnsupportedModel):
    error_kind = "no_chat_template"

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} has no chat template: send `prompt` instead of `messages`, or pass `chat_template` "
                         "(a Jinja template) with the request", path=str(path))


class HfTextFace:
    tokenizer: Any
    config: dict[str, Any]
    path: Path

    @property
    def context_length(self) -> int:
        return int(self.config.get("max_position_embeddings") or self.tokenizer.model_max_length)

    def encode(self, text: str, *, chat: bool = False) -> list[int]:
        """Rendered chat text carries its own special tokens; a plain prompt gets the model's BOS rule."""
        return list(self.tokenizer.encode(text, add_special_tokens=not chat))

    def render_chat(self, messages: list[dict[str, str]], template: str | None, add_generation_prompt: bool) -> str:
        if template is None and not getattr(self.tokenizer, "chat_template", None):
            raise NoChatTemplate(self.path)
        return self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def detokenizer(self) -> Any:
        from runtimes.text import HfDetokenizer

        return HfDetokenizer(self.tokenizer)

    def eos_ids(self, generation_eos: Any) -> set[int]:
        """The generation config's end tokens (an id or a list) and the tokenizer's own."""
        ids: set[int] = set()
        values: Iterable[Any] = (generation_eos, self.tokenizer.eos_token_id)
        for value in values:
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(value)
        return ids
