"""`train` through the real process: progress, artifacts, cancel -> checkpoint -> exact resume, DDP, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

WORDS = "apple river stone cloud green quick lamp music tiger paper moon seven orange bridge".split()


def chat_rows(count: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = rng.sample(WORDS, rng.randint(1, 6))
        messages = [{"role": "user", "content": "repeat: " + " ".join(words)}, {"role": "assistant", "content": " ".join(words)}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": "You repeat words."})
        rows.append({"messages": messages})
    return rows


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", chat_rows(60))


@pytest.fixture
def sidecar(spawn: Any, tmp_path: Path, tiny_path: Path) -> Any:
    # One thread: a 197k-parameter model gains nothing from two, and OpenMP's spinning makes tiny
    # ops crawl when the test machine is busy.
    return spawn("--allow-root", str(tmp_path), OMP_NUM_THREADS="1")


def tensors(directory: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def history(result: dict[str, Any]) -> list[dict[str, Any]]:
    return json.loads(Path(result["files"]["metrics_json"]).read_text())["history"]


def test_quick_training_reports_progress_and_registers_an_adapter_that_generate_uses(sidecar: Any, tmp_path: Path) -> None:
    rows = chat_rows(60) + [{"messages": [{"role": "robot", "content": "hi"}]}, {"messages": "not a list"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    response = sidecar.call("train", {"model": "builtin:tiny", "data": str(path), "preset": "quick", "max_steps": 12})
    result = response["result"]
    assert result["stopped"] == "max_steps" and result["metrics"]["steps"] == 12
    assert result["params"]["lora_rank"] == 8 and result["params"]["preset"] == "quick"  # the preset's value
    progress = [e for e in sidecar.events(response["id"], "$/progress") if e["stage"] == "train" and e.get("metrics", {}).get("lr")]
    assert progress and {"loss", "lr", "epoch", "tokens_per_s", "eta_s", "peak_rss_bytes"} <= set(progress[-1]["metrics"])
    steps = [e["step"] for e in progress]
    assert steps == sorted(steps) and steps[-1] == 12
    logs = sidecar.events(response["id"], "$/log")
    skipped = [e for e in logs if e["level"] == "warning" and "skipped 2 rows" in e["message"]]
    assert skipped and [r["row"] for r in skipped[0]["data"]["rows"]] == [61, 62]

    artifact = result["artifact"]
    assert artifact["kind"] == "adapter" and Path(artifact["path"], "adapter_model.safetensors").is_file()
    manifest = json.loads(Path(artifact["path"], "manifest.json").read_text())
    assert manifest["base_model"]["reference"] == "builtin:tiny" and len(manifest["datasets"]["data"]) == 64
    assert manifest["metrics"]["steps"] == 12 and manifest["params"]["max_steps"] == 12
    for key in ("metrics_csv", "metrics_json", "loss_curve_png"):
        assert Path(result["files"][key]).is_file()
    assert Path(result["files"]["loss_curve_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(row["val_loss"] is not None for row in history(result))

    prompt = {"model": "builtin:tiny", "messages": [{"role": "user", "content": "repeat: moon river"}], "temperature": 0, "max_tokens": 12}
    base = sidecar.call("generate", prompt)["result"]["text"]
    tuned = sidecar.call("generate", {**prompt, "adapters": [{"adapter": artifact["id"]}]})["result"]["text"]
    assert tuned != base


def train_params(data: Path, **extra: Any) -> dict[str, Any]:
    return {"model": "builtin:tiny", "data": str(data), "method": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.1,
            "batch_size": 2, "gradient_accumulation": 2, "learning_rate": 1e-3, "max_steps": 60, "eval_every": 20, **extra}


def test_a_cancelled_run_resumes_to_the_same_adapter_bit_for_bit(sidecar: Any, data: Path, tmp_path: Path) -> None:
    whole = sidecar.call("train", train_params(data, output=str(tmp_path / "whole")))["result"]

    request_id = sidecar.start("train", train_params(data, output=str(tmp_path / "interrupted")))
    for message in sidecar.messages():
        params = message.get("params") or {}
        if message.get("method") == "$/progress" and params.get("stage") == "train" and (params.get("step") or 0) >= 10:
            sidecar.notify("$/cancel", {"id": request_id})
            break
    error = sidecar.wait_response(request_id)["error"]
    assert error["code"] == -32800, error
    checkpoint = error["data"]["partial"]["checkpoint"]
    assert Path(checkpoint, "state.json").is_file() and 10 <= error["data"]["partial"]["step"] < 60
    assert not (tmp_path / "interrupted").exists()  # nothing half-written is visible

    resumed = sidecar.call("train", {"resume_from": checkpoint, "output": str(tmp_path / "resumed")})["result"]
    assert resumed["metrics"]["steps"] == 60
    a, b = tensors(whole["artifact"]["path"]), tensors(resumed["artifact"]["path"])
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # bit-identical
    assert [row["loss"] for row in history(whole)] == [row["loss"] for row in history(resumed)]

    for change, field in (({"learning_rate": 0.5}, "params.learning_rate"), ({"distributed": {"processes": 2}}, "params.distributed")):
        refused = sidecar.call("train", {"resume_from": checkpoint, **change})["error"]
        assert refused["code"] == -32602 and refused["data"]["field"] == field


def test_two_processes_match_one_with_the_same_global_batch(sidecar: Any, data: Path) -> None:
    """Same examples per optimizer step, split 2+2 instead of 4: the gradients differ only by the order
    float32 sums are taken in (DDP's all-reduce), ~1e-7 relative per step; over 8 steps of Adam on this
    model the losses agree to ~1e-6, so 1e-4 relative is a tolerance that still catches any real
    difference (a wrong normalisation or a missing shard moves the loss by percents)."""
    common = {"lora_dropout": 0.0, "gradient_accumulation": 1, "max_steps": 8, "eval_every": 4, "checkpoint_every": 4}
    single = sidecar.call("train", train_params(data, batch_size=4, **common))["result"]
    response = sidecar.call("train", train_params(data, batch_size=2, distributed={"processes": 2}, **common))
    double = response["result"]
    assert any("2 processes" in e["message"] for e in sidecar.events(response["id"], "$/log"))
    assert double["metrics"]["examples"] == single["metrics"]["examples"] == 32
    assert len(double["checkpoints"]) == 1 and Path(double["checkpoints"][0], "state.json").is_file()
    for one, two in zip(history(single), history(double), strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
        assert (one["val_loss"] is None) == (two["val_loss"] is None)
        if one["val_loss"] is not None:
            assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)


def test_dora_and_full_fine_tuning(sidecar: Any, data: Path, tmp_path: Path) -> None:
    dora = sidecar.call("train", train_params(data, method="dora", max_steps=3))["result"]
    assert json.loads(Path(dora["artifact"]["path"], "adapter_config.json").read_text())["use_dora"] is True
    full = sidecar.call("train", train_params(data, method="full", max_steps=3, learning_rate=1e-4))["result"]
    assert full["artifact"]["kind"] == "model" and Path(full["artifact"]["path"], "model.safetensors").is_file()
    text = sidecar.call("generate", {"model": full["artifact"]["id"], "prompt": "The fox", "max_tokens": 4, "temperature": 0})
    assert text["result"]["usage"]["completion_tokens"] >= 1


def test_bad_train_requests_fail_clearly_and_the_sidecar_keeps_serving(sidecar: Any, data: Path, tmp_path: Path) -> None:
    def error(params: dict[str, Any]) -> dict[str, Any]:
        return sidecar.call("train", params)["error"]

    missing = error({"model": "builtin:tiny", "data": str(tmp_path / "nope.jsonl")})
    assert missing["data"]["kind"] == "file_not_found"
    outside = error({"model": "builtin:tiny", "data": "/etc/passwd"})
    assert outside["data"]["kind"] == "path_not_allowed"
    bad = write_jsonl(tmp_path / "bad.jsonl", chat_rows(5) + [{"messages": [{"role": "user", "content": ""}]}])
    strict = error({"model": "builtin:tiny", "data": str(bad), "strict": True})
    assert strict["data"]["kind"] == "dataset_invalid" and "6" in strict["message"]
    qlora = error(train_params(data, method="qlora"))
    assert qlora["data"]["kind"] == "unsupported_device" and "lora" in qlora["message"]
    zero = error(train_params(data, batch_size=0))
    assert zero["code"] == -32602 and zero["data"]["field"] == "params.batch_size"
    unknown = error(train_params(data, rank=4))
    assert unknown["code"] == -32602 and "rank" in unknown["data"]["field"]
    taken = error(train_params(data, output=str(tmp_path)))
    assert taken["data"]["kind"] == "artifact_exists" and str(tmp_path) in taken["message"]
    not_a_checkpoint = error({"resume_from": str(tmp_path)})
    assert not_a_checkpoint["data"]["kind"] == "checkpoint_invalid"
    assert sidecar.call("ping")["result"] == {}


def test_padded_batches_a_validation_file_and_early_stopping(sidecar: Any, data: Path, tmp_path: Path) -> None:
    """A learning rate far too high makes the validation loss climb: patience 1 stops at the second evaluation."""
    validation = write_jsonl(tmp_path / "val.jsonl", chat_rows(8, seed=1))
    result = sidecar.call("train", train_params(data, validation=str(validation), packing=False, learning_rate=0.5,
                                                lora_dropout=0.0, eval_every=2, early_stopping_patience=1, max_steps=40))["result"]
    assert result["stopped"] == "early_stopping" and result["metrics"]["steps"] < 40
    evaluated = [row["val_loss"] for row in history(result) if row["val_loss"] is not None]
    assert len(evaluated) >= 2 and evaluated[-1] >= min(evaluated[:-1])
    assert result["metrics"]["best_val_loss"] == min(evaluated)
