"""The local queue in front of PiAPI: at most FLUX_MCP_MAX_CONCURRENT_TASKS tasks run at once.

PiAPI's plans limit concurrent jobs (pending and processing tasks count), so a server carrying
many agents holds back the creates that would pass the limit instead of letting PiAPI refuse
them. The queue is the ledger itself: a request waiting its turn is a `queued` row (already
reserved under its idempotency key, so a repeat re-attaches instead of queueing twice), and
`TaskLedger.admit` turns it into `submitting` inside one write transaction once fewer than the
limit of tasks are active across every process sharing the ledger. Within a process, waiters
line up first come, first served; only the head asks the ledger, again whenever a task of this
process ends (`slot_freed`) and every `recheck_seconds` for the other processes' tasks.

A caller that gives up while queued releases its row: nothing was sent, nothing is owed. A
process that dies while requests wait leaves their rows `queued` with a dead owner; they hold
their place in `flux_list_tasks`, and a repeat of the same request (or the same
`idempotency_key`) adopts the row and submits it, exactly once (`TaskService._reattach`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio

from flux_mcp.ledger import TaskLedger
from flux_mcp.polling import notify_safely

OnQueued = Callable[[int, float], Awaitable[None]]
"""Told how many requests of this process are ahead, and the seconds waited so far."""

HEARTBEAT_SECONDS = 10.0


class AdmissionQueue:
    def __init__(
        self,
        ledger: TaskLedger,
        limit: int,
        owner: str,
        *,
        recheck_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        self.limit = limit
        self._owner = owner
        self._recheck_seconds = recheck_seconds
        self._clock = clock
        self._line: list[object] = []
        self._changed = anyio.Event()

    @property
    def waiting(self) -> int:
        return len(self._line)

    def slot_freed(self) -> None:
        """A task of this process ended, or a place in the line was given up: look again."""
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_turn(self, local_id: str, on_queued: OnQueued | None = None) -> None:
        """Return once the queued claim `local_id` is admitted (now `submitting`).

        `on_queued` hears the number ahead whenever it changes and at least every 10 s."""
        ticket = object()
        self._line.append(ticket)
        start = last_report = self._clock()
        reported: int | None = None
        try:
            while True:
                ahead = self._line.index(ticket)
                if ahead == 0 and await self.ledger.admit(local_id, self._owner, self.limit):
                    return
                now = self._clock()
                if on_queued is not None and (ahead != reported or now - last_report >= HEARTBEAT_SECONDS):
                    reported, last_report = ahead, now
                    await notify_safely(on_queued, ahead, now - start)
                changed = self._changed
                patience = self._recheck_seconds if ahead == 0 else HEARTBEAT_SECONDS
                with anyio.move_on_after(min(patience, max(0.05, HEARTBEAT_SECONDS - (now - last_report)))):
                    await changed.wait()
        finally:
            self._line.remove(ticket)
            self.slot_freed()
