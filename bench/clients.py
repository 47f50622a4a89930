"""Client overhead: the Swift and Node clients against bench/protocol.py's Python host, in one run.

    python bench/clients.py            # default run: 5 rounds, about 2-3 minutes on 2 cores (+ the Swift build)
    python bench/clients.py --quick    # smoke run: 2 rounds of fewer pings and tokens, about 30 s
    python bench/clients.py --rounds 7 --pings 5000 --placement same-cpu --no-node

What it measures, in interleaved rounds (the order of the contestants rotates round by round, so a
change in the machine's load hits them alike); every sidecar is `python -m sidecar --debug` with this
interpreter, cwd = the repository root, one temporary MLSIDECAR_HOME:

1. Ping round trip, per-ping median: the Python host exactly as bench/protocol.py measures it (its
   `Child` and `ping_loop`: raw os.write / os.read on the pipes, reading until the newline), the
   Swift client (`sidecar-bench --runs 1 --json`: `try await client.ping().result()` from a task, one
   at a time) and the Node client (`clients/node/bench/bench.mjs --runs 1 --json`: `await client.ping()`).
   Each client's ratio to the Python host (target <= 1.05): the median of the client's round medians
   over the median of the host's. Each client's own raw-pipe baseline, measured by its bench in the
   same process (Swift: one thread doing write(2) then a blocking read(2), no parsing; Node: the pipe
   with JSON.parse), is shown for information. Two placements: same-cpu (the host, the client with
   all its threads and every sidecar pinned to one CPU: like with like) and unpinned (what users get).
2. `$/token` events per second reaching user code from one `debug/stream` request (target >= 50,000/s),
   unpinned: the Swift client's `for try await` loop and the Node client's `for await` loop; the
   Python host's parse rate (bench/protocol.py's `stream_once`) for reference.

The Swift bench is built first (`swift build -c release --product sidecar-bench`, nice'd; a no-op
when up to date). It prints a table (metric, ours, baseline, ratio, target, PASS/FAIL) and writes
bench/results/clients.json. The exit code is 0 even when a target is missed: it is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "clients.json"
SWIFT_DIR = ROOT / "clients" / "swift"
NODE_BENCH = ROOT / "clients" / "node" / "bench" / "bench.mjs"
sys.path.insert(0, str(ROOT))

from bench.protocol import Bench, ping_loop, sidecar_initialize, stream_once  # noqa: E402
from bench import report  # noqa: E402

PING_RATIO_TARGET = 1.05
TOKENS_TARGET_PER_S = 50_000
CLIENTS = ("python", "swift", "node")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- contestants


def placements() -> dict[str, set[int] | None]:
    """same-cpu: the host, the clients' threads and every sidecar on one CPU (like like with like: no
    client gains from keeping a second CPU awake, and a waking vCPU costs nothing); unpinned: what
    users get, where the scheduler places each process (a blocked reader's idle vCPU can take 30-50 us
    to wake in a VM, which a client that polls avoids)."""
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    chosen: dict[str, set[int] | None] = {}
    if usable:
        chosen["same-cpu"] = {usable[0]}
    chosen["unpinned"] = None
    return chosen


def python_host_round(bench: Bench, cpus: set[int] | None, pings: int, warmup: int, tokens: int,
                      token_runs: int) -> dict[str, Any]:
    """bench/protocol.py's host on a fresh sidecar: `pings` pings after `warmup`, then `token_runs` streams."""
    host_cpus = os.sched_getaffinity(0) if cpus else None
    if cpus:
        os.sched_setaffinity(0, cpus)
    child = bench.spawn("sidecar", "--debug", cpus=cpus)
    try:
        sidecar_initialize(child, 1)
        ping_loop(child, warmup, 10)
        latencies = ping_loop(child, pings, 10 + warmup)
        streams = []
        if token_runs:
            stream_once(child, 2, min(tokens, 5000), "tok")  # warm-up
            streams = [stream_once(child, 3 + i, tokens, "tok") for i in range(token_runs)]
    finally:
        child.close()
        if host_cpus:
            os.sched_setaffinity(0, host_cpus)
    if not all(s["complete"] for s in streams):
        raise RuntimeError(f"the Python host's debug/stream was incomplete: {streams}")
    out: dict[str, Any] = {"ping_us": statistics.median(latencies) / 1000}
    if streams:
        out["tokens_per_s"] = statistics.median(s["per_s"] for s in streams)
    return out


def swift_binary() -> Path:
    out = subprocess.run(["swift", "build", "-c", "release", "--show-bin-path"], cwd=SWIFT_DIR,
                         capture_output=True, text=True, check=True).stdout.strip()
    return Path(out) / "sidecar-bench"


def build_swift() -> Path:
    log("building the Swift bench (swift build -c release --product sidecar-bench) ...")
    subprocess.run(["nice", "-n", "10", "swift", "build", "-c", "release", "--product", "sidecar-bench"],
                   cwd=SWIFT_DIR, check=True, stdout=subprocess.DEVNULL)
    return swift_binary()


def run_bench(argv: list[str], cwd: Path, env: dict[str, str], cpus: set[int] | None, log_path: Path) -> None:
    """A client's bench as a child process (pinned with all its threads and sidecars when `cpus`)."""
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    with open(log_path, "ab") as stderr:
        done = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=pin, timeout=600)
    if done.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{' '.join(argv[:2])} exited with {done.returncode}:\n{tail}")


def swift_round(binary: Path, bench: Bench, workdir: Path, cpus: set[int] | None, pings: int, tokens: int,
                token_runs: int) -> dict[str, Any]:
    out = workdir / "swift.json"
    run_bench([str(binary), "--runs", "1", "--pings", str(pings), "--tokens", str(tokens), "--token-runs", str(token_runs),
               "--python", sys.executable, "--home", bench.env["MLSIDECAR_HOME"], "--json", str(out)],
              ROOT, bench.env, cpus, workdir / "swift-bench.log")
    report = json.loads(out.read_text())
    result = {"ping_us": report["ping_us"]["client_median"], "raw_ping_us": report["ping_us"]["raw_median"]}
    if report.get("tokens_per_s"):
        result["tokens_per_s"] = report["tokens_per_s"]["client_median"]
        result["raw_tokens_per_s"] = report["tokens_per_s"]["raw_median"]
    return result


def node_round(bench: Bench, workdir: Path, cpus: set[int] | None, pings: int, tokens: int, token_runs: int) -> dict[str, Any]:
    out = workdir / "node.json"
    env = dict(bench.env, MLSIDECAR_PYTHON=sys.executable)
    run_bench(["node", str(NODE_BENCH), "--runs", "1", "--pings", str(pings), "--tokens", str(tokens),
               "--token-runs", str(token_runs), "--home", bench.env["MLSIDECAR_HOME"], "--json", str(out)],
              ROOT / "clients" / "node", env, cpus, workdir / "node-bench.log")
    report = json.loads(out.read_text())
    result = {"ping_us": report["ping_median_us"]["client"], "raw_ping_us": report["ping_median_us"]["raw_json"]}
    if report.get("tokens_per_s"):
        result["tokens_per_s"] = report["tokens_per_s"]["client"]
        result["raw_tokens_per_s"] = report["tokens_per_s"]["raw_json"]
    return result


# ----------------------------------------------------------------------------- report


def summarize(rounds: list[dict[str, dict[str, Any]]], clients: list[str]) -> dict[str, Any]:
    """Per client: the median over rounds of each measure; the ratio of the client's median ping to
    the host's, and the per-round ratios (host and client in the same round) for reference."""
    out: dict[str, Any] = {}
    for client in clients:
        samples = [r[client] for r in rounds]
        out[client] = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
        out[client]["rounds"] = samples
    host = out["python"]["ping_us"]
    for client in clients:
        if client != "python":
            out[client]["ratio_to_python_host"] = out[client]["ping_us"] / host
            out[client]["round_ratios"] = [round(r[client]["ping_us"] / r["python"]["ping_us"], 4) for r in rounds]
    return out


NAMES = {"swift": "Swift client", "node": "Node client"}
RAW_NAMES = {"swift": "Swift raw pipe", "node": "Node raw pipe + JSON.parse"}


def build_rows(summary: dict[str, dict[str, Any]], config: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for placement, by_client in summary.items():
        host = by_client["python"]
        for client in ("swift", "node"):
            if client not in by_client:
                continue
            s = by_client[client]
            rows.append({
                "metric": f"{NAMES[client]}: ping round trip, median, {placement}", "unit": "us", "ours": s["ping_us"],
                "baselines": {"python host": host["ping_us"]},
                "ratio": s["ratio_to_python_host"], "ratio_label": "ours/host",
                "target": f"<= {PING_RATIO_TARGET:.2f}x host", "pass": s["ratio_to_python_host"] <= PING_RATIO_TARGET,
            })
            rows.append({
                "metric": f"{NAMES[client]}: ping vs its own raw pipe, {placement}", "unit": "us", "ours": s["ping_us"],
                "baselines": {RAW_NAMES[client]: s["raw_ping_us"]},
                "ratio": s["ping_us"] / s["raw_ping_us"], "ratio_label": "ours/raw", "target": "(info)", "pass": None,
            })
    for placement, by_client in summary.items():
        host = by_client["python"]
        for client in ("swift", "node"):
            s = by_client.get(client)
            if not s or "tokens_per_s" not in s:
                continue
            rows.append({
                "metric": f"{NAMES[client]}: $/token events to user code ({config['tokens']} per request), {placement}",
                "unit": "/s", "ours": s["tokens_per_s"], "baselines": {"python host": host["tokens_per_s"]},
                "ratio": s["tokens_per_s"] / host["tokens_per_s"], "ratio_label": "ours/host",
                "target": f">= {TOKENS_TARGET_PER_S:,}/s", "pass": s["tokens_per_s"] >= TOKENS_TARGET_PER_S,
            })
    return rows


def environment() -> dict[str, Any]:
    def version(argv: list[str]) -> str | None:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            return None

    return report.environment(ROOT, swift=version(["swift", "--version"]), node=version(["node", "--version"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1000 pings, 20000 tokens")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5)")
    parser.add_argument("--pings", type=int, help="pings per contestant and round (default 2000)")
    parser.add_argument("--warmup-pings", type=int, help="unmeasured pings first, Python host (default 200; the client benches warm up themselves)")
    parser.add_argument("--tokens", type=int, help="$/token events per debug/stream request (default 200000)")
    parser.add_argument("--token-runs", type=int, help="debug/stream requests per contestant and round (default 3)")
    parser.add_argument("--no-swift", action="store_true", help="leave the Swift client out")
    parser.add_argument("--no-node", action="store_true", help="leave the Node client out")
    parser.add_argument("--no-build", action="store_true", help="use the Swift bench as built")
    parser.add_argument("--placement", choices=("same-cpu", "unpinned"), help="only this placement (default: both)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results file (default {RESULTS.relative_to(ROOT)})")
    args = parser.parse_args(argv)

    quick = args.quick
    config = {
        "rounds": args.rounds or (2 if quick else 5),
        "pings": args.pings or (1000 if quick else 2000),
        "warmup_pings": args.warmup_pings if args.warmup_pings is not None else (100 if quick else 200),
        "tokens": args.tokens or (20_000 if quick else 200_000),
        "token_runs": args.token_runs or (1 if quick else 3),
        "quick": quick,
    }
    clients = ["python"] + ([] if args.no_swift else ["swift"]) + ([] if args.no_node else ["node"])
    config["clients"] = clients
    results: dict[str, Any] = {"benchmark": "clients", "config": config, "environment": environment(),
                               "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    binary = None
    if "swift" in clients:
        binary = swift_binary() if args.no_build else build_swift()
    workdir = Path(tempfile.mkdtemp(prefix="mlsidecar-bench-clients-"))
    bench = Bench(workdir)
    Path(bench.env["MLSIDECAR_HOME"]).mkdir(parents=True, exist_ok=True)
    bench.env.update({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"})
    where = placements()
    if args.placement:
        where = {args.placement: where[args.placement]}
    config["placements"] = {name: sorted(cpus) if cpus else None for name, cpus in where.items()}

    def run(client: str, cpus: set[int] | None, tokens: bool) -> dict[str, Any]:
        token_runs = config["token_runs"] if tokens else 0
        if client == "python":
            return python_host_round(bench, cpus, config["pings"], config["warmup_pings"], config["tokens"], token_runs)
        if client == "swift":
            return swift_round(binary, bench, workdir, cpus, config["pings"], config["tokens"], token_runs)
        return node_round(bench, workdir, cpus, config["pings"], config["tokens"], token_runs)

    rounds: dict[str, list[dict[str, dict[str, Any]]]] = {name: [] for name in where}
    wall = time.perf_counter()
    try:
        for index in range(config["rounds"]):
            order = clients[index % len(clients):] + clients[:index % len(clients)]
            for name, cpus in where.items():
                log(f"round {index + 1}/{config['rounds']}, {name}: {', '.join(order)} ...")
                # $/token rates in the unpinned placement only: what users get, and half the time
                rounds[name].append({client: run(client, cpus, tokens=cpus is None) for client in order})
    except Exception:
        tail = bench.stderr_tail()
        if tail:
            log("--- stderr of the Python host's sidecars (last lines) ---\n" + tail)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["wall_s"] = round(time.perf_counter() - wall, 2)
    summary = {name: summarize(r, clients) for name, r in rounds.items()}
    results["results"] = summary
    rows = build_rows(summary, config)
    results["summary"] = rows
    results["all_targets_met"] = all(r["pass"] is not False for r in rows)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    env = results["environment"]
    print(f"Client benchmark ({config['rounds']} rounds x {config['pings']} pings per placement, {config['token_runs']} x {config['tokens']} tokens; "
          f"{env.get('cpus_usable', env['cpus'])} usable CPUs, wall {results['wall_s']} s); JSON: {args.output}")
    report.print_rows(rows, digits=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
