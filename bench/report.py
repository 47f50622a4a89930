"""What every benchmark prints: values with their units, an aligned table, and the verdict line."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 10 else f"{value:.2f} s"
    if unit == "us":
        return f"{value:.1f} us"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "tok/s":
        return f"{value:.2f} tok/s"
    if unit == "cpus":
        return f"{value:.2f} CPUs"
    if unit == "n":
        return f"{value:.0f}"
    return f"{value:g}"


def verdict(row: dict[str, Any]) -> str:
    return "-" if row["pass"] is None else ("PASS" if row["pass"] else "FAIL <<<")


def print_aligned(header: Sequence[str], cells: list[Sequence[str]], rows: list[dict[str, Any]]) -> None:
    """The table (header, then one line of cells per row) and which targets were missed."""
    table = [tuple(header), *map(tuple, cells)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    for index, r in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        if index == 0:
            print(line)
    print(line)
    failed = [r["metric"] for r in rows if r["pass"] is False]
    if failed:
        print(f"FAIL: {len(failed)} target(s) missed: " + "; ".join(failed))
    else:
        print("All targets met.")


def git_commit(root: Path) -> str | None:
    """The commit a benchmark ran on, for its JSON; None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
