"""`benchmark` through the real process: builtin:tiny, its fine-tune (an unmerged adapter) and its Q4_K_M GGUF
side by side, each in its own process, with perplexity, golden-transcript parity and embeddings; a second run
carries the change against the first; bad input fails the row or the request as it should; a cancel answers
-32800 with the rows measured so far and leaves no report behind."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from runtimes.bench import stats

SMALL = {"threads": 1, "prompt_tokens": [32], "gen_tokens": [8], "repetitions": 3, "warmup": 1}


@pytest.fixture(scope="module")
def assets(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A copy of builtin:tiny, a LoRA adapter with non-zero weights, its f32 GGUF quantized to Q4_K_M, a text."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from runtimes.gguf.export import convert_to_gguf
    from runtimes.gguf.quantize import quantize_gguf

    root = tmp_path_factory.mktemp("bench-assets")
    tiny = Path(shutil.copytree(tiny_path, root / "tiny", ignore=shutil.ignore_patterns("manifest.json")))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    get_peft_model(model, LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])) \
        .save_pretrained(root / "adapter")
    convert_to_gguf(tiny, root / "tiny-f32.gguf", dtype="f32")
    quantize_gguf(root / "tiny-f32.gguf", root / "tiny-Q4_K_M.gguf", "Q4_K_M")
    corpus = (Path(__file__).resolve().parents[1] / "runtimes" / "data" / "tiny_corpus.txt").read_text(encoding="utf-8")
    (root / "text.txt").write_text(corpus[:4000], encoding="utf-8")
    (root / "broken.gguf").write_bytes(b"NOTGGUF" + bytes(64))
    return {"root": root, "tiny": tiny, "adapter": root / "adapter", "q4": root / "tiny-Q4_K_M.gguf",
            "f32": root / "tiny-f32.gguf", "text": root / "text.txt", "broken": root / "broken.gguf"}


@pytest.fixture
def sidecar(spawn: Any, assets: dict[str, Path]) -> Any:
    return spawn("--allow-root", str(assets["root"]), OMP_NUM_THREADS="1")


def request(assets: dict[str, Path]) -> dict[str, Any]:
    return {
        **SMALL,
        "models": [{"model": "builtin:tiny", "label": "base"},
                   {"model": "builtin:tiny", "label": "fine-tune", "adapters": [{"adapter": str(assets["adapter"])}]},
                   {"model": str(assets["q4"]), "label": "Q4_K_M"}],
        "perplexity": {"data": str(assets["text"]), "context": 64, "stride": 32},
        "golden": {"reference": "base", "prompts": ["Once upon a time", "The fox"], "tokens": 8},
        "embed": {"texts": ["a quiet river", "a loud city", "green hills"]},
    }


def test_base_fine_tune_and_quantization_side_by_side_then_the_change_against_the_last_run(sidecar: Any, assets: dict[str, Path],
                                                                                          shared_home: Path) -> None:
    response = sidecar.call("benchmark", request(assets))
    result = response["result"]
    rows = result["rows"]
    assert [r["label"] for r in rows] == ["base", "fine-tune", "Q4_K_M"]
    assert all(r["status"] == "ok" and r["error"] is None for r in rows), [r["error"] for r in rows]
    assert len({tuple(sorted(r)) for r in rows}) == 1  # the same fields for every model
    assert [r["runtime"] for r in rows] == ["transformers", "transformers", "llama.cpp"]
    assert rows[1]["adapters"] == [str(assets["adapter"])] and rows[0]["adapters"] == []
    settings = result["settings"]
    assert settings["threads"] == 1 and settings["batch_size"] == 2048 and settings["ubatch_size"] == 512
    assert all(r["settings"] == settings for r in rows)
    for r in rows:
        assert [s["test"] for s in r["speed"]] == ["pp32", "tg8"]
        for s in r["speed"]:
            assert len(s["samples_tps"]) == 3 and all(v > 0 for v in s["samples_tps"])
            assert math.isclose(s["mean_tps"], stats.mean(s["samples_tps"]), rel_tol=1e-3)
            assert math.isclose(s["std_tps"], stats.std(s["samples_tps"]), rel_tol=1e-3, abs_tol=1e-3)
        lat = r["latency"]
        assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] and lat["ttft_ms"] > 0
        assert r["load_s"] > 0 and r["peak_rss_bytes"] > 10 * 2**20 and r["size_bytes"] > 0
        assert r["machine"]["cpus"] >= 1 and isinstance(r["machine"]["busy"], bool)
        ppl = r["perplexity"]
        assert ppl["method"] == "sliding" and ppl["scored"] == ppl["tokens"] - 1 and ppl["ppl"] > 1
        assert r["embed"]["texts"] == 3 and r["embed"]["per_s"] > 0 and r["embed"]["reference"] == "base"
    assert rows[2]["size_bytes"] == assets["q4"].stat().st_size and "Q4_K" in rows[2]["dtype"]
    assert rows[0]["perplexity"]["tokens"] == rows[1]["perplexity"]["tokens"] == rows[2]["perplexity"]["tokens"]
    assert rows[0]["perplexity"]["ppl"] != rows[1]["perplexity"]["ppl"]  # the adapter is applied
    base_parity = rows[0]["parity"]
    assert base_parity["reference"] == "base" and base_parity["identical"] == 2 and base_parity["mean_top1_agreement"] == 1.0
    assert all(p["first_divergence"] is None and p["tokens"] == 8 for p in base_parity["prompts"])
    for r in rows[1:]:
        assert 0 <= r["parity"]["mean_top1_agreement"] <= 1 and len(r["parity"]["prompts"]) == 2
        assert all(p["same_prompt_tokens"] for p in r["parity"]["prompts"])
    assert rows[0]["embed"]["cosine_mean"] == pytest.approx(1.0, abs=1e-5)
    assert -1 <= rows[2]["embed"]["cosine_min"] <= rows[2]["embed"]["cosine_mean"] <= 1
    assert all(r["change"] is None for r in rows)
    warned = [line for line in sidecar.stderr().splitlines() if "[bench " in line and "Warning" in line]
    assert not warned, warned  # libraries' warnings stay out of the user's terminal (issue 12, section 7)

    artifact = result["artifact"]
    assert artifact["kind"] == "benchmark" and Path(artifact["path"]).parent == shared_home / "artifacts" / "benchmarks"
    report = json.loads(Path(result["files"]["report_json"]).read_text())
    assert report["rows"] == rows and report["id"] == artifact["id"]
    assert Path(result["files"]["report_md"]).read_text() == result["markdown"]
    table = [line for line in result["markdown"].splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3 and len({line.count("|") for line in table}) == 1
    assert Path(result["files"]["chart_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sidecar.call("artifacts/get", {"id": artifact["id"]})["result"] == artifact
    stages = {e["stage"] for e in sidecar.events(response["id"], "$/progress")}
    assert {"model", "load", "pp32", "tg8", "perplexity", "golden", "parity", "embed", "report"} <= stages

    # The same request again: every row carries the change against the first run, with its test.
    again = sidecar.call("benchmark", {**request(assets), "perplexity": None, "golden": None, "embed": None})["result"]
    for new, old in zip(again["rows"], rows):
        change = new["change"]
        assert new["key"] == old["key"] and change["previous_run"] == artifact["id"]
        pp_new, pp_old = new["speed"][0], old["speed"][0]
        assert change["pp_pct"] == pytest.approx((pp_new["mean_tps"] - pp_old["mean_tps"]) / pp_old["mean_tps"] * 100, abs=1e-2)
        tg = change["tests"][1]
        p = stats.welch(new["speed"][1]["samples_tps"], old["speed"][1]["samples_tps"])[2]
        assert tg["test"] == "tg8" and tg["p_value"] == pytest.approx(p, abs=1e-6) and tg["significant"] == (p < 0.05)
        assert change["significant"] == any(t["significant"] for t in change["tests"])
    assert again["artifact"]["id"] != artifact["id"] and Path(artifact["path"]).is_dir()  # the registry keeps every run


def test_a_model_that_fails_to_load_fails_its_row_and_bad_input_is_refused(sidecar: Any, assets: dict[str, Path]) -> None:
    tiny = {"model": "builtin:tiny", "label": "base"}
    quick = {**SMALL, "repetitions": 1, "warmup": 0}
    result = sidecar.call("benchmark", {**quick, "models": [{"model": str(assets["broken"]), "label": "broken"}, tiny]})["result"]
    broken, base = result["rows"]
    assert broken["status"] == "failed" and broken["error"]["kind"] == "unsupported_model" and "GGUF" in broken["error"]["message"]
    assert broken["speed"] == [] and broken["load_s"] is None
    assert base["status"] == "ok" and base["speed"][0]["mean_tps"] > 0
    assert "FAILED" in result["markdown"]
    missing = sidecar.call("benchmark", {**quick, "models": [{"model": str(assets["root"] / "nope"), "label": "gone"}, tiny]})["result"]
    assert missing["rows"][0]["error"]["kind"] == "model_not_found" and missing["rows"][1]["status"] == "ok"

    def error(params: dict[str, Any]) -> dict[str, Any]:
        return sidecar.call("benchmark", {**quick, **params})["error"]

    wrong = error({"models": [tiny, {"model": str(assets["q4"]), "runtime": "transformers"}]})
    assert wrong["code"] == -32602 and wrong["data"]["field"] == "params.models[1].runtime" and "llama.cpp" in wrong["message"]
    onnx = error({"models": [{"model": "builtin:tiny", "runtime": "onnxruntime"}]})
    assert onnx["code"] == -32602 and onnx["data"]["field"] == "params.models[0].runtime" and "onnxruntime" in onnx["message"]
    too_long = error({"models": [tiny], "prompt_tokens": [4096]})
    assert too_long["code"] == -32803 and too_long["data"]["kind"] == "prompt_too_long"
    assert too_long["data"]["detail"]["limit"] == 512 and "512" in too_long["message"]
    assert error({"models": [tiny], "perplexity": {"data": str(assets["root"] / "no-text.txt")}})["data"]["kind"] == "file_not_found"
    assert error({"models": [tiny, tiny]})["data"]["field"] == "params.models[1].label"
    assert error({"models": [tiny], "repetitions": 0})["data"]["field"] == "params.repetitions"
    adapters_on_gguf = error({"models": [{"model": str(assets["q4"]), "adapters": [{"adapter": str(assets["adapter"])}]}]})
    assert adapters_on_gguf["data"]["field"] == "params.models[0].adapters"
    assert sidecar.call("ping")["result"] == {}


def test_cancel_answers_with_the_rows_measured_so_far_and_leaves_no_report(spawn: Any, assets: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    home = tmp_path / "home"
    sidecar = spawn("--allow-root", str(assets["root"]), home=home, OMP_NUM_THREADS="1")
    params = {**SMALL, "models": [{"model": str(assets["q4"]), "label": "first"}, {"model": str(assets["f32"]), "label": "second"}]}
    request_id = sidecar.start("benchmark", params)
    while True:
        message = sidecar.read()
        assert message is not None and message.get("id") != request_id, message
        event = message.get("params", {})
        if message.get("method") == "$/progress" and event.get("stage") == "model" and event.get("step") == 1:
            break
    sidecar.notify("$/cancel", {"id": request_id})
    response = sidecar.wait_response(request_id)
    assert response["error"]["code"] == -32800
    rows = response["error"]["data"]["partial"]["rows"]
    assert [r["label"] for r in rows] == ["first"] and rows[0]["status"] == "ok"
    assert not (home / "artifacts" / "benchmarks").exists() or not any((home / "artifacts" / "benchmarks").iterdir())
    assert sidecar.call("ping")["result"] == {}


def test_an_onnx_export_is_measured_the_same_way_and_agrees_with_its_source(sidecar: Any, assets: dict[str, Path]) -> None:
    pytest.importorskip("onnxruntime")
    from runtimes.onnx.export import export_model, load_model

    onnx_dir = assets["root"] / "tiny-onnx"
    if not onnx_dir.exists():
        staging = assets["root"] / "tiny-onnx-staging"
        staging.mkdir()
        export_model(load_model(assets["tiny"], "decoder"), "decoder", staging / "model.onnx")
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(assets["tiny"] / name, staging / name)
        staging.rename(onnx_dir)
    response = sidecar.call("benchmark", {**SMALL, "repetitions": 2, "models": [{"model": str(assets["tiny"]), "label": "torch"},
                                                                               {"model": str(onnx_dir), "label": "onnx"}],
                                          "perplexity": {"data": str(assets["text"]), "method": "chunks", "context": 64},
                                          "golden": {"reference": "torch", "prompts": ["Once upon a time"], "tokens": 8}})
    assert "result" in response, response
    result = response["result"]
    torch_row, onnx_row = result["rows"]
    assert onnx_row["status"] == "ok" and onnx_row["runtime"] == "onnxruntime", onnx_row["error"]
    assert [s["test"] for s in onnx_row["speed"]] == ["pp32", "tg8"] and all(s["mean_tps"] > 0 for s in onnx_row["speed"])
    assert onnx_row["perplexity"]["scored"] == torch_row["perplexity"]["scored"]
    assert onnx_row["perplexity"]["ppl"] == pytest.approx(torch_row["perplexity"]["ppl"], rel=1e-4)
    assert onnx_row["parity"]["identical"] == 1 and onnx_row["parity"]["mean_top1_agreement"] == 1.0
