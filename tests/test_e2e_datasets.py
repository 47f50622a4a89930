"""datasets/inspect end to end: a real sidecar, a worker process, builtin:tiny's tokenizer, the path policy."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}] + CHAT},
    {"messages": "Hi there"},                                      # 2: wrong type
    {"messages": [{"role": "user", "content": "Only a question"}]},  # 3: no assistant turn
    {"messages": [{"role": "user", "content": "What is a fox?"}, {"role": "assistant", "content": "A small wild dog."}]},
    {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "boop"}]},  # 5: unknown role
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="module")
def inspector(data_dir, shared_home, tiny_path, tmp_path_factory):
    """One sidecar for the module whose only extra root is data_dir (its cwd, another temporary
    directory, is a root too). builtin:tiny is built first (tiny_path), once for the session."""
    from conftest import Sidecar, sidecar_env

    cwd = tmp_path_factory.mktemp("cwd")
    sidecar = Sidecar(["--allow-root", str(data_dir)], sidecar_env(shared_home), cwd / "stderr.log", cwd=str(cwd))
    yield sidecar
    sidecar.close()


@pytest.fixture(scope="module")
def chat_file(data_dir) -> Path:
    path = data_dir / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return path


def failure(response: dict) -> tuple[int, str, dict]:
    error = response["error"]
    return error["code"], error["data"]["kind"], error["data"]["detail"]


def test_inspect_with_the_tiny_model(inspector, chat_file):
    response = inspector.call("datasets/inspect", {"data": str(chat_file), "model": "builtin:tiny", "samples": 5})
    result = response["result"]
    assert (result["path"], result["file_type"], result["format"]) == (str(chat_file), "jsonl", "chat")
    assert (result["rows"], result["valid_rows"], result["problem_count"]) == (5, 2, 3)
    assert [p["row"] for p in result["problems"]] == [2, 3, 5]
    assert result["problems"][0]["reason"] == "messages must be a list of {role, content} objects, got str"
    assert "'robot'" in result["problems"][2]["reason"]
    assert result["sha256"] == hashlib.sha256(chat_file.read_bytes()).hexdigest()

    samples = result["samples"]
    assert [s["row"] for s in samples] == [1, 4]
    assert samples[0]["rendered"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                      "<|im_start|>assistant\nHello!<|im_end|>\n")
    stats = result["tokens"]
    assert stats["total"] == sum(s["tokens"] for s in samples) and stats["trained_tokens"] == sum(s["trained_tokens"] for s in samples)
    assert stats["min"] == min(s["tokens"] for s in samples) and stats["max"] == max(s["tokens"] for s in samples)
    assert 0 < stats["trained_tokens"] < stats["total"]

    stages = {event["stage"] for event in inspector.events(response["id"], "$/progress")}
    assert {"read", "tokenize"} <= stages


def test_inspect_without_a_model_and_with_a_tokenizer_limit(inspector, chat_file, data_dir):
    result = inspector.call("datasets/inspect", {"data": {"path": str(chat_file), "format": "chat"}, "samples": 1})["result"]
    assert result["tokens"] is None and result["valid_rows"] == 2
    assert result["samples"] == [{"row": 1, "rendered": "system: Be brief.\nuser: Hi\nassistant: Hello!", "tokens": None,
                                  "trained_tokens": None}]

    qa = data_dir / "qa.csv"
    qa.write_text("question,answer\nWhy is the sky blue?,Air scatters blue light the most.\n" + "Long?," + "very " * 200 + "long\n")
    result = inspector.call("datasets/inspect", {"data": {"path": str(qa), "columns": {"prompt": "question", "completion": "answer"}},
                                                 "model": "builtin:tiny", "max_seq_length": 64})["result"]
    assert (result["file_type"], result["format"], result["rows"], result["valid_rows"]) == ("csv", "completions", 2, 1)
    assert result["problems"][0]["row"] == 2 and "over max_seq_length 64" in result["problems"][0]["reason"]
    assert result["samples"][0]["rendered"] == "Why is the sky blue?Air scatters blue light the most.<|endoftext|>"


def test_path_outside_the_roots_is_refused(inspector, tmp_path):
    outside = tmp_path / "secret.jsonl"
    outside.write_text(json.dumps({"messages": CHAT}) + "\n")
    code, kind, detail = failure(inspector.call("datasets/inspect", {"data": str(outside)}))
    assert (code, kind, detail["path"]) == (-32803, "path_not_allowed", str(outside))


def test_strict_bad_rows_and_other_failures(inspector, chat_file, data_dir):
    response = inspector.call("datasets/inspect", {"data": str(chat_file), "strict": True})
    code, kind, detail = failure(response)
    assert (code, kind) == (-32803, "dataset_invalid")
    assert [p["row"] for p in detail["problems"]] == [2, 3, 5] and detail["path"] == str(chat_file)
    assert "row 2: messages must be a list" in response["error"]["message"]

    code, kind, _ = failure(inspector.call("datasets/inspect", {"data": str(data_dir / "missing.jsonl")}))
    assert (code, kind) == (-32803, "file_not_found")

    odd = data_dir / "odd.jsonl"
    odd.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    response = inspector.call("datasets/inspect", {"data": str(odd)})
    assert failure(response)[:2] == (-32803, "dataset_invalid") and "question, answer" in response["error"]["message"]

    response = inspector.call("datasets/inspect", {"data": {"path": str(odd), "columns": {"answer": "a"}}})
    assert response["error"]["code"] == -32602 and response["error"]["data"]["field"] == "params.data.columns"


def test_cancel_while_tokenizing(inspector, data_dir):
    big = data_dir / "big.jsonl"
    line = json.dumps({"messages": [{"role": "user", "content": "Tell me about foxes."},
                                    {"role": "assistant", "content": "Foxes are small, clever wild dogs."}]}) + "\n"
    big.write_text(line * 20000)
    request_id = inspector.start("datasets/inspect", {"data": str(big), "model": "builtin:tiny"})
    for message in inspector.messages():
        assert message.get("id") != request_id, f"answered before tokenizing: {message}"
        if message.get("method") == "$/progress" and message["params"]["stage"] == "tokenize":
            break
    started = time.monotonic()
    inspector.notify("$/cancel", {"id": request_id})
    response = inspector.wait_response(request_id)
    assert time.monotonic() - started < 5
    assert response["error"]["code"] == -32800
    partial = response["error"]["data"]["partial"]
    assert partial["rows"] == 20000 and 100 <= partial["tokenized"] < 20000
