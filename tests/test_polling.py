"""wait_for_task with a fake clock: exact schedules, live records at the deadline, heartbeats."""

from __future__ import annotations

import itertools

import pytest

from flux_mcp import errors
from flux_mcp.polling import BackoffPolicy, wait_for_task
from flux_mcp.record import TaskRecord

pytestmark = pytest.mark.anyio


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 3))
        self.now += seconds


def timeline(time: FakeTime, steps: list[tuple[float, str]]):
    """A fetch that reports the status scheduled for the current fake time."""
    calls: list[float] = []

    async def fetch(task_id: str) -> TaskRecord:
        calls.append(time.now)
        status = [s for at, s in steps if at <= time.now][-1]
        return TaskRecord(task_id=task_id, status=status, image_urls=["u"] if status == "completed" else [])

    return fetch, calls


def test_default_policy_starts_quick_then_grows_to_a_cap():
    policy = BackoffPolicy()
    assert [policy.interval(i) for i in range(7)] == [1.0, 1.0, 1.5, 2.25, 3.0, 3.0, 3.0]


async def test_completes_and_reports_each_status_change_once():
    time = FakeTime()
    fetch, calls = timeline(time, [(0, "pending"), (2, "processing"), (5, "completed")])
    updates: list[tuple[str, float]] = []

    async def on_update(record, elapsed):
        updates.append((record.status, elapsed))

    record = await wait_for_task(fetch, "t", timeout=60, on_update=on_update, clock=time.clock, sleep=time.sleep)
    assert record.status == "completed"
    assert [s for s, _ in updates] == ["pending", "processing", "completed"]
    assert calls == [0, 1.0, 2.0, 3.5, 5.75]  # 1, 1, 1.5, 2.25 between polls
    assert time.sleeps == [1.0, 1.0, 1.5, 2.25]


async def test_returns_the_live_record_at_the_deadline_instead_of_raising():
    time = FakeTime()
    fetch, _ = timeline(time, [(0, "processing")])
    record = await wait_for_task(fetch, "t", timeout=5, clock=time.clock, sleep=time.sleep)
    assert record.status == "processing" and record.task_id == "t"
    assert time.now == pytest.approx(5.0)  # never sleeps past the deadline


async def test_zero_timeout_polls_once():
    time = FakeTime()
    fetch, calls = timeline(time, [(0, "pending")])
    record = await wait_for_task(fetch, "t", timeout=0, clock=time.clock, sleep=time.sleep)
    assert record.status == "pending" and calls == [0]


async def test_heartbeat_at_least_every_interval_while_status_is_unchanged():
    time = FakeTime()
    fetch, _ = timeline(time, [(0, "processing"), (40, "completed")])
    updates: list[float] = []

    async def on_update(record, elapsed):
        updates.append(elapsed)

    await wait_for_task(
        fetch, "t", timeout=60, on_update=on_update, heartbeat_seconds=10, clock=time.clock, sleep=time.sleep
    )
    gaps = [b - a for a, b in itertools.pairwise(updates)]
    assert max(gaps) <= 10.0 + 1e-9 and len(updates) >= 5


async def test_a_failing_progress_callback_never_aborts_the_wait():
    time = FakeTime()
    fetch, _ = timeline(time, [(0, "processing"), (3, "completed")])

    async def broken(record, elapsed):
        raise RuntimeError("client went away")

    record = await wait_for_task(fetch, "t", timeout=60, on_update=broken, clock=time.clock, sleep=time.sleep)
    assert record.status == "completed"


async def test_transient_poll_errors_are_tolerated_but_fatal_ones_raise():
    time = FakeTime()
    answers = iter([errors.NetworkError("blip"), TaskRecord(task_id="t", status="completed")])

    async def flaky(task_id):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert (await wait_for_task(flaky, "t", timeout=60, clock=time.clock, sleep=time.sleep)).status == "completed"

    async def unauthorised(task_id):
        raise errors.AuthError("bad key")

    with pytest.raises(errors.AuthError):
        await wait_for_task(unauthorised, "t", timeout=60, clock=time.clock, sleep=time.sleep)


async def test_an_initial_terminal_record_returns_without_polling():
    time = FakeTime()
    fetch, calls = timeline(time, [(0, "processing")])
    done = TaskRecord(task_id="t", status="failed")
    assert await wait_for_task(fetch, "t", timeout=60, initial=done, clock=time.clock, sleep=time.sleep) is done
    assert calls == []


async def test_with_the_create_response_in_hand_the_first_get_waits_one_interval():
    time = FakeTime()
    fetch, calls = timeline(time, [(0, "pending"), (1.5, "completed")])
    updates: list[tuple[str, float]] = []

    async def on_update(record, elapsed):
        updates.append((record.status, elapsed))

    created = TaskRecord(task_id="t", status="pending")
    record = await wait_for_task(
        fetch, "t", timeout=60, initial=created, on_update=on_update, clock=time.clock, sleep=time.sleep
    )
    assert record.status == "completed"
    assert calls == [1.0, 2.0]  # no GET at t=0: the create response already said "pending"
    assert updates == [("pending", 0.0), ("completed", 2.0)]


async def test_with_the_create_response_and_no_time_there_is_no_get_at_all():
    time = FakeTime()
    fetch, calls = timeline(time, [(0, "pending")])
    created = TaskRecord(task_id="t", status="pending")
    assert await wait_for_task(fetch, "t", timeout=0, initial=created, clock=time.clock, sleep=time.sleep) is created
    assert calls == []


async def test_a_slow_poll_never_carries_the_wait_far_past_its_deadline():
    import anyio

    from flux_mcp import polling

    calls = 0

    async def slow_fetch(task_id):
        nonlocal calls
        calls += 1
        await anyio.sleep(30)  # e.g. a GET stuck in Retry-After backoff
        return TaskRecord(task_id=task_id, status="completed")

    created = TaskRecord(task_id="t", status="pending")
    started = anyio.current_time()
    record = await wait_for_task(slow_fetch, "t", timeout=0.2, initial=created)
    assert record is created and calls == 1
    assert anyio.current_time() - started < 0.2 + polling.FINAL_POLL_GRACE_SECONDS + 0.5
