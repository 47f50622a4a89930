"""The wire contract end to end: a real sidecar process over real pipes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from protocol.version import PROTOCOL_VERSION


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_ping(sidecar):
    assert sidecar.call("ping") == {"jsonrpc": "2.0", "id": 1, "result": {}}


def test_malformed_json_gets_parse_error_with_null_id(sidecar):
    sidecar.proc.stdin.write(b'{"id": 1, "method": \n')
    message = sidecar.read()
    assert message["id"] is None and message["error"]["code"] == -32700
    assert sidecar.call("ping")["result"] == {}


def test_array_and_scalars_are_invalid_requests(sidecar):
    for line in (b"[]", b'[{"id":1,"method":"ping"}]', b"42", b'"ping"', b"null", b"true"):
        sidecar.proc.stdin.write(line + b"\n")
        message = sidecar.read()
        assert message["id"] is None and message["error"]["code"] == -32600, line


def test_bad_envelopes(sidecar):
    sidecar.send({"jsonrpc": "1.0", "id": 5, "method": "ping"})
    assert sidecar.read()["error"]["code"] == -32600
    sidecar.send({"id": {"x": 1}, "method": "ping"})
    assert sidecar.read() == {"jsonrpc": "2.0", "id": None, "error": sidecar.seen[-1]["error"]}
    sidecar.send({"id": 6, "method": 3})
    assert sidecar.read()["error"]["code"] == -32600


def test_jsonrpc_field_may_be_omitted_by_people_typing(sidecar):
    sidecar.proc.stdin.write(b'{"id": 9, "method": "ping"}\n')
    assert sidecar.read() == {"jsonrpc": "2.0", "id": 9, "result": {}}


def test_unknown_method(sidecar):
    error = sidecar.call("no/such/method")["error"]
    assert error["code"] == -32601 and "no/such/method" in error["message"]


def test_debug_methods_do_not_exist_without_debug_flag(spawn):
    plain = spawn()
    error = plain.call("debug/sleep")["error"]
    assert error["code"] == -32601 and "--debug" in error["message"]


def test_bad_params_name_the_field(sidecar):
    cases = [
        ("debug/sleep", {"seconds": 1, "bogus": True}, "params.bogus"),
        ("debug/sleep", {"seconds": "long"}, "params.seconds"),
        ("models/load", {}, "params.model"),
        ("models/load", {"model": "x", "options": {"dtype": "float8"}}, "params.options.dtype"),
        ("initialize", {"protocolVersion": PROTOCOL_VERSION, "clientInfo": {"nam": "x"}}, "params.clientInfo"),
    ]
    for method, params, field in cases:
        error = sidecar.call(method, params)["error"]
        assert error["code"] == -32602, (method, params, error)
        assert error["data"]["field"].startswith(field), (field, error)
    sidecar.send({"jsonrpc": "2.0", "id": 99, "method": "ping", "params": [1, 2]})
    assert sidecar.read()["error"]["data"]["field"] == "params"


def test_seventeen_mib_line_is_refused_and_memory_does_not_grow(sidecar):
    assert sidecar.call("ping")["result"] == {}
    before = rss_kib(sidecar.proc.pid)
    chunk = b"x" * (1 << 20)
    sidecar.proc.stdin.write(b'{"id": 1, "method": "ping", "params": {"pad": "')
    for _ in range(17):
        sidecar.proc.stdin.write(chunk)
    sidecar.proc.stdin.write(b'"}}\n')
    message = sidecar.read()
    assert message["id"] is None and message["error"]["code"] == -32600
    assert message["error"]["data"]["maxMessageBytes"] == 16 << 20
    assert sidecar.call("ping")["result"] == {}
    grown_mib = (rss_kib(sidecar.proc.pid) - before) / 1024
    # About 4 MiB of allocator residue stays whatever the line's size (measured the same for 17 and 64 MiB).
    assert grown_mib < 8, f"RSS grew by {grown_mib:.1f} MiB while discarding a 17 MiB line"


def test_crlf_bom_and_empty_lines(sidecar):
    sidecar.proc.stdin.write(b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"ping"}\r\n\r\n\n   \n{"jsonrpc":"2.0","id":2,"method":"ping"}\r\n')
    assert sidecar.read()["id"] == 1
    assert sidecar.read()["id"] == 2


def test_cancel_of_unknown_and_finished_ids_is_ignored(sidecar):
    assert sidecar.call("ping")["result"] == {}
    sidecar.notify("$/cancel", {"id": 1})
    sidecar.notify("$/cancel", {"id": "never-sent"})
    sidecar.notify("$/cancel", {})
    sidecar.notify("$/cancel")
    sidecar.notify("$/unknown-notification", {"x": 1})
    response = sidecar.call("ping")
    assert response["result"] == {} and len(sidecar.seen) == 2


def test_initialize_negotiates_and_a_second_one_is_refused(sidecar):
    result = sidecar.call("initialize", {"protocolVersion": PROTOCOL_VERSION, "clientInfo": {"name": "tests"}})["result"]
    assert result["protocolVersion"] == PROTOCOL_VERSION
    assert result["serverInfo"]["pid"] == sidecar.proc.pid and result["serverInfo"]["name"] == "mlsidecar"
    assert result["capabilities"]["maxMessageBytes"] == 16 << 20
    assert result["capabilities"]["methods"]["debug/sleep"]["runs_in"] == "worker"
    assert "cpu" in result["capabilities"]["devices"]
    again = sidecar.call("initialize", {"protocolVersion": PROTOCOL_VERSION})["error"]
    assert again["code"] == -32600


def test_unsupported_protocol_version(sidecar):
    error = sidecar.call("initialize", {"protocolVersion": "1999-01-01"})["error"]
    assert error["code"] == -32602
    assert error["data"] == {"supported": [PROTOCOL_VERSION], "requested": "1999-01-01"}
    assert sidecar.call("initialize", {"protocolVersion": PROTOCOL_VERSION})["result"]["protocolVersion"] == PROTOCOL_VERSION


def test_a_request_before_initialize_implies_the_latest_version(sidecar):
    assert "result" in sidecar.call("models/list")
    assert sidecar.call("initialize", {"protocolVersion": PROTOCOL_VERSION})["error"]["code"] == -32600


def test_strict_mode_wants_initialize_first(spawn):
    strict = spawn("--strict")
    assert strict.call("ping")["result"] == {}
    assert strict.call("models/list")["error"]["code"] == -32002
    assert "result" in strict.call("initialize", {"protocolVersion": PROTOCOL_VERSION})
    assert "result" in strict.call("models/list")


def test_duplicate_id_in_flight_is_refused_without_a_second_response_for_it(sidecar):
    sidecar.start("debug/sleep", {"seconds": 0.5, "steps": 2}, request_id="job")
    sidecar.start("ping", request_id="job")
    duplicate = sidecar.read()
    while "method" in duplicate:
        duplicate = sidecar.read()
    assert duplicate["id"] is None and duplicate["error"]["data"] == {"id": "job"}
    final = sidecar.wait_response("job")
    assert final["result"]["steps"] == 2


def test_writes_to_fd1_never_reach_the_wire(sidecar):
    result = sidecar.call("debug/print")["result"]
    assert result["wrote"] == ["print", "os.write(1)", "child print", "child os.write(1)"]
    sleep = sidecar.call("debug/sleep", {"seconds": 0.1, "steps": 1, "write_stdout": True})
    assert sleep["result"]["steps"] == 1
    assert sidecar.call("ping")["result"] == {}
    assert sidecar.close() == 0
    stderr = sidecar.stderr()
    for text in ("print() from the sidecar", "os.write(1) from the sidecar", "child print", "child os.write(1)",
                 "print() from a worker", "os.write(1) from a worker"):
        assert text in stderr, text
    assert all(m.get("jsonrpc") == "2.0" for m in sidecar.seen)


def test_output_is_ascii_only(sidecar):
    sidecar.call("debug/stream", {"count": 3, "text": "日本😀\u2028"})
    raw = json.dumps(sidecar.seen)  # the parsed form; check the bytes themselves below
    assert "日本" in json.loads(raw)[0]["params"]["text"]
    sidecar.start("debug/stream", {"count": 1, "text": "é"}, request_id=50)
    sidecar.proc.stdin.close()
    rest = sidecar.proc.stdout.read()
    assert rest.isascii() and b"\\u00e9" in rest
