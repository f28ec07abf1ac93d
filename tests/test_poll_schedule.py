"""The learned poll schedule on a fake clock: where polls go for known and unknown kinds, what
conditioning on `started_at` changes, the GET budget and the tail, heartbeats without GETs,
sleeps measured from the schedule, learning from and persisting to the ledger, and pushed updates.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from flux_mcp import errors
from flux_mcp.ledger import TaskLedger
from flux_mcp.polling import (
    COLD_GAP_SECONDS,
    COLD_MIN_BUDGET,
    LATE_SHARE,
    MAX_BUDGET_FACTOR,
    MIN_GAP_SECONDS,
    TAIL_CAP_SECONDS,
    TAIL_FLOOR_SECONDS,
    BackoffPolicy,
    PollPlanner,
    wait_for_task,
)
from flux_mcp.push import TaskEvents
from flux_mcp.record import TaskRecord
from flux_mcp.timing import MAX_KINDS, MAX_SAMPLES, PRIORS, Estimate, LogNormal, Running, Sample, TaskKind, TimingStats

pytestmark = pytest.mark.anyio

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
DEV = TaskKind.of("Qubico/flux1-dev", "txt2img", {"width": 1024, "height": 1024})
SCHNELL = TaskKind.of("Qubico/flux1-schnell", "txt2img", {"width": 1024, "height": 1024})


class FakeTime:
    """One fake clock serving as both the monotonic and the wall clock (PiAPI's too)."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


class FakeTask:
    """A task at a fake PiAPI: queued `queue` s, then running `run` s; GETs are counted."""

    def __init__(self, time: FakeTime, queue: float, run: float, *, get_seconds: float = 0.0) -> None:
        self.time, self.queue, self.run = time, queue, run
        self.created = time.now
        self.gets: list[float] = []
        self.get_seconds = get_seconds

    def record(self) -> TaskRecord:
        elapsed = self.time.now - self.created
        status = "pending" if elapsed < self.queue else "processing" if elapsed < self.queue + self.run else "completed"
        at = EPOCH + timedelta(seconds=self.created)
        return TaskRecord(
            task_id="t",
            status=status,
            created_at=at,
            started_at=at + timedelta(seconds=self.queue) if status != "pending" else None,
            ended_at=at + timedelta(seconds=self.queue + self.run) if status == "completed" else None,
        )

    async def fetch(self, task_id: str) -> TaskRecord:
        self.gets.append(round(self.time.now - self.created, 3))
        self.time.now += self.get_seconds
        return self.record()

    @property
    def ends(self) -> float:
        return self.created + self.queue + self.run


def planner_for(time: FakeTime, **options) -> PollPlanner:
    return PollPlanner(clock=time.clock, wall=lambda: EPOCH.timestamp() + time.now, **options)


async def run(planner: PollPlanner, task: FakeTask, kind: TaskKind | None, *, timeout: float = 600, **options):
    created = task.record()
    wall = EPOCH.timestamp() + task.created
    if kind is not None:
        planner.note_created(created, kind, sent_wall=wall, answered_wall=wall)
    record = await wait_for_task(
        task.fetch,
        "t",
        timeout=timeout,
        schedule=planner.schedule("t", kind),
        clock=task.time.clock,
        sleep=task.time.sleep,
        initial=created,
        on_poll=lambda: planner.count_poll("t"),
        **options,
    )
    return record


def learned(planner: PollPlanner, kind: TaskKind, runs: list[float], queue: float = 1.0) -> None:
    for seconds in runs:
        planner.stats.add(kind, Sample(queue=queue, run=seconds))


# --- where the polls go ----------------------------------------------------------------------------


async def test_a_learned_kind_polls_around_its_usual_end_and_detects_it_quickly():
    time = FakeTime()
    planner = planner_for(time)
    learned(planner, DEV, [19.0, 19.5, 20.0, 20.5, 21.0])
    task = FakeTask(time, queue=1.0, run=20.2)
    record = await run(planner, task, DEV)
    assert record.status == "completed"
    assert all(at >= 15 for at in task.gets)  # nothing wasted early: the run alone takes ~20 s
    assert len(task.gets) <= planner.budget
    assert time.now - task.ends < 0.5


async def test_a_short_kind_gets_more_polls_closer_together_and_finds_its_end_within_50_ms():
    """Our own work on a result costs the same on any task, so a short task gets up to 1.5x the
    budget, where it is likely to end; a long one keeps the budget. Checked on a fake clock over a
    seeded batch of ~4 s tasks (queue ~0.5 s, run ~3.5 s +- 10 %) after 5 warm-ups each."""
    rng = random.Random(7)

    def draw() -> tuple[float, float]:
        return rng.lognormvariate(math.log(0.45), 0.47), rng.lognormvariate(math.log(3.5), 0.1)

    lags, gets = [], []
    for _ in range(10):
        time = FakeTime()
        planner = planner_for(time)
        for _ in range(5):
            queue, seconds = draw()
            planner.stats.add(SCHNELL, Sample(queue=queue, run=seconds))
        long = planner_for(time)
        learned(long, DEV, [32.0, 33.0, 34.0])
        assert planner.budget < planner.schedule("t", SCHNELL).budget <= MAX_BUDGET_FACTOR * planner.budget
        assert long.schedule("t", DEV).budget <= planner.budget + 1
        for _ in range(5):
            time.now = 0.0
            task = FakeTask(time, *draw())
            await run(planner, task, SCHNELL)
            planner.learn("t", task.record())  # forgets the task's GET count
            lags.append(time.now - task.ends)
            gets.append(len(task.gets))
    assert statistics.median(lags) <= 0.05
    assert statistics.fmean(gets) <= 12 and max(gets) <= MAX_BUDGET_FACTOR * planner.budget + 2
    assert sorted(lags)[int(0.9 * len(lags))] <= 0.25  # and the tenth that ends far out is not abandoned


def test_a_few_samples_that_agree_by_chance_do_not_make_the_fit_overconfident():
    stats = TimingStats()
    for seconds in [20.0, 20.01, 20.02, 20.01, 20.0]:
        stats.add(DEV, Sample(queue=1.0, run=seconds))
    few = stats.estimate(DEV)
    assert few is not None and few.learned and few.run.sigma >= 0.1  # PiAPI varies more than five samples show
    for i in range(MAX_SAMPLES):
        stats.add(DEV, Sample(queue=1.0, run=20.0 + (i % 3) * 0.01))
    many = stats.estimate(DEV)
    assert many is not None and many.run.sigma <= 0.05 + 1e-9  # many samples speak for themselves


async def test_a_cold_known_kind_uses_its_prior_and_a_small_budget():
    time = FakeTime()
    planner = planner_for(time)
    estimate = planner.stats.estimate(DEV)
    assert estimate is not None and not estimate.learned
    task = FakeTask(time, queue=1.2, run=19.0)
    await run(planner, task, DEV)
    # one GET per 3 s of expected time at most before the tail (a fixed 4 s poller spends ~5)
    assert len(task.gets) <= 7 and time.now - task.ends < 4.0
    schnell = planner.schedule("s", SCHNELL)
    assert not schnell.estimate.learned and schnell.budget == COLD_MIN_BUDGET  # ~4 s: a floor of 3
    assert PRIORS["Qubico/flux1-dev"].run_seconds == 19.0


async def test_a_cold_long_kind_never_waits_longer_than_twice_the_tasks_age():
    """A backend far faster than the prior (the simulator, a quiet hour) is still noticed soon."""
    time = FakeTime()
    planner = planner_for(time)
    task = FakeTask(time, queue=0.1, run=0.5)  # the prior expects ~20 s
    await run(planner, task, DEV)
    assert task.gets == [COLD_GAP_SECONDS]
    later = FakeTask(FakeTime(), queue=0.1, run=7.0)
    await run(planner_for(later.time), later, DEV)
    assert later.gets[:2] == [2.0, 6.0]


async def test_a_cold_short_kind_spends_no_poll_before_its_plan():
    """A ~4 s kind's planned first poll is only seconds away: no extra early GET (a fixed 2 s
    poller spends one there on every task)."""
    task = FakeTask(FakeTime(), queue=0.5, run=3.5)
    await run(planner_for(task.time), task, SCHNELL)
    assert 3.0 <= task.gets[0] <= 4.3 and len(task.gets) <= 2


async def test_an_unknown_kind_falls_back_to_the_capped_geometric_schedule():
    time = FakeTime()
    planner = planner_for(time)
    kind = TaskKind.of("Qubico/flux2-pro", "txt2img", {})
    assert planner.stats.estimate(kind) is None
    task = FakeTask(time, queue=0.5, run=20)
    await run(planner, task, kind)
    gaps = [round(b - a, 3) for a, b in itertools.pairwise([0.0, *task.gets])]
    assert gaps[:5] == [1.0, 1.0, 1.5, 2.25, 3.0] and set(gaps[5:]) == {3.0}


async def test_knowing_started_at_shifts_the_polls_by_the_queue_time():
    """Only the remaining run time is uncertain once PiAPI says when the run started."""

    async def polls_after_seeing_processing(queue: float) -> list[float]:
        time = FakeTime()
        planner = planner_for(time)
        learned(planner, DEV, [19.0, 19.5, 20.0, 20.5, 21.0], queue=1.0)
        task = FakeTask(time, queue=queue, run=20.0)
        time.now = queue + 0.5  # we look once, just after the start
        await task.fetch("t")
        planner.count_poll("t")
        schedule = planner.schedule("t", DEV)
        seen = task.record()
        assert seen.status == "processing" and seen.started_at is not None
        return [round(schedule.next_poll(seen, now=time.now, scheduled=time.now), 3)]

    early, late = await polls_after_seeing_processing(1.0), await polls_after_seeing_processing(6.0)
    assert late[0] - early[0] == pytest.approx(5.0, abs=0.01)


async def test_still_pending_means_the_run_has_not_started():
    time = FakeTime()
    planner = planner_for(time)
    learned(planner, DEV, [19.0, 19.5, 20.0, 20.5, 21.0], queue=1.0)
    task = FakeTask(time, queue=10.0, run=20.0)
    time.now = 9.0
    pending = task.record()
    assert pending.status == "pending"
    planner.count_poll("t")
    due = planner.schedule("t", DEV).next_poll(pending, now=time.now, scheduled=time.now)
    assert due >= 9.0 + 17  # at least most of a run is still ahead


def test_piapis_clock_is_read_through_the_create_with_the_shortest_round_trip():
    """A create pins PiAPI's clock only to within half its round trip; a burst of slow, lopsided
    round trips (answers queued on a busy machine) must not drag the estimate after it."""
    time = FakeTime()
    planner = planner_for(time)
    ahead = 0.5  # PiAPI's clock runs this far ahead of ours
    wall = EPOCH.timestamp()

    def create(sent: float, stamped: float, answered: float) -> None:
        record = TaskRecord(task_id="t", status="pending", created_at=EPOCH + timedelta(seconds=stamped + ahead))
        planner.note_created(record, DEV, sent_wall=wall + sent, answered_wall=wall + answered)

    def offset_seen() -> float:  # how far ahead of our clock a PiAPI moment is placed
        return planner.to_local(EPOCH) - time.now

    create(sent=0.0, stamped=0.01, answered=0.02)  # a quick one: pins the offset to +-10 ms
    assert offset_seen() == pytest.approx(-ahead, abs=0.01)
    for k in range(10):  # then slow, lopsided ones: stamped soon after sending, answered late
        create(sent=1.0 + k, stamped=1.02 + k, answered=1.4 + k)
    assert offset_seen() == pytest.approx(-ahead, abs=0.01)  # the latest alone would say 180 ms off
    for k in range(planner.CLOCK_SAMPLES):  # the quick one ages out: the best of the recent ones rules
        create(sent=20.0 + k, stamped=20.05 + k, answered=20.1 + k)
    assert offset_seen() == pytest.approx(-ahead, abs=0.01)
    for k in range(planner.CLOCK_SAMPLES):  # PiAPI's clock steps 2 s ahead: followed once the old samples age out
        create(sent=60.0 + k, stamped=60.05 + k + 2.0, answered=60.1 + k)
    assert offset_seen() == pytest.approx(-ahead - 2.0, abs=0.01)


# --- budget, tail and bounds -----------------------------------------------------------------


async def test_the_budget_caps_planned_gets_and_the_tail_slows_down_past_the_expected_end():
    time = FakeTime()
    planner = planner_for(time, budget=4)
    learned(planner, DEV, [19.0, 19.5, 20.0, 20.5, 21.0])
    task = FakeTask(time, queue=1.0, run=300.0)  # stuck far past anything seen
    await run(planner, task, DEV)
    gaps = [b - a for a, b in itertools.pairwise(task.gets)]
    tail = gaps[4:]
    assert all(g >= TAIL_FLOOR_SECONDS - 1e-6 for g in tail)
    assert all(b >= a - 1e-6 for a, b in itertools.pairwise(tail))  # never speeds up again
    assert max(gaps) <= TAIL_CAP_SECONDS + 1e-6
    assert len(task.gets) < 4 + 300 / TAIL_CAP_SECONDS + 10
    assert min(gaps) >= MIN_GAP_SECONDS - 1e-6


async def test_the_budget_is_per_task_across_waits():
    time = FakeTime()
    planner = planner_for(time, budget=4)
    learned(planner, DEV, [19.0, 19.5, 20.0, 20.5, 21.0])
    task = FakeTask(time, queue=1.0, run=100.0)
    await run(planner, task, DEV, timeout=25)
    assert planner.spent("t") == len(task.gets)
    first = len(task.gets)
    record = task.record()
    due = planner.schedule("t", DEV).next_poll(record, now=time.now, scheduled=time.now)
    assert due - time.now >= TAIL_FLOOR_SECONDS  # a new wait does not get a fresh budget
    assert first >= 4


async def test_a_task_past_its_expected_end_spends_its_last_planned_poll_in_proportion_to_its_age():
    time = FakeTime()
    planner = planner_for(time, budget=4)
    learned(planner, DEV, [19.0, 19.5, 20.0, 20.5, 21.0])
    task = FakeTask(time, queue=1.0, run=300.0)
    record = task.record()
    planner.note_created(record, DEV, sent_wall=EPOCH.timestamp(), answered_wall=EPOCH.timestamp())
    for _ in range(3):
        planner.count_poll("t")
    time.now = 30.0  # ~1.5x the expected end, one planned poll left
    late = task.record()
    due = planner.schedule("t", DEV).next_poll(late, now=time.now, scheduled=time.now)
    assert due - time.now <= LATE_SHARE * time.now + 1e-6  # not at the conditional p98, a third of its age away
    time.now = 12.0  # before the expected end, the plan alone decides
    early = task.record()
    assert planner.schedule("t", DEV).next_poll(early, now=12.0, scheduled=12.0) - 12.0 > LATE_SHARE * 12.0


def seen_running(planner: PollPlanner, task_id: str, *, ran: float, at: float, kind: TaskKind = DEV) -> TaskRecord:
    """`task_id`, created at 0, is seen by a GET sent at `at`, running for `ran` seconds."""
    record = TaskRecord(
        task_id=task_id, status="processing", created_at=EPOCH, started_at=EPOCH + timedelta(seconds=at - ran)
    )
    planner.note_created(record, kind, sent_wall=EPOCH.timestamp(), answered_wall=EPOCH.timestamp())
    planner.observe(task_id, kind, record, at)
    return record


def test_tasks_still_running_count_as_lasting_at_least_as_long_as_they_have_run():
    """A batch's first tasks to finish are its quickest: refitted with the rest, still running,
    the kind does not look quicker than it is."""
    stats = TimingStats()
    for seconds in [19.0, 19.5, 20.0, 20.5, 21.0]:
        stats.add(DEV, Sample(queue=1.0, run=seconds))
    plain = stats.estimate(DEV)
    assert plain is not None and plain.learned
    outlasting = stats.estimate_with(DEV, [Running(queued=1.0, ran=24.0)] * 10)
    assert outlasting is not None and outlasting.run.median > 22.0 > plain.run.median * 1.05
    young = stats.estimate_with(DEV, [Running(queued=1.0, ran=5.0)] * 10)
    assert young is not None and young.run.median == pytest.approx(plain.run.median, rel=0.02)  # says nothing new
    queued = stats.estimate_with(DEV, [Running(queued=8.0)] * 10)  # still pending after 8 s
    assert queued is not None and queued.queue.median > 4 * plain.queue.median
    assert queued.run == plain.run
    cold = TimingStats()
    assert cold.estimate_with(DEV, [Running(queued=1.0, ran=24.0)]) == cold.estimate(DEV)  # priors stay as they are


def test_one_stuck_task_does_not_stretch_its_kind_but_a_slow_majority_does():
    stats = TimingStats()
    for seconds in [19.0, 19.5, 20.0, 20.5, 21.0]:
        stats.add(DEV, Sample(queue=1.0, run=seconds))
    plain = stats.estimate(DEV)
    normal = [Running(queued=1.0, ran=10.0)] * 9
    stuck = stats.estimate_with(DEV, [*normal, Running(queued=1.0, ran=300.0)])
    assert stuck is not None and stuck.run.quantile(0.98) == pytest.approx(plain.run.quantile(0.98), rel=0.05)
    slow_day = stats.estimate_with(DEV, [Running(queued=1.0, ran=40.0)] * 6 + normal[:4])
    assert slow_day is not None and slow_day.run.median > 1.5 * plain.run.median


def test_the_censored_fit_finds_the_batch_its_quickest_finished_tasks_came_from():
    """64 tasks of a kind that takes ~20 s: 3 have finished, the other 61 run past the third.
    The fit must land near 20 s, not near the three quick ones (~13-15 s), and grow steadily as
    the running tasks' bounds move out."""
    rng = random.Random(3)
    medians, naive = [], []
    for _ in range(20):
        durations = sorted(math.exp(math.log(20.0) + 0.25 * rng.gauss(0, 1)) for _ in range(64))
        medians.append(_fit_median(durations[:3], [durations[3]] * 61))
        naive.append(_fit_median(durations[:3], []))
    assert 17.0 <= statistics.median(medians) <= 23.0
    assert statistics.median(naive) < 16.0
    along = [_fit_median([19.0, 20.0, 21.0], [bound] * 5) for bound in (25.0, 40.0, 80.0, 160.0, 320.0, 1000.0)]
    assert all(math.isfinite(m) for m in along) and along == sorted(along)


def _fit_median(finished: list[float], running: list[float]) -> float:
    stats = TimingStats()
    for seconds in finished:
        stats.add(DEV, Sample(queue=1.0, run=seconds))
    estimate = stats.estimate_with(DEV, [Running(queued=1.0, ran=r) for r in running])
    assert estimate is not None
    return estimate.run.median


def test_the_rest_of_a_batch_plan_with_what_its_finished_and_running_tasks_show():
    time = FakeTime()
    planner = planner_for(time)
    learned(planner, DEV, [19.0, 19.5, 20.0, 20.5, 21.0])
    start = planner.stats.estimate(DEV)
    for i in range(10):  # a batch on a slower day: all ten still running 25 s in
        seen_running(planner, f"b{i}", ran=24.0, at=25.0)
    time.now = 25.0
    refit = planner.current(DEV, start, now=time.now)
    assert refit is not None and refit.run.median > 1.1 * start.run.median
    began_cold = TimingStats().estimate(DEV)  # a task that began before the kind was learned keeps its plan
    assert began_cold is not None and planner.current(DEV, began_cold, now=time.now) is began_cold
    # The schedule reads the refit at each poll: a task of the batch plans further out than at its start.
    later = planner.schedule("b1", DEV)
    later.next_poll(None, now=time.now, scheduled=time.now)
    assert later.estimate == refit
    for i in range(10):  # they all finish at 27 s; a task read twice (flux_get_task) is still one sample
        done = TaskRecord(
            task_id=f"b{i}",
            status="completed",
            created_at=EPOCH,
            started_at=EPOCH + timedelta(seconds=1),
            ended_at=EPOCH + timedelta(seconds=27),
        )
        planner.learn(f"b{i}", done)
        planner.learn(f"b{i}", done)
    assert len(planner.stats.samples(DEV)) == 15
    running_again = TaskRecord(task_id="b0", status="processing", created_at=EPOCH, started_at=EPOCH)
    planner.observe("b0", DEV, running_again, 26.0)  # a late answer for a finished task: ignored
    time.now += planner.REFIT_SECONDS
    assert planner.current(DEV, start, now=time.now) == planner.stats.estimate(DEV)  # nothing running


async def test_only_fresh_states_teach_failed_polls_and_the_ledger_do_not():
    time = FakeTime()
    task = FakeTask(time, queue=1.0, run=5.0)
    calls = 0

    async def flaky(task_id: str) -> TaskRecord:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise errors.UpstreamError("PiAPI answered 502")
        return await task.fetch(task_id)

    seen: list[tuple[str, float]] = []
    stale = task.record()  # as the ledger had it at 0 s
    await wait_for_task(
        flaky,
        "t",
        timeout=60,
        policy=BackoffPolicy(first=(2.0,), factor=1.0, cap=2.0),
        clock=time.clock,
        sleep=time.sleep,
        last_known=stale,
        on_seen=lambda record, at: seen.append((record.status, at)),
    )
    # Polls at 0, 2 (failed), 4, 6: each state seen comes with when its GET was sent; none for the failure.
    assert seen == [("pending", 0.0), ("processing", 4.0), ("completed", 6.0)]


def test_statistics_are_bounded_and_robust_to_outliers():
    stats = TimingStats()
    for i in range(MAX_SAMPLES + 50):
        stats.add(DEV, Sample(queue=1.0, run=20.0 + (i % 5) * 0.1))
    assert len(stats.samples(DEV)) == MAX_SAMPLES
    stats.add(DEV, Sample(queue=1.0, run=2000.0))  # one wild outlier
    estimate = stats.estimate(DEV)
    assert estimate is not None and 19.5 < estimate.run.median < 20.7 and estimate.run.sigma < 0.1
    for n in range(MAX_KINDS + 10):
        stats.add(TaskKind("m", "txt2img", n, 1), Sample(queue=1, run=1))
    assert stats.kinds == MAX_KINDS
    assert stats.samples(DEV) == [] and not stats.estimate(DEV).learned  # the oldest kind went first


def test_kinds_bucket_pixels_and_batches():
    one = TaskKind.of("Qubico/flux1-schnell", "txt2img", {"width": 1024, "height": 1024})
    assert one == TaskKind.of("Qubico/flux1-schnell", "txt2img", {"width": 1000, "height": 1100})
    assert one.pixel_bucket == 0 and one.batch == 1
    assert TaskKind.of("Qubico/flux1-schnell", "txt2img", {"width": 512, "height": 512}).pixel_bucket == -2
    assert TaskKind.of("Qubico/flux1-schnell", "txt2img", {"batch_size": 4}).batch == 4
    assert TaskKind.of("Qubico/flux1-schnell", "txt2img", None) == one  # no size given: PiAPI's 1 MP default


# --- heartbeats, drift, pushes ------------------------------------------------------------------


async def test_heartbeats_come_from_the_last_known_state_and_never_cost_a_get():
    async def gets(heartbeat: float) -> tuple[int, list[float]]:
        time = FakeTime()
        planner = planner_for(time)
        learned(planner, DEV, [30.0, 31.0, 32.0, 33.0, 34.0])
        task = FakeTask(time, queue=1.0, run=32.0)
        beats: list[float] = []

        async def on_update(record, elapsed):
            beats.append(elapsed)

        await run(planner, task, DEV, heartbeat_seconds=heartbeat, on_update=on_update)
        return len(task.gets), beats

    quiet, _ = await gets(1e9)
    chatty, beats = await gets(2.0)
    assert chatty == quiet
    assert max(b - a for a, b in itertools.pairwise(beats)) <= 2.0 + 1e-9 and len(beats) >= 16


async def test_sleeps_are_measured_from_when_each_poll_was_scheduled():
    time = FakeTime()
    task = FakeTask(time, queue=0.0, run=7.0, get_seconds=0.4)  # every GET takes 0.4 s to answer
    await wait_for_task(
        task.fetch, "t", timeout=60, policy=BackoffPolicy(), clock=time.clock, sleep=time.sleep, initial=task.record()
    )
    assert task.gets == [1.0, 2.0, 3.5, 5.75, 8.75]  # not 1.0, 2.4, 4.3, ...


class FakeInbox:
    def __init__(self, time: FakeTime, push_at: float, record: TaskRecord) -> None:
        self.time, self.push_at, self.pending = time, push_at, record

    async def wait(self, sleep, seconds):
        if self.pending is not None and self.time.now + seconds >= self.push_at:
            self.time.now = max(self.time.now, self.push_at)
            return
        await sleep(seconds)

    def take(self):
        if self.pending is not None and self.time.now >= self.push_at:
            record, self.pending = self.pending, None
            return record
        return None


async def test_a_pushed_update_ends_the_wait_at_once_without_a_get():
    time = FakeTime()
    planner = planner_for(time)
    learned(planner, DEV, [19.0, 19.5, 20.0, 20.5, 21.0])
    task = FakeTask(time, queue=1.0, run=15.0)
    done = TaskRecord(task_id="t", status="completed", image_urls=["u"])
    record = await run(planner, task, DEV, inbox=FakeInbox(time, 16.0, done))
    assert record is done and time.now == 16.0 and task.gets == []


async def test_task_events_wake_only_the_waiters_of_that_task():
    import anyio

    events = TaskEvents()
    done = TaskRecord(task_id="a", status="completed")
    with events.subscribe("a") as inbox_a, events.subscribe("b") as inbox_b:
        relayed: list[str] = []
        events.add_listener(lambda record: relayed.append(record.task_id))
        with anyio.fail_after(2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(inbox_a.wait, anyio.sleep, 30)
                await anyio.sleep(0)
                assert events.publish(done) is True
        assert inbox_a.take() is done and inbox_b.take() is None and relayed == ["a"]
        assert events.publish(TaskRecord(task_id="a", status="processing")) is True
        assert inbox_a.take() is None  # nothing moves a finished task back
    assert events.publish(done) is False and not events.waiting("a")


# --- learning from and persisting to the ledger ------------------------------------------------


async def test_timings_are_learned_from_finished_tasks_and_survive_a_restart(tmp_path):
    ledger = TaskLedger(tmp_path / "tasks.sqlite3")
    for i in range(6):
        at = EPOCH + timedelta(minutes=i)
        await ledger.record(
            TaskRecord(
                task_id=f"t{i}",
                model="Qubico/flux1-dev",
                task_type="txt2img",
                status="completed",
                created_at=at,
                started_at=at + timedelta(seconds=1.5),
                ended_at=at + timedelta(seconds=21.5),
            )
        )
    await ledger.record(TaskRecord(task_id="running", model="Qubico/flux1-dev", task_type="txt2img"))

    restarted = PollPlanner()  # a new process: nothing in memory
    restarted.learn_from(await TaskLedger(tmp_path / "tasks.sqlite3").recent_timings())
    samples = restarted.stats.samples(DEV)
    assert len(samples) == 6 and samples[0] == Sample(queue=1.5, run=20.0)
    finished = (await ledger.get("t0")).record
    restarted.learn("t0", finished, DEV)  # read again after the restart: already one of the six
    assert len(restarted.stats.samples(DEV)) == 6
    estimate = restarted.stats.estimate(DEV)
    assert estimate is not None and estimate.learned and estimate.run.median == pytest.approx(20.0, rel=0.01)
    assert len(await ledger.recent_timings(limit=2)) == 2


def test_the_pace_seen_on_one_kind_scales_the_priors_of_kinds_not_yet_learned():
    """The simulator (or a slow day at PiAPI) shows up on the first finished task of any kind."""
    stats = TimingStats()
    before = stats.estimate(DEV)
    assert before is not None and stats.pace == 1.0
    schnell = TaskKind.of("Qubico/flux1-schnell", "txt2img", {})
    stats.add(schnell, Sample(queue=0.08, run=0.35))  # ten times faster than its prior (0.8 + 3.5 s)
    assert stats.pace == pytest.approx(0.1)
    after = stats.estimate(DEV)
    assert after is not None and not after.learned
    assert after.expected_total() == pytest.approx(before.expected_total() * 0.1)
    for _ in range(40):
        stats.add(schnell, Sample(queue=1000, run=100000))  # absurdly slow: bounded
    bounded = stats.estimate(DEV)
    assert bounded is not None and bounded.expected_total() == pytest.approx(before.expected_total() * 20)


@example(queue=(-0.52, 0.11), run=(0.0, 0.89), p=0.98, queued_for=0.0, extra=29.7)  # far into the tail
@given(
    queue=st.tuples(st.floats(-2.0, 1.5), st.floats(0.05, 2.0)),
    run=st.tuples(st.floats(-1.0, 3.5), st.floats(0.02, 2.0)),
    p=st.sampled_from([0.999, 0.98, 0.5, 0.98 / 3, 0.98 / 7, 0.2]),
    queued_for=st.floats(0.0, 40.0),
    extra=st.floats(0.0, 30.0),
)
def test_a_planned_poll_is_the_conditional_quantile_of_the_finish_to_within_a_millisecond(
    queue: tuple[float, float], run: tuple[float, float], p: float, queued_for: float, extra: float
) -> None:
    """While a task is queued, its finish is queue + run: the planner's quantile of it, given the
    task is still queued `queued_for` s in and unfinished at `elapsed`, matches a plain bisection on
    the same mixture (24 points of the conditional queue time) to within 1 ms above."""
    q, r = LogNormal(*queue), LogNormal(*run)
    elapsed = queued_for + extra
    low = q.cdf(queued_for)
    points = [max(queued_for, q.quantile(low + (j + 0.5) / 24 * (1 - low))) for j in range(24)]
    normal = statistics.NormalDist()

    def cdf(t: float) -> float:
        return sum(normal.cdf((math.log(t - x) - r.mu) / r.sigma) for x in points if t > x) / 24

    done = cdf(elapsed)
    if done >= 1 - 1e-9:
        return
    target = done + p * (1 - done)
    lo, hi = elapsed, elapsed + 1.0
    while cdf(hi) < target:
        hi = elapsed + 2 * (hi - elapsed)
    while hi - lo > 1e-7:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < target else (lo, mid)
    planned = Estimate(q, r, samples=5).completion_quantile(p, queued_for=queued_for, elapsed=elapsed)
    assert lo - 1e-6 <= planned <= hi + 1e-3 + 1e-6
