"""The MCP Tasks extension (SEP-2663, `io.modelcontextprotocol/tasks`) on the task ledger.

On the SDK's public `Extension` API. For a `tools/call` of a task tool whose request declares the
extension (2026-07-28 era: `_meta` client capabilities), the tool submits and the answer is a
task handle at once (`resultType: "task"`): the PiAPI task id, `ttlMs: null` (the ledger never
discards a task, so handles do not expire) and a `pollIntervalMs` from the poll schedule (the
learned one, for this task's kind).
`tasks/get` answers from the ledger, so it works after a restart and from another server process
on the same data directory, polling PiAPI once while the task runs; once the task is done it
carries the very result the tool would have returned (`tools.present_task`). `tasks/cancel` asks
PiAPI to cancel. An unknown task id is -32602 (SEP-2663, protocol errors).

A client that did not declare the extension on the request gets the ordinary tool result (the
wait-budget behaviour), and so does a dry run or an error found before anything was submitted.
Status notifications are not pushed: this server does not serve `subscriptions/listen`, and
polling is the extension's default.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver import Context
from mcp.shared.exceptions import MCPError
from mcp.types import INTERNAL_ERROR, INVALID_PARAMS, CallToolRequestParams, RequestParams
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ConfigDict, Field

from flux_mcp.errors import FluxError, NotFoundError
from flux_mcp.record import TaskRecord
from flux_mcp.results import FAILED_STATUSES, error_line
from flux_mcp.toolkit import FluxTool
from flux_mcp.tools import AppState, present_task

log = logging.getLogger(__name__)

EXTENSION_ID = "io.modelcontextprotocol/tasks"


class TaskParams(RequestParams):
    model_config = ConfigDict(defer_build=True)  # built on the first tasks/* request, not at start

    task_id: str = Field(alias="taskId")


class UpdateTaskParams(TaskParams):
    input_responses: dict[str, Any] = Field(default_factory=dict, alias="inputResponses")


def client_declared_tasks(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Whether this request's client declared the extension (only 2026-07-28 requests carry it)."""
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return False
    capabilities = ctx.session.client_capabilities
    return bool(capabilities and capabilities.extensions and EXTENSION_ID in capabilities.extensions)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TasksExtension(Extension):
    identifier = EXTENSION_ID

    def __init__(self, tools: Callable[[], Sequence[FluxTool]]) -> None:
        self._all_tools = tools  # built on the first tool call, not at start

    @functools.cached_property
    def _tools(self) -> dict[str, FluxTool]:
        return {tool.name: tool for tool in self._all_tools() if tool.start is not None}

    def methods(self) -> Sequence[MethodBinding]:
        return (
            MethodBinding("tasks/get", TaskParams, self._get),
            MethodBinding("tasks/cancel", TaskParams, self._cancel),
            MethodBinding("tasks/update", UpdateTaskParams, self._update),
        )

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        tool = self._tools.get(params.name)
        if tool is None or not client_declared_tasks(ctx):
            return await call_next(ctx)
        started = await tool.begin(Context(request_context=ctx, input_params=params), params.arguments or {})
        if not isinstance(started, TaskRecord):
            return started  # nothing to wait for (a dry run, an error), or a question for the user first
        state: AppState = ctx.lifespan_context
        entry = await state.service.ledger.get(started.task_id)
        created = entry.created_at if entry else datetime.now(UTC).timestamp()
        return {"resultType": "task", **self._task(state, started, created, entry.updated_at if entry else created)}

    def _task(self, state: AppState, record: TaskRecord, created: float, updated: float) -> dict[str, Any]:
        task: dict[str, Any] = {
            "taskId": record.task_id,
            "status": "working",
            "statusMessage": f"PiAPI status: {record.status}",
            "createdAt": _iso(created),
            "lastUpdatedAt": _iso(updated),
            "ttlMs": None,
            "pollIntervalMs": max(1, round(state.service.suggested_poll_seconds(record) * 1000)),
        }
        if record.status == "cancelled":
            task.update(status="cancelled", statusMessage="PiAPI cancelled the task")
        return task

    async def _known(self, ctx: ServerRequestContext[Any, Any], task_id: str) -> AppState:
        state: AppState = ctx.lifespan_context
        entry = await state.service.ledger.get(task_id)
        if entry is None or entry.task_id is None:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown task: {task_id}")
        return state

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: TaskParams) -> dict[str, Any]:
        state = await self._known(ctx, params.task_id)
        try:
            record, result = await present_task(state, params.task_id)
        except NotFoundError as exc:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown task: {params.task_id}") from exc
        except FluxError as exc:
            raise MCPError(code=INTERNAL_ERROR, message=error_line(exc)) from exc
        entry = await state.service.ledger.get(params.task_id)
        assert entry is not None
        task = self._task(state, record, entry.created_at, entry.updated_at)
        if record.status != "cancelled" and (record.is_terminal or record.status in FAILED_STATUSES):
            # A failed (or lost) generation is a completed call whose result is an error (isError),
            # exactly as the tool returns it; the task's own "failed" is for JSON-RPC errors only.
            task.update(
                status="completed",
                statusMessage=f"PiAPI status: {record.status}",
                result=result.model_dump(by_alias=True, mode="json", exclude_none=True),
            )
        return task

    async def _cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskParams) -> dict[str, Any]:
        state = await self._known(ctx, params.task_id)
        try:
            outcome, _ = await state.service.cancel(params.task_id)
            log.info("tasks/cancel %s: %s", params.task_id, outcome.message)
        except FluxError as exc:  # cooperative: acknowledged; tasks/get shows how the task ends
            log.warning("tasks/cancel %s could not reach PiAPI: %s", params.task_id, exc.message)
        return {}

    async def _update(self, ctx: ServerRequestContext[Any, Any], params: UpdateTaskParams) -> dict[str, Any]:
        await self._known(ctx, params.task_id)
        return {}  # these tasks never ask for input; responses are acknowledged and ignored
