"""Client types generated from protocol/schema.json: Swift `Codable` structs and TypeScript declarations.

The schema is the single source of truth; each target module turns it into source text, and
`python -m protocol.codegen` writes those files into clients/. tests/test_codegen.py fails when
the committed files differ from what the current schema generates.
"""

from __future__ import annotations

import json
from pathlib import Path

from protocol.schema import SCHEMA_PATH

ROOT = Path(__file__).resolve().parents[2]


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def generated_files(schema: dict | None = None) -> dict[Path, str]:
    """Every generated file, by its path under the repository root, with its text."""
    from protocol.codegen import swift, typescript

    schema = schema or load_schema()
    files: dict[Path, str] = {}
    for target in (swift, typescript):
        files.update({ROOT / path: text for path, text in target.generate(schema).items()})
    return files
