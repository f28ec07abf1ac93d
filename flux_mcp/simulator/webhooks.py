"""Webhook delivery of the offline PiAPI simulator, in PiAPI's format.

A task created with `config.webhook_config.endpoint` gets a POST when it is created and when it
ends (completed, failed or cancelled), each `{"timestamp": <unix seconds>, "data": <the task
exactly as GET returns it at that moment>}`, with the secret in the plain `x-webhook-secret`
header when one was given (PiAPI signs nothing). A delivery that does not get a 2xx answer is
tried again `webhook_attempts` times in all, `webhook_retry_seconds` apart. Queued
`webhook_drop` / `webhook_duplicate` faults lose the next delivery entirely or send it twice,
so receivers can be tested against PiAPI's "expect duplicates, keep polling" advice.

`WebhookDispatcher.run()` lives for as long as the app (the Starlette lifespan). Deliveries are
kept in a heap by due time on the simulator's clock; the loop sleeps until the earliest is due
(re-checking at least every `_RECHECK_SECONDS`, so a `ManualClock` that jumps ahead is noticed)
and is woken at once when a task is created or cancelled. Every attempt is appended to the
state's `webhook_log`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2

from flux_mcp.simulator.state import SimTask, SimulatorState

logger = logging.getLogger(__name__)

_RECHECK_SECONDS = 0.25
_TIMEOUT_SECONDS = 5.0


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    task: SimTask = field(compare=False)
    event: str = field(compare=False)  # "created" or "ended"
    attempt: int = field(default=1, compare=False)
    duplicate: bool = field(default=False, compare=False)
    cancel: bool = field(default=False, compare=False)
    body: dict[str, Any] | None = field(default=None, compare=False)  # fixed at the first attempt


class WebhookDispatcher:
    def __init__(
        self,
        state: SimulatorState,
        render: Callable[[SimTask], Awaitable[None]],
        http: httpx2.AsyncClient | None = None,
    ) -> None:
        self.state = state
        self._render = render
        self._http = http
        self._queue: list[_Delivery] = []
        self._seq = itertools.count()
        self._wake = anyio.Event()

    # --- scheduling (called from request handlers) --------------------------------------------

    def task_created(self, task: SimTask) -> None:
        if _endpoint(task):
            now = self.state.clock()
            self._push(_Delivery(now + self.state.config.webhook_latency, next(self._seq), task, "created"))
            self._push(_Delivery(task.ends + self.state.config.webhook_latency, next(self._seq), task, "ended"))

    def task_cancelled(self, task: SimTask) -> None:
        if _endpoint(task):
            due = self.state.clock() + self.state.config.webhook_latency
            self._push(_Delivery(due, next(self._seq), task, "ended", cancel=True))

    def _push(self, delivery: _Delivery) -> None:
        heapq.heappush(self._queue, delivery)
        self._wake.set()

    # --- the delivery loop --------------------------------------------------------------------

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                now = self.state.clock()
                while self._queue and self._queue[0].due <= now:
                    delivery = heapq.heappop(self._queue)
                    if self._still_relevant(delivery):
                        tg.start_soon(self._deliver, delivery)
                wait = min(self._queue[0].due - now, _RECHECK_SECONDS) if self._queue else _RECHECK_SECONDS
                self._wake = anyio.Event()
                with anyio.move_on_after(max(0.0, wait)):
                    await self._wake.wait()

    def _still_relevant(self, delivery: _Delivery) -> bool:
        # The completion delivery of a task that was cancelled meanwhile was replaced by the cancel's.
        return delivery.event != "ended" or delivery.cancel or delivery.task.cancelled_at is None

    async def _deliver(self, delivery: _Delivery) -> None:
        task = delivery.task
        if delivery.attempt == 1 and not delivery.duplicate:
            if self.state.take_fault(("webhook_drop",), "POST") is not None:
                status = self.state.status_word(task, self.state.phase(task))
                self._log(task, delivery.attempt, "dropped", status, self.state.clock())
                return
        if delivery.body is None:
            if self.state.phase(task) == "completed":
                await self._render(task)
            delivery.body = {"timestamp": int(time.time()), "data": self.state.task_object(task, task.base_url)}
        if delivery.attempt == 1 and not delivery.duplicate:
            if self.state.take_fault(("webhook_duplicate",), "POST") is not None:
                self._push(
                    _Delivery(delivery.due, next(self._seq), task, delivery.event, duplicate=True, body=delivery.body)
                )
        body = delivery.body
        webhook = task.request.config.webhook_config if task.request.config else None
        assert webhook is not None
        headers = {"x-webhook-secret": webhook.secret} if webhook.secret else {}
        sent = self.state.clock()
        try:
            response = await self._client().post(webhook.endpoint, json=body, headers=headers)
            outcome, ok = str(response.status_code), response.is_success
        except httpx2.HTTPError as exc:
            outcome, ok = type(exc).__name__, False
        self._log(task, delivery.attempt, outcome, str(body["data"]["status"]), sent)
        if not ok and delivery.attempt < self.state.config.webhook_attempts:
            due = self.state.clock() + self.state.config.webhook_retry_seconds
            self._push(_Delivery(due, next(self._seq), task, delivery.event, delivery.attempt + 1, body=body))

    def _client(self) -> httpx2.AsyncClient:
        if self._http is None:
            self._http = httpx2.AsyncClient(timeout=_TIMEOUT_SECONDS, follow_redirects=False)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    def _log(self, task: SimTask, attempt: int, outcome: str, status: str, sent: float) -> None:
        self.state.webhook_log.append(
            {
                "task_id": task.task_id,
                "status": status,
                "attempt": attempt,
                "outcome": outcome,
                "at": time.time(),
                "sent": sent,
            }
        )
        logger.debug("simulator: webhook for %s (%s), attempt %d: %s", task.task_id, status, attempt, outcome)


def _endpoint(task: SimTask) -> str:
    config = task.request.config
    return config.webhook_config.endpoint if config and config.webhook_config else ""
