"""Command-line flags for serving, and the dispatch to the human-facing commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sidecar.config import Config, parse_bytes


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sidecar", description="Serve the sidecar protocol (NDJSON JSON-RPC 2.0) on stdio.")
    parser.add_argument("--home", type=Path, help="data directory (default: $MLSIDECAR_HOME or the platform's user data dir)")
    parser.add_argument("--allow-root", action="append", default=[], metavar="DIR", help="another directory requests may read and write (repeatable)")
    parser.add_argument("--allow-network", action="store_true", help="allow downloading models from the Hugging Face hub")
    parser.add_argument("--debug", action="store_true", help="enable diagnostic methods (debug/*) and debug logs")
    parser.add_argument("--strict", action="store_true", help="refuse requests before initialize (-32002)")
    parser.add_argument("--max-concurrent-jobs", type=int, help="long jobs running at once (default 1)")
    parser.add_argument("--max-queued-jobs", type=int, help="long jobs waiting before -32001 busy (default 32)")
    parser.add_argument("--max-message-bytes", type=parse_bytes, help="largest accepted line (default 16MiB)")
    parser.add_argument("--pool-budget", type=parse_bytes, help="memory for loaded models (default half of RAM)")
    parser.add_argument("--cancel-grace", type=float, help="seconds a cancelled worker gets to checkpoint before it is killed")
    parser.add_argument("--host-pid", type=int, help="exit when this process exits (as initialize's processId)")
    parser.add_argument("--threads", type=int, help="compute threads per job (default: physical cores, capped by a CPU quota; "
                                                    "or $MLSIDECAR_THREADS)")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    config = Config.from_env()
    if args.home:
        config.home = args.home.expanduser()
    config.extra_roots = list(args.allow_root)
    config.allow_network = config.allow_network or args.allow_network
    config.debug = config.debug or args.debug
    config.strict = args.strict
    for name in ("max_concurrent_jobs", "max_queued_jobs", "max_message_bytes", "pool_budget"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, "pool_budget_bytes" if name == "pool_budget" else name, value)
    if args.cancel_grace is not None:
        config.cancel_grace_s = args.cancel_grace
    config.host_pid = args.host_pid
    return config


def serve(argv: list[str], wire_in: int, wire_out: int) -> None:
    args = serve_parser().parse_args(argv)
    config = config_from_args(args)
    from sidecar import threads

    threads.apply(threads.decide(requested=args.threads))  # before torch or llama.cpp can load, here or in a worker
    from sidecar.server import run

    run(config, wire_in, wire_out)


def run_command(command: str, argv: list[str]) -> int:
    if command == "call":
        from sidecar.call import main as call_main

        return call_main(argv)
    if command == "schema":
        from protocol.schema import schema_json

        sys.stdout.write(schema_json())
        return 0
    if command == "doctor":
        from sidecar.doctor import main as doctor_main

        return doctor_main(argv)
    if command == "demo":
        from sidecar.demo import main as demo_main

        return demo_main(argv)
    print(f"unknown command {command!r}; commands: serve (default), call, schema, doctor, demo", file=sys.stderr)
    return 2
