"""The thread policy: decided from the flag, the environment, then the machine; applied before torch loads."""

from __future__ import annotations

from sidecar import threads


def test_defaults_keep_the_libraries_waiting_and_use_at_most_the_cpus_we_may_run_on():
    policy = threads.decide({})
    assert policy.wait_policy == "LIBRARY"
    assert 1 <= policy.threads <= threads._affinity()
    assert policy.reason


def test_the_flag_wins_over_the_environment_which_wins_over_the_machine():
    assert threads.decide({"MLSIDECAR_THREADS": "3"}, requested=5).threads == 5
    assert threads.decide({"MLSIDECAR_THREADS": "3", "OMP_NUM_THREADS": "7"}).threads == 3
    assert threads.decide({"OMP_NUM_THREADS": "7"}).threads == 7
    assert threads.decide({"OMP_WAIT_POLICY": "active"}).wait_policy == "ACTIVE"
    assert threads.decide({"OMP_WAIT_POLICY": "ACTIVE", "MLSIDECAR_WAIT_POLICY": "passive"}).wait_policy == "PASSIVE"


def test_apply_writes_what_torch_openmp_and_workers_read():
    env: dict[str, str] = {}
    threads.apply(threads.ThreadPolicy(2, "PASSIVE", "test"), env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == env["MLSIDECAR_THREADS"] == "2"
    assert "test" in env[threads.ENV_APPLIED]


def test_status_reports_the_policy_in_force(spawn):
    status = spawn("--threads", "1", MLSIDECAR_WAIT_POLICY="passive").call("status")["result"]
    assert status["threads"]["threads"] == 1 and status["threads"]["wait_policy"] == "PASSIVE"
    assert "--threads 1" in status["threads"]["reason"]


def test_library_waiting_leaves_omp_wait_policy_unset():
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    threads.apply(threads.ThreadPolicy(2, "LIBRARY", "test"), env)
    assert "OMP_WAIT_POLICY" not in env
