"""Our own receiver for PiAPI's webhooks: `POST <FLUX_MCP_PUBLIC_URL>/webhooks/piapi` (HTTP mode).

With `FLUX_MCP_PUBLIC_URL` set (the base URL at which PiAPI can reach this server),
`serve --transport http` asks PiAPI to push every task's updates here (`webhook_config` =
this endpoint and the secret below) and serves this route. PiAPI POSTs `{"timestamp", "data":
<the task as GET returns it>}` with the secret in the plain `x-webhook-secret` header; there is
no signature, and PiAPI cannot send our MCP bearer token, so that secret is the route's whole
authentication.

The receiver, in order: refuses a body over `max_body_bytes` (413, before reading it all);
compares the secret in constant time (401); parses the task (400); accepts only task ids in our
ledger (404); treats a repeat or an out-of-order delivery as a no-op (200: a finished task never
moves back, a processing one never back to pending); writes the new state to the ledger (one
and hands it to `push.TaskEvents`, which wakes the call waiting for the task at once (that call
writes the ledger, as for a poll). When no call in this process is waiting (it already returned
a handle, or never started), the receiver writes the ledger itself (one transaction) and
completes a finished task in the background (images saved, timings learned), so `flux_wait_task`
answers at once. Polling stays on as a sparse safety net.

The secret is `FLUX_MCP_WEBHOOK_SECRET`, or else a random one made once and kept beside the
ledger (`webhook-secret`, mode 0600), so restarts and other worker processes accept deliveries
meant for tasks they did not create.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from flux_mcp import errors
from flux_mcp.polling import is_newer
from flux_mcp.record import TaskRecord, is_valid_task_id
from flux_mcp.settings import Settings

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from flux_mcp.ledger import LedgerEntry
    from flux_mcp.lifecycle import TaskService
    from flux_mcp.tools import AppState

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/piapi"
SECRET_FILE = "webhook-secret"
# PiAPI echoes the task's input, which may carry our data URIs (input images, base64): room for two.
_ENVELOPE_BYTES = 1024 * 1024


def max_body_bytes(settings: Settings) -> int:
    return 2 * (settings.max_input_bytes * 4 // 3 + 64) + _ENVELOPE_BYTES


def webhook_secret(settings: Settings) -> str:
    """FLUX_MCP_WEBHOOK_SECRET, or the one kept beside the ledger (made once, mode 0600)."""
    if settings.webhook_secret is not None and settings.webhook_secret.get_secret_value().strip():
        return settings.webhook_secret.get_secret_value().strip()
    path = Path(settings.data_dir) / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass  # made by an earlier run or another worker: read theirs
    else:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32))
    value = path.read_text().strip()
    if not value:
        raise errors.StorageError(f"the webhook secret file {path} is empty; delete it to make a new one")
    return value


class WebhookReceiver:
    """The route's handler; `attach` (from the server's lifespan) gives it the server's state,
    whose task service it uses (built on first use, like the tools do)."""

    def __init__(self, settings: Settings) -> None:
        assert settings.public_url, "the receiver needs FLUX_MCP_PUBLIC_URL"
        self.endpoint = settings.public_url + WEBHOOK_PATH
        self._secret = webhook_secret(settings)
        self.max_body_bytes = max_body_bytes(settings)
        self._state: AppState | None = None
        self._background: TaskGroup | None = None

    @property
    def config(self) -> dict[str, str]:
        """PiAPI's `config.webhook_config` for every create."""
        return {"endpoint": self.endpoint, "secret": self._secret}

    def attach(self, state: AppState, background: TaskGroup) -> None:
        self._state, self._background = state, background

    def routes(self) -> list[BaseRoute]:
        return [Route(WEBHOOK_PATH, self.handle, methods=["POST"])]

    async def handle(self, request: Request) -> JSONResponse:
        state, background = self._state, self._background
        if state is None or background is None:
            return _answer(503, "not ready")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return _answer(413, "body too large")
        supplied = request.headers.get("x-webhook-secret", "")
        if not hmac.compare_digest(supplied.encode(), self._secret.encode()):
            return _answer(401, "wrong or missing x-webhook-secret")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                return _answer(413, "body too large")
        record = _parse(bytes(body))
        if record is None:
            return _answer(400, "expected {timestamp, data: <task>}")
        service = state.service
        entry = await service.ledger.get(record.task_id)
        if entry is None:  # a task id the ledger holds is ours, whatever its submit state says
            return _answer(404, "unknown task")
        if not is_newer(record, entry.record):
            return _answer(200, "already known")
        # A call waiting here records it itself (one ledger write per step); otherwise write it now
        # and, for a finished task, finish it in the background so flux_wait_task answers at once.
        if not service.events.publish(record):
            entry = await service.ledger.record(record)
            if record.is_terminal:
                background.start_soon(self._finish, service, record, entry)
        log.info("webhook: task %s is %s", record.task_id, record.status)
        return _answer(200, "accepted")

    @staticmethod
    async def _finish(service: TaskService, record: TaskRecord, entry: LedgerEntry) -> None:
        try:
            # No call waits now, but the one that asks next (flux_wait_task, the Tasks extension's
            # result) shows the previews its task's call asked for: make them while saving.
            with service.showing_previews(record.task_id, service.wants_previews(entry)):
                await service.finish(record, patience=30.0, recorded=entry)
        except errors.FluxError as exc:
            log.warning("finishing %s after its webhook failed: %s", record.task_id, exc.message)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:  # a background job must never take the server down
            log.exception("finishing %s after its webhook failed", record.task_id)


def _parse(body: bytes) -> TaskRecord | None:
    try:
        envelope: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    data = envelope.get("data") if isinstance(envelope, dict) else None
    if not isinstance(data, dict):
        return None
    record = TaskRecord.from_api(data)
    return record if record.task_id and is_valid_task_id(record.task_id) else None


def _answer(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": message}, status_code=status)
