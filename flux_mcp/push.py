"""Pushed task updates: wake the call waiting for a task the moment news of it arrives.

`TaskEvents` is an in-process registry keyed by task id. A wait subscribes for its task
(`subscribe`, a context manager giving an `Inbox`); whoever learns something new about a task
(the webhook receiver, or a notifier relaying another worker's news) calls `publish(record)`,
which hands the record to every subscriber of that task and ends their sleep at once. Nothing
polls: a subscriber's sleep is cut short.

Cross-process hook: `add_listener(fn)` registers a function called (synchronously, must not block)
with every record published here, so a notifier can forward it to other processes; that notifier
calls `publish` in each receiving process. `publish` returns whether anyone here was waiting,
so the receiver knows when to finish a task in the background instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio

from flux_mcp.polling import Sleep, is_newer
from flux_mcp.record import TaskRecord

log = logging.getLogger(__name__)

Listener = Callable[[TaskRecord], None]


class Subscription:
    """One waiter's inbox for one task."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self._latest: TaskRecord | None = None  # delivered, not yet taken
        self._newest: TaskRecord | None = None  # the most advanced state delivered so far
        self._sleeping: anyio.CancelScope | None = None  # the wait in progress, ended by a delivery

    def deliver(self, record: TaskRecord) -> None:
        if is_newer(record, self._newest):
            self._newest = self._latest = record
            if self._sleeping is not None:
                self._sleeping.cancel()

    def take(self) -> TaskRecord | None:
        record, self._latest = self._latest, None
        return record

    async def wait(self, sleep: Sleep, seconds: float) -> None:
        if self._latest is not None or seconds <= 0:
            return
        # One cancel scope, ended by `deliver`: no helper tasks to start and cancel on every wait
        # (with a thousand calls waiting, those showed in the server's profile).
        assert self._sleeping is None, "one waiter per subscription"  # a delivery ends only the one wait
        with anyio.CancelScope() as scope:
            self._sleeping = scope
            try:
                await sleep(seconds)
            finally:
                self._sleeping = None


class TaskEvents:
    def __init__(self) -> None:
        self._waiters: dict[str, set[Subscription]] = {}
        self._listeners: list[Listener] = []

    @contextmanager
    def subscribe(self, task_id: str) -> Iterator[Subscription]:
        subscription = Subscription(task_id)
        self._waiters.setdefault(task_id, set()).add(subscription)
        try:
            yield subscription
        finally:
            waiters = self._waiters.get(task_id)
            if waiters is not None:
                waiters.discard(subscription)
                if not waiters:
                    del self._waiters[task_id]

    def waiting(self, task_id: str) -> bool:
        return bool(self._waiters.get(task_id))

    def publish(self, record: TaskRecord, *, relay: bool = True) -> bool:
        """Hand `record` to this process's waiters (and, with `relay`, to the listeners)."""
        waiters = list(self._waiters.get(record.task_id, ()))
        for subscription in waiters:
            subscription.deliver(record)
        if relay:
            for listener in self._listeners:
                try:
                    listener(record)
                except Exception:  # a relay must never break the receiver
                    log.warning("task event listener failed", exc_info=True)
        return bool(waiters)

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)
