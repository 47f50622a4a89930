"""The human entry points: call, schema, doctor."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, sidecar_env


def run(*args: str, home, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, cwd=ROOT,
                          env=sidecar_env(home), timeout=timeout)


def test_call_prints_the_result_and_streams_tokens(shared_home):
    result = run("call", "--sidecar-arg=--debug", "debug/stream", '{"count": 3, "text": "日本"}', home=shared_home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("日本日本日本\n")
    assert json.loads(result.stdout.split("\n", 1)[1]) == {"count": 3, "text": "日本"}


def test_call_raw_prints_protocol_lines(shared_home):
    result = run("call", "--raw", "--sidecar-arg=--debug", "debug/sleep", '{"seconds": 0.2, "steps": 2}', home=shared_home)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0
    assert [m["params"]["step"] for m in lines if m.get("method") == "$/progress"] == [1, 2]
    assert lines[-1]["result"]["steps"] == 2


def test_call_reports_errors_with_a_nonzero_exit(shared_home):
    result = run("call", "no/such", home=shared_home)
    assert result.returncode == 1 and "-32601" in result.stderr
    result = run("call", "ping", "{not json", home=shared_home)
    assert result.returncode == 2 and "not JSON" in result.stderr


def test_schema_command_prints_the_committed_schema(shared_home):
    result = run("schema", home=shared_home)
    assert result.returncode == 0
    assert result.stdout == (ROOT / "protocol" / "schema.json").read_text()


def test_doctor_reports_versions_and_devices(shared_home):
    result = run("doctor", "--json", home=shared_home, timeout=120)
    report = json.loads(result.stdout)
    assert report["packages"]["torch"] and "cpu" in report["devices"]
    assert report["home"] == str(shared_home)
