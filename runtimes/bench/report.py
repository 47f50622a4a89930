"""The report's Markdown table and the comparison with the previous run of the same model and settings.

`change` compares a row with the newest earlier row that has the same key (the model's identity and
the settings that change what is measured): the percent change of each test's mean tokens/s, and
Welch's t-test on the two runs' repetitions; `significant` when any test's two-sided p < 0.05.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from runtimes.bench import stats

ALPHA = 0.05


def change(row: dict[str, Any], previous: Iterable[tuple[str, float, dict[str, Any]]]) -> dict[str, Any] | None:
    """previous: (artifact id, created, row) newest first."""
    if row["status"] != "ok" or not row["speed"]:
        return None
    for artifact_id, created, old in previous:
        if old.get("key") != row["key"] or old.get("status") != "ok" or not old.get("speed"):
            continue
        old_tests = {s["test"]: s for s in old["speed"]}
        tests = []
        for s in row["speed"]:
            before = old_tests.get(s["test"])
            if before is None or not before["mean_tps"]:
                continue
            welch = stats.welch(s["samples_tps"], before["samples_tps"])
            p = welch[2] if welch else None
            tests.append({"test": s["test"], "previous_mean_tps": before["mean_tps"],
                          "pct": round((s["mean_tps"] - before["mean_tps"]) / before["mean_tps"] * 100, 3),
                          "p_value": round(p, 6) if p is not None else None, "significant": p is not None and p < ALPHA})
        if not tests:
            continue
        kinds = {s["test"]: s["kind"] for s in row["speed"]}
        first = {kind: next((t["pct"] for t in tests if kinds[t["test"]] == kind), None) for kind in ("pp", "tg")}
        busy = bool((row.get("machine") or {}).get("busy") or (old.get("machine") or {}).get("busy"))
        note = ("one of the two runs was measured while other processes used the CPUs: a significant difference may be "
                "the machine's, not the model's") if busy else None
        return {"previous_run": artifact_id, "previous_created": created, "pp_pct": first["pp"], "tg_pct": first["tg"],
                "significant": any(t["significant"] for t in tests), "tests": tests, "note": note}
    return None


def _mib(value: int | None) -> str:
    return f"{value / 2**20:.1f} MiB" if value else "-"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    tests = list(dict.fromkeys(s["test"] for r in rows for s in r["speed"]))
    header = ["model", "runtime", "type", "size", "load s", "peak RSS", *[f"{t} t/s" for t in tests], "TTFT ms",
              "p50 / p90 / p99 ms", "PPL", "parity top-1 / identical", "embed/s (cos)", "change", "machine"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r["status"] == "failed":
            cells = [r["label"], r["runtime"] or "-", "FAILED", *["-"] * (len(header) - 4), r["error"]["message"][:120].replace("|", "/")]
            lines.append("| " + " | ".join(cells[:len(header)]) + " |")
            continue
        speed = {s["test"]: s for s in r["speed"]}
        lat = r["latency"] or {}
        ppl = r["perplexity"]
        parity = r["parity"]
        embed = r["embed"]
        ch = r["change"]
        machine = r["machine"] or {}
        cells = [
            r["label"], r["runtime"], r["dtype"] or "-", _mib(r["size_bytes"]), _num(r["load_s"]), _mib(r["peak_rss_bytes"]),
            *[(f"{speed[t]['mean_tps']:.2f} ± {speed[t]['std_tps']:.2f}" if t in speed else "-") for t in tests],
            _num(lat.get("ttft_ms"), 1),
            " / ".join(_num(lat.get(k), 2) for k in ("p50_ms", "p90_ms", "p99_ms")) if lat else "-",
            f"{ppl['ppl']:.4f} ({ppl['method']}, {ppl['scored']} tok)" if ppl else "-",
            f"{parity['mean_top1_agreement']:.3f} / {parity['identical']}/{len(parity['prompts'])}" if parity else "-",
            (f"{embed['per_s']:.1f}" + (f" ({embed['cosine_mean']:.4f})" if embed["cosine_mean"] is not None else "")) if embed else "-",
            (f"pp {_num(ch['pp_pct'], 1)}%, tg {_num(ch['tg_pct'], 1)}%" + (" (significant" if ch["significant"] else " (noise")
             + (", busy machine)" if ch.get("note") else ")")) if ch else "-",
            (f"busy: {machine['foreign_cpus']:.2f} CPUs foreign" if machine.get("busy") else "idle") if machine else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"threads {settings['threads']}, OMP_WAIT_POLICY {settings['omp_wait_policy']}, n_batch {settings['batch_size']}, "
                 f"n_ubatch {settings['ubatch_size']}, {settings['repetitions']} repetitions after {settings['warmup']} warmup")
    return "\n".join(lines) + "\n"
