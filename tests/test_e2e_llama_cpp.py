"""generate on the llama.cpp runtime, through the sidecar, against the transformers runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

GREEDY = {"temperature": 0, "max_tokens": 32, "ignore_eos": True}
PROMPTS = ["Once upon a time, a clever fox", "The tortoise did not stop.", "In the spring, the farmer"]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_path: Path) -> Path:
    from runtimes.gguf.export import convert_to_gguf

    path = tiny_path.parent / "tiny-f32.gguf"
    if not path.exists():
        partial = path.with_suffix(".partial")
        convert_to_gguf(tiny_path, partial, dtype="f32")
        partial.rename(path)
    return path


@pytest.fixture(scope="module")
def both(tiny_gguf, shared_home, tmp_path_factory):
    from conftest import Sidecar, sidecar_env

    sidecar = Sidecar([], sidecar_env(shared_home), tmp_path_factory.mktemp("llama") / "stderr.log")
    yield sidecar
    sidecar.close()


def test_llama_cpp_greedy_equals_transformers_greedy(both, tiny_gguf):
    for prompt in PROMPTS:
        hf = both.call("generate", {"model": "builtin:tiny", "prompt": prompt, **GREEDY})["result"]
        response = both.call("generate", {"model": str(tiny_gguf), "prompt": prompt, **GREEDY})
        gguf = response["result"]
        assert gguf["runtime"] == "llama.cpp"
        assert gguf["text"] == hf["text"], prompt
        assert gguf["usage"] == hf["usage"]
        assert "".join(e["text"] for e in both.events(response["id"], "$/token")) == gguf["text"]


def test_llama_cpp_chat_stops_at_end_of_turn_and_renders_like_transformers(both, tiny_gguf):
    messages = [{"role": "system", "content": "Tell fables."}, {"role": "user", "content": "A fox and a crow?"}]
    hf = both.call("generate", {"model": "builtin:tiny", "messages": messages, "temperature": 0, "max_tokens": 40})["result"]
    gguf = both.call("generate", {"model": str(tiny_gguf), "messages": messages, "temperature": 0, "max_tokens": 40})["result"]
    assert gguf["usage"]["prompt_tokens"] == hf["usage"]["prompt_tokens"]
    assert gguf["text"] == hf["text"] and gguf["finish_reason"] == hf["finish_reason"]


def test_llama_cpp_seeded_sampling_and_cancel(both, tiny_gguf):
    params = {"model": str(tiny_gguf), "prompt": PROMPTS[0], "max_tokens": 30, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    first = both.call("generate", params)["result"]["text"]
    assert both.call("generate", params)["result"]["text"] == first
    request_id = both.start("generate", {**params, "max_tokens": 470})
    for message in both.messages():
        if message.get("method") == "$/token" and message["params"]["id"] == request_id:
            both.notify("$/cancel", {"id": request_id})
            break
    error = both.wait_response(request_id)["error"]
    assert error["code"] == -32800 and error["data"]["partial"]["usage"]["completion_tokens"] < 470


def test_llama_cpp_prompt_too_long(both, tiny_gguf):
    error = both.call("generate", {"model": str(tiny_gguf), "prompt": "the fox ran " * 400, **GREEDY})["error"]
    assert error["data"]["kind"] == "prompt_too_long" and error["data"]["detail"]["context_length"] == 512


def test_a_gguf_lora_adapter_on_llama_cpp_matches_the_peft_adapter_on_transformers(both, tiny_gguf, tiny_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from runtimes.gguf.lora import convert_lora_to_gguf

    adapter_dir = tiny_path.parent / "adapter-llama-parity"
    adapter_gguf = tiny_path.parent / "adapter-llama-parity.gguf"
    if not adapter_gguf.exists():
        torch.manual_seed(5)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path), config)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.mul_(2.0)
        peft_model.save_pretrained(adapter_dir)
        convert_lora_to_gguf(adapter_dir, tiny_path, adapter_gguf.with_suffix(".partial"), dtype="f32")
        adapter_gguf.with_suffix(".partial").rename(adapter_gguf)
    prompt = {"prompt": PROMPTS[0], **GREEDY, "max_tokens": 16}
    base = both.call("generate", {"model": str(tiny_gguf), **prompt})["result"]["text"]
    hf = both.call("generate", {"model": "builtin:tiny", **prompt, "adapters": [{"adapter": str(adapter_dir)}]})["result"]
    cpp = both.call("generate", {"model": str(tiny_gguf), **prompt, "options": {"lora_path": str(adapter_gguf)}})["result"]
    assert cpp["text"] == hf["text"] != base
    models = both.call("models/list")["result"]["models"]
    assert any(m["adapters"] == [str(adapter_gguf)] for m in models)
    wrong = both.call("generate", {"model": "builtin:tiny", **prompt, "options": {"lora_path": str(adapter_gguf)}})["error"]
    assert wrong["data"]["field"] == "params.options.lora_path"
