"""The tools: eight generated task tools, get/wait/cancel/list, and the task resources.

Each tool is a `toolkit.FluxTool`: an arguments model (for task tools built from the shared
parameter definitions in `flux_mcp.parameters`: descriptions, enums, ranges, defaults), a result
type and a body. All eight task tools run `_run_task_tool`: submit, report the task id in the
first progress notification, wait up to `wait_seconds` with real progress (status and elapsed
time, strictly increasing), and return either the finished task or a successful `processing`
result with the task id, so a client-side time-out can never lose a paid task. Their `start`
submits without waiting, for the Tasks extension (`flux_mcp.tasks`), whose `tasks/get` answers
with `present_task`: the same result, built from the ledger. `flux_get_task`, `flux_wait_task`,
`flux_cancel_task` and `flux_list_tasks` work on any task by id, from the ledger and PiAPI.

If the client abandons a task tool's call (cancel notification or dropped request), the wait
stops and PiAPI is sent a best-effort cancel inside a shielded scope. Abandoning the read-only
`flux_wait_task` only stops waiting. Anticipated failures are `isError` results carrying an
`error` object; only programming errors reach the SDK's generic "Error executing tool".
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import anyio
from mcp.server import MCPServer
from mcp.server.apps import Apps
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.server.mcpserver.resolve import Elicit, ElicitationResult, Resolve
from mcp.types import CallToolResult, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

from flux_mcp.confirmation import SpendApproval, Unasked, refusal, spend_question
from flux_mcp.errors import FluxError, InvalidInputError, NotFoundError, about_task
from flux_mcp.gallery.apps import VIEW_META, VIEW_URI
from flux_mcp.record import TaskRecord
from flux_mcp.results import (
    FAILED_STATUSES,
    MAX_INLINE_IMAGES,
    CancelResult,
    ErrorOut,
    TaskResult,
    ToolResult,
    task_result,
)
from flux_mcp.schemas import listed_only, optional_input
from flux_mcp.settings import Settings
from flux_mcp.toolkit import FluxTool

if TYPE_CHECKING:
    from flux_mcp.catalog import TaskRequest
    from flux_mcp.ledger import LedgerEntry
    from flux_mcp.lifecycle import TaskOutcome, TaskService
    from flux_mcp.parameters import TaskTool

# The service's modules (lifecycle, ledger, files, HTTP client, Pillow) and the task tools' parameters
# (the catalog) load on a tool's first use, not here: starting the server and answering tools/list
# needs none of them (the list is kept by `flux_mcp.tool_list`; tests/test_cold_start.py).

log = logging.getLogger(__name__)

TASK_TOOL_ANNOTATIONS = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True
)
READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=True)
LOCAL_READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
CANCEL = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=True)


#: How long a task id (the Tasks extension's handle) stays valid, said by every tool that makes
#: one: the ledger never discards a task, so `ttlMs` is null.
HANDLE_LIFETIME = "Its task_id never expires."

TaskId = Annotated[str, Field(description="task_id from a flux_* result.")]
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
    # The schema names what a model looks for in the list; every field is returned.
    model_config = ConfigDict(
        json_schema_extra=listed_only("task_id", "status", "prompt", "images"), defer_build=True
    )  # built on first use, not at start

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


class TaskList(ToolResult):
    model_config = ConfigDict(defer_build=True)  # built on first use, not at start
    unlisted: ClassVar[frozenset[str]] = frozenset({"spent_today_usd", "daily_budget_usd"})

    tasks: list[TaskSummary]
    spent_today_usd: float | None  # null only in an error result
    daily_budget_usd: float | None  # null = no daily limit
    error: ErrorOut | None  # null, or (with isError) why the arguments were refused

    def summary(self) -> str:
        if self.error is not None:
            return f"Error [{self.error.category}] {self.error.message}"
        return f"{len(self.tasks)} task(s), newest first."

    @classmethod
    def failure(cls, exc: FluxError, **context: Any) -> CallToolResult:
        """The same structured `error` object as every other tool."""
        error = ErrorOut(**exc.to_dict())
        return cls(tasks=[], spent_today_usd=None, daily_budget_usd=None, error=error).to_call_result(is_error=True)


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
    return result.to_call_result(previews=previews, is_error=failed)


@dataclass
class _Submitted:
    """A task tool's call once submitted: what to wait for and how to present it."""

    request: TaskRequest
    record: TaskRecord
    reattached: bool
    include: str
    wait_seconds: float


def _split_options(settings: Settings, args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The task's own arguments, and the options that steer the call (wait, dry run, key, preview)."""
    task_args = dict(args)
    options = {name: task_args.pop(name) for name in ("wait_seconds", "dry_run", "idempotency_key", "include_image")}
    options["wait_seconds"] = settings.wait_seconds if options["wait_seconds"] is None else options["wait_seconds"]
    options["include_image"] = options["include_image"] or settings.include_image
    return task_args, options


async def _submit(
    tool: TaskTool, state: AppState, args: dict[str, Any], approval: Any = None, on_queued: Any = None
) -> _Submitted | CallToolResult:
    """Validated arguments -> a submitted task, or the finished result of a dry run."""
    service = state.service
    args, options = _split_options(state.settings, args)
    idempotency_key, include = options["idempotency_key"], options["include_image"]
    request = await service.prepare(tool.task_type, args)
    cost = request.estimated_cost_usd
    if options["dry_run"]:
        from flux_mcp.lifecycle import summarise_payload

        spent = await service.spent_today()
        reattach = await service.would_reattach(tool.name, request, idempotency_key)
        decision = "allowed" if reattach else service.guard.decide(cost, spent)
        return TaskResult(
            task_id=None,
            model=request.model.value,
            task_type=request.task_type.value,
            status=None,
            error=None,
            payload=summarise_payload(request.to_payload()),
            estimated_cost_usd=cost,
            spent_today_usd=spent,
            spend_guard=decision,
            next_step=f"Nothing was sent (spend guard: {decision}). Call again without dry_run to submit.",
        ).to_call_result()
    if (refused := refusal(approval)) is not None:
        raise refused
    # The preview choice is kept with the task, so a result fetched later looks the same.
    arguments = {**args, "include_image": include}
    submission = await service.submit(
        tool.name, request, arguments=arguments, idempotency_key=idempotency_key, on_queued=on_queued
    )
    return _Submitted(
        request=request,
        record=submission.record,
        reattached=submission.reattached,
        include=include,
        wait_seconds=options["wait_seconds"],
    )


async def _run_task_tool(tool: TaskTool, ctx: Context, args: dict[str, Any], approval: Any = None) -> CallToolResult:
    service = _state(ctx).service
    progress = _Progress(ctx)  # also reports a turn waited in the local queue
    submitted = await _submit(tool, _state(ctx), args, approval, on_queued=progress.queued)
    if isinstance(submitted, CallToolResult):
        return submitted
    record = submitted.record
    with about_task(record.task_id), service.showing_previews(record.task_id, submitted.include == "thumbnail"):
        try:
            # `initial` makes the first progress notification carry the task id before any waiting.
            outcome = await service.wait(
                record.task_id, timeout=submitted.wait_seconds, on_update=progress.send, initial=record
            )
        except anyio.get_cancelled_exc_class():
            if not submitted.reattached:
                with anyio.CancelScope(shield=True):
                    await service.cancel_quietly(record.task_id)
            raise
    outcome.reattached = submitted.reattached
    # The task's cost, and its refund if PiAPI did not bill it, are in the ledger by now: a read of
    # today's spend begun from here on (perhaps another call's) counts them.
    settled = service.spend_mark()
    cost, spent = submitted.request.estimated_cost_usd, await service.spent_today(after=settled)
    return await _present(service, outcome, submitted.include, estimated_cost_usd=cost, spent_today_usd=spent)


async def present_task(state: AppState, task_id: str) -> tuple[TaskRecord, CallToolResult]:
    """A task as its task tool would have returned it, from the ledger (one poll if it is still
    running): the Tasks extension's `tasks/get`. Raises `NotFoundError` for a task the ledger
    does not hold."""
    entry = await state.service.ledger.get(task_id)
    if entry is None or entry.record is None:
        raise NotFoundError(f"task {task_id} is not in the local ledger", task_id=task_id)
    include = _shown(state, entry)
    with about_task(task_id), state.service.showing_previews(task_id, include == "thumbnail"):
        if entry.record.is_terminal:  # from the ledger (and the local copies), no request
            outcome = await state.service.wait(task_id, timeout=0)
        else:
            outcome = await state.service.get(task_id)
    cost, spent = entry.estimated_cost_usd, await state.service.spent_today()
    result = await _present(state.service, outcome, include, estimated_cost_usd=cost, spent_today_usd=spent)
    return outcome.record, result


def _confirm_resolver(tool: TaskTool) -> Callable[..., Awaitable[Unasked | Elicit[SpendApproval]]]:
    """Runs before the tool body: asks the user to confirm a call above the per-call threshold."""

    async def confirm_spend(ctx: Context, arguments: dict[str, Any]) -> Unasked | Elicit[SpendApproval]:
        state = _state(ctx)
        if state.settings.confirm_above_usd is None:
            return Unasked()
        args, options = _split_options(state.settings, arguments)
        if options["dry_run"]:
            return Unasked()
        try:
            request = await state.service.prepare(tool.task_type, args)
        except FluxError:
            return Unasked()  # the tool body reports it
        return await spend_question(ctx, state.service, tool.name, request, options["idempotency_key"])

    return confirm_spend


def _task_tool(tool: TaskTool) -> FluxTool:
    async def run(ctx: Context, args: dict[str, Any], approval: Any = None) -> CallToolResult:
        return await _run_task_tool(tool, ctx, args, approval)

    async def start(ctx: Context, args: dict[str, Any], approval: Any = None) -> TaskRecord | CallToolResult:
        submitted = await _submit(tool, _state(ctx), args, approval)
        return submitted if isinstance(submitted, CallToolResult) else submitted.record

    async def error_context(ctx: Context, raw: Mapping[str, Any]) -> dict[str, Any]:
        from flux_mcp.parameters import PARAMETERS

        given = raw.get("model")
        model = tool.fixed_model or (given if isinstance(given, str) else None) or PARAMETERS["model"].default
        context: dict[str, Any] = {"task_type": tool.task_type.value, "model": str(model)}
        state = _state(ctx)
        if state.service_built:  # today's spend, without building the service for a rejected argument
            context["spent_today_usd"] = await state.service.spent_today()
        return context

    def needs(approval: Any) -> None:
        """The SDK runs the resolver first (elicitation in both protocol eras) and passes `approval`."""

    needs.__annotations__ = {
        "approval": Annotated[ElicitationResult[SpendApproval], Resolve(_confirm_resolver(tool))],
        "return": None,
    }

    return FluxTool(
        name=tool.name,
        title=tool.title,
        description=f"{tool.description} {HANDLE_LIFETIME}",
        arguments=tool.arguments_model,
        result=TaskResult,
        run=run,
        annotations=TASK_TOOL_ANNOTATIONS,
        error_context=error_context,
        needs=needs,
        start=start,
        meta=VIEW_META,
    )


# --- get / wait / cancel / list ---------------------------------------------------------------


def _optional(description: str) -> Any:
    return Field(description=description, json_schema_extra=optional_input)


class _Arguments(BaseModel):
    # As the task tools: never coerced. Built on first use, not at start.
    model_config = ConfigDict(extra="forbid", strict=True, defer_build=True)


class TaskIdArguments(_Arguments):
    task_id: TaskId


class WaitArguments(TaskIdArguments):
    wait_seconds: Annotated[float | None, Field(ge=0, le=600), _optional("Seconds to wait.")] = None


class ListArguments(_Arguments):
    status: Annotated[ListStatus | None, _optional("Only this status.")] = None
    task_type: Annotated[TaskTypeName | None, _optional("Only this task type.")] = None
    limit: Annotated[int, Field(ge=1, le=200, description="At most this many.")] = 20


def _shown(state: AppState, entry: LedgerEntry | None) -> str:
    """What a later look at a task shows inline: what the call that made it asked for."""
    return "thumbnail" if state.service.wants_previews(entry) else "none"


async def _get_task(ctx: Context, args: dict[str, Any]) -> CallToolResult:
    state = _state(ctx)
    with about_task(args["task_id"]):
        include = _shown(state, await state.service.ledger.get(args["task_id"]))
        with state.service.showing_previews(args["task_id"], include == "thumbnail"):
            outcome = await state.service.get(args["task_id"])
    return await _present(state.service, outcome, include)


async def _wait_task(ctx: Context, args: dict[str, Any]) -> CallToolResult:
    state = _state(ctx)
    timeout = state.settings.wait_seconds if args["wait_seconds"] is None else args["wait_seconds"]
    with about_task(args["task_id"]):
        include = _shown(state, await state.service.ledger.get(args["task_id"]))
        with state.service.showing_previews(args["task_id"], include == "thumbnail"):
            outcome = await state.service.wait(args["task_id"], timeout=timeout, on_update=_Progress(ctx).send)
    return await _present(state.service, outcome, include)


async def _cancel_task(ctx: Context, args: dict[str, Any]) -> CallToolResult:
    state = _state(ctx)
    with about_task(args["task_id"]):
        cancel, outcome = await state.service.cancel(args["task_id"])
    outcome.notes.insert(0, cancel.message + ".")
    return await _present(state.service, outcome, "none", cancel_accepted=cancel.accepted)


async def _list_tasks(ctx: Context, args: dict[str, Any]) -> CallToolResult:
    state = _state(ctx)
    entries = await state.service.ledger.list(**args)
    return TaskList(
        error=None,
        tasks=[_summary(e) for e in entries],
        spent_today_usd=await state.service.spent_today(),
        daily_budget_usd=state.settings.daily_budget_usd,
    ).to_call_result()


def all_tools() -> list[FluxTool]:
    """Every tool, in the order tools/list shows them (task tools first, in catalog order)."""
    from flux_mcp.parameters import TASK_TOOLS

    return [
        *(_task_tool(tool) for tool in TASK_TOOLS),
        FluxTool(
            name="flux_get_task",
            title="Get a Flux task",
            description="Current state of a task, without waiting.",
            arguments=TaskIdArguments,
            result=TaskResult,
            run=_get_task,
            annotations=READ_ONLY,
            meta=VIEW_META,
        ),
        FluxTool(
            name="flux_wait_task",
            title="Wait for a Flux task",
            description="Keep waiting for a task that came back 'processing'.",
            arguments=WaitArguments,
            result=TaskResult,
            run=_wait_task,
            annotations=READ_ONLY,
            meta=VIEW_META,
        ),
        FluxTool(
            name="flux_cancel_task",
            title="Cancel a Flux task",
            description="Ask PiAPI to cancel a task (only pending tasks can be).",
            arguments=TaskIdArguments,
            result=CancelResult,
            run=_cancel_task,
            annotations=CANCEL,
        ),
        FluxTool(
            name="flux_list_tasks",
            title="List Flux tasks",
            description="Tasks from the local ledger, newest first.",
            arguments=ListArguments,
            result=TaskList,
            run=_list_tasks,
            annotations=LOCAL_READ_ONLY,
            meta=VIEW_META,
        ),
    ]


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


# --- the gallery App's own action -------------------------------------------------------------------


async def _rerun_arguments(state: AppState, task_id: str) -> tuple[TaskTool, dict[str, Any]]:
    """The tool and validated arguments that submit `task_id`'s request again, as a new task."""
    entry = await state.service.ledger.get(task_id)
    if entry is None:
        raise NotFoundError(f"task {task_id} is not in the local ledger", task_id=task_id)
    from flux_mcp.parameters import TASK_TOOLS

    tool = next((t for t in TASK_TOOLS if t.name == entry.tool), None)
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
    ) -> Annotated[CallToolResult, TaskResult]:
        """Submit a task's request again as a new, paid task (spend guard applies); returns at once."""
        try:
            with about_task(task_id):
                tool, args = await _rerun_arguments(_state(ctx), task_id)
            return await _run_task_tool(tool, ctx, args, approval)
        except FluxError as exc:
            return TaskResult.failure(exc)


def register_resources(mcp: MCPServer) -> None:
    @mcp.resource("flux://tasks/{task_id}", mime_type="application/json", title="Flux task record")
    async def task_record(task_id: str, ctx: Context) -> str:
        """The ledger's record of a task: request, status history, image URLs and local copies."""
        ledger = _state(ctx).service.ledger
        entry = await ledger.get(task_id)
        if entry is None:
            raise ResourceNotFoundError(f"task {task_id} is not in the local ledger")
        return json.dumps(await ledger.describe(entry))

    async def local_copy(ctx: Context, task_id: str, n: str) -> str:
        rows = await _state(ctx).service.ledger.images(task_id)
        row = next((r for r in rows if str(r.n) == n and r.path), None)
        if row is None:
            raise ResourceNotFoundError(f"no local copy of image {n} of task {task_id}")
        return row.path

    @mcp.resource("flux://tasks/{task_id}/images/{n}", mime_type="image/png", title="Flux task image")
    async def task_image(task_id: str, n: str, ctx: Context) -> bytes:
        """Image n of a task, read from the local copy (outlives PiAPI's temporary URL)."""
        return await anyio.Path(await local_copy(ctx, task_id, n)).read_bytes()

    @mcp.resource("flux://tasks/{task_id}/thumbnails/{n}", mime_type="image/webp", title="Flux task thumbnail")
    async def task_thumbnail(task_id: str, n: str, ctx: Context) -> bytes:
        """A preview of image n (<= 512 px, <= 200 KB), made from the local copy."""
        from flux_mcp.files import make_thumbnail

        data, _ = await anyio.to_thread.run_sync(make_thumbnail, Path(await local_copy(ctx, task_id, n)))
        return data
