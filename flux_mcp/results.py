"""What a tool call returns: each tool declares a `ToolResult` type, and results become MCP content.

Every result carries `structuredContent` matching the published `outputSchema` and, for clients
that read only content, one text block: a one-line summary followed by that same structured
result serialized as JSON (so an agent framework that passes on text alone still gets the task
id, status and image paths as data). Task results add a `resource_link` per image (the local copy
outlives PiAPI's temporary URL) and, when asked, small thumbnails as `ImageContent` (never full
size: hosts cap tool results near 1 MB). Failures use the same shape with `isError: true` and an
`error` object `{code, category, message, retryable, hint}`, so an agent can branch without
parsing text.
"""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar

from mcp.types import CallToolResult, ImageContent, ResourceLink, TextContent
from pydantic import BaseModel, ConfigDict

from flux_mcp.errors import FluxError, TaskFailedError, TaskLostError
from flux_mcp.record import Status, TaskRecord
from flux_mcp.schemas import compact_output, listed_only

if TYPE_CHECKING:
    from flux_mcp.lifecycle import TaskOutcome

log = logging.getLogger(__name__)

MAX_INLINE_IMAGES = 4
# The error a task's own status carries: (category, hint).
_ERROR_KINDS: dict[str, tuple[str, str]] = {
    "failed": (TaskFailedError.category, TaskFailedError.default_hint),
    "lost": (TaskLostError.category, TaskLostError.default_hint),
}
FAILED_STATUSES = frozenset(_ERROR_KINDS)  # a result with one of these is an `isError` result


class ToolResult(BaseModel):
    """The structured result a tool declares: its JSON schema is the tool's `outputSchema`."""

    #: Fields left out of the published `outputSchema` (still returned; the schema allows them),
    #: so the tool list stays small: see `schemas.compact_output`.
    unlisted: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def output_schema(cls) -> dict[str, Any]:
        return _output_schema(cls)

    def wire(self) -> dict[str, Any]:
        """The `structuredContent`: None-valued optional fields omitted, required ones kept."""
        required = {name for name, field in type(self).model_fields.items() if field.is_required()}
        data = self.model_dump(mode="json")
        return {k: v for k, v in data.items() if v is not None or k in required}

    def summary(self) -> str:
        """One line for people and text-only clients; the JSON that follows it has everything."""
        return ""

    def extra_content(self) -> list[Any]:
        """Content after the text block (resource links, for results that name images)."""
        return []

    def to_call_result(self, *, previews: list[tuple[bytes, str]] = (), is_error: bool = False) -> CallToolResult:
        data = self.wire()
        summary = self.summary()
        text = (summary + "\n" if summary else "") + json.dumps(data, ensure_ascii=False)
        content: list[Any] = [TextContent(type="text", text=text)]
        content += [
            ImageContent(type="image", data=base64.b64encode(raw).decode(), mime_type=mime)
            for raw, mime in previews[:MAX_INLINE_IMAGES]
        ]
        content += self.extra_content()
        return CallToolResult(content=content, structured_content=data, is_error=is_error)

    @classmethod
    def failure(cls, exc: FluxError, **context: Any) -> CallToolResult:
        """An anticipated failure as this tool's result. A type with no room for an `error` object
        reports it as text alone (its `outputSchema` does not apply to error results)."""
        return CallToolResult(content=[TextContent(type="text", text=error_line(exc))], is_error=True)


@cache
def _output_schema(result_type: type[ToolResult]) -> dict[str, Any]:
    return compact_output(result_type.model_json_schema(), unlisted=result_type.unlisted)


def error_line(exc: FluxError) -> str:
    text = f"Error [{exc.category}] {exc.message}"
    if exc.task_id and exc.task_id not in text:
        text += f" (task {exc.task_id})"
    return text + (f"\n{exc.hint}" if exc.hint else "")


class ImageOut(BaseModel):
    url: str
    path: str | None  # the local copy, or null when not saved


class ErrorOut(BaseModel):
    # The schema lists what an agent branches on; code, message and hint are always returned too.
    model_config = ConfigDict(json_schema_extra=listed_only("category", "retryable"))

    code: int | None
    category: str
    message: str
    retryable: bool
    hint: str = ""


class TaskResult(ToolResult):
    """The outcome of a Flux task tool (also returned by get and wait). Optional fields are left
    out of `structuredContent` when they have no value; `task_id`, `status` and `error` are always
    present (null for a dry run, or an error before PiAPI gave a task id)."""

    unlisted: ClassVar[frozenset[str]] = frozenset(
        {"model", "task_type", "created_at", "started_at", "ended_at", "elapsed_seconds", "usage"}
        | {"estimated_cost_usd", "reattached", "spent_today_usd", "spend_guard", "payload", "next_step"}
    )

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

    def summary(self) -> str:
        if self.status is None and self.error is not None:
            return f"Error [{self.error.category}] {self.error.message}" + (
                f" (task {self.task_id})" if self.task_id and self.task_id not in self.error.message else ""
            )
        if self.status is None:
            return f"Dry run: nothing was sent (estimated ${self.estimated_cost_usd})."
        return f"Task {self.task_id} ({self.task_type}, {self.model}): {self.status}."

    def extra_content(self) -> list[Any]:
        if not self.task_id:
            return []
        from flux_mcp.files import mime_of  # files (and the ledger) load on a tool's first use

        # A link only where the resource can be read: `flux://` serves local copies alone.
        return [
            ResourceLink(
                type="resource_link",
                name=f"{self.task_id}_{n}",
                uri=f"flux://tasks/{self.task_id}/images/{n}",
                mime_type=mime_of(image.path),
                description="Local copy",
            )
            for n, image in enumerate(self.images)
            if image.path
        ]

    @classmethod
    def from_error(cls, exc: FluxError, *, task_type: str = "", model: str = "", **extra: Any) -> TaskResult:
        return cls(
            task_id=exc.task_id,
            model=model,
            task_type=task_type,
            status=None,
            error=ErrorOut(**exc.to_dict()),
            next_step=exc.hint or None,
            **extra,
        )

    @classmethod
    def failure(cls, exc: FluxError, **context: Any) -> CallToolResult:
        return cls.from_error(exc, **context).to_call_result(is_error=True)


class CancelResult(TaskResult):
    """`flux_cancel_task`: the task as it now stands, and whether PiAPI accepted the cancel."""

    cancel_accepted: bool

    @classmethod
    def failure(cls, exc: FluxError, **context: Any) -> CallToolResult:
        return super().failure(exc, **{"cancel_accepted": False, **context})


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
