"""The HTTP client for PiAPI's unified task API, and the one place its request policy lives.

Policy, all here so no code path can bypass it:
- Auth: `X-API-Key` is attached per request, and only to requests for PiAPI's own base URL. Image
  downloads (CDN URLs that PiAPI returns) go out without it, so the key never leaks to another host.
- Timeouts: explicit connect/read/write/pool timeouts on every request.
- Size: an answer is read up to `MAX_ANSWER_BYTES` (after decoding), never past it.
- Errors: HTTP status, PiAPI's `{code, data, message}` envelope and transport failures become
  `FluxError` subclasses with a category and a `retryable` flag; the key is scrubbed from any text.
- Retries: GET and DELETE are retried with capped exponential backoff, full jitter and
  `Retry-After`. The create POST is retried only when the request provably never reached PiAPI
  (connection refused, connect or pool time-out) or PiAPI refused it with 429, within a small
  time budget. A 4xx answer proves the task was not created; any other failure after the body
  was sent (time-out, dropped connection, 5xx, an unreadable answer) raises
  `SubmitUncertainError`: a duplicate paid task is worse than an error.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import anyio
import anyio.lowlevel
import httpx2

from flux_mcp import errors
from flux_mcp.download import AddressPolicy, DownloadLimits, download_client, limited_body
from flux_mcp.record import TaskRecord, is_valid_task_id
from flux_mcp.transport import PooledTransport, needs_env_proxy

log = logging.getLogger(__name__)

TASK_PATH = "/api/v1/task"
# Secrets shorter than this are not scrubbed from upstream text (they would mangle every word).
MIN_SCRUBBED_CHARS = 4


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter; `Retry-After` wins when it is larger."""

    attempts: int = 4
    base_seconds: float = 0.5
    cap_seconds: float = 8.0
    max_retry_after_seconds: float = 30.0
    # A create refused with 429 is retried only while the total sleep stays under this, so a
    # submit never sits in backoff for minutes before the task even exists.
    create_budget_seconds: float = 15.0

    def delay(self, attempt: int, retry_after: float | None, rand: Callable[[], float]) -> float:
        backoff = min(self.cap_seconds, self.base_seconds * 2**attempt) * rand()
        if retry_after is not None:
            return max(backoff, min(retry_after, self.max_retry_after_seconds))
        return backoff


@dataclass(frozen=True)
class Download:
    """A download in progress: its headers, and its body under the policy's time and rate limits."""

    response: httpx2.Response
    url: str
    limits: DownloadLimits
    started: float

    @property
    def headers(self) -> httpx2.Headers:
        return self.response.headers

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return limited_body(self.response, self.url, self.limits, started=self.started, clock=anyio.current_time)


@dataclass(frozen=True)
class CancelOutcome:
    accepted: bool
    message: str


def _retry_after_seconds(response: httpx2.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


CONNECTIONS_PER_KIND = 20  # open connections for API calls, and as many for downloads
# A task object is a few kilobytes (a batch of four images included): a larger answer is not
# PiAPI's, and is not read past this.
MAX_ANSWER_BYTES = 1024 * 1024


async def _read_answer(response: httpx2.Response) -> bytes | None:
    """The whole (decoded) answer, or None once it passes MAX_ANSWER_BYTES."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class PiAPIClient:
    """`create_task`, `get_task`, `cancel_task` against PiAPI (or the simulator), plus downloads."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        http: httpx2.AsyncClient | None = None,
        timeout_seconds: float = 30.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rand: Callable[[], float] = random.random,
        download_http: httpx2.AsyncClient | None = None,
        download_limits: DownloadLimits | None = None,
    ) -> None:
        """`http` serves API calls (and, when given without `download_http`, downloads too: a test
        seam). Otherwise downloads get their own client, guarded by `flux_mcp.download`."""
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._secrets: set[str] = set()
        self.add_secret(api_key)
        timeout = httpx2.Timeout(timeout_seconds, connect=min(10.0, timeout_seconds))
        # Requests wait for a connection here, in our own first-come-first-served line, never in
        # a pool's queue (httpx2's re-scanned its whole queue against every connection whenever one
        # freed up). Connections come from `flux_mcp.transport` and stay alive between requests
        # (no reconnect per poll). API calls and downloads have a line each, so a burst of
        # downloads never delays a poll. (`limits` applies only where a proxy keeps httpx2's own
        # transport.)
        self._api_slots = anyio.CapacityLimiter(CONNECTIONS_PER_KIND)
        self._download_slots = anyio.CapacityLimiter(CONNECTIONS_PER_KIND)
        self._slot_wait_seconds = timeout_seconds
        self._http = http or httpx2.AsyncClient(
            timeout=timeout,
            transport=None if needs_env_proxy(self.base_url) else PooledTransport(connections=CONNECTIONS_PER_KIND),
            limits=httpx2.Limits(max_connections=CONNECTIONS_PER_KIND, max_keepalive_connections=CONNECTIONS_PER_KIND),
            follow_redirects=False,  # API calls never follow; downloads follow at most 5 hops
            max_redirects=5,
        )
        self._owns_http = http is None
        self.download_limits = download_limits or DownloadLimits()
        self._download_http = download_http or (
            http
            if http is not None
            else download_client(AddressPolicy(self.base_url), timeout=timeout, limits=self.download_limits)
        )
        self._owns_download_http = download_http is None and http is None
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._rand = rand

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()
        if self._owns_download_http:
            await self._download_http.aclose()

    async def __aenter__(self) -> PiAPIClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- the three task operations ----------------------------------------------------------

    async def create_task(self, payload: dict[str, Any]) -> TaskRecord:
        slept = 0.0
        for attempt in range(self.retry.attempts):
            try:
                data = await self._send("POST", TASK_PATH, json=payload)
            except (errors.NetworkError, errors.RateLimitedError) as exc:
                # Only failures that prove PiAPI never accepted the body reach this branch.
                delay = self.retry.delay(attempt, exc.retry_after, self._rand)
                if attempt + 1 >= self.retry.attempts or slept + delay > self.retry.create_budget_seconds:
                    raise
                await self._sleep(delay)
                slept += delay
                continue
            record = TaskRecord.from_api(data)
            if not record.task_id:
                raise errors.SubmitUncertainError("PiAPI accepted the create request but returned no task_id")
            return record
        raise AssertionError("unreachable")  # pragma: no cover

    async def get_task(self, task_id: str) -> TaskRecord:
        data = await self._with_retries("GET", f"{TASK_PATH}/{task_id}", task_id=task_id)
        record = TaskRecord.from_api(data)
        return record if record.task_id else record.model_copy(update={"task_id": task_id})

    async def cancel_task(self, task_id: str) -> CancelOutcome:
        """Best effort: PiAPI documents cancel only for pending tasks, and not for Flux at all."""
        try:
            await self._with_retries("DELETE", f"{TASK_PATH}/{task_id}", task_id=task_id)
        except errors.FluxError as exc:
            return CancelOutcome(False, f"PiAPI did not cancel the task: {exc.message}")
        return CancelOutcome(True, "PiAPI accepted the cancel request")

    # --- downloads (no API key: these URLs belong to PiAPI's file host) -----------------------

    @asynccontextmanager
    async def _slot(self, slots: anyio.CapacityLimiter, task_id: str | None = None) -> AsyncIterator[None]:
        try:
            # A free slot is taken at once; only a wait for one needs a deadline (a cancel scope
            # per request was 3 % of the event loop's time with a thousand tasks in flight).
            await anyio.lowlevel.checkpoint_if_cancelled()  # as `acquire` does: a cancelled caller stops here
            slots.acquire_nowait()
        except anyio.WouldBlock:
            try:
                with anyio.fail_after(self._slot_wait_seconds):
                    await slots.acquire()
            except TimeoutError:
                # Nothing was sent: as safe to retry as a refused connection, even for a create.
                raise errors.NetworkError("no connection to PiAPI came free in time", task_id=task_id) from None
        try:
            yield
        finally:
            slots.release()

    @asynccontextmanager
    async def stream_download(self, url: str) -> AsyncIterator[Download]:
        """GET an image URL under the download policy (`flux_mcp.download`): addresses checked on
        every hop, at most 5 redirects, and the body cut off when it is too slow or too long."""
        started = anyio.current_time()
        try:
            async with (
                self._slot(self._download_slots),
                self._download_http.stream("GET", url, follow_redirects=True) as response,
            ):
                if response.status_code != 200:
                    raise errors.StorageError(
                        f"downloading {url} failed with HTTP {response.status_code}",
                        retryable=response.status_code >= 500,
                    )
                yield Download(response, url, self.download_limits, started)
        except httpx2.TimeoutException as exc:
            raise errors.RequestTimeoutError(f"downloading {url} timed out") from exc
        except httpx2.HTTPError as exc:  # transport failures, redirect loops, undecodable bodies
            raise errors.NetworkError(f"downloading {url} failed: {type(exc).__name__}") from exc

    # --- internals -------------------------------------------------------------------------

    async def _with_retries(self, method: str, path: str, *, task_id: str | None) -> dict[str, Any]:
        if task_id is not None and not is_valid_task_id(task_id):
            # The id becomes part of the URL path: never let it walk to another endpoint.
            raise errors.InvalidInputError(
                f"task_id {task_id!r} is not a PiAPI task id",
                hint="Pass the task_id exactly as a flux_* result returned it.",
            )
        for attempt in range(self.retry.attempts):
            try:
                return await self._send(method, path, task_id=task_id)
            except errors.FluxError as exc:
                if not exc.retryable or attempt + 1 >= self.retry.attempts:
                    raise
                log.info("%s %s failed (%s); retrying", method, path, exc.category)
                await self._sleep(self.retry.delay(attempt, exc.retry_after, self._rand))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(
        self, method: str, path: str, *, json: dict[str, Any] | None = None, task_id: str | None = None
    ) -> dict[str, Any]:
        headers = {"X-API-Key": self._api_key, "Accept": "application/json"}
        is_create = method == "POST"
        try:
            async with (
                self._slot(self._api_slots, task_id),
                self._http.stream(method, self.base_url + path, json=json, headers=headers) as response,
            ):
                body = await _read_answer(response)
        except (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout) as exc:
            # Nothing was sent: safe to retry, even the create.
            raise errors.NetworkError(f"could not connect to PiAPI ({type(exc).__name__})", task_id=task_id) from exc
        except httpx2.TimeoutException as exc:
            if is_create:
                raise errors.SubmitUncertainError(
                    "PiAPI did not answer the create request in time; the task may exist"
                ) from exc
            raise errors.RequestTimeoutError(f"PiAPI did not answer {method} in time", task_id=task_id) from exc
        except httpx2.HTTPError as exc:  # transport failures, undecodable bodies, ...
            if is_create:
                raise errors.SubmitUncertainError(
                    f"the connection failed after the create request was sent ({type(exc).__name__}); "
                    "the task may exist"
                ) from exc
            raise errors.NetworkError(f"connection to PiAPI failed ({type(exc).__name__})", task_id=task_id) from exc
        if body is None:
            message = f"PiAPI's answer to {method} was larger than {MAX_ANSWER_BYTES} bytes"
            if is_create:
                raise errors.SubmitUncertainError(f"{message}; the task may exist")
            raise errors.UpstreamError(message, task_id=task_id, status_code=response.status_code)
        return self._parse(response, body, task_id=task_id, is_create=is_create)

    def add_secret(self, value: str | None) -> None:
        """Also scrub `value` (e.g. a webhook secret) from everything PiAPI sends back."""
        if value and len(value.strip()) >= MIN_SCRUBBED_CHARS:
            self._secrets.add(value.strip())

    def scrub(self, value: Any) -> Any:
        """`value` (text, or JSON from upstream) with the API key and every registered secret
        replaced by `***`: upstream text is scrubbed before anything returns, logs or stores it."""
        if isinstance(value, str):
            for secret in self._secrets:
                value = value.replace(secret, "***")
            return value
        if isinstance(value, dict):
            return {self.scrub(k): self.scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.scrub(v) for v in value]
        return value

    def _parse(
        self, response: httpx2.Response, answer: bytes, *, task_id: str | None, is_create: bool
    ) -> dict[str, Any]:
        status = response.status_code
        try:
            body = json.loads(answer)
        except ValueError:
            body = None
        envelope_message = ""
        envelope_code: int | None = None
        if isinstance(body, dict):
            envelope_message = self.scrub(str(body.get("message") or ""))
            try:
                envelope_code = int(body.get("code")) if body.get("code") is not None else None
            except (TypeError, ValueError):
                envelope_code = None
        if status == 200 and isinstance(body, dict) and envelope_code in (None, 200):
            data = body.get("data")
            if isinstance(data, dict):
                return self.scrub(data)
        # An error: HTTP status first; a 200 whose envelope says otherwise takes the envelope's
        # code when it looks like an HTTP status, else counts as a server-side failure.
        effective = status
        if status == 200:
            effective = envelope_code if envelope_code is not None and 400 <= envelope_code < 600 else 500
        detail = envelope_message or (
            "no task object in the answer" if status == 200 else response.reason_phrase or "no detail"
        )
        kwargs: dict[str, Any] = {"task_id": task_id, "status_code": status, "code": envelope_code or status}
        if effective == 429:
            raise errors.RateLimitedError(
                f"PiAPI is rate limiting requests (HTTP 429): {detail}",
                retry_after=_retry_after_seconds(response),
                **kwargs,
            )
        if effective == 401:
            raise errors.AuthError(f"PiAPI rejected the API key (HTTP 401): {detail}", **kwargs)
        if effective == 403:
            raise errors.AuthError(
                f"PiAPI refused access (HTTP 403): {detail}",
                hint="The key is valid but not allowed this (e.g. dev-advanced needs a Creator plan or higher).",
                **kwargs,
            )
        if effective == 404:
            raise errors.NotFoundError(f"PiAPI does not know this task (HTTP 404): {detail}", **kwargs)
        if 400 <= effective < 500:
            raise errors.InvalidInputError(
                f"PiAPI rejected the request (HTTP {effective}): {detail}",
                hint="PiAPI refused these arguments; change them and call again.",
                **kwargs,
            )
        if is_create:
            # A 5xx (or an unreadable answer) says nothing about whether the task was created:
            # gateways commonly time out after the origin accepted it. An id in the answer is kept.
            data = self.scrub(body.get("data")) if isinstance(body, dict) else None
            seen_id = data.get("task_id") if isinstance(data, dict) else None
            raise errors.SubmitUncertainError(
                f"PiAPI answered the create request with HTTP {effective} ({detail}); the task may exist",
                task_id=str(seen_id) if seen_id else task_id,
                status_code=status,
                code=envelope_code or status,
            )
        raise errors.UpstreamError(
            f"PiAPI failed with HTTP {effective}: {detail}", retry_after=_retry_after_seconds(response), **kwargs
        )
