"""`python -m sidecar call METHOD '{params}'`: one request from a terminal, with live progress and tokens."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from protocol.version import PROTOCOL_VERSION
from sidecar.client import SidecarProcess

BAR_WIDTH = 24


def render_progress(params: dict[str, Any]) -> str:
    stage, step, total = params.get("stage", ""), params.get("step"), params.get("total")
    parts = [f"[{stage}]"]
    if params.get("position") is not None:
        parts.append(f"queue position {params['position']}")
    if step is not None and total:
        filled = int(BAR_WIDTH * min(step, total) / total)
        parts.append("█" * filled + "░" * (BAR_WIDTH - filled) + f" {step}/{total}")
    elif step is not None:
        parts.append(str(step))
    if params.get("message"):
        parts.append(params["message"])
    metrics = params.get("metrics") or {}
    parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
    return " ".join(parts)


class TerminalView:
    """Progress on one rewritten stderr line, tokens streamed to stdout, logs on their own lines."""

    def __init__(self) -> None:
        self.progress_shown = False
        self.tokens_shown = False
        self.tty = sys.stderr.isatty()
        self._last_line: tuple[str, float] = ("", 0.0)

    def event(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params") or {}
        if method == "$/progress":
            line = render_progress(params)
            if self.tty:
                sys.stderr.write("\r\033[K" + line)
                self.progress_shown = True
            elif self._worth_a_line(params):
                sys.stderr.write(line + "\n")
        elif method == "$/token":
            self.clear()
            sys.stdout.write(params.get("text", ""))
            sys.stdout.flush()
            self.tokens_shown = True
        elif method == "$/log":
            self.clear()
            sys.stderr.write(f"{params.get('level', 'info')}: {params.get('message', '')}\n")
        sys.stderr.flush()

    def _worth_a_line(self, params: dict[str, Any]) -> bool:
        """Without a terminal to redraw, print a stage's first and last step and one line a second between."""
        import time

        stage, now = params.get("stage", ""), time.monotonic()
        last = params.get("step") is not None and params.get("step") == params.get("total")
        if stage != self._last_line[0] or last or now - self._last_line[1] >= 1.0:
            self._last_line = (stage, now)
            return True
        return False

    def clear(self) -> None:
        if self.progress_shown:
            sys.stderr.write("\r\033[K")
            self.progress_shown = False

    def end(self) -> None:
        self.clear()
        if self.tokens_shown:
            sys.stdout.write("\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sidecar call", description="Send one request to a fresh sidecar and show what it streams back.")
    p.add_argument("method")
    p.add_argument("params", nargs="?", default="{}", help="JSON object (default {})")
    p.add_argument("--raw", action="store_true", help="print the NDJSON lines as they arrive")
    p.add_argument("--sidecar-arg", action="append", default=[], metavar="ARG",
                   help="pass ARG to the sidecar (e.g. --sidecar-arg=--debug)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as exc:
        print(f"params are not JSON: {exc}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("MLSIDECAR_LOG_LEVEL", "WARNING")
    view = TerminalView()
    with SidecarProcess(args.sidecar_arg, env=env) as sidecar:
        sidecar.request("initialize", {"protocolVersion": PROTOCOL_VERSION, "clientInfo": {"name": "mlsidecar-call"},
                                       "processId": os.getpid()})
        request_id = sidecar.start(args.method, params)
        response = None
        while response is None:
            try:
                for message in sidecar.messages():
                    if args.raw:
                        print(json.dumps(message), flush=True)
                    if "method" in message:
                        if not args.raw:
                            view.event(message)
                    elif message.get("id") == request_id:
                        response = message
                        break
                else:
                    print("the sidecar exited without answering", file=sys.stderr)
                    return 1
            except KeyboardInterrupt:
                view.clear()
                print("cancelling… (Ctrl-C again to kill)", file=sys.stderr)
                sidecar.notify("$/cancel", {"id": request_id})
        view.end()
    if args.raw:
        return 0 if "result" in response else 1
    if "error" in response:
        print(json.dumps(response["error"], indent=2, ensure_ascii=False), file=sys.stderr)
        return 1
    print(json.dumps(response["result"], indent=2, ensure_ascii=False))
    return 0
