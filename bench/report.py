"""What every benchmark prints: values with their units, an aligned table, and the verdict line."""

from __future__ import annotations

import os
import platform
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


def print_rows(rows: list[dict[str, Any]], digits: int = 2) -> None:
    """Rows of {metric, unit, ours, baselines {name: value}, ratio, ratio_label, target, pass} as a table."""
    cells = []
    for row in rows:
        unit = row["unit"]
        baselines = ", ".join(f"{name} {fmt(v, unit)}" for name, v in row["baselines"].items()) or "-"
        ratio = f"{row['ratio']:.{digits}f} ({row['ratio_label']})" if row["ratio"] is not None else "-"
        cells.append((row["metric"], fmt(row["ours"], unit), baselines, ratio, row["target"], verdict(row)))
    print_aligned(("metric", "ours", "baseline(s)", "ratio", "target", "result"), cells, rows)


def git_commit(root: Path) -> str | None:
    """The commit a benchmark ran on, for its JSON; None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(root: Path, packages: Sequence[str] = (), **extra: Any) -> dict[str, Any]:
    """What every benchmark's JSON records about the machine: interpreter, CPUs, the packages that
    shape its numbers (None where not installed), the load average and the commit; then `extra`."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "machine": platform.machine(), "cpus": os.cpu_count(), **extra}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    for package in packages:
        try:
            info[f"{package}_version"] = version(package)
        except PackageNotFoundError:
            info[f"{package}_version"] = None
    try:
        info["loadavg"] = os.getloadavg()
    except (AttributeError, OSError):
        pass
    info["git_commit"] = git_commit(root)
    return info
