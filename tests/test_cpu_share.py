"""runtimes/cpu_share.py: a job's thread count follows the cores other programs leave free."""

from __future__ import annotations

import os

import pytest

from runtimes import cpu_share
from runtimes.cpu_share import CpuClock, Governor

STAT = """cpu  900 0 300 5000 10 0 5 0 0 0
cpu0 400 0 100 2500 5 0 2 0 0 0
cpu1 500 0 200 2500 5 0 3 1 0 0
intr 12345
ctxt 999
"""


class FakeClock:
    """Two CPUs; `others` cores kept busy by other programs, `own` by this process."""

    cpus = 2

    def __init__(self) -> None:
        self.wall, self.busy, self.own = 0.0, 0.0, 0.0
        self.others, self.ours = 0.0, 0.0
        self.elsewhere: int | None = None  # other programs' runnable threads at this instant (None: unknown)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.busy += (self.others + self.ours) * seconds
        self.own += self.ours * seconds

    def busy_seconds(self) -> float:
        return self.busy

    def runnable_elsewhere(self) -> int | None:
        return self.elsewhere

    def own_seconds(self) -> float:
        return self.own


def governor(clock: FakeClock, ceiling: int = 2, adaptive: bool = True) -> Governor:
    return Governor(ceiling, adaptive, clock=clock, now=lambda: clock.wall)  # type: ignore[arg-type]


def run(gov: Governor, clock: FakeClock, seconds: float) -> int:
    """Poll the way a decode loop does (every 50 ms) for `seconds`; the thread count at the end."""
    threads = gov.threads_per_job()
    for _ in range(int(seconds / 0.05)):
        clock.advance(0.05)
        threads = gov.threads_per_job()
    return threads


def test_proc_stat_busy_time_leaves_out_idle_and_iowait_and_other_cpus(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    clock = CpuClock(str(stat))
    clock._allowed = {1}
    ticks = os.sysconf("SC_CLK_TCK")
    assert clock.busy_seconds() == pytest.approx((500 + 200 + 3 + 1) / ticks)
    clock._allowed = {0, 1}
    assert clock.busy_seconds() == pytest.approx((400 + 100 + 2 + 500 + 200 + 3 + 1) / ticks)


def test_the_real_proc_stat_reads_as_a_clock_that_does_not_go_back():
    clock = CpuClock()
    first = clock.busy_seconds()
    if first is None:
        pytest.skip("no /proc/stat on this system")
    sum(i * i for i in range(200_000))
    assert clock.busy_seconds() >= first
    assert clock.cpus >= 1


def test_busy_cores_elsewhere_take_threads_away_and_give_them_back():
    clock = FakeClock()
    gov = governor(clock)
    clock.ours = 2.0
    assert run(gov, clock, 1.0) == 2  # alone: the ceiling
    clock.others, clock.ours = 2.0, 1.0  # two busy loops arrive
    assert run(gov, clock, 1.0) == 1
    assert gov.reading is not None and gov.reading.others_cores == pytest.approx(2.0)
    clock.others = 0.0  # they leave
    assert run(gov, clock, 1.0) == 2


def test_one_burst_is_not_a_reason_to_change():
    clock = FakeClock()
    gov = governor(clock)
    clock.ours = 2.0
    run(gov, clock, 1.0)
    clock.others = 2.0
    clock.advance(0.3)  # one sample's worth of a compiler's burst
    assert gov.threads_per_job() == 2
    clock.others = 0.0
    assert run(gov, clock, 1.0) == 2


def test_concurrent_jobs_in_one_process_split_the_free_cores():
    clock = FakeClock()
    gov = Governor(4, True, clock=clock, now=lambda: clock.wall)  # type: ignore[arg-type]
    clock.cpus = 4
    with gov.job() as first, gov.job() as second:
        assert first.threads() == second.threads() == 2
    with gov.job() as only:
        assert only.threads() == 4


def test_a_fixed_count_is_used_as_given_and_a_fixed_policy_never_samples():
    clock = FakeClock()
    clock.others = 2.0
    gov = governor(clock, adaptive=False)
    assert run(gov, clock, 1.0) == 2 and gov.reading is None
    assert governor(clock).job(fixed=3).threads() == 3


def test_no_proc_stat_keeps_the_ceiling(tmp_path):
    gov = Governor(2, True, clock=CpuClock(str(tmp_path / "missing")))
    assert gov.threads_per_job() == 2 and not gov.adaptive


def test_jobs_report_changes_once_and_leave_threads_alone_outside_the_sidecar(monkeypatch):
    clock = FakeClock()
    gov = governor(clock)
    monkeypatch.setenv(cpu_share.ENV_THREADS, "2")
    job = gov.job()
    assert job.changed() == 2 and job.changed() is None

    class Target:
        counts: list[int] = []

        def set_threads(self, count: int) -> None:
            self.counts.append(count)

    target = Target()
    gov.job().apply_to(target)
    assert target.counts == [2]
    monkeypatch.delenv(cpu_share.ENV_THREADS)
    assert gov.job().changed() is None  # a runtime used as a library: torch and llama.cpp keep their own


def test_a_job_starts_on_who_wants_the_cpus_now_not_on_the_last_window():
    clock = FakeClock()
    gov = governor(clock)
    clock.others, clock.ours = 2.0, 1.0
    run(gov, clock, 1.0)
    assert gov.threads_per_job() == 1  # busy while the last job ran
    clock.others, clock.elsewhere = 0.0, 0  # they stopped between the jobs
    with gov.job() as job:
        assert job.threads() == 2  # at once, not half a second into the job
    clock.elsewhere = 2  # two programs want both CPUs as the next job starts, and still do 20 ms later
    with gov.job() as job:
        assert job.threads() == 1


def test_runnable_elsewhere_reads_procs_running_less_our_own_threads():
    clock = CpuClock()
    if clock.busy_seconds() is None or clock._allowed is None or len(clock._allowed) != os.cpu_count():
        pytest.skip("needs /proc and the whole machine in the affinity mask")
    value = clock.runnable_elsewhere()
    assert value is not None and value >= 0


def test_a_neighbour_still_spinning_as_a_job_starts_does_not_cost_it_threads():
    clock = FakeClock()
    gov = governor(clock)
    glances = iter([2, 0])  # another sidecar's pool is still spinning as the job starts, asleep 20 ms later
    clock.runnable_elsewhere = lambda: next(glances)  # type: ignore[method-assign]
    clock.ours = 2.0
    with gov.job() as job:
        assert job.threads() == 2
        clock.advance(0.1)
        assert job.threads() == 2  # and the first look, a tenth of a second in, agrees


def test_fewer_threads_need_half_a_second_of_evidence_more_need_one_sample():
    clock = FakeClock()
    gov = governor(clock)
    clock.ours = 2.0
    run(gov, clock, 1.0)
    clock.others = 2.0
    clock.advance(0.25)
    assert gov.threads_per_job() == 2  # one quarter-second sample of load: not yet
    clock.advance(0.25)
    assert gov.threads_per_job() == 1  # two agreeing ones: fewer
    clock.others = 0.0
    clock.advance(0.25)
    assert gov.threads_per_job() == 2  # one sample of free cores: back at once
