"""The report's chart: tokens/s per model and test with standard-deviation error bars, and the
per-token latency percentiles, side by side in one PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """None when no row has a speed measurement (encoders only, or every model failed)."""
    measured = [r for r in rows if r.get("speed")]
    if not measured:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = list(dict.fromkeys(s["test"] for r in measured for s in r["speed"]))
    labels = [r["label"] for r in measured]
    fig, (speed_ax, latency_ax) = plt.subplots(1, 2, figsize=(max(9.0, 2.2 * len(labels) + 5), 4.5))
    width = 0.8 / len(tests)
    for t, test in enumerate(tests):
        means, stds = [], []
        for r in measured:
            found = next((s for s in r["speed"] if s["test"] == test), None)
            means.append(found["mean_tps"] if found else 0.0)
            stds.append(found["std_tps"] if found else 0.0)
        xs = [i + (t - (len(tests) - 1) / 2) * width for i in range(len(labels))]
        speed_ax.bar(xs, means, width, yerr=stds, capsize=3, label=test)
    speed_ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    speed_ax.set_ylabel("tokens/s (mean ± std)")
    speed_ax.set_title("speed")
    speed_ax.legend()
    quantiles = ("p50_ms", "p90_ms", "p99_ms")
    width = 0.8 / len(quantiles)
    for q, key in enumerate(quantiles):
        values = [((r.get("latency") or {}).get(key) or 0.0) for r in measured]
        xs = [i + (q - 1) * width for i in range(len(labels))]
        latency_ax.bar(xs, values, width, label=key.removesuffix("_ms"))
    latency_ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    latency_ax.set_ylabel("ms per generated token")
    latency_ax.set_title("decode latency percentiles")
    latency_ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
