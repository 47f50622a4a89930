"""`export` and `quantize` (format gguf) through the real sidecar: artifacts, lineage, Modelfile and
model card, generation from the result through llama.cpp, every bad input, a full disk and cancel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).resolve().parents[1] / "runtimes" / "data" / "demo_chat.jsonl"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def side(tiny_path: Path, shared_home: Path, work: Path) -> Any:
    from conftest import Sidecar, sidecar_env

    sidecar = Sidecar(["--allow-root", str(work), "--allow-root", str(DATA.parent)], sidecar_env(shared_home),
                      work / "stderr.log")
    yield sidecar
    sidecar.close()


@pytest.fixture(scope="module")
def adapter(side: Any) -> dict[str, Any]:
    """A real (briefly) trained LoRA adapter on builtin:tiny, with its run, data hash and metrics."""
    response = side.call("train", {"model": "builtin:tiny", "data": str(DATA), "preset": "quick", "max_steps": 2,
                                   "eval_every": None})
    return ok(response)["artifact"]


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


def serving(side: Any) -> None:
    assert ok(side.call("ping")) == {}


def stages(side: Any, request_id: Any) -> list[str]:
    events = side.events(request_id, "$/progress")
    last: dict[str, int] = {}
    for event in events:  # step never goes backwards within a stage
        if event.get("step") is not None:
            assert event["step"] >= last.get(event["stage"], 0), event
            last[event["stage"]] = event["step"]
    return list(dict.fromkeys(e["stage"] for e in events))


def save_llama(out: Path, tiny_path: Path, **dims: Any) -> Path:
    from test_gguf_quantize import save_llama as save

    return save(out, tiny_path, **dims)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def generate(side: Any, model: str, **extra: Any) -> dict[str, Any]:
    return ok(side.call("generate", {"model": model, "messages": [{"role": "user", "content": "Tell me about the fox."}],
                                     "max_tokens": 12, "temperature": 0, **extra}))


# ---------------------------------------------------------------------------------------------


def test_export_then_quantize_from_the_file_and_from_the_artifact(side: Any, work: Path) -> None:
    out = work / "tiny-f16"
    response = side.call("export", {"model": "builtin:tiny", "format": "gguf", "output": str(out), "system": "Be brief."})
    result = ok(response)
    assert set(stages(side, response["id"])) >= {"resolve", "convert", "write"}
    assert result["path"] == str(out / "tiny-f16.F16.gguf") and result["outtype"] == "f16"  # auto: f16 from f32
    assert {f["role"] for f in result["files"]} == {"model", "modelfile", "model_card"}
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "manifest.json", "tiny-f16.F16.gguf"]
    artifact = result["artifact"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert artifact["kind"] == "gguf" and manifest["model_file"] == "tiny-f16.F16.gguf"
    assert artifact["metrics"]["tensor_types"] == {"F16": 16, "F32": 5} and len(artifact["parents"]) == 1  # builtin:tiny
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-f16.F16.gguf\nTEMPLATE \"\"\"")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'SYSTEM """Be brief."""' in modelfile
    card = (out / "README.md").read_text()
    assert "llama-cli -m tiny-f16.F16.gguf" in card and "ollama create tiny-f16 -f Modelfile" in card
    assert artifact["parents"][0] in card and "tiny-v2" in card  # lineage from the built-in's manifest
    reply = generate(side, result["path"])
    assert reply["runtime"] == "llama.cpp" and reply["usage"]["completion_tokens"] > 0

    from_file = side.call("quantize", {"model": result["path"], "format": "gguf", "type": "q8_0",
                                       "output": str(work / "tiny-q8")})
    q8 = ok(from_file)
    assert stages(side, from_file["id"]) == ["resolve", "quantize", "write"]  # a GGUF source: nothing to convert
    assert q8["type"] == "Q8_0" and q8["artifact"]["parents"] == [artifact["id"]]  # the file's artifact
    assert q8["source_size_bytes"] == os.path.getsize(result["path"])
    assert q8["ratio"] == pytest.approx(q8["size_bytes"] / q8["source_size_bytes"], abs=1e-4) and q8["seconds"] > 0
    greedy = {"prompt": "The moral of the story is that", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    f16_text = ok(side.call("generate", {"model": result["path"], **greedy}))["text"]
    assert ok(side.call("generate", {"model": q8["path"], **greedy}))["text"] == f16_text

    q4 = ok(side.call("quantize", {"model": artifact["id"], "format": "gguf", "type": "Q4_K_M", "name": "tiny-q4-from-id",
                                   "modelfile": False}))
    assert q4["artifact"]["parents"] == [artifact["id"]] and q4["path"].endswith("/tiny-q4-from-id.Q4_K_M.gguf")
    assert {f["role"] for f in q4["files"]} == {"model", "model_card"}
    assert q4["warnings"] and "fallback" in q4["warnings"][0]  # builtin:tiny's 64-wide rows have no K-quant blocks
    assert q4["artifact"]["metrics"]["fallback_tensors"] == 15
    shutil.rmtree(q4["artifact"]["path"])


def test_quantize_a_hugging_face_model_in_one_job(side: Any, work: Path, tiny_path: Path) -> None:
    response = side.call("quantize", {"model": "builtin:tiny", "format": "gguf", "type": "Q4_0",
                                      "output": str(work / "tiny-q4_0")})
    result = ok(response)
    assert stages(side, response["id"]) == ["resolve", "convert", "quantize", "write"]
    names = sorted(p.name for p in (work / "tiny-q4_0").iterdir())
    assert names == ["Modelfile", "README.md", "manifest.json", "tiny-q4_0.Q4_0.gguf"]  # no f16 intermediate left
    weights = sum(p.stat().st_size for p in tiny_path.glob("*.safetensors"))
    assert result["source_size_bytes"] == weights and 0 < result["ratio"] < 0.3
    assert "Q4_0" in (work / "tiny-q4_0" / "README.md").read_text()
    assert generate(side, result["path"])["usage"]["completion_tokens"] > 0


def test_fine_tune_to_q4_k_m_in_one_request(side: Any, work: Path, adapter: dict[str, Any]) -> None:
    pytest.importorskip("runtimes.hf.merge")
    out = work / "tuned-q4"
    response = side.call("export", {"model": "builtin:tiny", "format": "gguf", "adapters": [{"adapter": adapter["id"]}],
                                    "merge": True, "quantization": "q4_k_m", "output": str(out)})
    result = ok(response)
    assert stages(side, response["id"]) == ["resolve", "merge", "convert", "quantize", "write"]
    assert result["quantization"] == "Q4_K_M" and result["path"] == str(out / "tuned-q4.Q4_K_M.gguf")
    assert adapter["id"] in result["artifact"]["parents"] and len(result["artifact"]["parents"]) == 2
    assert "ADAPTER" not in (out / "Modelfile").read_text()
    card = (out / "README.md").read_text()
    manifest = json.loads((Path(adapter["path"]) / "manifest.json").read_text())
    assert adapter["id"] in card and manifest["datasets"]["data"] in card  # the dataset's hash, from the lineage
    assert "| lora_rank | 8 |" in card and "train_loss" in card and "merged into the weights" in card
    assert "type: Q4_K_M" in card
    assert generate(side, result["path"])["usage"]["completion_tokens"] > 0


def test_adapter_kept_beside_the_base(side: Any, work: Path, adapter: dict[str, Any]) -> None:
    out = work / "tiny-with-adapter"
    result = ok(side.call("export", {"model": "builtin:tiny", "format": "gguf", "adapters": [{"adapter": adapter["id"],
                                                                                             "weight": 0.5}],
                                     "output": str(out)}))
    lora = [f for f in result["files"] if f["role"] == "adapter"]
    assert len(lora) == 1 and lora[0]["path"].endswith(".lora.gguf")
    name = Path(lora[0]["path"]).name
    assert f"ADAPTER ./{name}" in (out / "Modelfile").read_text()
    assert any("weight 0.5" in w for w in result["warnings"])  # Ollama cannot scale an adapter
    assert f"--lora-scaled {name} 0.5" in (out / "README.md").read_text()
    with_lora = generate(side, result["path"], options={"lora_path": lora[0]["path"], "lora_scale": 0.5})
    assert with_lora["usage"]["completion_tokens"] > 0


def test_bad_inputs_fail_clearly_and_the_sidecar_keeps_serving(side: Any, work: Path, tiny_path: Path,
                                                               adapter: dict[str, Any]) -> None:
    base = {"format": "gguf"}
    failed(side.call("export", {**base, "model": str(work / "no-such-model")}), -32803, "model_not_found")
    serving(side)
    not_model = work / "not-a-model"
    not_model.mkdir(exist_ok=True)
    (not_model / "notes.txt").write_text("hello")
    error = failed(side.call("export", {**base, "model": str(not_model)}), -32803, "unsupported_model")
    assert "config.json" in error["message"]
    failed(side.call("quantize", {**base, "model": str(not_model), "type": "Q4_0"}), -32803, "unsupported_model")
    serving(side)

    other = save_llama(work / "other-base", tiny_path)  # hidden 256: not the adapter's base
    error = failed(side.call("export", {**base, "model": str(other), "adapters": [{"adapter": adapter["id"]}]}),
                   -32803, "adapter_mismatch")
    assert adapter["id"] in error["message"] and str(other) in error["message"] and "builtin:tiny" in error["message"]
    assert error["data"]["detail"]["adapter_base"] == "builtin:tiny"
    serving(side)

    import torch

    pickled = work / "pickled"
    pickled.mkdir(exist_ok=True)
    for item in tiny_path.iterdir():
        if item.suffix != ".safetensors" and item.name != "manifest.json":
            shutil.copy2(item, pickled / item.name)
    from safetensors.torch import load_file

    torch.save(load_file(str(tiny_path / "model.safetensors")), pickled / "pytorch_model.bin")
    error = failed(side.call("export", {**base, "model": str(pickled)}), -32803, "unsupported_model")
    assert "allow_pickle" in error["message"] and "pytorch_model.bin" in error["message"]
    allowed = ok(side.call("export", {**base, "model": str(pickled), "options": {"allow_pickle": True},
                                      "output": str(work / "from-pickle")}))
    assert allowed["artifact"]["metrics"]["tensor_types"] == {"F16": 16, "F32": 5}
    serving(side)

    error = failed(side.call("export", {**base, "model": "builtin:tiny", "quantization": "Q7_X"}), -32602)
    assert error["data"]["field"] == "params.quantization" and "Q4_K_M" in error["message"]
    error = failed(side.call("quantize", {**base, "model": "builtin:tiny", "type": "nope"}), -32602)
    assert error["data"]["field"] == "params.type" and "Q8_0" in error["message"]
    error = failed(side.call("quantize", {**base, "model": "builtin:tiny", "type": "iq2_xs"}), -32602)
    assert "importance matrix" in error["message"]
    failed(side.call("export", {**base, "model": "builtin:tiny", "merge": True}), -32602)
    error = failed(side.call("quantize", {**base, "model": "builtin:tiny"}), -32602)
    assert error["data"]["field"] == "params.type"
    error = failed(side.call("export", {**base, "model": "builtin:tiny", "context_length": 512}), -32602)
    assert error["data"]["field"] == "params.context_length"
    serving(side)

    taken = work / "taken"
    taken.mkdir(exist_ok=True)
    error = failed(side.call("export", {**base, "model": "builtin:tiny", "output": str(taken)}), -32803, "artifact_exists")
    assert str(taken) in error["message"]
    failed(side.call("quantize", {**base, "model": "builtin:tiny", "type": "Q4_0", "output": str(taken)}), -32803,
           "artifact_exists")
    failed(side.call("export", {**base, "model": "builtin:tiny", "name": "../escape"}), -32602)
    serving(side)


@pytest.fixture
def small_disk(work: Path) -> Any:
    """A 200 KiB tmpfs inside the allowed roots: a real ENOSPC mid-write (needs root; skipped otherwise)."""
    mount = work / "small-disk"
    mount.mkdir(exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_that_fills_mid_write_leaves_nothing(side: Any, small_disk: Path, tiny_path: Path, work: Path) -> None:
    # our GGUF writer (416 KiB of f16 into 200 KiB)
    error = failed(side.call("export", {"model": "builtin:tiny", "format": "gguf", "output": str(small_disk / "f16")}),
                   -32803, "disk_full")
    assert error["data"]["retryable"] is True
    assert list(small_disk.iterdir()) == []
    serving(side)
    # llama.cpp's quantizer (231 KiB of Q8_0), from a GGUF outside the small disk
    source = work / "tiny-source.gguf"
    if not source.exists():
        from runtimes.gguf.export import convert_to_gguf

        convert_to_gguf(tiny_path, source, dtype="f16")
    failed(side.call("quantize", {"model": str(source), "format": "gguf", "type": "Q8_0", "output": str(small_disk / "q8")}),
           -32803, "disk_full")
    assert list(small_disk.iterdir()) == []
    serving(side)


def test_cancel_mid_export_leaves_nothing(side: Any, work: Path, tiny_path: Path) -> None:
    deep = save_llama(work / "deep", tiny_path, hidden_size=128, intermediate_size=384, num_hidden_layers=48)
    out = work / "cancelled"
    request_id = side.start("export", {"model": str(deep), "format": "gguf", "quantization": "Q4_K_M", "output": str(out)})
    for message in side.messages():
        params = message.get("params") or {}
        if message.get("method") == "$/progress" and params.get("id") == request_id and params["stage"] == "convert":
            side.notify("$/cancel", {"id": request_id})
            break
    response = side.wait_response(request_id)
    failed(response, -32800)
    assert not out.exists() and leftovers(work) == []
    assert not [a for a in ok(side.call("artifacts/list", {"kind": "gguf", "limit": 1000}))["artifacts"]
                if a["path"] == str(out)]
    serving(side)
