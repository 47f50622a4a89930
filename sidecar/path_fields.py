"""Containment of every path-bearing param, in the dispatcher, before any handler runs.

protocol/messages.py marks each field that names a file (ModelRef, InputPath, OutputPath,
ArtifactName carry "x-path" in their JSON Schema). Checking them here, from that mark, makes
containment a property of the protocol rather than of each handler: a new method's path fields
are checked without anyone remembering to, and nothing is looked at on disk before they are.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi

from protocol.errors import RpcError

_NOT_PATHS = ("builtin:", "artifact:")  # model references that name no file


def check_path_fields(params: msgspec.Struct, paths: Any) -> None:
    """Raise PathNotAllowed (path_not_allowed) or RpcError (-32602, a bad name) for the first offending field."""
    for field, kind, value in _marked(_type_info(type(params)), params, "params"):
        if kind == "name":
            from handlers.outputs import check_name

            check_name(value, field)
        elif kind == "model" and value.strip().startswith(_NOT_PATHS):
            continue
        elif value.strip():
            try:
                paths.check(Path(value.strip()).expanduser())
            except Exception as exc:
                if getattr(exc, "error_kind", None) == "path_not_allowed":
                    exc.error_detail = {**getattr(exc, "error_detail", {}), "field": field}
                raise
        elif kind != "model":
            raise RpcError.invalid_params(field, "is empty: give a path")


@functools.lru_cache(maxsize=None)
def _type_info(cls: type) -> Any:
    return mi.type_info(cls)


def _marked(info: Any, value: Any, field: str) -> Iterator[tuple[str, str, str]]:
    if isinstance(info, mi.Metadata):
        kind = (info.extra_json_schema or {}).get("x-path")
        if kind and isinstance(value, str):
            yield field, kind, value
        else:
            yield from _marked(info.type, value, field)
    elif isinstance(info, mi.StructType) and isinstance(value, info.cls):
        for f in info.fields:
            yield from _marked(f.type, getattr(value, f.name), f"{field}.{f.encode_name}")
    elif isinstance(info, mi.ListType) and isinstance(value, list):
        for index, item in enumerate(value):
            yield from _marked(info.item_type, item, f"{field}.{index}")
    elif isinstance(info, mi.UnionType):
        for member in info.types:
            yield from _marked(member, value, field)
