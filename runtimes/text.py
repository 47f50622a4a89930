"""Runtime-agnostic pieces of text generation: sampling settings, streaming detokenizers, stop strings."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 0
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1


class Utf8Stream:
    """Bytes in, whole code points out: a character split across tokens is held until complete."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class HfDetokenizer:
    """Streaming detokenization for any Hugging Face tokenizer.

    Decodes a short window of recent ids and emits what grew since the last call, holding text that
    ends in U+FFFD (an incomplete UTF-8 sequence from byte-level BPE or byte fallback). The window keeps
    the cost per token constant while letting tokenizers that merge spaces across tokens decode right.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # ids before this were emitted and are only context
        self._read = 0  # ids before this have had their text emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def feed(self, token_id: int) -> str:
        self._ids.append(token_id)
        emitted = self._decode(self._ids[self._prefix:self._read])
        current = self._decode(self._ids[self._prefix:])
        if len(current) <= len(emitted) or current.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return current[len(emitted):]

    def flush(self) -> str:
        emitted = self._decode(self._ids[self._prefix:self._read])
        current = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return current[len(emitted):] if len(current) > len(emitted) else ""


class StopMatcher:
    """Finds stop strings across token boundaries; text that might begin a stop string is held back."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Returns the text that is safe to emit now; sets `stopped` when a stop string appeared."""
        if not self._stops:
            return text
        self._pending += text
        first = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if first >= 0:
            self.stopped = True
            out, self._pending = self._pending[:first], ""
            return out
        keep = self._partial_suffix()
        out, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest suffix of pending text that is a prefix of some stop string."""
        for length in range(min(self._hold, len(self._pending)), 0, -1):
            tail = self._pending[-length:]
            if any(s.startswith(tail) for s in self._stops):
                return length
        return 0

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
