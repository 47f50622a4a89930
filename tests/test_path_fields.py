"""Every params field that names a file is checked against the allowed roots before anything else
(sidecar/path_fields.py, in the dispatcher, before any handler runs).

The fields are found through the schema's "x-path" mark (protocol/messages.py: ModelRef, InputPath,
OutputPath, ArtifactName), so a field added with one of those types is tested here without being
listed. Each outside path is tried twice, once existing and once not: the answer must be the same
(path_not_allowed), or the sidecar would be an oracle for what exists outside the roots.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from protocol.schema import build_schema

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = "demo_chat.jsonl"  # copied into the sidecar's working directory, inside its roots

# The smallest valid params of each method that has path fields; the field under test replaces one value.
BASELINES: dict[str, dict[str, Any]] = {
    "models/load": {"model": "builtin:tiny"},
    "models/unload": {"model": "builtin:tiny"},
    "generate": {"model": "builtin:tiny", "prompt": "hi", "max_tokens": 1, "adapters": [{"adapter": "x"}],
                 "options": {"lora_path": "x"}},
    "embed": {"model": "builtin:tiny", "input": "a"},
    "datasets/inspect": {"data": DEMO_DATA, "model": "builtin:tiny"},
    "train": {"model": "builtin:tiny", "data": DEMO_DATA, "validation": DEMO_DATA, "preset": "quick", "max_steps": 1,
              "resume_from": "x", "output": "x", "name": "x", "options": {"lora_path": "x"}},
    "merge_lora": {"model": "builtin:tiny", "adapters": [{"adapter": "x"}], "output": "x", "name": "x",
                   "options": {"lora_path": "x"}},
    "export": {"model": "builtin:tiny", "format": "gguf", "adapters": [{"adapter": "x"}], "output": "x", "name": "x",
               "options": {"lora_path": "x"}},
    "quantize": {"model": "builtin:tiny", "format": "gguf", "type": "Q8_0", "output": "x", "name": "x",
                 "options": {"lora_path": "x"}},
    "benchmark": {"models": [{"model": "builtin:tiny", "adapters": [{"adapter": "x"}]}], "perplexity": {"data": "x"},
                  "golden": {"reference": "x", "prompts": ["a"]}, "embed": {"texts": "x"}, "output": "x", "name": "x",
                  "prompt_tokens": [8], "gen_tokens": [4], "repetitions": 1},
}


def _walk(node: dict, defs: dict, path: tuple, found: list, seen: frozenset = frozenset()) -> None:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        if name not in seen:
            _walk(defs[name], defs, path, found, seen | {name})
        return
    if "x-path" in node:
        found.append((path, node["x-path"]))
    for option in node.get("anyOf", []):
        _walk(option, defs, path, found, seen)
    if "items" in node:
        _walk(node["items"], defs, path + (0,), found, seen)
    for key, sub in node.get("properties", {}).items():
        _walk(sub, defs, path + (key,), found, seen)


def path_fields() -> list[tuple[str, tuple, str]]:
    schema = build_schema()
    defs = schema["$defs"]
    cases = []
    for method, entry in schema["methods"].items():
        if entry["debug_only"]:
            continue
        found: list = []
        _walk(entry["params"], defs, (), found)
        cases += [(method, path, mark) for path, mark in found]
    return cases


def _with(params: dict, path: tuple, value: Any) -> dict:
    params = copy.deepcopy(params)
    target = params
    for key in path[:-1]:
        if isinstance(key, str) and not isinstance(target.get(key), (dict, list)):
            target[key] = [{}] if isinstance(path[path.index(key) + 1], int) else {}
        target = target[key]
    target[path[-1]] = value
    return params


CASES = path_fields()


def test_the_protocol_has_path_fields_and_each_method_with_them_has_a_baseline():
    assert len(CASES) >= 20
    assert {method for method, _, _ in CASES} <= set(BASELINES), "add a baseline for the new method"


@pytest.fixture(scope="module")
def walled(tmp_path_factory, tiny_path):
    """A sidecar whose only roots are its home and a fresh working directory; /etc lies outside."""
    cwd = tmp_path_factory.mktemp("cwd")
    (cwd / DEMO_DATA).write_bytes((ROOT / "runtimes" / "data" / DEMO_DATA).read_bytes())
    return cwd


@pytest.mark.parametrize("method,path,mark", CASES, ids=[f"{m}:{'.'.join(map(str, p))}" for m, p, _ in CASES])
def test_path_outside_the_roots_is_refused_the_same_whether_it_exists_or_not(spawn, walled, method, path, mark):
    sidecar = spawn(cwd=str(walled))
    base = BASELINES[method]  # its placeholder paths ("x") lie inside the roots: only the field under test is outside
    if mark == "name":
        for bad in ("../escape", "/etc/escape", "a/b", ".."):
            error = sidecar.call(method, _with(base, path, bad))["error"]
            assert error["code"] == -32602 and error["data"]["field"] == "params." + ".".join(map(str, path)), error
        return
    answers = []
    for outside in ("/etc/passwd", "/etc/no-such-file-mlsidecar", "../../../../../../etc/passwd",
                    "../../../../../../etc/no-such-file-mlsidecar"):
        error = sidecar.call(method, _with(base, path, outside)).get("error")
        assert error is not None, (method, path, outside)
        answers.append((error["code"], (error.get("data") or {}).get("kind")))
    assert set(answers) == {(-32803, "path_not_allowed")}, (method, path, answers)
    assert sidecar.call("ping")["result"] == {}
