"""keep_alive, with Ollama's meaning: how long a model stays loaded after the request that used it."""

from __future__ import annotations

import math
import re

DEFAULT_KEEP_ALIVE_S = 300.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class InvalidKeepAlive(ValueError):
    pass


def parse_keep_alive(value: str | int | float | None) -> float | None:
    """Seconds to keep an idle model; None means until unloaded. A duration ("5m", "1h30m", "250ms") or
    seconds; 0 unloads when the request ends; a negative value (or infinity) keeps it."""
    if value is None:
        return DEFAULT_KEEP_ALIVE_S
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise InvalidKeepAlive(f"keep_alive {value!r} is not a duration like '5m', '1h30m', '10s' or a number of seconds") from None
            seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
        seconds *= sign
    if math.isnan(seconds):
        raise InvalidKeepAlive(f"keep_alive {value!r} is not a number of seconds")
    return None if seconds < 0 or math.isinf(seconds) else seconds
