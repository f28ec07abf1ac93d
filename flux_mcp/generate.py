"""`piapi-flux-mcp generate "a prompt"`: one image from the terminal, for people and scripts.

It runs the same core as the MCP tools (`runtime.open_service` -> `TaskService`: the same argument
models, ledger, idempotency, downloads and output folder), so a task made here shows up in
`flux_list_tasks` and a repeat of the same request re-attaches instead of paying twice (`--new`
submits again). Progress goes to stderr: a redrawn status line with an indeterminate bar in a
terminal, plain lines when stderr is piped. The saved paths go to stdout, one per line; `--json`
prints the tool's structured result instead. Ctrl-C asks PiAPI to cancel the task before exiting.

Exit codes (`EXIT_CODES`, also listed by `generate --help`) tell a script what kind of failure it
met without parsing text.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import anyio

from flux_mcp import errors
from flux_mcp.catalog import TaskType
from flux_mcp.lifecycle import TaskOutcome, TaskService
from flux_mcp.parameters import TOOLS_BY_TASK_TYPE, TaskTool
from flux_mcp.record import TaskRecord
from flux_mcp.results import TaskResult, task_result
from flux_mcp.runtime import open_service
from flux_mcp.settings import Settings

EXIT_OK = 0
EXIT_STILL_RUNNING = 75  # EX_TEMPFAIL: the task is alive; its id is printed
EXIT_INTERRUPTED = 130
EXIT_CODES: dict[str, int] = {
    "task_failed": 1,
    "cancelled": 1,
    "invalid_input": 2,
    "auth": 3,
    "rate_limited": 4,
    "upstream": 4,
    "network": 4,
    "timeout": 4,
    "submit_uncertain": 5,
    "storage": 6,
    "not_found": 6,
    "task_lost": 1,
    "budget_exceeded": 7,
    "confirmation_required": 7,
    "not_confirmed": 7,
}
EXIT_OTHER = 1
EXIT_MEANINGS = {
    EXIT_OK: "the images were made (paths on stdout)",
    1: "PiAPI failed or cancelled the task (or another failure)",
    2: "bad arguments or configuration; nothing was sent",
    3: "PiAPI rejected the key",
    4: "PiAPI or the network had trouble; trying again may work",
    5: "the create request's outcome is unknown: check the ledger before trying again",
    6: "a local file problem (output folder, input image)",
    7: "the spend guard stopped it (FLUX_MCP_DAILY_BUDGET_USD, FLUX_MCP_CONFIRM_ABOVE_USD)",
    EXIT_STILL_RUNNING: "still running when --timeout passed; the task id is printed",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); PiAPI was asked to cancel the task",
}
# Arguments the tools take that make no sense on a terminal (the command always waits, saves and
# prints paths).
_TOOL_ONLY = ("wait_seconds", "include_image")


def exit_codes_help() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_MEANINGS.items())


def exit_code(result: TaskResult) -> int:
    if result.error is not None:
        return EXIT_CODES.get(result.error.category, EXIT_OTHER)
    if result.status in ("pending", "processing"):
        return EXIT_STILL_RUNNING
    return EXIT_OK


def tool_for(task: str) -> TaskTool:
    return TOOLS_BY_TASK_TYPE[TaskType(task)]


def parse_setting(text: str) -> tuple[str, Any]:
    """`NAME=VALUE` from `--set`; VALUE is read as JSON when it parses (numbers, true, null)."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise errors.InvalidInputError(f"--set {text!r}: expected NAME=VALUE")
    try:
        return name.replace("-", "_"), json.loads(raw)
    except ValueError:
        return name.replace("-", "_"), raw


def with_input_roots(settings: Settings, arguments: dict[str, Any]) -> Settings:
    """A file named on the command line may be read: its folder joins the allowed input roots."""
    folders = [
        Path(value).expanduser().resolve().parent
        for name in ("image", "control_image")
        if isinstance(value := arguments.get(name), str) and not value.startswith(("http://", "https://", "data:"))
    ]
    if not folders:
        return settings
    return settings.model_copy(update={"image_roots": [*settings.allowed_image_roots(), *folders]})


# --- progress on stderr ------------------------------------------------------------------------

_WORDS = {"pending": "queued", "processing": "processing", "completed": "saving", "failed": "failed"}


class Progress:
    """Status, elapsed time and phase on stderr: a redrawn line with an indeterminate bar in a
    terminal (refreshed ten times a second by `run`), one plain line per change otherwise."""

    BAR = 14
    SPINNER = "|/-\\"

    def __init__(self, stream: TextIO, *, live: bool) -> None:
        self.stream = stream
        self.live = live
        self.task_id = ""
        self.status = "submitting"
        self.started = time.monotonic()
        self._frame = 0
        self._drawn = False

    def note(self, text: str) -> None:
        self.clear()
        print(text, file=self.stream, flush=True)

    async def update(self, record: TaskRecord, elapsed: float) -> None:
        changed = record.status != self.status
        self.task_id, self.status = record.task_id, record.status
        if not self.live and changed:
            word = _WORDS.get(record.status, record.status)
            print(f"task {record.task_id}: {word} ({self.elapsed():.1f} s)", file=self.stream, flush=True)
        elif self.live:
            self.draw()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def draw(self) -> None:
        self._frame += 1
        span = self.BAR - 4
        offset = abs((self._frame // 2) % (2 * span) - span)
        bar = " " * offset + "====" + " " * (span - offset)
        word = _WORDS.get(self.status, self.status)
        task = f"  task {self.task_id}" if self.task_id else ""
        self.stream.write(f"\r\x1b[2K{self.SPINNER[self._frame % 4]} {word:<10} {self.elapsed():6.1f} s [{bar}]{task}")
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._drawn = False

    async def run(self) -> None:
        while True:
            self.draw()
            await anyio.sleep(0.1)


# --- the command ---------------------------------------------------------------------------------


async def generate(
    settings: Settings,
    tool: TaskTool,
    arguments: dict[str, Any],
    progress: Progress,
    *,
    wait_seconds: float,
    fresh: bool = False,
) -> TaskResult:
    """Submit one task through the core, wait up to `wait_seconds`, save its images."""
    model = str(tool.fixed_model or arguments.get("model") or "")
    try:
        args = tool.validate_arguments(arguments)
    except errors.FluxError as exc:
        return TaskResult.from_error(exc, task_type=tool.task_type.value, model=model)
    for name in _TOOL_ONLY:
        args.pop(name, None)
    dry_run = args.pop("dry_run", False)
    key = args.pop("idempotency_key", None) or (f"cli-{uuid.uuid4().hex}" if fresh else None)
    async with open_service(settings) as service:
        try:
            request = await service.prepare(tool.task_type, args)
            if dry_run:
                return TaskResult(
                    task_id=None,
                    model=request.model.value,
                    task_type=request.task_type.value,
                    status=None,
                    error=None,
                    payload=request.to_payload(),
                    estimated_cost_usd=request.estimated_cost_usd,
                    next_step="Nothing was sent.",
                )
            submission = await service.submit(tool.name, request, arguments=args, idempotency_key=key)
        except errors.FluxError as exc:
            return TaskResult.from_error(exc, task_type=tool.task_type.value, model=model)
        record = submission.record
        if submission.reattached:
            progress.note(
                f"task {record.task_id} is this same request, submitted earlier: re-attaching instead of "
                "paying again (--new submits another)"
            )
        try:
            outcome = await _wait_with_progress(service, record, progress, wait_seconds)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                if not submission.reattached:
                    progress.note(f"interrupted: asking PiAPI to cancel task {record.task_id} ...")
                    await service.cancel_quietly(record.task_id)
            raise
        except errors.FluxError as exc:
            exc.task_id = exc.task_id or record.task_id
            return TaskResult.from_error(exc, task_type=request.task_type.value, model=request.model.value)
        outcome.reattached = submission.reattached
        return task_result(outcome, estimated_cost_usd=request.estimated_cost_usd)


async def _wait_with_progress(
    service: TaskService, record: TaskRecord, progress: Progress, wait_seconds: float
) -> TaskOutcome:
    """`service.wait`, with the terminal line redrawn meanwhile; the line is cleared however it ends."""
    failure: errors.FluxError | None = None
    progress.task_id = record.task_id
    async with anyio.create_task_group() as tg:
        if progress.live:
            tg.start_soon(progress.run)
        try:
            outcome = await service.wait(
                record.task_id, timeout=wait_seconds, on_update=progress.update, initial=record
            )
        except errors.FluxError as exc:  # raised after the task group, not wrapped in an exception group
            failure = exc
        finally:
            tg.cancel_scope.cancel()
            progress.clear()
    if failure is not None:
        raise failure
    return outcome


def report(result: TaskResult, *, as_json: bool, out: TextIO, err: TextIO) -> None:
    """`--json`: the structured result on stdout. Otherwise paths on stdout, the rest on stderr."""
    if as_json:
        print(json.dumps(result.wire(), indent=2), file=out)
        return
    if result.error is not None:
        where = f" (task {result.task_id})" if result.task_id and result.task_id not in result.error.message else ""
        print(f"error [{result.error.category}] {result.error.message}{where}", file=err)
        if result.error.hint:
            print(result.error.hint, file=err)
        return
    if result.status is None:
        print(json.dumps({"payload": result.payload, "estimated_cost_usd": result.estimated_cost_usd}), file=out)
        print("dry run: nothing was sent", file=err)
        return
    if result.status in ("pending", "processing"):
        print(
            f"task {result.task_id} is still {result.status}; it keeps running at PiAPI. "
            f"Ask for it with the flux_wait_task tool, task_id {result.task_id}.",
            file=err,
        )
        return
    for image in result.images:
        print(image.path or image.url, file=out)
    cost = f", ~${result.estimated_cost_usd:g}" if result.estimated_cost_usd is not None else ""
    took = f" in {result.elapsed_seconds:.1f} s" if result.elapsed_seconds is not None else ""
    print(f"{result.status}{took}: task {result.task_id}, {len(result.images)} image(s){cost}", file=err)
    if any(image.path is None for image in result.images):
        print("some images were not saved locally; their PiAPI URLs are temporary", file=err)


async def _interruptible(job: Callable[[], Awaitable[TaskResult]]) -> TaskResult | None:
    """Run `job`; Ctrl-C (SIGINT) cancels it through anyio's own cancel scope, so its cleanup
    (cancelling the task at PiAPI) runs as for any cancellation. None when interrupted."""
    result = None

    async def cancel_on_sigint(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                scope.cancel()
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_on_sigint, tg.cancel_scope)
        result = await job()
        tg.cancel_scope.cancel()
    return result


def run(
    settings: Settings,
    task: str,
    arguments: dict[str, Any],
    *,
    wait_seconds: float,
    fresh: bool,
    as_json: bool,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    if not settings.simulate:
        settings.require_api_key()  # ConfigurationError: one line, exit 2, before anything starts
    tool = tool_for(task)
    progress = Progress(err, live=err.isatty())
    settings = with_input_roots(settings, arguments)
    try:
        job = partial(generate, settings, tool, arguments, progress, wait_seconds=wait_seconds, fresh=fresh)
        result = anyio.run(_interruptible, job)
    except KeyboardInterrupt:  # a second Ctrl-C while the cancel is being sent
        return EXIT_INTERRUPTED
    if result is None:
        return EXIT_INTERRUPTED
    report(result, as_json=as_json, out=out, err=err)
    return exit_code(result)
