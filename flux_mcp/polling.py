"""Waiting for a PiAPI task: polls placed where completion is likely, and a deadline that never
loses the task.

`wait_for_task` polls until the task is terminal or the deadline passes, and then returns the
*current* record either way: a task still running at the deadline is alive and resumable, not
an error. `on_update` is called on every status change and as a heartbeat at least every
`heartbeat_seconds`, with the elapsed time, so the MCP layer can turn it into real progress. A
heartbeat reports the last known state and never costs a GET. A failing `on_update` is logged
and ignored: describing a paid task must never abort it. Each poll is placed at an absolute time
when it is scheduled, so the time a GET takes to answer never pushes the next one later. An
`Inbox` (see `flux_mcp.push`) lets a pushed update (a webhook) end a sleep at once.

Where the polls go is a `Schedule`:
- `LearnedSchedule` (the default, built by `PollPlanner`): from the kind's queue and run
  distributions (`flux_mcp.timing`), conditioned on what is known now (still pending some time
  after `created_at`, or processing since `started_at`), the remaining polls of a per-task GET
  budget go at equal steps of completion probability up to the 98th percentile, which is where they
  detect completion soonest for their number. For a task that began with its kind learned, the
  estimate is re-read at each poll, refitted with the tasks of the kind still running here (each
  known, from a fresh answer, to take at least as long as it had run then): the first tasks of a
  batch to finish re-place the polls of the rest, without teaching them that the kind is as quick
  as its quickest. Short kinds get up to 1.5x the budget (`planned_budget`): our own fixed work on
  each result is a larger share of their wait. A task already past its expected end spends its last
  planned poll no more than `LATE_SHARE` of its age later (1 s at least), not at the conditional
  98th percentile. Past that (an outlier, or the budget spent) the tail polls at growing intervals
  from a floor, so a task far past its expected end slows down instead of hammering PiAPI. While a
  kind has no learned samples yet (the priors only, scaled by the pace seen on other kinds), the
  budget is one GET per `COLD_SECONDS_PER_GET` of expected time, at least `COLD_MIN_BUDGET` (within
  the configured budget), and the task keeps this plan even if the kind is learned meanwhile; a
  kind expected to take `COLD_LONG_SECONDS` or more waits no longer than twice the task's age (at
  least `COLD_GAP_SECONDS`, less on a backend seen to run faster than the priors), so a backend far
  faster than the prior is still noticed soon; a short kind's planned polls are seconds apart
  anyway. A kind with no estimate at all uses `FALLBACK`, a capped geometric schedule. With push
  delivery, polling is a sparse safety net: one poll near the 90th percentile, then the tail (while
  cold, no gap longer than the task's age, twice it for a long kind, and at least
  `COLD_PUSH_GAP_SECONDS`).
- `PolicySchedule`: a plain interval policy (`BackoffPolicy`), for tests and callers that want
  fixed behaviour.

Clock and sleep are injected, so tests run whole schedules in milliseconds.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import anyio

from flux_mcp import errors
from flux_mcp.record import TaskRecord
from flux_mcp.settings import DEFAULT_POLL_BUDGET
from flux_mcp.timing import MAX_KINDS, Estimate, Running, TaskKind, TimingStats

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
OnUpdate = Callable[[TaskRecord, float], Awaitable[None]]
Fetch = Callable[[str], Awaitable[TaskRecord]]

FINAL_POLL_GRACE_SECONDS = 1.0
FINAL_POLL_FRESH_SECONDS = 1.0
MIN_GAP_SECONDS = 0.05  # never two GETs for one task closer than this
TAIL_FLOOR_SECONDS = 1.0
TAIL_CAP_SECONDS = 15.0
TAIL_GROWTH = 1.5
P_LAST = 0.98  # the planned polls cover completion up to this probability; the tail does the rest
P_PUSH = 0.9  # with push delivery, the one safety-net poll
COLD_SECONDS_PER_GET = 3.0
COLD_MIN_BUDGET = 3
COLD_GAP_SECONDS = 2.0
COLD_LONG_SECONDS = 10.0  # while cold, a kind expected to take this long or more has its gaps capped by its age
LATE_SHARE = 0.1  # past its expected end, a task's last planned poll waits at most this share of its age (>= 1 s)
COLD_PUSH_GAP_SECONDS = 4.0
OWN_SECONDS = 0.05  # our own work on every result, whatever the task: the GET's round trip, saving, the thumbnail
LAG_SHARE = 0.03  # the detection lag aimed at, as a share of the expected duration
MAX_BUDGET_FACTOR = 1.5
_STATUS_RANK = {"pending": 0, "processing": 1}


class PollPolicy(Protocol):
    def interval(self, attempt: int) -> float:
        """Seconds to wait before poll number `attempt + 1` (attempt 0 follows the first poll)."""
        ...


@dataclass(frozen=True)
class BackoffPolicy:
    """Quick first checks, then growing intervals capped at a few seconds (1, 1, 1.5, 2.25, 3, 3, ...)."""

    first: Sequence[float] = (1.0, 1.0)
    factor: float = 1.5
    cap: float = 3.0

    def interval(self, attempt: int) -> float:
        if attempt < len(self.first):
            return self.first[attempt]
        last = self.first[-1] if self.first else 1.0
        return min(self.cap, last * self.factor ** (attempt - len(self.first) + 1))


FALLBACK = BackoffPolicy()
DEFAULT_POLICY = FALLBACK  # kept for callers that name a plain policy


class Schedule(Protocol):
    def next_poll(self, record: TaskRecord | None, *, now: float, scheduled: float) -> float:
        """When to poll next (clock time), given the latest record seen at `now`; `scheduled` is
        when the poll that produced it was due (or the wait's start)."""
        ...


class Inbox(Protocol):
    """Pushed updates for one task (see `flux_mcp.push.TaskEvents.subscribe`)."""

    async def wait(self, sleep: Sleep, seconds: float) -> None:
        """Sleep up to `seconds`, or less if an update arrives."""
        ...

    def take(self) -> TaskRecord | None:
        """The newest pushed record not yet taken, if any."""
        ...


@dataclass
class PolicySchedule:
    """A plain interval policy: poll n+1 is due `policy.interval(n)` after poll n was due."""

    policy: PollPolicy = FALLBACK
    attempt: int = 0

    def next_poll(self, record: TaskRecord | None, *, now: float, scheduled: float) -> float:
        due = scheduled + self.policy.interval(self.attempt)
        self.attempt += 1
        return due


# --- the learned schedule ------------------------------------------------------------------------


@dataclass
class LearnedSchedule:
    """Polls for one task, from its kind's estimate; see the module docstring."""

    estimate: Estimate | None
    budget: int
    to_local: Callable[[datetime], float]  # PiAPI's timestamps on our clock
    spent: Callable[[], int]  # GETs spent on this task so far (across waits)
    push: bool = False
    pace: float = 1.0  # observed / prior durations so far (`TimingStats.pace`): shortens cold gaps
    current: Callable[[float], Estimate | None] | None = None  # the kind's estimate as of now (`PollPlanner.current`)
    _fallback: PolicySchedule = field(default_factory=PolicySchedule)
    _tail_gap: float = 0.0  # grows from TAIL_FLOOR_SECONDS once the planned polls are spent

    def next_poll(self, record: TaskRecord | None, *, now: float, scheduled: float) -> float:
        if self.current is not None:
            self.estimate = self.current(now)
        due = self._plan(record, now=now, scheduled=scheduled)
        if self.estimate is not None and not self.estimate.learned and record is not None and record.created_at:
            due = min(due, now + self._cold_gap(self.estimate, age=now - self.to_local(record.created_at)))
        return max(due, now + MIN_GAP_SECONDS if self.spent() else now)

    def _cold_gap(self, estimate: Estimate, *, age: float) -> float:
        """The longest wait while the kind has its prior only, so that a backend far faster than the
        prior (the simulator, a quiet hour) is still noticed soon: for a long kind, no gap longer
        than twice the task's age (at least `COLD_GAP_SECONDS`); a short kind's planned polls are
        only seconds apart anyway. With push (the polls a safety net), at least
        `COLD_PUSH_GAP_SECONDS`, and a short kind's gaps no longer than its age."""
        long_kind = estimate.expected_total() >= COLD_LONG_SECONDS
        if not (long_kind or self.push):
            return math.inf
        floor = (COLD_PUSH_GAP_SECONDS if self.push else COLD_GAP_SECONDS) * min(1.0, self.pace)
        return max(floor, (2.0 if long_kind else 1.0) * age)

    def _plan(self, record: TaskRecord | None, *, now: float, scheduled: float) -> float:
        if self.estimate is None or record is None or record.created_at is None:
            return self._fallback.next_poll(record, now=now, scheduled=scheduled)
        if record.status == "processing" and record.started_at is not None:
            base = self.to_local(record.started_at)
            known: dict[str, float] = {"running_for": max(0.0, now - base)}
        else:
            base = self.to_local(record.created_at)
            elapsed = max(0.0, now - base)
            known = {"queued_for": elapsed if record.status == "pending" else 0.0, "elapsed": elapsed}
        p_last = P_PUSH if self.push else P_LAST
        last = base + self.estimate.completion_quantile(p_last, **known)
        remaining = 1 if self.push else self.budget - self.spent()
        if remaining <= 0 or now >= last - MIN_GAP_SECONDS / 2:
            return self._tail(now, scheduled)
        planned = base + self.estimate.completion_quantile(p_last / remaining, **known)
        age = now - self.to_local(record.created_at)
        if remaining == 1 and not self.push and age >= self.estimate.expected_total():
            # The last planned poll of a task already past its expected end: at the conditional p98
            # it could be a third of the task's age away; a tenth of it keeps the lag in proportion.
            planned = min(planned, now + max(TAIL_FLOOR_SECONDS, LATE_SHARE * age))
        return planned

    def _tail(self, now: float, scheduled: float) -> float:
        self._tail_gap = min(TAIL_CAP_SECONDS, self._tail_gap * TAIL_GROWTH) if self._tail_gap else TAIL_FLOOR_SECONDS
        return max(now, scheduled) + self._tail_gap


class PollPlanner:
    """Per process: the timing statistics, the GET budget, and each task's GETs and clock anchor.

    `to_local` maps a PiAPI timestamp onto the monotonic clock through the wall clock, corrected
    by the offset between PiAPI's clock and ours measured at our own creates (`note_created`).
    Each create pins that offset only to within half its round trip, and a busy moment (a burst of
    creates, a loaded machine) stretches round trips to hundreds of milliseconds, more on the
    way back than on the way in: so, as NTP does, the offset is taken from the create with the
    shortest round trip among the last `CLOCK_SAMPLES`, not from the latest one.
    Per-task state (GETs spent, kinds, the running tasks' last seen states, the tasks learned) is
    bounded (the most recent `MAX_TASKS` of each).
    """

    MAX_TASKS = 1024
    CLOCK_SAMPLES = 32
    REFIT_SECONDS = 0.25

    def __init__(
        self,
        stats: TimingStats | None = None,
        *,
        budget: int = DEFAULT_POLL_BUDGET,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
    ) -> None:
        self.stats = stats or TimingStats()
        self.budget = budget
        self._clock = clock
        self._wall = wall
        self._skew = 0.0  # PiAPI's clock minus ours, seconds
        self._clock_samples: deque[tuple[float, float]] = deque(maxlen=self.CLOCK_SAMPLES)  # (round trip, skew)
        self._spent: OrderedDict[str, int] = OrderedDict()
        self._kinds: OrderedDict[str, TaskKind] = OrderedDict()
        self._running: OrderedDict[str, tuple[TaskKind, Running]] = OrderedDict()  # as last seen
        self._learned: OrderedDict[str, bool] = OrderedDict()  # task ids already counted as samples
        self._refits: dict[TaskKind, tuple[float, Estimate | None]] = {}  # when, and what

    def _remember(self, table: OrderedDict[str, object], key: str, value: object) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.MAX_TASKS:
            table.popitem(last=False)

    def note_created(self, record: TaskRecord, kind: TaskKind, *, sent_wall: float, answered_wall: float) -> None:
        """A create we sent between `sent_wall` and `answered_wall` (our wall clock) was stamped
        `record.created_at` by PiAPI: that pins PiAPI's clock against ours."""
        if record.created_at is not None:
            round_trip = max(0.0, answered_wall - sent_wall)
            self._clock_samples.append((round_trip, record.created_at.timestamp() - (sent_wall + answered_wall) / 2))
            self._skew = min(self._clock_samples, key=lambda sample: sample[0])[1]
        self._remember(self._kinds, record.task_id, kind)  # type: ignore[arg-type]

    def kind_of(self, task_id: str) -> TaskKind | None:
        return self._kinds.get(task_id)

    def to_local(self, moment: datetime) -> float:
        return self._clock() - (self._wall() - (moment.timestamp() - self._skew))

    def count_poll(self, task_id: str) -> None:
        self._remember(self._spent, task_id, self._spent.get(task_id, 0) + 1)  # type: ignore[arg-type]

    def spent(self, task_id: str) -> int:
        return self._spent.get(task_id, 0)

    def schedule(self, task_id: str, kind: TaskKind | None, *, push: bool = False) -> LearnedSchedule:
        estimate = self.stats.estimate(kind) if kind is not None else None
        budget = self.budget
        if estimate is not None:
            if estimate.learned:
                budget = planned_budget(budget, estimate.expected_total())
            else:
                budget = min(budget, max(COLD_MIN_BUDGET, math.ceil(estimate.expected_total() / COLD_SECONDS_PER_GET)))

        def current(now: float) -> Estimate | None:
            return self.current(kind, estimate, now=now)

        return LearnedSchedule(
            estimate=estimate,
            budget=budget,  # set once: a kind learned meanwhile re-places this task's polls, adds none
            to_local=self.to_local,
            spent=lambda: self.spent(task_id),
            push=push,
            pace=self.stats.pace,
            current=current if kind is not None else None,
        )

    def current(self, kind: TaskKind, start: Estimate | None, *, now: float) -> Estimate | None:
        """The estimate to plan a task's next poll with. For a task that began with its kind
        learned (`start`): refitted with the tasks of the kind still running (`observe`: each lasts
        at least as long as it had run when last seen), so that the first of a batch to finish
        re-place the polls of the rest without teaching them that the kind is as quick as its
        quickest. A task that began cold keeps `start`: a refit from a batch's first three
        finishers is too uncertain to re-place its last few polls (they would spread wide), and a
        pace taken from them carries their bias uncorrected. Refitted at most every
        `REFIT_SECONDS` per kind, whatever finishes meanwhile: a thousand tasks finishing at once
        cost a few refits, not a thousand."""
        if start is None or not start.learned:
            return start
        cached = self._refits.get(kind)
        if cached is not None and 0 <= now - cached[0] < self.REFIT_SECONDS:
            return cached[1]
        running = [seen for seen_kind, seen in self._running.values() if seen_kind == kind]
        refit = self.stats.estimate_with(kind, running)
        if len(self._refits) >= MAX_KINDS:  # bounded like the statistics themselves
            self._refits.clear()
        self._refits[kind] = (now, refit)
        return refit

    def observe(self, task_id: str, kind: TaskKind, record: TaskRecord, at: float) -> None:
        """PiAPI showed `task_id` not finished yet as of `at` (our clock; for a GET, when it was
        sent, so the bound errs low). Only fresh states count: a record read back from the ledger,
        or kept after a failed poll, says nothing about now. Kept until the task is learned (or
        ages out with the oldest `MAX_TASKS`): a task whose wait ended still lasted that long."""
        if record.created_at is None or record.is_terminal or task_id in self._learned:
            return
        created = self.to_local(record.created_at)
        if record.status == "pending":
            seen = Running(queued=max(0.0, at - created))
        elif record.started_at is not None:
            started = self.to_local(record.started_at)
            seen = Running(queued=max(0.0, started - created), ran=max(0.0, at - started))
        else:
            return
        self._remember(self._running, task_id, (kind, seen))  # type: ignore[arg-type]

    def learn_from(self, rows: Iterable[tuple[str, str, Mapping[str, Any], TaskRecord]]) -> None:
        """Learn from `(model, task_type, request input, record)` rows, newest first (as
        `TaskLedger.recent_timings` gives them), so the newest are kept when the bound bites."""
        for model, task_type, task_input, record in reversed(list(rows)):
            self.learn(record.task_id, record, TaskKind.of(model, task_type, task_input))

    def learn(self, task_id: str, record: TaskRecord, kind: TaskKind | None = None) -> None:
        """A finished task: one sample, however often it is seen finished (a client may read a
        finished task many times; each read must not count again)."""
        self._spent.pop(task_id, None)
        self._running.pop(task_id, None)
        if task_id in self._learned:
            return
        kind = kind or self._kinds.get(task_id)
        if kind is not None and self.stats.learn(kind, record):
            self._remember(self._learned, task_id, True)  # type: ignore[arg-type]


def planned_budget(budget: int, expected: float) -> int:
    """Planned GETs for a learned kind expected to take `expected` seconds. N polls spread where a
    kind usually ends detect it after a share of its duration, which is also what the wait beyond
    the task can reasonably be; but our own work on each result (`OWN_SECONDS`) does not shrink
    with the task, and eats more of a short task's share. So a short task gets more polls, placed
    closer together: budget x (1 + OWN_SECONDS / (LAG_SHARE x expected)), at most
    `MAX_BUDGET_FACTOR` times the budget (x1.4 for a ~4 s task, x1.05 for a ~33 s one)."""
    factor = 1 + OWN_SECONDS / (LAG_SHARE * max(expected, OWN_SECONDS))
    return math.floor(budget * min(MAX_BUDGET_FACTOR, factor))


# --- the wait ------------------------------------------------------------------------------------


async def _notify(on_update: OnUpdate | None, record: TaskRecord, elapsed: float) -> None:
    await notify_safely(on_update, record, elapsed)


async def notify_safely(callback: Callable[..., Awaitable[None]] | None, *args: object) -> None:
    """Send a progress update; one that fails is logged, never raised into the work it describes."""
    if callback is None:
        return
    try:
        await callback(*args)
    except anyio.get_cancelled_exc_class():
        raise
    except Exception:  # a progress send must never abort the task it describes
        log.warning("progress update failed; continuing", exc_info=True)


def is_newer(candidate: TaskRecord, current: TaskRecord | None) -> bool:
    """Whether `candidate` moves the task forward: statuses only advance, a finished task never
    moves back, and a repeat of the same status adds nothing."""
    if current is None:
        return True
    if current.is_terminal:
        return False
    if candidate.is_terminal:
        return True
    return _STATUS_RANK.get(candidate.status, 1) > _STATUS_RANK.get(current.status, 1) or (
        candidate.status == current.status and candidate.started_at is not None and current.started_at is None
    )


async def wait_for_task(
    fetch: Fetch,
    task_id: str,
    *,
    timeout: float,
    on_update: OnUpdate | None = None,
    policy: PollPolicy | None = None,
    schedule: Schedule | None = None,
    heartbeat_seconds: float = 10.0,
    clock: Clock = time.monotonic,
    sleep: Sleep = anyio.sleep,
    initial: TaskRecord | None = None,
    last_known: TaskRecord | None = None,
    inbox: Inbox | None = None,
    on_poll: Callable[[], None] | None = None,
    on_seen: Callable[[TaskRecord, float], None] | None = None,
) -> TaskRecord:
    """Poll `fetch(task_id)` until terminal or `timeout` seconds pass; return the latest record.

    Transient fetch failures (retryable `FluxError`) are tolerated while time remains: the last
    known record is kept and polling continues. A non-retryable failure is raised.

    `initial` is a state the caller has just seen (reported at once; the first GET waits for the
    schedule). `last_known` is an older state (e.g. from the ledger): polled at once, but what is
    returned if that poll cannot finish by the deadline. `schedule` places the polls (default: a
    `PolicySchedule` of `policy`); `on_poll` is told of each GET, and `on_seen` of each state
    PiAPI showed (a GET's answer, with when the GET was sent; a pushed update, with when it came).
    """
    plan = schedule or PolicySchedule(policy or FALLBACK)
    start = clock()
    deadline = start + max(0.0, timeout)
    record = initial if initial is not None else last_known
    reported: str | None = None
    next_beat = start + heartbeat_seconds

    async def report(latest: TaskRecord, now: float, *, beat: bool = False) -> None:
        nonlocal reported, next_beat
        if latest.status != reported or beat:
            reported = latest.status
            next_beat = now + heartbeat_seconds
            await _notify(on_update, latest, now - start)

    if initial is not None:
        # The caller has just seen the task (e.g. in the create response): report it, and let the
        # schedule decide when the first GET is worth making.
        await report(initial, start)
        if initial.is_terminal:
            return initial
        next_poll = plan.next_poll(initial, now=start, scheduled=start)
    else:
        next_poll = start
    last_poll: float | None = None
    while True:
        now = clock()
        due = now >= next_poll or record is None
        if record is not None and now >= deadline:
            # One last look at the deadline, unless there was one just now (or no time at all).
            if timeout <= 0 or (last_poll is not None and now - last_poll < FINAL_POLL_FRESH_SECONDS):
                return record
            due = True
        if due:
            scheduled = next_poll
            last_poll = now
            try:
                if on_poll is not None:
                    on_poll()
                if record is None:  # nothing to return yet: this answer is needed, however long it takes
                    record = await fetch(task_id)
                    if on_seen is not None:
                        on_seen(record, last_poll)
                else:
                    # A poll (with the client's own retries and Retry-After sleeps) must not carry the
                    # wait past its deadline by more than a moment: past it, the last record stands.
                    with anyio.move_on_after(max(deadline - clock(), FINAL_POLL_GRACE_SECONDS)) as scope:
                        answer = await fetch(task_id)
                    if scope.cancelled_caught:
                        log.info("poll of %s ran past the deadline; returning the last known state", task_id)
                        return record
                    if on_seen is not None:
                        on_seen(answer, last_poll)
                    if is_newer(answer, record) or answer.status == record.status:
                        record = answer
            except errors.FluxError as exc:
                if not exc.retryable or (record is None and clock() >= deadline):
                    raise
                log.info("poll of %s failed (%s); will retry", task_id, exc.category)
            now = clock()
            if record is not None:
                await report(record, now)
                if record.is_terminal:
                    return record
            next_poll = plan.next_poll(record, now=now, scheduled=scheduled)
            continue
        wake = min(next_poll, next_beat, deadline)
        if inbox is not None:
            await inbox.wait(sleep, wake - now)
            pushed = inbox.take()
            if pushed is not None and is_newer(pushed, record):
                record = pushed
                now = clock()
                if on_seen is not None:
                    on_seen(record, now)
                await report(record, now)
                if record.is_terminal:
                    return record
                next_poll = plan.next_poll(record, now=now, scheduled=now)  # knowledge changed: re-plan
                continue
        else:
            await sleep(wake - now)
        now = clock()
        if now >= next_beat and now < deadline:
            await report(record, now, beat=True)
