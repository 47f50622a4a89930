"""A run's metrics as CSV and JSON, and its loss curve as a PNG, in the run directory."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

COLUMNS = ["step", "epoch", "loss", "val_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"]


def _atomic_write(path: Path, write: Any) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def write_metrics(run_dir: Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> tuple[Path, Path]:
    csv_path, json_path = run_dir / "metrics.csv", run_dir / "metrics.json"

    def write_csv(temp: Path) -> None:
        with open(temp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in history:
                writer.writerow({key: "" if row.get(key) is None else row[key] for key in COLUMNS})

    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    _atomic_write(csv_path, write_csv)
    payload = {"summary": {k: clean(v) for k, v in summary.items()}, "history": [{k: clean(v) for k, v in row.items()} for row in history]}
    _atomic_write(json_path, lambda temp: temp.write_text(json.dumps(payload, indent=1), encoding="utf-8"))
    return csv_path, json_path


def plot_loss(run_dir: Path, history: list[dict[str, Any]], title: str) -> Path | None:
    """Train and validation loss against the optimizer step; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return None
    train = [(row["step"], row["loss"]) for row in history if row.get("loss") is not None]
    val = [(row["step"], row["val_loss"]) for row in history if row.get("val_loss") is not None]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train), label="train", linewidth=1.2)
    if val:
        axes.plot(*zip(*val), label="validation", marker="o", linewidth=1.2)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean token cross-entropy)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = run_dir / "loss_curve.png"
    _atomic_write(path, lambda temp: figure.savefig(temp, format="png"))
    plt.close(figure)
    return path
