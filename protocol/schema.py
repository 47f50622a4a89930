"""The JSON Schema of the whole protocol, generated from the msgspec types (and committed as schema.json)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, get_args

import msgspec

from protocol import messages as m
from protocol.errors import ErrorCode, ErrorKind
from protocol.methods import METHODS, NOTIFICATIONS
from protocol.version import PROTOCOL_VERSION

SCHEMA_PATH = Path(__file__).with_name("schema.json")


def build_schema() -> dict:
    types: list[type] = [m.Request, m.Notification, m.Response]
    for contract in METHODS.values():
        types += [contract.params, contract.result]
    types += list(NOTIFICATIONS.values())
    refs, components = msgspec.json.schema_components(types, ref_template="#/$defs/{name}")
    components = _normalized(components)
    by_type = dict(zip(types, refs))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "mlsidecar protocol",
        "protocolVersion": PROTOCOL_VERSION,
        "envelopes": {"request": by_type[m.Request], "notification": by_type[m.Notification], "response": by_type[m.Response]},
        "methods": {
            name: {"summary": c.summary, "runs_in": c.runs_in, "debug_only": c.debug,
                   "params": by_type[c.params], "result": by_type[c.result]}
            for name, c in METHODS.items()
        },
        "notifications": {name: {"params": by_type[t]} for name, t in NOTIFICATIONS.items()},
        "errors": {"codes": {code.name: int(code) for code in ErrorCode}, "kinds": list(get_args(ErrorKind))},
        "$defs": components,
    }


def _normalized(node: Any) -> Any:
    """Descriptions as `inspect.cleandoc` reads the docstrings, whatever indentation msgspec's version keeps.

    msgspec 0.23 stopped dedenting continuation lines; the schema (and the client types made from it)
    must not change with that.
    """
    if isinstance(node, dict):
        return {k: inspect.cleandoc(v) if k == "description" and isinstance(v, str) else _normalized(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_normalized(v) for v in node]
    return node


def schema_json() -> str:
    return json.dumps(build_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    SCHEMA_PATH.write_text(schema_json())
    print(f"wrote {SCHEMA_PATH}")
