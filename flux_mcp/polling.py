"""Waiting for a PiAPI task: a pluggable poll schedule and a deadline that never loses the task.

`wait_for_task` polls until the task is terminal or the deadline passes, and then returns the
*current* record either way: a task still running at the deadline is alive and resumable, not
an error. `on_update` is called on every status change and as a heartbeat at least every
`heartbeat_seconds`, with the elapsed time, so the MCP layer can turn it into real progress.
A failing `on_update` is logged and ignored: describing a paid task must never abort it.

Clock and sleep are injected, so tests run the whole schedule in milliseconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import anyio

from flux_mcp import errors
from flux_mcp.record import TaskRecord

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
OnUpdate = Callable[[TaskRecord, float], Awaitable[None]]
Fetch = Callable[[str], Awaitable[TaskRecord]]


class PollPolicy(Protocol):
    def interval(self, attempt: int) -> float:
        """Seconds to wait before poll number `attempt + 1` (attempt 0 follows the first poll)."""
        ...


@dataclass(frozen=True)
class BackoffPolicy:
    """Quick first checks, then growing intervals capped at a few seconds (1, 1, 1.5, 2.25, 3, 3, ...).

    The cap sets the detection lag of long tasks (about cap/2 on average); bench/poll_schedules.py
    measures this schedule against the fixed and exponential ones other clients use.
    """

    first: Sequence[float] = (1.0, 1.0)
    factor: float = 1.5
    cap: float = 3.0

    def interval(self, attempt: int) -> float:
        if attempt < len(self.first):
            return self.first[attempt]
        last = self.first[-1] if self.first else 1.0
        return min(self.cap, last * self.factor ** (attempt - len(self.first) + 1))


DEFAULT_POLICY = BackoffPolicy()
FINAL_POLL_GRACE_SECONDS = 1.0


async def _notify(on_update: OnUpdate | None, record: TaskRecord, elapsed: float) -> None:
    if on_update is None:
        return
    try:
        await on_update(record, elapsed)
    except anyio.get_cancelled_exc_class():
        raise
    except Exception:  # a progress send must never abort the task it describes
        log.warning("progress update failed; continuing", exc_info=True)


async def wait_for_task(
    fetch: Fetch,
    task_id: str,
    *,
    timeout: float,
    on_update: OnUpdate | None = None,
    policy: PollPolicy = DEFAULT_POLICY,
    heartbeat_seconds: float = 10.0,
    clock: Clock = time.monotonic,
    sleep: Sleep = anyio.sleep,
    initial: TaskRecord | None = None,
    last_known: TaskRecord | None = None,
) -> TaskRecord:
    """Poll `fetch(task_id)` until terminal or `timeout` seconds pass; return the latest record.

    Transient fetch failures (retryable `FluxError`) are tolerated while time remains: the last
    known record is kept and polling continues. A non-retryable failure is raised.

    `initial` is a state the caller has just seen (reported at once; the first GET waits one
    interval). `last_known` is an older state (e.g. from the ledger): polled at once, but what is
    returned if that poll cannot finish by the deadline.
    """
    start = clock()
    deadline = start + max(0.0, timeout)
    record = initial
    last_status: str | None = None
    last_sent = start
    attempt = 0

    async def pause() -> bool:
        """Sleep until the next poll (never past the deadline or the next heartbeat)."""
        nonlocal attempt
        now = clock()
        if now >= deadline:
            return False
        until_heartbeat = max(0.05, heartbeat_seconds - (now - last_sent))
        await sleep(min(policy.interval(attempt), deadline - now, until_heartbeat))
        attempt += 1
        return True

    if initial is None:
        record = last_known
    else:
        # The caller has just seen the task (e.g. in the create response): report it, then wait
        # one interval before the first GET instead of asking again at once.
        last_status = record.status
        await _notify(on_update, record, 0.0)
        if record.is_terminal or not await pause():
            return record
    while True:
        try:
            if record is None:  # nothing to return yet: this answer is needed, however long it takes
                record = await fetch(task_id)
            else:
                # A poll (with the client's own retries and Retry-After sleeps) must not carry the
                # wait past its deadline by more than a moment: past it, the last record stands.
                with anyio.move_on_after(max(deadline - clock(), FINAL_POLL_GRACE_SECONDS)) as scope:
                    record = await fetch(task_id)
                if scope.cancelled_caught:
                    log.info("poll of %s ran past the deadline; returning the last known state", task_id)
                    return record
        except errors.FluxError as exc:
            if not exc.retryable or (record is None and clock() >= deadline):
                raise
            log.info("poll of %s failed (%s); will retry", task_id, exc.category)
        now = clock()
        if record is not None and (record.status != last_status or now - last_sent >= heartbeat_seconds):
            last_status = record.status
            last_sent = now
            await _notify(on_update, record, now - start)
        if record is not None and record.is_terminal:
            return record
        if not await pause():
            if record is None:  # pragma: no cover - guarded by the raise above
                raise errors.RequestTimeoutError("no answer from PiAPI before the deadline", task_id=task_id)
            return record
