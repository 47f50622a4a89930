"""The job engine end to end: worker processes, progress, cancellation, the queue, crashes."""

from __future__ import annotations

import os
import signal
import time

import pytest


def pid_gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            if open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z":
                return True  # a zombie has released everything; only its parent's wait() is missing
        except OSError:
            return True
        time.sleep(0.02)
    return False


def wait_for_event(sidecar, request_id, method="$/progress"):
    """Read until that event; everything else read meanwhile stays in the backlog (another request's answer
    may come first: on a loaded machine a short inline job ends before a worker has started)."""
    for message in sidecar.messages():
        if message.get("method") == method and message["params"].get("id") == request_id:
            return message["params"]
        assert message.get("id") != request_id, f"answered before the awaited event: {message}"
        if "id" in message:
            sidecar.backlog.append(message)
    raise AssertionError("sidecar exited")


def test_worker_job_streams_monotonic_rate_limited_progress(sidecar):
    response = sidecar.call("debug/sleep", {"seconds": 1.0, "steps": 200})
    assert response["result"]["steps"] == 200 and response["result"]["pid"] != sidecar.proc.pid
    progress = sidecar.events(response["id"], "$/progress")
    steps = [p["step"] for p in progress]
    assert steps == sorted(steps) and steps[-1] == 200 and progress[-1]["total"] == 200
    assert len(progress) <= 20, f"{len(progress)} progress events for 1 s: not rate-limited to ~10/s"


def test_no_event_after_the_response(sidecar):
    for request_id in range(1, 6):
        sidecar.start("debug/stream", {"count": 500}, request_id=request_id)
    sidecar.start("debug/sleep", {"seconds": 0.3, "steps": 1000}, request_id=6)
    answered: set = set()
    while len(answered) < 6:
        message = sidecar.read()
        if "method" in message:
            assert message["params"]["id"] not in answered, message
        else:
            assert message["id"] not in answered
            answered.add(message["id"])
    seqs = [e["seq"] for e in sidecar.events(3, "$/token")]
    assert seqs == list(range(500))


def test_cancel_a_running_worker_job(sidecar):
    request_id = sidecar.start("debug/sleep", {"seconds": 30, "steps": 300})
    wait_for_event(sidecar, request_id)
    started = time.monotonic()
    sidecar.notify("$/cancel", {"id": request_id})
    response = sidecar.wait_response(request_id)
    assert time.monotonic() - started < 2
    assert response["error"]["code"] == -32800
    assert response["error"]["data"]["partial"]["step"] >= 1
    sidecar.notify("$/cancel", {"id": request_id})  # finished: ignored
    assert sidecar.call("ping")["result"] == {}


def test_cancel_an_inline_job(sidecar):
    request_id = sidecar.start("debug/stream", {"count": 100000, "delay_ms": 5})
    wait_for_event(sidecar, request_id, "$/token")
    sidecar.notify("$/cancel", {"id": request_id})
    assert sidecar.wait_response(request_id)["error"]["code"] == -32800


def test_queue_reports_positions_cancels_queued_jobs_and_refuses_when_full(spawn):
    sidecar = spawn("--debug", "--max-queued-jobs", "2")
    first = sidecar.start("debug/sleep", {"seconds": 1.5, "steps": 3})
    second = sidecar.start("debug/sleep", {"seconds": 0.1, "steps": 1})
    third = sidecar.start("debug/sleep", {"seconds": 0.1, "steps": 1})
    fourth = sidecar.start("debug/sleep", {"seconds": 0.1, "steps": 1})
    busy = sidecar.wait_response(fourth)
    assert busy["error"]["code"] == -32001 and busy["error"]["data"]["retryable"] is True
    status = sidecar.call("status")["result"]
    states = {j["id"]: (j["state"], j["position"]) for j in status["jobs"]}
    assert states[first][0] == "running" and states[second] == ("queued", 1) and states[third] == ("queued", 2)
    sidecar.notify("$/cancel", {"id": second})
    assert sidecar.wait_response(second)["error"]["code"] == -32800
    assert sidecar.wait_response(first)["result"]["steps"] == 3
    assert sidecar.wait_response(third)["result"]["steps"] == 1
    queued = [e for e in sidecar.events(third, "$/progress") if e["stage"] == "queued"]
    assert [e["position"] for e in queued] == [2, 1]
    assert sidecar.events(second, "$/progress")[0]["position"] == 1


@pytest.mark.parametrize("mode,how", [("sigkill", "SIGKILL"), ("segfault", "SIGSEGV"), ("exit", "code 17")])
def test_a_crashing_worker_fails_its_request_and_the_sidecar_keeps_serving(sidecar, mode, how):
    error = sidecar.call("debug/crash", {"mode": mode})["error"]
    assert error["code"] == -32803 and error["data"]["kind"] == "worker_crashed"
    assert how in error["message"]
    assert f"crashing with {mode}" in error["data"]["detail"]["stderr_tail"]
    assert sidecar.call("debug/sleep", {"seconds": 0.05, "steps": 1})["result"]["steps"] == 1


def test_exceptions_in_a_worker_become_clear_errors(sidecar):
    oom = sidecar.call("debug/crash", {"mode": "memory_error"})["error"]
    assert oom["code"] == -32803 and oom["data"]["kind"] == "out_of_memory"
    failure = sidecar.call("debug/sleep", {"seconds": 0.01, "steps": 1, "fail": "disk on fire"})["error"]
    assert failure["code"] == -32603 and "disk on fire" in failure["message"]


def test_worker_killed_from_outside_mid_job(sidecar):
    request_id = sidecar.start("debug/sleep", {"seconds": 30, "steps": 300})
    wait_for_event(sidecar, request_id)
    job = next(j for j in sidecar.call("status")["result"]["jobs"] if j["id"] == request_id)
    os.kill(job["pid"], signal.SIGKILL)
    error = sidecar.wait_response(request_id)["error"]
    assert error["data"]["kind"] == "worker_crashed" and "SIGKILL" in error["message"]
    assert sidecar.call("ping")["result"] == {}


def test_two_hundred_concurrent_requests_are_each_answered_once(spawn):
    sidecar = spawn("--debug", "--max-queued-jobs", "200", "--max-concurrent-jobs", "4")
    methods = [("ping", {}), ("status", {}), ("models/list", {}), ("debug/stream", {"count": 20}),
               ("debug/sleep", {"seconds": 0.01, "steps": 1}), ("no/such", {}), ("debug/sleep", {"bad": 1})]
    expected = {}
    for index in range(200):
        method, params = methods[index % len(methods)]
        expected[sidecar.start(method, params, request_id=f"r{index}")] = method
    responses: dict = {}
    while len(responses) < 200:
        message = sidecar.read()
        assert message is not None
        if "method" not in message:
            assert message["id"] not in responses, f"second response for {message['id']}"
            responses[message["id"]] = message
        else:
            assert message["params"]["id"] not in responses
    assert set(responses) == set(expected)
    for request_id, method in expected.items():
        ok = "result" in responses[request_id]
        assert ok == (method not in ("no/such",) and not (method == "debug/sleep" and "bad" in str(responses[request_id]))), request_id


def test_stdin_closed_by_a_live_host_answers_everything_then_exits(spawn):
    """End of input from a live host means "nothing more to send", as when requests are piped by hand."""
    sidecar = spawn("--debug")
    running = sidecar.start("debug/sleep", {"seconds": 1.0, "steps": 10})
    queued = sidecar.start("debug/sleep", {"seconds": 0.5, "steps": 5})
    streaming = sidecar.start("debug/stream", {"count": 50, "delay_ms": 5})
    wait_for_event(sidecar, running)
    sidecar.proc.stdin.close()
    rest = list(sidecar.messages())
    assert sidecar.proc.wait(30) == 0
    finals = {m["id"]: m for m in [*sidecar.backlog, *rest] if "id" in m}
    assert {running, queued, streaming} <= set(finals)
    assert all("result" in finals[i] for i in (running, queued, streaming)), finals
    assert [e["stage"] for e in sidecar.events(queued)].count("queued") >= 1


def test_shutdown_cancels_work_answers_and_refuses_new_work(spawn):
    sidecar = spawn("--debug")
    running = sidecar.start("debug/sleep", {"seconds": 30, "steps": 300})
    wait_for_event(sidecar, running)
    result = sidecar.call("shutdown")["result"]
    assert result["cancelled"] == [running]
    assert sidecar.backlog[0]["id"] == running and sidecar.backlog[0]["error"]["code"] == -32800
    refused = sidecar.call("debug/sleep", {"seconds": 0.01})["error"]
    assert refused["data"]["kind"] == "shutting_down"
    assert sidecar.call("ping")["result"] == {}
    assert sidecar.close() == 0


def _spare_workers(parent: int) -> list[int]:
    """Children of `parent` that are spare workers waiting for a job (`--preload` on their command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat", "rb").read().rsplit(b")", 1)[1].split()
            command = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == parent and stat[0] not in (b"Z", b"X") and b"--preload" in command:
            found.append(int(entry))
    return found


def _wait_for_spare(parent: int, timeout_s: float = 60.0, ran: tuple[int, ...] = ()) -> int:
    """A spare of `parent`'s; `ran` are workers that answered jobs, which may take a moment to exit."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        spares = [pid for pid in _spare_workers(parent) if pid not in ran]
        if spares:
            return spares[0]
        time.sleep(0.05)
    raise AssertionError(f"no spare worker appeared under {parent} within {timeout_s} s")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc")
def test_the_next_worker_job_takes_the_spare_and_the_spare_goes_with_the_sidecar(sidecar):
    assert not _spare_workers(sidecar.proc.pid)  # none before the first worker job
    first = sidecar.call("debug/sleep", {"seconds": 0.01, "steps": 1})["result"]["pid"]
    spare = _wait_for_spare(sidecar.proc.pid, ran=(first,))
    second = sidecar.call("debug/sleep", {"seconds": 0.01, "steps": 1})["result"]["pid"]
    assert second == spare != first
    another = _wait_for_spare(sidecar.proc.pid, ran=(first, second))
    assert another not in (first, second)  # a fresh process per job, never one that ran a job before
    sidecar.call("shutdown")
    sidecar.proc.stdin.close()
    assert sidecar.proc.wait(30) == 0
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{another}") and open(f"/proc/{another}/stat", "rb").read().rsplit(b")", 1)[1].split()[0] != b"Z":
        assert time.monotonic() < deadline, "the spare worker outlived the sidecar"
        time.sleep(0.05)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc")
def test_a_spare_killed_while_it_waits_is_replaced_and_the_job_runs(sidecar):
    ran = sidecar.call("debug/sleep", {"seconds": 0.01, "steps": 1})["result"]["pid"]
    spare = _wait_for_spare(sidecar.proc.pid, ran=(ran,))
    os.kill(spare, signal.SIGKILL)
    response = sidecar.call("debug/sleep", {"seconds": 0.01, "steps": 1})
    assert response["result"]["steps"] == 1 and response["result"]["pid"] != spare


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc")
def test_no_spare_worker_when_turned_off(spawn):
    sidecar = spawn("--debug", MLSIDECAR_SPARE_WORKER="0")
    sidecar.call("debug/sleep", {"seconds": 0.01, "steps": 1})
    time.sleep(1.5)
    assert not _spare_workers(sidecar.proc.pid)
