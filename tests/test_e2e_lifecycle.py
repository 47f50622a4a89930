"""The sidecar never outlives its host and never leaves workers behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import ROOT, sidecar_env
from protocol.version import PROTOCOL_VERSION
from test_e2e_jobs import pid_gone, wait_for_event

HOST = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    from sidecar.client import SidecarProcess
    sidecar = SidecarProcess(["--debug"])
    job = sidecar.start("debug/sleep", {"seconds": 60, "steps": 600})
    for message in sidecar.messages():
        if message.get("method") == "$/progress":
            break
    status = sidecar.request("status")
    worker = next(j["pid"] for j in status["jobs"] if j["id"] == job)
    print(json.dumps({"sidecar": sidecar.proc.pid, "worker": worker}), flush=True)
    time.sleep(600)
""")


def test_killing_the_host_takes_the_sidecar_and_its_workers_within_two_seconds(tmp_path: Path, shared_home: Path):
    host = subprocess.Popen([sys.executable, "-c", HOST, str(ROOT)], stdout=subprocess.PIPE,
                            env=sidecar_env(shared_home), start_new_session=True)
    pids = json.loads(host.stdout.readline())
    host.kill()
    host.wait()
    started = time.monotonic()
    assert pid_gone(pids["sidecar"], 2.0), "sidecar outlived its host by 2 s"
    assert pid_gone(pids["worker"], 2.0 - (time.monotonic() - started) + 0.1), "worker outlived the host"


def test_sidecar_exits_when_the_initialize_process_id_dies(spawn):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    sidecar = spawn("--debug")
    sidecar.call("initialize", {"protocolVersion": PROTOCOL_VERSION, "processId": sleeper.pid})
    job = sidecar.start("debug/sleep", {"seconds": 60, "steps": 600})
    wait_for_event(sidecar, job)
    worker = next(j["pid"] for j in sidecar.call("status")["result"]["jobs"] if j["id"] == job)
    sleeper.kill()
    sleeper.wait()
    started = time.monotonic()
    assert sidecar.proc.wait(2.5) == 0
    assert time.monotonic() - started < 2.0
    assert pid_gone(worker, 1.0)


def test_sigterm_is_a_clean_stop(spawn):
    sidecar = spawn("--debug")
    job = sidecar.start("debug/sleep", {"seconds": 60, "steps": 600})
    wait_for_event(sidecar, job)
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.wait_response(job)["error"]["code"] == -32800
    assert sidecar.proc.wait(5) == 0


def test_ctrl_c_in_a_terminal_cancels_cleanly(spawn):
    sidecar = spawn("--debug", new_session=True)  # its own process group, as a terminal's foreground job
    job = sidecar.start("debug/sleep", {"seconds": 60, "steps": 600})
    wait_for_event(sidecar, job)
    os.killpg(sidecar.proc.pid, signal.SIGINT)
    error = sidecar.wait_response(job)["error"]
    assert error["code"] == -32800, error
    assert sidecar.proc.wait(5) == 0


def test_requests_from_a_file_run_to_completion(tmp_path: Path, shared_home: Path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"id": 1, "method": "debug/sleep", "params": {"seconds": 0.3, "steps": 3}},
        {"id": 2, "method": "ping"},
    ]))  # no newline after the last line: it still counts
    out = tmp_path / "out.jsonl"
    with open(requests, "rb") as stdin, open(out, "wb") as stdout:
        code = subprocess.run([sys.executable, "-m", "sidecar", "--debug"], stdin=stdin, stdout=stdout,
                              stderr=subprocess.DEVNULL, env=sidecar_env(shared_home), timeout=60).returncode
    assert code == 0
    messages = [json.loads(line) for line in out.read_text().splitlines()]
    finals = {m["id"]: m for m in messages if "id" in m}
    assert finals[1]["result"]["steps"] == 3 and finals[2]["result"] == {}


def test_start_up_does_not_import_heavy_libraries(tmp_path: Path, shared_home: Path):
    code = ("import sys, runpy; sys.argv=['sidecar','--help']\n"
            "try:\n    runpy.run_module('sidecar', run_name='__main__')\nexcept SystemExit: pass\n"
            "from sidecar import server, jobs, workers, pool, models\n"
            "heavy = [m for m in ('torch', 'transformers', 'llama_cpp', 'coremltools', 'numpy') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=sidecar_env(shared_home), cwd=ROOT)
    assert "HEAVY []" in result.stderr, result.stderr


def test_workers_die_with_a_killed_sidecar(spawn):
    sidecar = spawn("--debug")
    job = sidecar.start("debug/sleep", {"seconds": 60, "steps": 600})
    wait_for_event(sidecar, job)
    worker = next(j["pid"] for j in sidecar.call("status")["result"]["jobs"] if j["id"] == job)
    sidecar.proc.kill()
    sidecar.proc.wait()
    assert pid_gone(worker, 2.0)
