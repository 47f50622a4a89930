"""`python -m sidecar [serve|call|schema|doctor|demo]`; serving on stdio is the default."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and not argv[0].startswith("-") else "serve"
    if command == "serve":
        from sidecar import wire

        wire_in, wire_out = wire.isolate_stdio()  # before anything else is imported or printed
        from sidecar.cli import serve

        serve(argv[1:] if argv and argv[0] == "serve" else argv, wire_in, wire_out)
        return
    from sidecar.cli import run_command

    sys.exit(run_command(command, argv[1:]))


if __name__ == "__main__":
    main()
