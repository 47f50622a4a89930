"""generate end to end on builtin:tiny with the transformers runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

GREEDY = {"model": "builtin:tiny", "temperature": 0, "max_tokens": 32, "ignore_eos": True}
PROMPTS = ["Once upon a time, a clever fox", "The tortoise did not stop.", "In the spring, the farmer"]


@pytest.fixture(scope="module")
def gen(tiny_path, shared_home, tmp_path_factory):
    """One sidecar for the tests that only read, so torch is imported and the model loaded once."""
    from conftest import Sidecar, sidecar_env

    sidecar = Sidecar([], sidecar_env(shared_home), tmp_path_factory.mktemp("gen") / "stderr.log")
    yield sidecar
    sidecar.close()


def tokens_of(sidecar, request_id):
    events = sidecar.events(request_id, "$/token")
    assert [e["seq"] for e in events] == list(range(len(events)))
    return "".join(e["text"] for e in events)


def test_greedy_matches_transformers_generate_and_streams_the_same_text(spawn, tiny_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    sidecar = spawn()
    for prompt in PROMPTS:
        response = sidecar.call("generate", {**GREEDY, "prompt": prompt})
        result = response["result"]
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            expected = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert result["text"] == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
        assert tokens_of(sidecar, response["id"]) == result["text"]
        assert result["usage"] == {"prompt_tokens": ids.shape[1], "completion_tokens": 32}
        assert result["finish_reason"] == "length" and result["runtime"] == "transformers"
        assert result["timings"]["tokens_per_s"] > 0 and result["timings"]["ttft_ms"] >= result["timings"]["prompt_eval_ms"]


def test_seeded_sampling_is_reproducible(gen, tiny_path):
    sidecar = gen
    params = {"model": "builtin:tiny", "prompt": PROMPTS[0], "max_tokens": 40, "temperature": 1.2, "top_k": 0,
              "top_p": 1.0, "min_p": 0.0, "ignore_eos": True}
    first = sidecar.call("generate", {**params, "seed": 7})["result"]
    again = sidecar.call("generate", {**params, "seed": 7})["result"]
    other = sidecar.call("generate", {**params, "seed": 8})["result"]
    assert first["text"] == again["text"] and first["seed"] == 7
    assert first["text"] != other["text"]
    unseeded = sidecar.call("generate", {**params})["result"]
    assert isinstance(unseeded["seed"], int)


def test_stop_strings_are_matched_across_tokens_and_never_emitted(gen, tiny_path):
    sidecar = gen
    full = sidecar.call("generate", {**GREEDY, "prompt": PROMPTS[0]})["result"]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 5]
    assert len(stop.strip()) >= 3
    response = sidecar.call("generate", {**GREEDY, "prompt": PROMPTS[0], "stop": [stop, "never-there"]})
    result = response["result"]
    assert result["finish_reason"] == "stop"
    assert result["text"] == full[: full.index(stop)]
    assert stop not in tokens_of(sidecar, response["id"])


def test_stream_false_and_coalescing(gen, tiny_path):
    sidecar = gen
    quiet = sidecar.call("generate", {**GREEDY, "prompt": PROMPTS[1], "stream": False})
    assert sidecar.events(quiet["id"], "$/token") == [] and quiet["result"]["text"]
    coalesced = sidecar.call("generate", {**GREEDY, "prompt": PROMPTS[1], "stream_interval_ms": 10000})
    events = sidecar.events(coalesced["id"], "$/token")
    assert len(events) <= 2 and "".join(e["text"] for e in events) == quiet["result"]["text"]


def test_chat_messages_use_the_models_template(gen, tiny_path):
    sidecar = gen
    result = sidecar.call("generate", {"model": "builtin:tiny", "temperature": 0, "max_tokens": 20,
                                       "messages": [{"role": "system", "content": "Tell fables."},
                                                    {"role": "user", "content": "A fox and a crow?"}]})["result"]
    assert result["usage"]["prompt_tokens"] > 10 and result["finish_reason"] in ("stop", "length")


def test_a_model_without_a_chat_template(spawn, tiny_path, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_path, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    sidecar = spawn("--allow-root", str(tmp_path))
    messages = [{"role": "user", "content": "hi"}]
    error = sidecar.call("generate", {"model": str(plain), "messages": messages})["error"]
    assert error["data"]["kind"] == "no_chat_template" and "chat_template" in error["message"]
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    ok = sidecar.call("generate", {"model": str(plain), "messages": messages, "chat_template": template, "max_tokens": 4})
    assert ok["result"]["usage"]["completion_tokens"] >= 1


def test_prompt_longer_than_the_context(gen, tiny_path):
    sidecar = gen
    long_prompt = "the fox ran " * 400
    error = sidecar.call("generate", {**GREEDY, "prompt": long_prompt})["error"]
    assert error["data"]["kind"] == "prompt_too_long" and error["data"]["detail"]["context_length"] == 512
    response = sidecar.call("generate", {**GREEDY, "prompt": long_prompt, "truncate": True})
    assert response["result"]["usage"]["prompt_tokens"] == 512 - 32
    assert any("truncated" in e["message"] for e in sidecar.events(response["id"], "$/log"))


def test_bad_generate_params(gen, tiny_path):
    sidecar = gen
    for params, field in [({"model": "builtin:tiny"}, "params.prompt"),
                          ({"model": "builtin:tiny", "prompt": "a", "messages": []}, "params.prompt"),
                          ({"model": "builtin:tiny", "prompt": "a", "top_p": 0}, "params.top_p"),
                          ({"model": "builtin:tiny", "prompt": "a", "max_tokens": 0}, "params.max_tokens"),
                          ({"model": "builtin:tiny", "prompt": "a", "messages": [{"role": "user"}]}, "params.messages")]:
        error = sidecar.call("generate", params)["error"]
        assert error["code"] == -32602 and error["data"]["field"].startswith(field), (params, error)


def test_cancel_stops_within_a_step_and_returns_the_partial_text(gen, tiny_path):
    sidecar = gen
    request_id = sidecar.start("generate", {**GREEDY, "prompt": PROMPTS[0], "max_tokens": 470})
    for message in sidecar.messages():
        if message.get("method") == "$/token":
            sidecar.notify("$/cancel", {"id": request_id})
            break
    error = sidecar.wait_response(request_id)["error"]
    assert error["code"] == -32800
    partial = error["data"]["partial"]
    assert partial["usage"]["completion_tokens"] < 470
    assert partial["text"] == tokens_of(sidecar, request_id)
    assert sidecar.call("generate", {**GREEDY, "prompt": PROMPTS[0], "max_tokens": 4})["result"]["usage"]["completion_tokens"] == 4


def test_concurrent_requests_on_one_model_are_all_answered_correctly(gen, tiny_path):
    sidecar = gen
    expected = {p: sidecar.call("generate", {**GREEDY, "prompt": p})["result"]["text"] for p in PROMPTS}
    ids = {sidecar.start("generate", {**GREEDY, "prompt": p}): p for p in PROMPTS * 3}
    for request_id, prompt in ids.items():
        result = sidecar.wait_response(request_id)["result"]
        assert result["text"] == expected[prompt]
        assert tokens_of(sidecar, request_id) == expected[prompt]


def test_streamed_text_holds_whole_code_points(tiny_path):
    from transformers import AutoTokenizer

    from runtimes.text import HfDetokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    text = "The fox saw 日本 and 😀 — café naïve. 🦊🦊!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 2  # byte-level pieces: many characters span several tokens
    detokenizer = HfDetokenizer(tokenizer)
    pieces = [detokenizer.feed(i) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.fixture(scope="module")
def adapters(tiny_path: Path) -> dict[str, Path]:
    """Two random LoRA adapters (non-zero B, so they change the output), saved in PEFT format."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    made = {}
    for name, seed, rank in (("a", 1, 4), ("b", 2, 8)):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_path)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
        peft_model = get_peft_model(base, config)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_" in param_name:
                    param.mul_(3.0)
        path = tiny_path.parent / f"adapter-{name}"
        if not path.exists():
            peft_model.save_pretrained(path)
        made[name] = path
    return made


def reference_text(tiny_path: Path, adapters: list[tuple[Path, float]], prompt: str) -> str:
    """Greedy text from base + sum(weight * delta), computed by merging with peft in-process."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    for path, weight in adapters:
        peft_model = PeftModel.from_pretrained(model, path)
        for module in peft_model.modules():
            if hasattr(module, "set_scale"):
                module.set_scale("default", weight)
        model = peft_model.merge_and_unload()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_unmerged_adapters_are_switched_per_request_on_one_loaded_base(gen, tiny_path, adapters):
    sidecar = gen
    prompt = PROMPTS[0]
    cases = {
        "base": [],
        "a": [(adapters["a"], 1.0)],
        "b": [(adapters["b"], 1.0)],
        "a+b": [(adapters["a"], 0.5), (adapters["b"], 1.0)],
    }
    texts = {}
    for name, chosen in list(cases.items()) + [("base-again", [])]:
        params = {**GREEDY, "prompt": prompt, "adapters": [{"adapter": str(p), "weight": w} for p, w in chosen]}
        texts[name] = sidecar.call("generate", params)["result"]["text"]
    assert texts["base"] == texts["base-again"]
    assert len({texts["base"], texts["a"], texts["b"], texts["a+b"]}) == 4
    for name in ("a", "b", "a+b"):
        assert texts[name] == reference_text(tiny_path, cases[name], prompt), name
    models = sidecar.call("models/list")["result"]["models"]
    assert len(models) == 1 and sorted(models[0]["adapters"]) == sorted(str(p) for p in adapters.values())
    bad = sidecar.call("generate", {**GREEDY, "prompt": prompt, "adapters": [{"adapter": str(tiny_path)}]})["error"]
    assert bad["data"]["kind"] == "adapter_invalid"
