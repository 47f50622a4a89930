"""Model references, the pool and the registry end to end, on builtin:tiny."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest


def test_load_list_and_unload(spawn, tiny_path):
    sidecar = spawn()
    response = sidecar.call("models/load", {"model": "builtin:tiny", "keep_alive": "10m"})
    loaded = response["result"]
    assert loaded["runtime"] == "transformers" and loaded["device"] == "cpu" and loaded["dtype"] == "float32"
    assert loaded["memory_bytes"] > 100_000 and loaded["in_use"] == 0
    assert loaded["keep_alive_s"] == 600 and loaded["expires_at"] > time.time() + 500
    stages = [p["stage"] for p in sidecar.events(response["id"], "$/progress")]
    assert "load" in stages and stages[-1] == "load"
    assert [m["model"] for m in sidecar.call("models/list")["result"]["models"]] == ["builtin:tiny"]
    assert sidecar.call("status")["result"]["pool"]["used_bytes"] == loaded["memory_bytes"]
    unloaded = sidecar.call("models/unload", {"model": "builtin:tiny"})["result"]["unloaded"]
    assert [u["path"] for u in unloaded] == [str(tiny_path)]
    assert sidecar.call("models/list")["result"]["models"] == []


def test_concurrent_loads_of_one_model_load_it_once(spawn, tiny_path):
    sidecar = spawn()
    first = sidecar.start("models/load", {"model": "builtin:tiny"})
    second = sidecar.start("models/load", {"model": str(tiny_path)})
    a, b = sidecar.wait_response(first)["result"], sidecar.wait_response(second)["result"]
    assert a["loaded_at"] == b["loaded_at"]
    assert len(sidecar.call("models/list")["result"]["models"]) == 1


def test_keep_alive_semantics(spawn, tiny_path):
    sidecar = spawn()
    assert sidecar.call("models/load", {"model": "builtin:tiny", "keep_alive": 0})["result"]["in_use"] == 0
    assert sidecar.call("models/list")["result"]["models"] == []
    sidecar.call("models/load", {"model": "builtin:tiny", "keep_alive": "300ms"})
    assert len(sidecar.call("models/list")["result"]["models"]) == 1
    time.sleep(0.6)
    assert sidecar.call("models/list")["result"]["models"] == []
    kept = sidecar.call("models/load", {"model": "builtin:tiny", "keep_alive": -1})["result"]
    assert kept["keep_alive_s"] is None and kept["expires_at"] is None
    bad = sidecar.call("models/load", {"model": "builtin:tiny", "keep_alive": "soon"})["error"]
    assert bad["code"] == -32602 and bad["data"]["field"] == "params.keep_alive"


def test_unresolvable_references_say_what_was_tried(spawn, tiny_path):
    sidecar = spawn()
    error = sidecar.call("models/load", {"model": "nobody/no-such-model"})["error"]
    assert error["code"] == -32803 and error["data"]["kind"] == "model_not_found"
    tried = " ".join(error["data"]["detail"]["tried"])
    assert "registry" in tried and "local path" in tried and "Hugging Face cache" in tried and "--allow-network" in tried
    error = sidecar.call("models/load", {"model": "builtin:huge"})["error"]
    assert error["data"]["kind"] == "model_not_found" and "builtin:tiny" in error["message"]
    error = sidecar.call("models/load", {"model": "artifact:model-nope"})["error"]
    assert error["data"]["kind"] == "model_not_found"
    error = sidecar.call("models/load", {"model": "/nonexistent-outside-the-roots/model"})["error"]
    assert error["data"]["kind"] == "path_not_allowed"  # containment is checked before existence


def test_paths_outside_the_roots_are_refused_until_allowed(spawn, tiny_path, tmp_path):
    outside = tmp_path / "elsewhere" / "tiny"
    shutil.copytree(tiny_path, outside)
    error = spawn().call("models/load", {"model": str(outside)})["error"]
    assert error["data"]["kind"] == "path_not_allowed"
    assert "--allow-root" in error["message"] and error["data"]["detail"]["roots"]
    link = tiny_path.parent / "link-to-outside"
    link.symlink_to(outside, target_is_directory=True)
    try:
        error = spawn().call("models/load", {"model": str(link)})["error"]
        assert error["data"]["kind"] == "path_not_allowed"
    finally:
        link.unlink()
    allowed = spawn("--allow-root", str(tmp_path)).call("models/load", {"model": str(outside)})
    assert allowed["result"]["path"] == str(outside.resolve())


def test_unsupported_models_get_clear_errors(spawn, tiny_path, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_path / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    sidecar = spawn("--allow-root", str(tmp_path))
    error = sidecar.call("models/load", {"model": str(pickled)})["error"]
    assert error["data"]["kind"] == "unsupported_model" and "allow_pickle" in error["message"]
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    error = sidecar.call("models/load", {"model": str(gguf)})["error"]
    assert error["data"]["kind"] == "unsupported_model" and "not a readable GGUF file" in error["message"]
    (tmp_path / "notes.txt").write_text("hello")
    error = sidecar.call("models/load", {"model": str(tmp_path / "notes.txt")})["error"]
    assert error["data"]["kind"] == "unsupported_model"


def test_pool_budget_evicts_the_least_recently_used(spawn, tiny_path, tmp_path):
    for name in ("a", "b"):
        shutil.copytree(tiny_path, tmp_path / name)
    size = sum(f.stat().st_size for f in tiny_path.glob("*.safetensors"))
    sidecar = spawn("--allow-root", str(tmp_path), "--pool-budget", str(int(size * 1.5)))
    sidecar.call("models/load", {"model": str(tmp_path / "a")})
    sidecar.call("models/load", {"model": str(tmp_path / "b")})
    assert [m["path"] for m in sidecar.call("models/list")["result"]["models"]] == [str(tmp_path / "b")]


def test_builtin_model_is_a_registered_artifact(spawn, tiny_path):
    sidecar = spawn()
    artifacts = sidecar.call("artifacts/list", {"kind": "model"})["result"]["artifacts"]
    builtin = next(a for a in artifacts if a["name"] == "builtin:tiny")
    assert builtin["path"] == str(tiny_path) and builtin["size_bytes"] > 0
    assert sidecar.call("artifacts/get", {"id": builtin["id"]})["result"] == builtin
    manifest = json.loads((tiny_path / "manifest.json").read_text())
    assert manifest["id"] == builtin["id"]
    assert sidecar.call("models/load", {"model": builtin["id"], "keep_alive": 0})["result"]["path"] == str(tiny_path)
    missing = sidecar.call("artifacts/get", {"id": "nope"})["error"]
    assert missing["data"]["kind"] == "artifact_not_found"
    assert sidecar.call("artifacts/list", {"limit": 0})["error"]["code"] == -32602


def test_hugging_face_ids_resolve_from_the_local_cache_only(spawn, tiny_path, tmp_path):
    cache = tmp_path / "hf-cache"
    repo = cache / "models--someorg--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    sidecar = spawn("--allow-root", str(tmp_path), HF_HUB_CACHE=str(cache))
    loaded = sidecar.call("models/load", {"model": "someorg/tiny-llama", "keep_alive": 0})["result"]
    assert loaded["path"] == str(repo / "snapshots" / commit)
    error = sidecar.call("models/load", {"model": "someorg/not-cached"})["error"]
    assert error["data"]["kind"] == "model_not_found" and "not cached" in error["message"]


def test_unload_gives_the_memory_back(spawn, tiny_path, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_e2e_protocol import rss_kib

    big = tmp_path / "big"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=8192, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(big)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_path / name, big / name)
    sidecar = spawn("--allow-root", str(tmp_path))
    sidecar.call("models/load", {"model": "builtin:tiny"})  # torch and transformers imported: the baseline
    baseline = rss_kib(sidecar.proc.pid)
    loaded = sidecar.call("models/load", {"model": str(big), "keep_alive": -1})["result"]
    # weights may be mapped from the file and count once touched: one token touches them all
    sidecar.call("generate", {"model": str(big), "prompt": "fox", "max_tokens": 1})
    after_load = rss_kib(sidecar.proc.pid)
    assert loaded["memory_bytes"] > 100 << 20
    assert (after_load - baseline) * 1024 > 0.8 * loaded["memory_bytes"]
    sidecar.call("models/unload", {"model": str(big)})
    freed = (after_load - rss_kib(sidecar.proc.pid)) * 1024
    assert freed > 0.8 * loaded["memory_bytes"], f"only {freed >> 20} MiB of {loaded['memory_bytes'] >> 20} MiB came back"
