"""Typed failures shared by every layer.

Each failure carries a *category* an agent can branch on, whether retrying the same call can
help (`retryable`), a sentence it can act on (`hint`) and the PiAPI task id when one exists, so
no error ever loses a paid task. Messages never contain the API key: the client builds them
from status codes and PiAPI's own envelope text, never from request headers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

ErrorCategory = Literal[
    "auth",
    "invalid_input",
    "rate_limited",
    "upstream",
    "network",
    "timeout",
    "task_failed",
    "submit_uncertain",
    "not_found",
    "storage",
    "budget_exceeded",
    "confirmation_required",
    "not_confirmed",
    "task_lost",
]


class FluxError(Exception):
    """Base of every anticipated failure. Subclasses fix the category and default retryability."""

    category: ClassVar[ErrorCategory] = "upstream"
    default_retryable: ClassVar[bool] = False
    default_hint: ClassVar[str] = ""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool | None = None,
        hint: str | None = None,
        task_id: str | None = None,
        code: int | None = None,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = self.default_retryable if retryable is None else retryable
        self.hint = hint if hint is not None else self.default_hint
        self.task_id = task_id
        self.code = code
        self.status_code = status_code
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, Any]:
        """The `{code, category, message, retryable, hint}` object tools return."""
        return {
            "code": self.code,
            "category": self.category,
            "message": self.message,
            "retryable": self.retryable,
            "hint": self.hint,
        }


@contextmanager
def about_task(task_id: str | None) -> Iterator[None]:
    """The one way a task id joins an error on its way up: a `FluxError` raised inside names
    `task_id` unless it already names a task, so no error ever loses a paid task."""
    try:
        yield
    except FluxError as exc:
        if exc.task_id is None:
            exc.task_id = task_id
        raise


class AuthError(FluxError):
    category = "auth"
    default_hint = "Check PIAPI_API_KEY: PiAPI rejected it (401/403). Retrying will not help."


class InvalidInputError(FluxError):
    category = "invalid_input"
    default_hint = "Fix the named argument and call again; nothing was sent to PiAPI."


class RateLimitedError(FluxError):
    category = "rate_limited"
    default_retryable = True
    default_hint = "PiAPI is rate limiting this key; wait a little and call again."


class UpstreamError(FluxError):
    category = "upstream"
    default_retryable = True
    default_hint = "PiAPI answered with an error; try again shortly."


class NetworkError(FluxError):
    category = "network"
    default_retryable = True
    default_hint = "Could not reach PiAPI; check connectivity and PIAPI_BASE_URL, then try again."


class RequestTimeoutError(FluxError):
    category = "timeout"
    default_retryable = True
    default_hint = "PiAPI did not answer in time; try again."


class TaskFailedError(FluxError):
    category = "task_failed"
    default_hint = "PiAPI reported the task as failed; adjust the prompt or inputs and submit again."


class SubmitUncertainError(FluxError):
    category = "submit_uncertain"
    default_hint = (
        "The create request reached PiAPI but no answer came back, so a paid task may exist. "
        "Check flux_list_tasks (or your PiAPI dashboard) before submitting again; to submit anyway, "
        "call again with a new idempotency_key."
    )


class NotFoundError(FluxError):
    category = "not_found"
    default_hint = "No task with that id is known to PiAPI or the local ledger; check the id."


class StorageError(FluxError):
    category = "storage"
    default_hint = "A local file operation failed; check the output directory and allowed image roots."


class BudgetExceededError(FluxError):
    category = "budget_exceeded"
    default_hint = "Nothing was sent. Wait for the next UTC day, or raise FLUX_MCP_DAILY_BUDGET_USD (unset = no limit)."


class ConfirmationRequiredError(FluxError):
    category = "confirmation_required"
    default_hint = (
        "Nothing was sent. This client cannot ask the user to confirm; lower the cost (fewer images, a cheaper "
        "model) or raise FLUX_MCP_CONFIRM_ABOVE_USD (unset = never ask)."
    )


class NotConfirmedError(FluxError):
    category = "not_confirmed"
    default_hint = "Nothing was sent: the user did not confirm the cost. Do not resubmit unless they ask."


class TaskLostError(FluxError):
    """PiAPI no longer knows a task this server recorded as unfinished: its outcome is unknown."""

    category = "task_lost"
    default_hint = (
        "PiAPI no longer knows this task, so waiting will not help: check your PiAPI dashboard for it. "
        "To generate again, call the task tool with a new idempotency_key."
    )
