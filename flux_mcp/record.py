"""One normalised view of PiAPI's task JSON.

PiAPI's documentation and real responses disagree on casing and vocabulary (`Completed`,
`completed`, legacy `success`, `staged`, `starting`, `retry`), on where image URLs live
(`output.image_url` for one image, `output.image_urls` for a batch) and on how unset times are
written (`0001-01-01T00:00:00Z`). `TaskRecord.from_api` absorbs all of that so no other module
ever reads raw task JSON. Unknown statuses count as still running: a new word from PiAPI must
never end a paid task early.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

# `lost` is ours, never PiAPI's: a task it no longer knows that was not finished when last seen.
Status = Literal["pending", "processing", "completed", "failed", "cancelled", "lost"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

_STATUS_WORDS: dict[str, Status] = {
    "pending": "pending",
    "staged": "pending",
    "queued": "pending",
    "starting": "processing",
    "processing": "processing",
    "running": "processing",
    "in_progress": "processing",
    "retry": "processing",
    "completed": "completed",
    "complete": "completed",
    "success": "completed",
    "succeeded": "completed",
    "failed": "failed",
    "failure": "failed",
    "error": "failed",
    "cancelled": "cancelled",
    "canceled": "cancelled",
}
_UNSET_TIME_PREFIX = "0001-01-01"
_FRACTION = re.compile(r"\.(\d+)")


_TASK_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def is_valid_task_id(task_id: str) -> bool:
    """PiAPI ids are UUIDs; anything that could change a URL path or a file name is refused."""
    return bool(_TASK_ID.fullmatch(task_id)) and ".." not in task_id


def normalise_status(raw: object) -> Status:
    """Lowercase PiAPI's status word; anything unknown (or missing) means still running."""
    word = str(raw or "").strip().lower().replace("-", "_").replace(" ", "_")
    return _STATUS_WORDS.get(word, "processing")


def parse_time(raw: object) -> datetime | None:
    """RFC 3339 time or None; PiAPI writes `0001-01-01T00:00:00Z` for 'not yet'."""
    if not isinstance(raw, str) or not raw or raw.startswith(_UNSET_TIME_PREFIX):
        return None
    text = raw.strip().replace("Z", "+00:00")
    # Go prints nanoseconds; Python 3.11 accepts at most microseconds.
    fraction = _FRACTION.search(text)
    if fraction:
        text = text[: fraction.start()] + "." + fraction.group(1)[:6] + text[fraction.end() :]
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)  # PiAPI's times are UTC


def collect_image_urls(output: object) -> list[str]:
    """`output.image_url` then every `output.image_urls` entry, de-duplicated, order kept."""
    if not isinstance(output, dict):
        return []
    candidates: list[object] = [output.get("image_url")]
    many = output.get("image_urls")
    if isinstance(many, list):
        candidates.extend(many)
    urls: list[str] = []
    for url in candidates:
        if isinstance(url, str) and url.strip() and url not in urls:
            urls.append(url)
    return urls


class TaskError(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)  # built on first use, not at start

    code: int | None = None
    message: str = ""
    raw_message: str = ""

    @property
    def text(self) -> str:
        return self.message or self.raw_message or (f"error code {self.code}" if self.code else "")


class TaskRecord(BaseModel):
    """A task as PiAPI last reported it."""

    model_config = ConfigDict(frozen=True, defer_build=True)  # built on first use, not at start

    task_id: str
    model: str = ""
    task_type: str = ""
    status: Status = "pending"
    raw_status: str = ""
    image_urls: list[str] = []
    error: TaskError | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    usage: dict[str, Any] | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> TaskRecord:
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
        raw_error = data.get("error") if isinstance(data.get("error"), dict) else {}
        error = _parse_error(raw_error)
        status = normalise_status(data.get("status"))
        usage = meta.get("usage")
        return cls(
            task_id=str(data.get("task_id") or ""),
            model=str(data.get("model") or ""),
            task_type=str(data.get("task_type") or ""),
            status=status,
            raw_status=str(data.get("status") or ""),
            image_urls=collect_image_urls(data.get("output")),
            error=_failure_error(error, status) if status in ("failed", "cancelled") else None,
            created_at=parse_time(meta.get("created_at")),
            started_at=parse_time(meta.get("started_at")),
            ended_at=parse_time(meta.get("ended_at") or meta.get("completed_at")),
            usage=usage if isinstance(usage, dict) else None,
        )


def _failure_error(error: TaskError | None, status: Status) -> TaskError:
    # Success responses carry placeholder errors (`code: 1100, message: ""`), so an error
    # object is kept only for a task that ended badly, and such a task always gets one.
    return error or TaskError(message=f"PiAPI reported the task as {status} without detail")


def _parse_error(raw: dict[str, Any]) -> TaskError | None:
    code = raw.get("code")
    try:
        code = int(code) if code not in (None, "") else None
    except (TypeError, ValueError):
        code = None
    message = str(raw.get("message") or "")
    raw_message = str(raw.get("raw_message") or "")
    if not code and not message and not raw_message:
        return None
    return TaskError(code=code or None, message=message, raw_message=raw_message)
