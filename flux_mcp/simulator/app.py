"""Starlette routes of the offline PiAPI simulator: the task API, the file CDN and admin controls.

The API routes (`/api/v1/task...`) share one wrapper that applies, in order, the configured
latency, queued `slow` faults, queued `http_error` / `malformed` faults (a gateway answers before
auth is checked), the `X-API-Key` check, and finally the handler; the outcome of every API request
is appended to the state's request log. Handlers reuse `flux_mcp.catalog.TaskRequest`, so the
simulator rejects exactly what the real client validates. Images are rendered lazily the first
time a completed task is observed (or its file is fetched), in a worker thread. `/files/...` needs
no key, like PiAPI's CDN, and `/_simulator/...` exposes the fault and config controls over HTTP.
All deliberate delays go through `_Sleeper`, so shutting the server down never waits for them.
Webhooks (`simulator/webhooks.py`) are delivered by a loop that the app's lifespan runs.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import anyio
import anyio.to_thread
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flux_mcp.catalog import TaskRequest, describe_validation_error
from flux_mcp.simulator.render import render_task_images
from flux_mcp.simulator.state import SimTask, SimulatorState
from flux_mcp.simulator.webhooks import WebhookDispatcher

logger = logging.getLogger(__name__)

DEFAULT_API_KEY = "sim-key"
MALFORMED_BODY = "<html>bad gateway</html>"
_FAULT_MESSAGES: dict[int, str] = {
    429: "too many requests, please slow down",
    500: "internal server error",
    502: "bad gateway",
    503: "service unavailable, please retry later",
}


class _Sleeper:
    """Interruptible sleeps: `wake_all()` (on server shutdown) ends every pending delay at once."""

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self.closing = False

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0 or self.closing:
            return
        if self._event is None:
            self._event = anyio.Event()
        with anyio.move_on_after(seconds):
            await self._event.wait()

    def wake_all(self) -> None:
        self.closing = True
        if self._event is not None:
            self._event.set()


@dataclass
class _Reply:
    status: int
    body: dict[str, Any] | str
    task_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_after: float = 0.0

    def response(self) -> Response:
        if isinstance(self.body, str):
            return Response(self.body, status_code=self.status, media_type="text/html", headers=self.headers)
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def envelope(code: int, data: dict[str, Any] | None, message: str) -> dict[str, Any]:
    """PiAPI's `{code, data, message}` wrapper."""
    return {"code": code, "data": data, "message": message}


def _error(status: int, message: str, task_id: str | None = None) -> _Reply:
    return _Reply(status, envelope(status, None, message), task_id=task_id)


def _sim(request: Request) -> SimulatorState:
    state: SimulatorState = request.app.state.simulator
    return state


def _webhooks(request: Request) -> WebhookDispatcher:
    dispatcher: WebhookDispatcher = request.app.state.webhooks
    return dispatcher


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def ensure_rendered(state: SimulatorState, task: SimTask) -> None:
    """Render a completed task's images once (in a thread) and publish them under /files/."""
    if task.rendered or task.expired:
        return
    if task.render_lock is None:
        task.render_lock = anyio.Lock()
    async with task.render_lock:
        if task.rendered or task.expired:
            return
        plain = state.config.plain_images
        if plain:  # drawn once per size and cached: no thread needed
            images = render_task_images(task.request, task.task_id, plain=True)
        else:
            images = await anyio.to_thread.run_sync(render_task_images, task.request, task.task_id)
        for name, data in zip(task.file_names(), images, strict=True):
            state.files[name] = data
        task.rendered = True


# --- the task API ---------------------------------------------------------------------------------

Handler = Callable[[Request, SimulatorState], Awaitable[_Reply]]


def _api(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        state = _sim(request)
        sleeper: _Sleeper = request.app.state.sleeper
        method = request.method
        reply = await _dispatch(request, state, sleeper, handler)
        state.record(method, request.url.path, reply.status, reply.task_id)
        await sleeper.sleep(reply.delay_after)
        return reply.response()

    return endpoint


async def _dispatch(request: Request, state: SimulatorState, sleeper: _Sleeper, handler: Handler) -> _Reply:
    method = request.method
    task_id = request.path_params.get("task_id")
    await sleeper.sleep(state.config.latency)
    slow = state.take_fault(("slow",), method)
    if slow is not None:
        await sleeper.sleep(slow.delay)
    fault = state.take_fault(("http_error", "malformed"), method)
    if fault is not None and fault.kind == "malformed":
        return _Reply(200, MALFORMED_BODY, task_id=task_id)
    if fault is not None and fault.status is not None:
        reply = _error(fault.status, fault.message or _fault_message(fault.status), task_id)
        if fault.retry_after is not None:
            seconds = fault.retry_after
            reply.headers["Retry-After"] = str(int(seconds)) if seconds == int(seconds) else str(seconds)
        return reply
    supplied = request.headers.get("x-api-key", "")
    expected: str = request.app.state.api_key
    if not hmac.compare_digest(supplied.encode(), expected.encode()):
        return _error(401, "Unauthorized: invalid api key", task_id)
    return await handler(request, state)


def _fault_message(status: int) -> str:
    if status in _FAULT_MESSAGES:
        return _FAULT_MESSAGES[status]
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return f"simulated error {status}"


def _drop_empty_webhook(body: Any) -> Any:
    """PiAPI's own examples send `"webhook_config": {"endpoint": "", ...}` to mean "no webhook"."""
    config = body.get("config") if isinstance(body, dict) else None
    webhook = config.get("webhook_config") if isinstance(config, dict) else None
    if isinstance(webhook, dict) and webhook.get("endpoint") == "":
        trimmed = {k: v for k, v in config.items() if k != "webhook_config"}
        return {**body, "config": trimmed}
    return body


async def _create_task(request: Request, state: SimulatorState) -> _Reply:
    try:
        body = json.loads(await request.body())
    except json.JSONDecodeError as exc:
        return _error(400, f"invalid request body: not valid JSON ({exc.msg})")
    except UnicodeDecodeError:
        return _error(400, "invalid request body: not valid UTF-8 JSON")
    try:
        task_request = TaskRequest.model_validate(_drop_empty_webhook(body))
    except ValidationError as exc:
        return _error(400, describe_validation_error(exc))
    raw_input = dict(body.get("input") or {})
    task = state.create_task(task_request, raw_input, _base_url(request))
    _webhooks(request).task_created(task)
    late = state.take_fault(("create_late",), "POST")
    data = state.task_object(task, _base_url(request))
    broken = state.take_fault(("create_error",), "POST")
    if broken is not None and broken.status is not None:
        message = broken.message or _fault_message(broken.status)
        return _Reply(broken.status, envelope(broken.status, data, message), task_id=task.task_id)
    logger.debug("simulator: created task %s (%s %s)", task.task_id, task.model, task_request.task_type)
    return _Reply(200, envelope(200, data, "success"), task_id=task.task_id, delay_after=late.delay if late else 0.0)


async def _get_task(request: Request, state: SimulatorState) -> _Reply:
    task_id = request.path_params["task_id"]
    task = state.tasks.get(task_id)
    if task is None:
        return _error(404, "task not found", task_id)
    if state.phase(task) == "completed":
        await ensure_rendered(state, task)
    return _Reply(200, envelope(200, state.task_object(task, _base_url(request)), "success"), task_id=task_id)


async def _cancel_task(request: Request, state: SimulatorState) -> _Reply:
    task_id = request.path_params["task_id"]
    task = state.tasks.get(task_id)
    if task is None:
        return _error(404, "task not found", task_id)
    phase = state.cancel(task)
    if phase != "pending":
        return _error(400, f"task is already {phase} and cannot be cancelled", task_id)
    _webhooks(request).task_cancelled(task)
    return _Reply(200, envelope(200, state.task_object(task, _base_url(request)), "success"), task_id=task_id)


# --- files (no auth, like the CDN) ------------------------------------------------------------


async def _file(request: Request) -> Response:
    state = _sim(request)
    name: str = request.path_params["name"]
    data = state.files.get(name)
    if data is None:
        task = state.tasks.get(name.rsplit("_", 1)[0])
        if task is not None and name in task.file_names() and state.phase(task) == "completed":
            await ensure_rendered(state, task)
            data = state.files.get(name)
    if data is None:
        return Response("file not found", status_code=404, media_type="text/plain")
    slow = state.take_fault(("slow_file",), "GET")
    if slow is not None:
        return StreamingResponse(_drip(data, slow.delay, request.app.state.sleeper), media_type="image/png")
    return Response(data, media_type="image/png")


async def _drip(data: bytes, seconds: float, sleeper: _Sleeper) -> AsyncIterator[bytes]:
    pieces = 20
    size = -(-len(data) // pieces)
    for start in range(0, len(data), size):
        await sleeper.sleep(seconds / pieces)
        yield data[start : start + size]


# --- admin controls ---------------------------------------------------------------------------


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    value = json.loads(raw) if raw.strip() else {}
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _admin_error(exc: Exception) -> JSONResponse:
    message = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
    return JSONResponse({"error": message}, status_code=400)


async def _config(request: Request) -> Response:
    state = _sim(request)
    if request.method == "POST":
        try:
            state.configure(**await _json_object(request))
        except (ValidationError, ValueError, TypeError) as exc:
            return _admin_error(exc)
    return JSONResponse(state.config.model_dump())


async def _faults(request: Request) -> Response:
    state = _sim(request)
    if request.method == "POST":
        try:
            body = await _json_object(request)
            fault = state.add_fault(body.pop("kind", None), **body)
        except (ValidationError, ValueError, TypeError) as exc:
            return _admin_error(exc)
        return JSONResponse(fault.model_dump())
    if request.method == "DELETE":
        state.faults.clear()
    return JSONResponse([f.model_dump() for f in state.faults])


async def _expire(request: Request) -> Response:
    return JSONResponse({"expired": _sim(request).expire_files()})


async def _log(request: Request) -> Response:
    return JSONResponse(list(_sim(request).log))


async def _webhook_log(request: Request) -> Response:
    return JSONResponse(list(_sim(request).webhook_log))


async def _tasks(request: Request) -> Response:
    state = _sim(request)
    base = _base_url(request)
    return JSONResponse([state.task_object(task, base) for task in state.tasks.values()])


async def _reset(request: Request) -> Response:
    _sim(request).reset()
    return JSONResponse({"reset": True})


def create_app(state: SimulatorState | None = None, api_key: str = DEFAULT_API_KEY) -> Starlette:
    """The simulator as an ASGI app; `app.state.simulator` is the `SimulatorState` it serves."""
    routes = [
        Route("/api/v1/task", _api(_create_task), methods=["POST"]),
        Route("/api/v1/task/{task_id}", _api(_get_task), methods=["GET"]),
        Route("/api/v1/task/{task_id}", _api(_cancel_task), methods=["DELETE"]),
        Route("/files/{name}", _file, methods=["GET"]),
        Route("/_simulator/config", _config, methods=["GET", "POST"]),
        Route("/_simulator/faults", _faults, methods=["GET", "POST", "DELETE"]),
        Route("/_simulator/expire", _expire, methods=["POST"]),
        Route("/_simulator/log", _log, methods=["GET"]),
        Route("/_simulator/webhooks", _webhook_log, methods=["GET"]),
        Route("/_simulator/tasks", _tasks, methods=["GET"]),
        Route("/_simulator/reset", _reset, methods=["POST"]),
    ]
    state = state if state is not None else SimulatorState()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(app.state.webhooks.run)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await app.state.webhooks.aclose()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.simulator = state
    app.state.api_key = api_key
    app.state.sleeper = _Sleeper()
    app.state.webhooks = WebhookDispatcher(state, lambda task: ensure_rendered(state, task))
    return app
