"""`export` and `quantize` with format coreml through a real `python -m sidecar`, on builtin:tiny.

The whole path a host app takes: the request over the pipes, the worker process, progress events,
the artifact registered, the result's spec and quantization report, the errors with their codes,
and a cancel mid-conversion that leaves nothing behind. (The package's contents are proven in
tests/test_coreml_export.py.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

Q4 = {"mode": "palettize", "nbits": 4, "granularity": "per_grouped_channel", "group_size": 16}


def test_export_4bit_then_requantize(spawn: Any, tiny_path: Path) -> None:
    sidecar = spawn()
    response = sidecar.call("export", {"model": "builtin:tiny", "format": "coreml", "context_length": 128,
                                       "prefill_length": 32, "functions": ["prefill", "decode", "embed"],
                                       "quantization": Q4, "name": "tiny-coreml-q4"})
    assert "result" in response, response
    result = response["result"]
    stages = {e["stage"] for e in sidecar.events(response["id"], "$/progress")}
    assert {"convert", "compress", "assemble", "report", "write"} <= stages
    assert result["format"] == "coreml" and result["path"].endswith("tiny-coreml-q4.mlpackage")
    assert list(result["spec"]["functions"]) == ["prefill", "decode", "embed"]
    report = result["quantization_report"]
    assert report["perplexity"] > 0 and report["logit_max_abs_diff"] > 0
    assert [u for u in report["uncompressed"] if len(u["shape"]) > 1] == []
    manifest = json.loads((Path(result["artifact"]["path"]) / "manifest.json").read_text())
    assert manifest["kind"] == "coreml" and manifest["quantization"] == Q4

    listed = sidecar.call("artifacts/list", {"kind": "coreml"})["result"]
    assert result["artifact"]["id"] in [a["id"] for a in listed["artifacts"]]

    # quantize a Core ML artifact: re-exported from the model it records, the artifact as parent
    response = sidecar.call("quantize", {"model": result["artifact"]["id"], "format": "coreml",
                                         "quantization": {"mode": "linear", "dtype": "int8"}, "name": "tiny-coreml-i8"})
    assert "result" in response, response
    quantized = response["result"]
    assert quantized["type"] == "int8-per_channel"
    assert quantized["artifact"]["parents"][0] == result["artifact"]["id"]  # then the model it was made from
    assert quantized["artifact"]["parents"][1:] == result["artifact"]["parents"]
    assert quantized["quantization_report"]["logit_max_abs_diff"] < report["logit_max_abs_diff"]
    sidecar.close()
    bars = [line for line in sidecar.stderr().splitlines() if "passes/s" in line or "ops/s" in line]
    assert not bars, bars[:3]  # coremltools' tqdm bars stay out of the host's log; $/progress reports the stages


def test_errors_keep_the_sidecar_serving(spawn: Any, tiny_path: Path) -> None:
    sidecar = spawn()
    cases = [
        ({"prefill_length": 1024, "context_length": 128}, -32602, "params.prefill_length"),
        ({"context_length": 100000}, -32602, "params.context_length"),
        ({"quantization": {"mode": "palettize", "nbits": 4, "granularity": "per_block"}}, -32602,
         "params.quantization.granularity"),
    ]
    for extra, code, field in cases:
        response = sidecar.call("export", {"model": "builtin:tiny", "format": "coreml", **extra})
        assert response["error"]["code"] == code, response
        assert response["error"]["data"]["field"] == field
    assert "result" in sidecar.call("ping")
    sidecar.close()


def test_cancel_mid_conversion(spawn: Any, tiny_path: Path, tmp_path: Path) -> None:
    sidecar = spawn("--allow-root", str(tmp_path))
    out = tmp_path / "cancelled"
    request_id = sidecar.start("export", {"model": "builtin:tiny", "format": "coreml", "output": str(out)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        message = sidecar.read()
        if message and message.get("method") == "$/progress" and message["params"].get("stage") == "convert":
            break
    sidecar.notify("$/cancel", {"id": request_id})
    response = sidecar.wait_response(request_id)
    assert response["error"]["code"] == -32800, response
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".cancelled")]
    assert "result" in sidecar.call("ping")
    sidecar.close()
