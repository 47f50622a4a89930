"""`merge_lora` through the real process: a trained adapter artifact and a DoRA file folded into
builtin:tiny, verified, registered with its parents, and answering `generate` as the adapters did
unmerged; bad input, a full disk and a cancel each refused or stopped with nothing left behind and
the sidecar still serving."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

GREEDY = {"temperature": 0, "max_tokens": 24, "ignore_eos": True, "prompt": "Once upon a time, a clever fox"}


def make_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, **config: Any) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1.5)
    peft_model.save_pretrained(out_dir)
    return out_dir


def leftovers(*roots: Path) -> list[str]:
    """Hidden temporaries (.NAME.tmp-*) or merged directories anywhere under the roots."""
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            found += [os.path.join(dirpath, n) for n in dirnames + filenames if ".tmp-" in n]
    return found


@pytest.fixture
def sidecar(spawn: Any, tmp_path: Path) -> Any:
    """On the session's home, where builtin:tiny is built already."""
    return spawn("--allow-root", str(tmp_path), OMP_NUM_THREADS="1")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def private(spawn: Any, tmp_path: Path, home: Path) -> Any:
    """On a home of its own, so that anything left behind shows."""
    return spawn("--allow-root", str(tmp_path), home=home, OMP_NUM_THREADS="1")


@pytest.fixture
def tiny(tiny_path: Path, tmp_path: Path) -> Path:
    """builtin:tiny as a plain directory inside the allowed root."""
    return Path(shutil.copytree(tiny_path, tmp_path / "tiny", ignore=shutil.ignore_patterns("manifest.json")))


def test_merged_model_is_registered_verified_and_answers_like_the_adapters_unmerged(sidecar: Any, tiny_path: Path,
                                                                                  shared_home: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]})
                            + "\n" for w in "apple river stone cloud green quick lamp music tiger paper moon".split()))
    trained = sidecar.call("train", {"model": "builtin:tiny", "data": str(data), "preset": "quick", "max_steps": 3,
                                     "validation_split": 0})["result"]["artifact"]
    dora = make_adapter(tiny_path, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    adapters = [{"adapter": trained["id"], "weight": 1.0}, {"adapter": str(dora), "weight": 0.5}]

    name = f"merged-{tmp_path.name}"
    response = sidecar.call("merge_lora", {"model": "builtin:tiny", "adapters": adapters, "name": name})
    result = response["result"]
    verification = result["verification"]
    assert verification["probes"] == 4 and verification["dtype"] == "float32" and verification["max_abs_logit_diff"] <= 1e-4
    assert result["tensors"] == 21 and result["merged_tensors"] == 14  # the trained adapter is on all linear layers
    artifact = result["artifact"]
    assert artifact["kind"] == "model" and artifact["name"] == name and artifact["parents"] == [trained["id"]]
    assert Path(artifact["path"]) == shared_home / "artifacts" / "models" / name
    progress = sidecar.events(response["id"], "$/progress")
    merge_steps = [e["step"] for e in progress if e["stage"] == "merge"]
    assert merge_steps == sorted(merge_steps) and merge_steps[-1] == 21
    assert {"merge", "verify", "save"} <= {e["stage"] for e in progress}
    files = {p.name for p in Path(artifact["path"]).iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "manifest.json"} <= files
    manifest = json.loads(Path(artifact["path"], "manifest.json").read_text())
    assert [a["path"] for a in manifest["adapters"]] == [trained["path"], str(dora)]
    assert manifest["verification"]["max_abs_logit_diff"] == verification["max_abs_logit_diff"]
    assert sidecar.call("artifacts/get", {"id": artifact["id"]})["result"] == artifact

    # Plain transformers loads it; our generate answers with it as it did with the adapters unmerged.
    loaded = AutoModelForCausalLM.from_pretrained(artifact["path"])
    assert next(loaded.parameters()).dtype == torch.float32
    merged_text = sidecar.call("generate", {**GREEDY, "model": artifact["id"]})["result"]["text"]
    unmerged_text = sidecar.call("generate", {**GREEDY, "model": "builtin:tiny", "adapters": adapters})["result"]["text"]
    base_text = sidecar.call("generate", {**GREEDY, "model": "builtin:tiny"})["result"]["text"]
    assert merged_text == unmerged_text != base_text

    # The merged model is a base like any other: its id becomes the parent; bf16 without the check.
    again = sidecar.call("merge_lora", {"model": artifact["id"], "adapters": [{"adapter": str(dora)}], "dtype": "bf16",
                                        "verify": False, "output": str(tmp_path / "bf16")})["result"]
    assert again["verification"] is None and again["artifact"]["parents"] == [artifact["id"]]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert sidecar.call("generate", {**GREEDY, "model": str(tmp_path / "bf16")})["result"]["text"]


def write_adapter(out_dir: Path, module: str, n_in: int, n_out: int, **config: Any) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    out_dir.mkdir(parents=True)
    (out_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **config}))
    save_file({f"base_model.model.{module}.lora_A.weight": rng.standard_normal((4, n_in), dtype=np.float32),
               f"base_model.model.{module}.lora_B.weight": rng.standard_normal((n_out, 4), dtype=np.float32)},
              str(out_dir / "adapter_model.safetensors"))
    return out_dir


def test_bad_input_is_refused_and_the_sidecar_keeps_serving(private: Any, tiny: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    good = write_adapter(tmp_path / "good", "model.layers.0.self_attn.q_proj", 64, 64)
    wide = write_adapter(tmp_path / "wide", "model.layers.0.self_attn.q_proj", 96, 96)
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(str(tiny / "model.safetensors")), pickled / "pytorch_model.bin")
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").mkdir()
    one = [{"adapter": str(good)}]

    def failed(params: dict[str, Any]) -> dict[str, Any]:
        error = private.call("merge_lora", params)["error"]
        assert private.call("ping")["result"] == {}
        return error

    error = failed({"model": str(tmp_path / "missing"), "adapters": one})
    assert error["data"]["kind"] == "model_not_found"
    error = failed({"model": str(tmp_path / "empty"), "adapters": one})
    assert error["data"]["kind"] == "unsupported_model" and "no config.json" in error["message"]
    error = failed({"model": str(good), "adapters": one})
    assert error["data"]["kind"] == "unsupported_model" and "is a PEFT adapter, not a model" in error["message"]
    error = failed({"model": str(tiny), "adapters": [{"adapter": str(pickled)}]})
    assert error["data"]["kind"] == "adapter_invalid" and "params.adapters[0].adapter" in error["message"]
    error = failed({"model": str(tiny), "adapters": [*one, {"adapter": str(wide)}]})
    assert error["data"]["kind"] == "adapter_mismatch" and "different base model" in error["message"]
    assert error["data"]["detail"]["adapter"] == str(wide) and error["data"]["detail"]["model"] == str(tiny)
    error = failed({"model": str(pickled), "adapters": one})
    assert error["data"]["kind"] == "unsupported_model" and "allow_pickle" in error["message"]
    error = failed({"model": str(tiny), "adapters": one, "output": str(tmp_path / "taken")})
    assert error["data"]["kind"] == "artifact_exists"
    error = failed({"model": str(tiny), "adapters": one, "output": "/etc/merged"})
    assert error["data"]["kind"] == "path_not_allowed"
    for params, field in (({"adapters": []}, "params.adapters"), ({"adapters": [*one, *one]}, "params.adapters[1].adapter"),
                          ({"adapters": one, "dtype": "q4"}, "params.dtype"), ({"adapters": one, "name": "../x"}, "params.name")):
        error = failed({"model": str(tiny), **params})
        assert error["code"] == -32602 and error["data"]["field"] == field, error

    # A pickle base merges once allowed, into safetensors.
    result = private.call("merge_lora", {"model": str(pickled), "adapters": one, "options": {"allow_pickle": True},
                                         "output": str(tmp_path / "from_pickle")})["result"]
    assert result["merged_tensors"] == 1 and not list((tmp_path / "from_pickle").glob("*.bin"))
    models = private.call("artifacts/list", {"kind": "model"})["result"]["artifacts"]
    assert [a["path"] for a in models if a["name"] != "builtin:tiny"] == [str(tmp_path / "from_pickle")]
    assert leftovers(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 512 KiB tmpfs (the merged tiny model is ~790 KB), where mounting one is allowed (root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_fails_with_disk_full_and_leaves_nothing(private: Any, tiny: Path, tmp_path: Path,
                                                           small_disk: Path) -> None:
    adapter = write_adapter(tmp_path / "adapter", "model.layers.0.self_attn.q_proj", 64, 64)
    error = private.call("merge_lora", {"model": str(tiny), "adapters": [{"adapter": str(adapter)}],
                                        "output": str(small_disk / "merged")})["error"]
    assert error["data"]["kind"] == "disk_full" and error["data"]["retryable"], error
    assert list(small_disk.iterdir()) == []  # not even a hidden temporary
    assert private.call("ping")["result"] == {}
    assert private.call("merge_lora", {"model": str(tiny), "adapters": [{"adapter": str(adapter)}], "verify": False,
                                       "output": str(tmp_path / "merged")})["result"]["merged_tensors"] == 1


def test_cancel_mid_merge_leaves_nothing(private: Any, tiny: Path, tmp_path: Path, home: Path) -> None:
    """A deep narrow model (48 layers, 435 tensors), so the merge is still running when the cancel lands."""
    import torch
    import transformers

    base = tmp_path / "deep"
    config = json.loads((tiny / "config.json").read_text())
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, "num_hidden_layers": 48}))
    model.save_pretrained(base)
    for path in tiny.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, base)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])

    request_id = private.start("merge_lora", {"model": str(base), "adapters": [{"adapter": str(adapter)}], "name": "cancelled"})
    for message in private.messages():
        if message.get("method") == "$/progress" and message["params"].get("stage") == "merge":
            private.notify("$/cancel", {"id": request_id})
            break
    error = private.wait_response(request_id)["error"]
    assert error["code"] == -32800, error
    partial = error["data"]["partial"]
    assert partial["stage"] in ("merge", "verify", "save"), partial
    if partial["stage"] == "merge":
        assert 0 < partial["tensors_done"] < partial["tensors"] == 435
    assert not (home / "artifacts" / "models" / "cancelled").exists() and leftovers(home, tmp_path) == []
    assert private.call("ping")["result"] == {}
    names = [a["name"] for a in private.call("artifacts/list", {"kind": "model"})["result"]["artifacts"]]
    assert "cancelled" not in names
