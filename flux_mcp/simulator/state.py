"""Task store, timing and fault controls of the offline PiAPI simulator.

Everything the simulator knows lives in one `SimulatorState`: the tasks, the queued faults, the
request log, the webhook deliveries and the rendered files. A task never runs anywhere: its
status is *computed* from an injectable clock each time it is observed (pending while queued,
then processing until its run has ended, then completed or failed), so a test that owns the clock
(`ManualClock`) can move a task through its whole life instantly.

A task's queue and run times are drawn when it is created, like a real queue that has already
accepted the job: by default a fixed `pending_seconds` and a fixed per-model total `durations`;
with a `TimingProfile` for its model, a queue time and a run time drawn from log-normal
distributions (mean and coefficient of variation each) by a seedable random generator, so the
same seed replays the same workload; as at PiAPI, the run takes longer for more pixels and more
images (a profile's `run_seconds` is for one 1024x1024 image, scaled linearly by the output's
pixel count and the batch size). `PIAPI_LIKE_PROFILES` are durations of the size PiAPI's
docs and users report (~4 s schnell, ~20 s dev, ~33 s dev-advanced). Wall-clock timestamps for
`meta` (`created_at`, `started_at`, `ended_at`) are the creation time plus clock offsets, so
they always match the statuses. Faults are small records with a remaining count; the HTTP layer
asks `take_fault` for the first one that matches the request's method.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flux_mcp.catalog import PRICE_PER_IMAGE_USD, Model, TaskRequest
from flux_mcp.simulator.render import output_size

Phase = Literal["pending", "processing", "completed", "failed", "cancelled"]
StatusStyle = Literal["lower", "capitalized", "legacy"]
# `create_error`: the task is created, but the answer is an HTTP error whose body still names it.
# `slow_file`: the next image file is sent in small pieces spread over `delay` seconds.
FaultKind = Literal[
    "http_error", "malformed", "fail_next", "create_late", "slow", "webhook_drop", "webhook_duplicate", "create_error",
    "slow_file",
]  # fmt: skip
HttpMethod = Literal["GET", "POST", "DELETE"]

UNSET_TIME = "0001-01-01T00:00:00Z"
USAGE_UNITS_PER_USD = 10_000_000  # inferred from PiAPI examples: $0.02 -> consume 200000
DEFAULT_DURATIONS: dict[str, float] = {
    Model.SCHNELL.value: 1.0,
    Model.DEV.value: 2.0,
    Model.DEV_ADVANCED.value: 3.0,
}
TERMINAL_PHASES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


def _model_name(key: str) -> str:
    """Accept `Qubico/flux1-dev` as well as the short `dev` / `flux1-dev` spellings."""
    for candidate in (key, f"Qubico/{key}", f"Qubico/flux1-{key}"):
        if candidate in DEFAULT_DURATIONS:
            return candidate
    raise ValueError(f"unknown model {key!r}; expected one of {', '.join(DEFAULT_DURATIONS)}")


class TimingProfile(BaseModel):
    """How long a model's tasks queue and run: log-normal, given by mean seconds and spread (CV).
    `run_seconds` is for one 1024x1024 image; `draw` scales it by the task's `work` (pixels / 1 MP
    times images), as PiAPI's run time grows with both."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    queue_seconds: float = Field(ge=0)
    run_seconds: float = Field(ge=0)
    queue_spread: float = Field(default=0.5, ge=0, le=3)
    run_spread: float = Field(default=0.1, ge=0, le=3)

    def draw(self, rng: random.Random, work: float = 1.0) -> tuple[float, float]:
        return _lognormal(rng, self.queue_seconds, self.queue_spread), _lognormal(
            rng, self.run_seconds * work, self.run_spread
        )


def _lognormal(rng: random.Random, mean: float, spread: float) -> float:
    if mean <= 0 or spread <= 0:
        return mean
    sigma = math.sqrt(math.log1p(spread * spread))
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)


# PiAPI's docs show a dev-advanced task queued ~1.2 s and running ~31.5 s; schnell and dev take
# about 4 s and 20 s in total. Run times vary little (same model, size and steps), queues more.
PIAPI_LIKE_PROFILES: dict[str, TimingProfile] = {
    Model.SCHNELL.value: TimingProfile(queue_seconds=0.5, run_seconds=3.5),
    Model.DEV.value: TimingProfile(queue_seconds=1.0, run_seconds=19.0),
    Model.DEV_ADVANCED.value: TimingProfile(queue_seconds=1.2, run_seconds=31.5),
}


class SimulatorConfig(BaseModel):
    """Behaviour knobs; change them with `SimulatorState.configure` or `POST /_simulator/config`.

    `profiles` (per model) replace the fixed `pending_seconds` / `durations` with drawn times;
    `seed` makes the draws repeatable. Webhooks: each delivery is tried `webhook_attempts` times,
    `webhook_retry_seconds` apart, until the receiver answers 2xx; `webhook_latency` delays each.
    """

    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    durations: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_DURATIONS))
    pending_seconds: float = Field(default=0.2, ge=0)
    profiles: dict[str, TimingProfile] = Field(default_factory=dict)
    seed: int | None = None
    status_style: StatusStyle = "lower"
    latency: float = Field(default=0.0, ge=0)
    webhook_attempts: int = Field(default=3, ge=1, le=10)
    webhook_retry_seconds: float = Field(default=5.0, ge=0)
    webhook_latency: float = Field(default=0.0, ge=0)
    # Every image a plain one-colour PNG of the right size, drawn once per size: for load tests,
    # where drawing each labelled image (12-40 ms of CPU) would make the simulator the bottleneck.
    plain_images: bool = False

    @field_validator("profiles")
    @classmethod
    def _check_profiles(cls, value: dict[str, TimingProfile]) -> dict[str, TimingProfile]:
        return {_model_name(key): profile for key, profile in value.items()}

    @field_validator("durations")
    @classmethod
    def _check_durations(cls, value: dict[str, float]) -> dict[str, float]:
        merged = dict(DEFAULT_DURATIONS)
        for key, seconds in value.items():
            if seconds < 0:
                raise ValueError(f"duration for {key!r} must be >= 0")
            merged[_model_name(key)] = float(seconds)
        return merged


class Fault(BaseModel):
    """One queued misbehaviour. `times` counts the remaining uses; `method=None` matches any."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: FaultKind
    times: int = Field(default=1, ge=1)
    method: HttpMethod | None = None
    status: int | None = Field(default=None, ge=400, le=599)
    retry_after: float | None = Field(default=None, ge=0)
    delay: float = Field(default=0.0, ge=0)
    code: int = 10000
    message: str | None = None
    raw_message: str = ""
    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:8])

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _needs_status(self) -> Fault:
        if self.kind in ("http_error", "create_error") and self.status is None:
            raise ValueError("an http_error fault needs a status (e.g. 429, 500, 502, 503)")
        return self

    def error_object(self) -> dict[str, Any]:
        """The task `error` a `fail_next` fault puts on the task it fails."""
        message = self.message if self.message is not None else "task failed"
        return {"code": self.code, "raw_message": self.raw_message, "message": message, "detail": None}

    def matches(self, method: str) -> bool:
        return self.method is None or self.method == method.upper()


@dataclass
class SimTask:
    """One accepted task; its status is derived from `created` and the clock, never stored."""

    task_id: str
    request: TaskRequest
    raw_input: dict[str, Any]
    created: float
    created_wall: datetime
    pending_seconds: float
    duration: float
    failure: dict[str, Any] | None = None
    cancelled_at: float | None = None
    rendered: bool = False
    expired: bool = False
    render_lock: Any = None  # anyio.Lock, created lazily inside the event loop
    base_url: str = ""  # where its files are served, for webhook bodies

    @property
    def model(self) -> str:
        return self.request.model.value

    @property
    def image_count(self) -> int:
        return self.request.image_count

    @property
    def started(self) -> float:
        return self.created + self.pending_seconds

    @property
    def ends(self) -> float:
        return self.created + max(self.duration, self.pending_seconds)

    def wall(self, at: float) -> str:
        moment = self.created_wall + timedelta(seconds=at - self.created)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def file_names(self) -> list[str]:
        return [f"{self.task_id}_{n}.png" for n in range(self.image_count)]


class LogEntry(TypedDict):
    """One `/api/v1` request as `GET /_simulator/log` reports it."""

    method: str
    path: str
    status: int
    task_id: str | None


class WebhookAttempt(TypedDict):
    """One webhook POST as `GET /_simulator/webhooks` reports it (`outcome`: HTTP status or error)."""

    task_id: str
    status: str
    attempt: int
    outcome: str
    at: float
    sent: float  # on the simulator's clock, when the POST went out


_STATUS_WORDS: dict[StatusStyle, dict[str, str]] = {
    "lower": {p: p for p in ("pending", "processing", "completed", "failed", "cancelled")},
    "capitalized": {p: p.capitalize() for p in ("pending", "processing", "completed", "failed", "cancelled")},
    "legacy": {
        "pending": "pending",
        "starting": "starting",
        "processing": "processing",
        "completed": "success",
        "failed": "failed",
        "cancelled": "cancelled",
    },
}


class ManualClock:
    """A clock tests advance by hand: `clock = ManualClock(); clock.advance(5)`."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class SimulatorState:
    """All simulator state. Safe to share between the HTTP app and the test that drives it."""

    clock: Callable[[], float] = time.monotonic
    config: SimulatorConfig = field(default_factory=SimulatorConfig)
    tasks: dict[str, SimTask] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    log: list[LogEntry] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    webhook_log: list[WebhookAttempt] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)

    # --- configuration and faults -------------------------------------------------------------

    def configure(self, **changes: Any) -> SimulatorConfig:
        """Update config fields (`durations` merges into the current per-model durations)."""
        if "durations" in changes:
            changes["durations"] = {**self.config.durations, **(changes["durations"] or {})}
        if "profiles" in changes:
            changes["profiles"] = {**self.config.profiles, **(changes["profiles"] or {})}
        merged = {**self.config.model_dump(), **changes}
        self.config = SimulatorConfig.model_validate(merged)
        if "seed" in changes:
            self.rng.seed(self.config.seed)
        return self.config

    def add_fault(self, kind: FaultKind, **options: Any) -> Fault:
        """Queue a fault, e.g. `add_fault("http_error", status=429, retry_after=1, times=2)`."""
        fault = Fault(kind=kind, **options)
        self.faults.append(fault)
        return fault

    def take_fault(self, kinds: tuple[str, ...], method: str) -> Fault | None:
        """Consume one use of the first queued fault of one of `kinds` that matches `method`."""
        for fault in self.faults:
            if fault.kind in kinds and fault.matches(method):
                if fault.times <= 1:
                    self.faults.remove(fault)
                else:
                    fault.times -= 1
                return fault.model_copy()
        return None

    def expire_files(self) -> int:
        """Delete every rendered file (their URLs now 404), like PiAPI's temporary storage."""
        count = len(self.files)
        self.files.clear()
        for task in self.tasks.values():
            if task.rendered or self.phase(task) == "completed":
                task.expired = True
        return count

    def reset(self) -> None:
        """Forget tasks, faults, the log and files; the config and clock stay as they are."""
        self.tasks.clear()
        self.faults.clear()
        self.log.clear()
        self.files.clear()
        self.webhook_log.clear()

    def record(self, method: str, path: str, status: int, task_id: str | None) -> None:
        self.log.append({"method": method, "path": path, "status": status, "task_id": task_id})

    # --- tasks -------------------------------------------------------------------------------------

    def create_task(self, request: TaskRequest, raw_input: dict[str, Any], base_url: str = "") -> SimTask:
        failure = self.take_fault(("fail_next",), "POST")
        model = request.model.value
        profile = self.config.profiles.get(model)
        if profile is None:
            queued, total = self.config.pending_seconds, self.config.durations[model]
        else:
            width, height = output_size(request)
            queued, run = profile.draw(self.rng, work=width * height / 1024**2 * request.image_count)
            total = queued + run
        task = SimTask(
            task_id=str(uuid.uuid4()),
            request=request,
            raw_input=raw_input,
            created=self.clock(),
            created_wall=datetime.now(UTC),
            pending_seconds=queued,
            duration=total,
            failure=None if failure is None else failure.error_object(),
            base_url=base_url,
        )
        self.tasks[task.task_id] = task
        return task

    def phase(self, task: SimTask) -> Phase:
        if task.cancelled_at is not None:
            return "cancelled"
        now = self.clock()
        if now < task.started:
            return "pending"
        if now < task.ends:
            return "processing"
        return "failed" if task.failure is not None else "completed"

    def cancel(self, task: SimTask) -> Phase:
        """Cancel a pending task; returns the phase it was in (only "pending" means success)."""
        phase = self.phase(task)
        if phase == "pending":
            task.cancelled_at = self.clock()
        return phase

    def status_word(self, task: SimTask, phase: Phase) -> str:
        style = self.config.status_style
        if style == "legacy" and phase == "processing" and self.clock() < (task.started + task.ends) / 2:
            return _STATUS_WORDS[style]["starting"]
        return _STATUS_WORDS[style][phase]

    def usage_units(self, task: SimTask) -> int:
        return round(PRICE_PER_IMAGE_USD[task.request.model] * task.image_count * USAGE_UNITS_PER_USD)

    def task_object(self, task: SimTask, base_url: str) -> dict[str, Any]:
        """The task exactly as PiAPI's get-task `data` shows it."""
        phase = self.phase(task)
        webhook = task.request.config.webhook_config if task.request.config else None
        service_mode = task.request.config.service_mode if task.request.config else None
        started_at = UNSET_TIME
        ended_at = UNSET_TIME
        if phase in ("processing", "completed", "failed"):
            started_at = task.wall(task.started)
        if phase in ("completed", "failed"):
            ended_at = task.wall(task.ends)
        elif phase == "cancelled" and task.cancelled_at is not None:
            ended_at = task.wall(task.cancelled_at)
        output = None
        if phase == "completed":
            base = base_url.rstrip("/")
            urls = [f"{base}/files/{name}" for name in task.file_names()]
            batch = task.image_count > 1
            output = {
                "image_url": "" if batch else urls[0],
                "image_urls": urls if batch else [],
                "image_base64": "",
            }
        error: dict[str, Any] = {"code": 0, "raw_message": "", "message": "", "detail": None}
        if phase == "failed" and task.failure is not None:
            error = dict(task.failure)
        elif phase == "cancelled":
            error = {**error, "message": "task cancelled by user"}
        charged = phase not in ("failed", "cancelled")
        return {
            "task_id": task.task_id,
            "model": task.model,
            "task_type": task.request.task_type.value,
            "status": self.status_word(task, phase),
            "config": {
                "service_mode": service_mode or "",
                "webhook_config": {
                    "endpoint": webhook.endpoint if webhook else "",
                    "secret": webhook.secret if webhook else "",
                },
            },
            "input": task.raw_input,
            "output": output,
            "meta": {
                "created_at": task.wall(task.created),
                "started_at": started_at,
                "ended_at": ended_at,
                "usage": {"type": "quota", "frozen": 0, "consume": self.usage_units(task) if charged else 0},
                "is_using_private_pool": False,
            },
            "detail": None,
            "logs": [],
            "error": error,
        }
