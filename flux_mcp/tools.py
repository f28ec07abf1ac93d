"""The tools: eight generated task tools, get/wait/cancel/list, and the task resources.

Each task tool publishes the JSON schema of its own arguments model (built from the shared
parameter definitions in `flux_mcp.parameters`: descriptions, enums, ranges, defaults) and
validates the client's raw arguments with that same model, so every bad or unknown argument
comes back as one structured `invalid_input` error (`FluxServer.call_tool` hands them over raw,
untouched by the SDK's lenient parsing). All eight run `_run_task_tool`: submit, report the task
id in the first progress notification, wait up to `wait_seconds` with real progress (status and
elapsed time, strictly increasing), and return either the finished task or a successful
`processing` result with the task id, so a client-side time-out can never lose a paid task.
`flux_get_task`, `flux_wait_task`, `flux_cancel_task` and `flux_list_tasks` work on any task by
id, from the ledger and PiAPI.

If the client abandons a task tool's call (cancel notification or dropped request), the wait
stops and PiAPI is sent a best-effort cancel inside a shielded scope. Abandoning the read-only
`flux_wait_task` only stops waiting. Anticipated failures are `isError` results carrying an
`error` object; only programming errors reach the SDK's generic "Error executing tool".
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import anyio
from mcp.server import MCPServer
from mcp.server.apps import Apps
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.server.mcpserver.resolve import Elicit, ElicitationResult, Resolve
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, Strict

from flux_mcp.confirmation import SpendApproval, Unasked, refusal, spend_question
from flux_mcp.errors import FluxError, InvalidInputError, NotFoundError
from flux_mcp.gallery.apps import VIEW_META, VIEW_URI
from flux_mcp.lifecycle import TaskOutcome, TaskService, summarise_payload
from flux_mcp.parameters import PARAMETERS, TASK_TOOLS, TaskTool
from flux_mcp.record import TaskRecord
from flux_mcp.results import (
    FAILED_STATUSES,
    MAX_INLINE_IMAGES,
    CancelResult,
    ErrorOut,
    TaskResult,
    error_result,
    summary_text,
    task_result,
    to_call_result,
)
from flux_mcp.settings import Settings

log = logging.getLogger(__name__)

TASK_TOOL_NAMES = frozenset(tool.name for tool in TASK_TOOLS)

TASK_TOOL_ANNOTATIONS = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True
)
READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=True)
CANCEL = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=True)


TaskId = Annotated[str, Field(description="task_id from a flux_* result.")]
ReturnsTask = Annotated[CallToolResult, TaskResult]
ListStatus = Literal["pending", "processing", "completed", "failed", "cancelled", "uncertain", "lost"]
TaskTypeName = Literal[
    "txt2img", "img2img", "txt2img-lora", "img2img-lora",
    "fill-inpaint", "fill-outpaint", "redux-variation", "controlnet-lora",
]  # fmt: skip


class AppState:
    """What the tools share for the server's lifetime. The service (HTTP client, ledger, image
    store) is built by `build_service` on first use, so starting the server and answering
    tools/list load and build none of it."""

    def __init__(self, settings: Settings, build_service: Callable[[], TaskService]) -> None:
        self.settings = settings
        self._build_service = build_service
        self._service: TaskService | None = None

    @property
    def service(self) -> TaskService:
        if self._service is None:
            self._service = self._build_service()
        return self._service

    @property
    def service_built(self) -> bool:
        return self._service is not None


class TaskSummary(BaseModel):
    task_id: str | None
    tool: str
    task_type: str
    model: str
    status: str | None
    submit_state: str
    created_at: str
    prompt: str | None = None
    images: list[str] = []
    error: str | None = None


class TaskList(BaseModel):
    tasks: list[TaskSummary]
    spent_today_usd: float | None  # null only in an error result
    daily_budget_usd: float | None  # null = no daily limit
    error: ErrorOut | None  # null, or (with isError) why the arguments were refused


def list_failure(exc: FluxError) -> CallToolResult:
    """`flux_list_tasks`'s error result: the same structured `error` object as every other tool."""
    result = TaskList(tasks=[], spent_today_usd=None, daily_budget_usd=None, error=ErrorOut(**exc.to_dict()))
    text = summary_text(error_result(exc))
    return CallToolResult(
        content=[TextContent(type="text", text=text)], structured_content=result.model_dump(mode="json"), is_error=True
    )


class _Progress:
    """Turns task updates into strictly increasing `notifications/progress` (elapsed seconds)."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._last = -1.0
        self._queued_for = 0.0  # time spent in the local queue comes before the task's own

    async def queued(self, ahead: int, waited: float) -> None:
        self._queued_for = waited
        limit = _state(self._ctx).settings.max_concurrent_tasks
        await self._report(
            waited,
            f"queued locally, {ahead} ahead, {waited:.0f} s - {limit} tasks already running at PiAPI "
            "(FLUX_MCP_MAX_CONCURRENT_TASKS); nothing sent yet",
        )

    async def send(self, record: TaskRecord, elapsed: float) -> None:
        await self._report(self._queued_for + elapsed, f"{record.status}, {elapsed:.0f} s - task {record.task_id}")

    async def _report(self, elapsed: float, message: str) -> None:
        value = max(round(elapsed, 1), round(self._last + 0.1, 1))
        self._last = value
        try:
            await self._ctx.report_progress(value, None, message)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            log.warning("progress notification failed; the task continues", exc_info=True)


def _state(ctx: Context) -> AppState:
    return ctx.request_context.lifespan_context


def _settings_include(settings: Settings, include_image: str | None) -> str:
    return include_image or settings.include_image


def failure_result(
    exc: FluxError,
    *,
    task_type: str = "",
    model: str = "",
    cancel: bool = False,
    spent_today_usd: float | None = None,
) -> CallToolResult:
    result = error_result(exc, task_type=task_type, model=model, spent_today_usd=spent_today_usd)
    if cancel:  # flux_cancel_task publishes CancelResult: its errors must match that schema too
        result = CancelResult(**dict(result), cancel_accepted=False)
    return to_call_result(result, is_error=True)


async def _present(
    service: TaskService,
    outcome: TaskOutcome,
    include: str,
    *,
    estimated_cost_usd: float | None = None,
    cancel_accepted: bool | None = None,
    spent_today_usd: float | None = None,
) -> CallToolResult:
    result = task_result(outcome, estimated_cost_usd=estimated_cost_usd, spent_today_usd=spent_today_usd)
    if cancel_accepted is not None:
        result = CancelResult(**dict(result), cancel_accepted=cancel_accepted)
    # A cancel that worked is a success for flux_cancel_task, whatever the task's status.
    failed = result.status in FAILED_STATUSES or (result.status == "cancelled" and cancel_accepted is None)
    previews = []
    if include == "thumbnail":
        previews = await service.previews([(i.url, i.path) for i in result.images], limit=MAX_INLINE_IMAGES)
    return to_call_result(result, previews=previews, is_error=failed)


def _split_options(settings: Settings, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The task's own arguments, and the options that steer the call (wait, dry run, key, preview)."""
    task_args = dict(args)
    options = {name: task_args.pop(name) for name in ("wait_seconds", "dry_run", "idempotency_key", "include_image")}
    options["wait_seconds"] = settings.wait_seconds if options["wait_seconds"] is None else options["wait_seconds"]
    options["include_image"] = _settings_include(settings, options["include_image"])
    return task_args, options


async def _run_task_tool(tool: TaskTool, ctx: Context, args: dict[str, Any], approval: Any = None) -> CallToolResult:
    state = _state(ctx)
    service, settings = state.service, state.settings
    args, options = _split_options(settings, args)
    idempotency_key, include = options["idempotency_key"], options["include_image"]
    model = str(tool.fixed_model or args.get("model") or "")
    try:
        request = await service.prepare(tool.task_type, args)
    except FluxError as exc:
        return failure_result(exc, task_type=tool.task_type.value, model=model)
    task_type, model, cost = request.task_type.value, request.model.value, request.estimated_cost_usd
    if options["dry_run"]:
        spent = await service.spent_today()
        reattach = await service.would_reattach(tool.name, request, idempotency_key)
        decision = "allowed" if reattach else service.guard.decide(cost, spent)
        result = TaskResult(
            task_id=None,
            model=model,
            task_type=task_type,
            status=None,
            error=None,
            payload=summarise_payload(request.to_payload()),
            estimated_cost_usd=cost,
            spent_today_usd=spent,
            spend_guard=decision,
            next_step=f"Nothing was sent (spend guard: {decision}). Call again without dry_run to submit.",
        )
        return to_call_result(result)
    if (refused := refusal(approval)) is not None:
        return failure_result(refused, task_type=task_type, model=model, spent_today_usd=await service.spent_today())
    progress = _Progress(ctx)
    try:
        submission = await service.submit(
            tool.name, request, arguments=args, idempotency_key=idempotency_key, on_queued=progress.queued
        )
    except FluxError as exc:
        return failure_result(exc, task_type=task_type, model=model, spent_today_usd=await service.spent_today())
    record = submission.record
    try:
        # `initial` makes the first progress notification carry the task id before any waiting.
        outcome = await service.wait(
            record.task_id, timeout=options["wait_seconds"], on_update=progress.send, initial=record
        )
    except anyio.get_cancelled_exc_class():
        if not submission.reattached:
            with anyio.CancelScope(shield=True):
                await service.cancel_quietly(record.task_id)
        raise
    except FluxError as exc:
        exc.task_id = exc.task_id or record.task_id
        return failure_result(exc, task_type=task_type, model=model)
    outcome.reattached = submission.reattached
    spent = await service.spent_today()
    return await _present(service, outcome, include, estimated_cost_usd=cost, spent_today_usd=spent)


def _confirm_resolver(tool: TaskTool) -> Callable[..., Awaitable[Unasked | Elicit[SpendApproval]]]:
    """Runs before the tool body: asks the user to confirm a call above the per-call threshold."""

    async def confirm_spend(ctx: Context, raw_arguments: Any = None) -> Unasked | Elicit[SpendApproval]:
        state = _state(ctx)
        if state.settings.confirm_above_usd is None:
            return Unasked()
        try:
            args = tool.validate_arguments(raw_arguments if isinstance(raw_arguments, dict) else {})
            args, options = _split_options(state.settings, args)
            if options["dry_run"]:
                return Unasked()
            request = await state.service.prepare(tool.task_type, args)
        except FluxError:
            return Unasked()  # the tool body reports it
        return await spend_question(ctx, state.service, tool.name, request, options["idempotency_key"])

    return confirm_spend


def _task_tool_function(tool: TaskTool) -> Callable[..., Awaitable[CallToolResult]]:
    """The tool body: validates the raw arguments (see `FluxServer.call_tool`) with the tool's model."""

    async def run(ctx: Context, raw_arguments: Any = None, approval: Any = None) -> ReturnsTask:
        try:
            args = tool.validate_arguments(raw_arguments if isinstance(raw_arguments, dict) else {})
        except FluxError as exc:
            given = raw_arguments.get("model") if isinstance(raw_arguments, dict) else None
            model = tool.fixed_model or (given if isinstance(given, str) else None) or PARAMETERS["model"].default
            return failure_result(exc, task_type=tool.task_type.value, model=str(model))
        return await _run_task_tool(tool, ctx, args, approval)

    run.__name__ = run.__qualname__ = tool.name
    # The SDK fills `approval` by running the resolver first (elicitation in both protocol eras).
    run.__annotations__["approval"] = Annotated[ElicitationResult[SpendApproval], Resolve(_confirm_resolver(tool))]
    return run


# --- the gallery App's own action -------------------------------------------------------------------

_RERUN_TOOLS = {tool.name: tool for tool in TASK_TOOLS}


async def _rerun_arguments(state: AppState, task_id: str) -> tuple[TaskTool, dict[str, Any]]:
    """The tool and validated arguments that submit `task_id`'s request again, as a new task."""
    entry = await state.service.ledger.get(task_id)
    if entry is None:
        raise NotFoundError(f"task {task_id} is not in the local ledger", task_id=task_id)
    tool = _RERUN_TOOLS.get(entry.tool)
    if tool is None:
        raise InvalidInputError(
            f"task {task_id} was not submitted by this server, so its arguments are unknown",
            hint="Call the task tool again with the arguments you want.",
        )
    args = dict(entry.request)
    if any(isinstance(v, str) and v.startswith("data:") and v.endswith(" chars)") for v in args.values()):
        raise InvalidInputError(
            f"task {task_id} was given an inline image, which is not stored; it cannot be re-run from the ledger",
            hint="Call the task tool again with the image.",
        )
    # A new key makes it a new task (a repeat would re-attach); the view follows it with flux_get_task.
    args.update(idempotency_key=f"rerun-{uuid.uuid4().hex}", wait_seconds=0, include_image="none")
    return tool, tool.validate_arguments(args)


async def _confirm_rerun(ctx: Context, task_id: str) -> Unasked | Elicit[SpendApproval]:
    state = _state(ctx)
    if state.settings.confirm_above_usd is None:
        return Unasked()
    try:
        tool, args = await _rerun_arguments(state, task_id)
        args, options = _split_options(state.settings, args)
        request = await state.service.prepare(tool.task_type, args)
    except FluxError:
        return Unasked()  # the tool body reports it
    return await spend_question(ctx, state.service, tool.name, request, options["idempotency_key"])


def register_app_tools(apps: Apps) -> None:
    """Tools only the gallery view calls (`_meta.ui.visibility: ["app"]`; hosts hide them from the model)."""

    @apps.tool(
        resource_uri=VIEW_URI,
        visibility=["app"],
        title="Re-run a Flux task",
        annotations=TASK_TOOL_ANNOTATIONS,
    )
    async def flux_rerun(
        task_id: TaskId,
        ctx: Context,
        approval: Annotated[ElicitationResult[SpendApproval], Resolve(_confirm_rerun)] = None,
    ) -> ReturnsTask:
        """Submit a task's request again as a new, paid task (spend guard applies); returns at once."""
        state = _state(ctx)
        try:
            tool, args = await _rerun_arguments(state, task_id)
        except FluxError as exc:
            exc.task_id = exc.task_id or task_id
            return failure_result(exc)
        return await _run_task_tool(tool, ctx, args, approval)


def register_tools(mcp: MCPServer) -> None:
    for tool in TASK_TOOLS:
        mcp.add_tool(
            _task_tool_function(tool),
            name=tool.name,
            title=tool.title,
            description=tool.description,
            annotations=TASK_TOOL_ANNOTATIONS,
            meta=VIEW_META,
        )
    _register_task_management(mcp)
    _register_resources(mcp)


def _register_task_management(mcp: MCPServer) -> None:
    @mcp.tool(title="Get a Flux task", annotations=READ_ONLY, meta=VIEW_META)
    async def flux_get_task(task_id: TaskId, ctx: Context) -> ReturnsTask:
        """Current state of a task, without waiting."""
        state = _state(ctx)
        try:
            outcome = await state.service.get(task_id)
        except FluxError as exc:
            exc.task_id = exc.task_id or task_id
            return failure_result(exc)
        return await _present(state.service, outcome, state.settings.include_image)

    @mcp.tool(title="Wait for a Flux task", annotations=READ_ONLY, meta=VIEW_META)
    async def flux_wait_task(
        task_id: TaskId,
        ctx: Context,
        wait_seconds: Annotated[
            float | None, Strict(), Field(ge=0, le=600, description="Seconds to wait (default 45).")
        ] = None,
    ) -> ReturnsTask:
        """Keep waiting for a task that came back 'processing'."""
        state = _state(ctx)
        timeout = state.settings.wait_seconds if wait_seconds is None else wait_seconds
        progress = _Progress(ctx)
        try:
            outcome = await state.service.wait(task_id, timeout=timeout, on_update=progress.send)
        except FluxError as exc:
            exc.task_id = exc.task_id or task_id
            return failure_result(exc)
        return await _present(state.service, outcome, state.settings.include_image)

    @mcp.tool(title="Cancel a Flux task", annotations=CANCEL)
    async def flux_cancel_task(task_id: TaskId, ctx: Context) -> Annotated[CallToolResult, CancelResult]:
        """Ask PiAPI to cancel a task (only pending tasks can be)."""
        state = _state(ctx)
        try:
            cancel, outcome = await state.service.cancel(task_id)
        except FluxError as exc:
            exc.task_id = exc.task_id or task_id
            return failure_result(exc, cancel=True)
        outcome.notes.insert(0, cancel.message + ".")
        return await _present(state.service, outcome, "none", cancel_accepted=cancel.accepted)

    @mcp.tool(
        title="List Flux tasks", annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False), meta=VIEW_META
    )
    async def flux_list_tasks(
        ctx: Context,
        status: Annotated[ListStatus | None, Field(description="Only this status (null = any).")] = None,
        task_type: Annotated[TaskTypeName | None, Field(description="Only this task type (null = any).")] = None,
        limit: Annotated[int, Strict(), Field(ge=1, le=200, description="Newest first, at most this many.")] = 20,
    ) -> TaskList:
        """Tasks from the local ledger, newest first."""
        state = _state(ctx)
        entries = await state.service.ledger.list(status=status, task_type=task_type, limit=limit)
        return TaskList(
            error=None,
            tasks=[_summary(e) for e in entries],
            spent_today_usd=await state.service.spent_today(),
            daily_budget_usd=state.settings.daily_budget_usd,
        )


def _summary(entry: Any) -> TaskSummary:
    request = entry.request if isinstance(entry.request, dict) else {}
    prompt = request.get("prompt") or (entry.payload.get("input") or {}).get("prompt")
    return TaskSummary(
        task_id=entry.task_id,
        tool=entry.tool,
        task_type=entry.task_type,
        model=entry.model,
        status=entry.status,
        submit_state=entry.submit_state,
        created_at=datetime.fromtimestamp(entry.created_at, UTC).isoformat(timespec="seconds"),
        prompt=prompt[:200] if isinstance(prompt, str) else None,
        images=[row.path or row.url for row in entry.images],
        error=(entry.error or {}).get("message") if isinstance(entry.error, dict) else None,
    )


def _register_resources(mcp: MCPServer) -> None:
    @mcp.resource("flux://tasks/{task_id}", mime_type="application/json", title="Flux task record")
    async def task_record(task_id: str, ctx: Context) -> str:
        """The ledger's record of a task: request, status history, image URLs and local copies."""
        ledger = _state(ctx).service.ledger
        entry = await ledger.get(task_id)
        if entry is None:
            raise ResourceNotFoundError(f"task {task_id} is not in the local ledger")
        return json.dumps(await ledger.describe(entry))

    @mcp.resource("flux://tasks/{task_id}/images/{n}", mime_type="image/png", title="Flux task image")
    async def task_image(task_id: str, n: str, ctx: Context) -> bytes:
        """Image n of a task, read from the local copy (outlives PiAPI's temporary URL)."""
        rows = await _state(ctx).service.ledger.images(task_id)
        row = next((r for r in rows if str(r.n) == n and r.path), None)
        if row is None:
            raise ResourceNotFoundError(f"no local copy of image {n} of task {task_id}")
        return await anyio.Path(row.path).read_bytes()
