"""What a tool call returns: one `TaskResult` schema for every task tool, as MCP content.

Every result carries `structuredContent` matching the published `outputSchema`, a short text
summary for clients that read only text, a `resource_link` per image (the local copy outlives
PiAPI's temporary URL) and, when asked, small thumbnails as `ImageContent` (never full size: hosts
cap tool results near 1 MB). Failures use the same shape with `isError: true` and an `error`
object `{code, category, message, retryable, hint}`, so an agent can branch without parsing text.
"""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime
from typing import Any

from mcp.types import CallToolResult, ImageContent, ResourceLink, TextContent
from pydantic import BaseModel

from flux_mcp.errors import FluxError, TaskFailedError, TaskLostError
from flux_mcp.files import mime_of
from flux_mcp.lifecycle import TaskOutcome
from flux_mcp.record import Status, TaskRecord

log = logging.getLogger(__name__)

MAX_INLINE_IMAGES = 4
# The error a task's own status carries: (category, hint).
_ERROR_KINDS: dict[str, tuple[str, str]] = {
    "failed": (TaskFailedError.category, TaskFailedError.default_hint),
    "lost": (TaskLostError.category, TaskLostError.default_hint),
}
FAILED_STATUSES = frozenset(_ERROR_KINDS)  # a result with one of these is an `isError` result


class ImageOut(BaseModel):
    url: str
    path: str | None  # the local copy, or null when not saved


class ErrorOut(BaseModel):
    code: int | None
    category: str
    message: str
    retryable: bool
    hint: str = ""


class TaskResult(BaseModel):
    """The outcome of a Flux task tool (also returned by get and wait). Optional fields are left
    out of `structuredContent` when they have no value; `task_id`, `status` and `error` are always
    present (null for a dry run, or an error before PiAPI gave a task id)."""

    task_id: str | None
    model: str
    task_type: str
    status: Status | None
    images: list[ImageOut] = []
    error: ErrorOut | None
    created_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    elapsed_seconds: float | None = None
    usage: dict[str, Any] | None = None
    estimated_cost_usd: float | None = None
    reattached: bool = False
    spent_today_usd: float | None = None
    spend_guard: str | None = None  # dry runs: allowed, needs_confirmation or over_budget
    payload: dict[str, Any] | None = None
    next_step: str | None = None

    def wire(self) -> dict[str, Any]:
        """The `structuredContent`: None-valued optional fields omitted, required ones kept."""
        required = {name for name, field in type(self).model_fields.items() if field.is_required()}
        data = self.model_dump(mode="json")
        return {k: v for k, v in data.items() if v is not None or k in required}


class CancelResult(TaskResult):
    """`flux_cancel_task`: the task as it now stands, and whether PiAPI accepted the cancel."""

    cancel_accepted: bool


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def _elapsed(record: TaskRecord) -> float | None:
    if record.created_at is None:
        return None
    end = record.ended_at or datetime.now(UTC)
    return round(max(0.0, (end - record.created_at).total_seconds()), 1)


def _next_step(record: TaskRecord, saved: bool) -> str | None:
    if record.status in ("pending", "processing"):
        return f"Still running. Call flux_wait_task with task_id '{record.task_id}' to keep waiting."
    if record.status == "completed" and saved:
        return "Done. Local copies are in images[].path; PiAPI's URLs are temporary."
    if record.status == "completed":
        return "Done. Some images have no local copy (images[].path is null); PiAPI's URLs are temporary."
    return None


def task_result(
    outcome: TaskOutcome, *, estimated_cost_usd: float | None = None, spent_today_usd: float | None = None
) -> TaskResult:
    record = outcome.record
    paths = {row.n: row.path for row in outcome.images}
    error = None
    if record.error is not None:
        category, hint = _ERROR_KINDS.get(record.status, ("cancelled", ""))
        error = ErrorOut(
            code=record.error.code, category=category, message=record.error.text, retryable=False, hint=hint
        )
    saved = all(paths.get(n) for n in range(len(record.image_urls)))
    notes = [n for n in (_next_step(record, saved), *outcome.notes) if n]
    if outcome.reattached:
        notes.insert(0, "This identical request was already submitted, so no new task was paid for; "
                        "pass a new idempotency_key to generate another.")  # fmt: skip
    return TaskResult(
        task_id=record.task_id,
        model=record.model,
        task_type=record.task_type,
        status=record.status,
        images=[ImageOut(url=url, path=paths.get(n)) for n, url in enumerate(record.image_urls)],
        error=error,
        created_at=_iso(record.created_at),
        started_at=_iso(record.started_at),
        ended_at=_iso(record.ended_at),
        elapsed_seconds=_elapsed(record),
        usage=record.usage,
        estimated_cost_usd=estimated_cost_usd,
        reattached=outcome.reattached,
        spent_today_usd=spent_today_usd,
        next_step=" ".join(notes) or None,
    )


def summary_text(result: TaskResult) -> str:
    if result.status is None and result.error is not None:
        text = f"Error [{result.error.category}] {result.error.message}"
        if result.task_id and result.task_id not in text:
            text += f" (task {result.task_id})"
        return text + (f"\n{result.error.hint}" if result.error.hint else "")
    if result.status is None:
        return "Dry run: nothing was sent. " + json.dumps(
            {
                "payload": result.payload,
                "estimated_cost_usd": result.estimated_cost_usd,
                "spend_guard": result.spend_guard,
                "spent_today_usd": result.spent_today_usd,
            }
        )
    lines = [f"Task {result.task_id} ({result.task_type}, {result.model}): {result.status}."]
    if result.error:
        lines.append(f"Error [{result.error.category}] {result.error.message}")
    for n, image in enumerate(result.images):
        lines.append(f"Image {n}: {image.path or image.url}" + (f" (url {image.url})" if image.path else ""))
    if result.next_step:
        lines.append(result.next_step)
    return "\n".join(lines)


def to_call_result(
    result: TaskResult, *, previews: list[tuple[bytes, str]] = (), is_error: bool = False
) -> CallToolResult:
    content: list[Any] = [TextContent(type="text", text=summary_text(result))]
    content += [
        ImageContent(type="image", data=base64.b64encode(data).decode(), mime_type=mime)
        for data, mime in previews[:MAX_INLINE_IMAGES]
    ]
    for n, image in enumerate(result.images):
        # A link only where the resource can be read: `flux://` serves local copies alone.
        if result.task_id and image.path:
            content.append(
                ResourceLink(
                    type="resource_link",
                    name=f"{result.task_id}_{n}",
                    uri=f"flux://tasks/{result.task_id}/images/{n}",
                    mime_type=mime_of(image.path),
                    description="Local copy",
                )
            )
    return CallToolResult(content=content, structured_content=result.wire(), is_error=is_error)


def error_result(
    exc: FluxError, *, task_type: str = "", model: str = "", spent_today_usd: float | None = None
) -> TaskResult:
    return TaskResult(
        spent_today_usd=spent_today_usd,
        task_id=exc.task_id,
        model=model,
        task_type=task_type,
        status=None,
        error=ErrorOut(**exc.to_dict()),
        next_step=exc.hint or None,
    )
