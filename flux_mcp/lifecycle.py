"""The task lifecycle: validate, submit once, wait, record, keep the images. No MCP in here.

`TaskService` is what every tool calls. Its guarantees, each enforced in one method:
- `prepare`: arguments become a validated `TaskRequest`, and local image paths become data URIs
  (through `files.InputResolver`), before anything is sent or recorded.
- `submit`: every create goes through the ledger's idempotency reservation first, so a repeat of
  the same request (same `idempotency_key`, or the same payload within the window) re-attaches to
  the task already paid for. A create whose outcome is unknown is recorded as `uncertain` and
  reported as `submit_uncertain`; it is never resubmitted behind the caller's back.
- `wait`: polls with `polling.wait_for_task` on the learned schedule of `polling.PollPlanner`,
  wakes at once when a pushed update arrives (`push.TaskEvents`), writes every status change to
  the ledger (one transaction each), and at the deadline returns the live record (the task id is
  never lost).
- `finish`: a completed task's images are downloaded exactly once (a ledger lease arbitrates
  between processes) into the output directory, with sidecars, all images of a batch at once.
  Its PiAPI timings teach the planner.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from flux_mcp import errors
from flux_mcp.admission import AdmissionQueue, OnQueued
from flux_mcp.catalog import TaskRequest, TaskType, expected_images
from flux_mcp.files import IMAGE_THREADS, ImageStore, InputResolver, fetch_image, make_thumbnail
from flux_mcp.ledger import LedgerEntry, SavedImageRow, TaskLedger, fingerprint, new_owner_id, owner_is_gone
from flux_mcp.parameters import build_request
from flux_mcp.polling import (
    MIN_GAP_SECONDS,
    OnUpdate,
    PolicySchedule,
    PollPlanner,
    PollPolicy,
    Schedule,
    is_newer,
    wait_for_task,
)
from flux_mcp.push import TaskEvents
from flux_mcp.record import TaskError, TaskRecord
from flux_mcp.settings import Settings
from flux_mcp.spend import SpendGuard, day_start
from flux_mcp.timing import TaskKind

if TYPE_CHECKING:  # the HTTP client (httpx2) is loaded by whoever builds the service, on first use
    from anyio.abc import TaskGroup

    from flux_mcp.client import CancelOutcome, PiAPIClient

log = logging.getLogger(__name__)

OTHER_PROCESS_SUBMIT_WAIT_SECONDS = 30.0
DOWNLOAD_WAIT_SECONDS = 30.0
PREVIEW_SECONDS = 10.0
_DATA_URI_PREVIEW = 48
_SECRET_KEYS = frozenset({"secret", "webhook_secret"})


def idempotency_slot(backend: str, tool: str, payload_fingerprint: str, key: str | None) -> str:
    """The ledger's idempotency key: the caller's `idempotency_key`, else the tool and payload
    fingerprint; both scoped to the backend (PiAPI's base URL), so a task on one backend (say a
    simulator) is never re-attached to a request meant for another."""
    return f"{backend}|key:{key}" if key else f"{backend}|fp:{tool}:{payload_fingerprint}"


def summarise_payload(value: Any) -> Any:
    """A payload or argument set as shown to models and stored on disk (ledger, sidecars):
    data URIs shortened, webhook secrets masked."""
    if isinstance(value, dict):
        return {k: "***" if k in _SECRET_KEYS and v else summarise_payload(v) for k, v in value.items()}
    if isinstance(value, list):
        return [summarise_payload(v) for v in value]
    if isinstance(value, str) and value.startswith("data:") and len(value) > _DATA_URI_PREVIEW * 2:
        return f"{value[:_DATA_URI_PREVIEW]}...({len(value)} chars)"
    return value


@dataclass(frozen=True)
class Submission:
    record: TaskRecord
    reattached: bool = False


@dataclass
class TaskOutcome:
    """A task as the tools present it: the record plus local copies and a note for the caller."""

    record: TaskRecord
    images: list[SavedImageRow] = field(default_factory=list)
    reattached: bool = False
    notes: list[str] = field(default_factory=list)


class TaskService:
    def __init__(
        self,
        settings: Settings,
        client: PiAPIClient,
        ledger: TaskLedger,
        *,
        store: ImageStore | None,
        resolver: InputResolver,
        policy: PollPolicy | None = None,
        planner: PollPlanner | None = None,
        events: TaskEvents | None = None,
        webhook: dict[str, str] | None = None,
        background: TaskGroup | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        """`policy` fixes the poll intervals (default: the planner's learned schedule). `webhook`
        (`{endpoint, secret}`) is our own receiver: every create asks PiAPI to push to it, and
        polling becomes a sparse safety net; `events` is where its pushes arrive. `background`
        (the server's task group) lets a download outlive the call that started it; without it
        downloads run inside the call."""
        self.settings = settings
        self.client = client
        self.ledger = ledger
        self.store = store
        self._image_threads = anyio.CapacityLimiter(IMAGE_THREADS)  # previews made from files
        self.resolver = resolver
        self.policy = policy
        self.planner = planner or PollPlanner(budget=settings.poll_budget, clock=clock)
        self.events = events or TaskEvents()
        self.webhook = webhook
        self._clock = clock
        self._sleep = sleep
        self._owner = new_owner_id()
        self.background = background
        self._downloads: dict[str, _DownloadJob] = {}  # task id -> its download running in this process
        self._showing: dict[str, int] = {}  # task id -> calls waiting for it that will show a preview
        # Reads of today's spend shared by calls finishing together, numbered as they begin:
        self._spend_reads = 0
        self._spent: tuple[int, float] | None = None  # the newest finished read: its number, USD
        self._spent_read: tuple[int, anyio.Event] | None = None  # the newest read under way, and its end
        self.guard = SpendGuard(settings.daily_budget_usd, settings.confirm_above_usd)
        self._timings_loaded = False
        limit = settings.max_concurrent_tasks
        self.admission = AdmissionQueue(ledger, limit, self._owner) if limit else None

    # --- before anything is sent ------------------------------------------------------------

    async def prepare(self, task_type: TaskType, args: dict[str, Any]) -> TaskRequest:
        resolved = dict(args)
        for name in ("image", "control_image"):
            if resolved.get(name):
                resolved[name] = await self.resolver.resolve(resolved[name], field=name)
        return build_request(task_type, resolved, config=self.settings.piapi_config())

    # --- submit exactly once ----------------------------------------------------------------

    def _idempotency(self, tool: str, payload_fingerprint: str, key: str | None) -> tuple[str, float | None]:
        """The ledger slot a create reserves, and how long a *finished* repeat re-attaches (None =
        forever). A create in flight or of unknown outcome blocks its slot whatever the window."""
        slot = idempotency_slot(self.client.base_url, tool, payload_fingerprint, key)
        return slot, None if key else self.settings.idempotency_window_seconds

    def spend_mark(self) -> int:
        """A mark for `spent_today(after=...)`: taken once a call's outcome is in the ledger."""
        return self._spend_reads

    async def spent_today(self, *, after: int | None = None) -> float:
        """USD charged today (UTC) across every process sharing the ledger.

        With `after` (a `spend_mark()`), from any read begun after that mark, which counts
        everything recorded before it: calls finishing together share one read. Without it, from
        a read of its own (the spend guard decides on it)."""
        if after is None:
            return await self.ledger.spent_since(day_start(time.time()))
        while True:
            if self._spent is not None and self._spent[0] > after:
                return self._spent[1]
            under_way = self._spent_read
            if under_way is None or under_way[0] <= after:
                break  # none begun late enough: begin one now (and let later callers join it)
            await under_way[1].wait()
        self._spend_reads += 1
        read, done = self._spend_reads, anyio.Event()
        self._spent_read = (read, done)
        try:
            spent = await self.ledger.spent_since(day_start(time.time()))
            if self._spent is None or read > self._spent[0]:
                self._spent = (read, spent)
            return spent
        finally:
            if self._spent_read is not None and self._spent_read[1] is done:
                self._spent_read = None
            done.set()

    async def would_reattach(self, tool: str, request: TaskRequest, idempotency_key: str | None) -> bool:
        """Whether `submit` would re-attach to a task already paid for (so costs nothing)."""
        payload_fingerprint = await _fingerprint(request.to_payload())
        return await self.ledger.would_reattach(*self._idempotency(tool, payload_fingerprint, idempotency_key))

    async def submit(
        self,
        tool: str,
        request: TaskRequest,
        *,
        arguments: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        on_queued: OnQueued | None = None,
    ) -> Submission:
        """Create the task once. `arguments` (the tool's normalised arguments) go to the ledger.
        Past FLUX_MCP_MAX_CONCURRENT_TASKS the request waits its turn first, told to `on_queued`.

        A new task that would pass the daily budget raises `BudgetExceededError`; nothing is sent."""
        payload = request.to_payload()
        webhook = request.config.webhook_config if request.config else None
        if webhook is not None:  # PiAPI may echo it in a task's error text: scrub it from answers
            self.client.add_secret(webhook.secret)
        payload_fingerprint = await _fingerprint(payload)
        key, window = self._idempotency(tool, payload_fingerprint, idempotency_key)
        reservation = await self.ledger.reserve(
            idempotency_key=key,
            window_seconds=window,
            tool=tool,
            task_type=request.task_type.value,
            model=request.model.value,
            request=summarise_payload(arguments if arguments is not None else payload),
            payload=summarise_payload(payload),
            estimated_cost_usd=request.estimated_cost_usd,
            payload_fingerprint=payload_fingerprint,
            owner=self._owner,
            spend_limit=self.guard.limit(time.time()),
            queued=self.admission is not None,
        )
        if not reservation.is_new:
            return await self._reattach(reservation.entry, payload, payload_fingerprint, idempotency_key, on_queued)
        return await self._create(reservation.entry.local_id, payload, on_queued)

    async def _create(self, local_id: str, payload: dict[str, Any], on_queued: OnQueued | None) -> Submission:
        """Send the create for a reservation of ours (after its turn in the queue) and record it."""
        try:
            # Writing the reservation could not be interrupted: a cancel that came meanwhile must
            # stop us here, before anything is paid for. The same holds while it waits its turn.
            await anyio.lowlevel.checkpoint_if_cancelled()
            if self.admission is not None:
                await self.admission.wait_turn(local_id, on_queued)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self.ledger.release(local_id)
            raise
        # Once the POST may be on its way, a client's cancel must not separate the task id from the
        # ledger: the create and its recording run shielded (bounded), and a cancelled caller then
        # cancels the task at PiAPI through its normal path.
        record: TaskRecord | None = None
        if self.webhook is not None:  # our own receiver takes the webhook slot (after the fingerprint)
            payload = {**payload, "config": {**(payload.get("config") or {}), "webhook_config": self.webhook}}
        with anyio.CancelScope(shield=True) as shielded:
            shielded.deadline = anyio.current_time() + self._create_deadline_seconds
            try:
                sent = time.time()
                record = await self.client.create_task(payload)
                kind = TaskKind.of(record.model or payload["model"], payload["task_type"], payload.get("input"))
                self.planner.note_created(record, kind, sent_wall=sent, answered_wall=time.time())
            except errors.SubmitUncertainError as exc:
                # A task id the answer carried is stored with it, so the task can still be found.
                await self.ledger.mark_uncertain(local_id, exc.message, task_id=exc.task_id)
                raise
            except errors.FluxError:
                await self.ledger.release(local_id)
                self._slot_freed()
                raise
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self.ledger.mark_uncertain(local_id, "creating the task was interrupted; it may exist")
                raise
            try:
                await self.ledger.attach(local_id, record)
            except errors.FluxError as exc:
                # PiAPI has the task but the ledger could not say so: never lose its id.
                exc.task_id = record.task_id
                exc.message = f"task {record.task_id} was created, but recording it failed: {exc.message}"
                raise
        if record is None or shielded.cancelled_caught:
            raise errors.SubmitUncertainError(
                f"creating the task took longer than {self._create_deadline_seconds:.0f} s; it may exist"
            )
        return Submission(record=record)

    @property
    def _create_deadline_seconds(self) -> float:
        """How long a create may run shielded; a reservation older than this is settled."""
        return self.settings.request_timeout_seconds * 2 + 30

    def _slot_freed(self) -> None:
        if self.admission is not None:
            self.admission.slot_freed()

    async def _reattach(
        self,
        entry: LedgerEntry,
        payload: dict[str, Any],
        payload_fingerprint: str,
        key: str | None,
        on_queued: OnQueued | None = None,
    ) -> Submission:
        if key and entry.fingerprint:
            if entry.fingerprint != payload_fingerprint:
                raise errors.InvalidInputError(
                    f"idempotency_key {key!r} was already used for a different request "
                    f"(task {entry.task_id or 'not yet created'}); use a new key for a new request",
                    hint="Pass a new idempotency_key, or repeat the original arguments to re-attach.",
                )
        if entry.submit_state == "queued" and await self.ledger.adopt(entry.local_id, self._owner):
            # Queued by a process that died before its turn came: never sent, so this caller takes
            # its place (and its position in the line) and submits it, once.
            return await self._create(entry.local_id, payload, on_queued)
        stale = time.time() - entry.created_at > self._create_deadline_seconds + OTHER_PROCESS_SUBMIT_WAIT_SECONDS
        if entry.submit_state == "submitting" and (stale or owner_is_gone(entry.submit_owner)):
            # Its process died, or it outlived any create (an owner on another host cannot be probed).
            await self.ledger.mark_uncertain(entry.local_id, "the process submitting it stopped mid-request")
            entry = await self.ledger.get_local(entry.local_id) or entry
        elif entry.submit_state in ("queued", "submitting"):
            entry = await self.ledger.wait_for_submission(entry.local_id, OTHER_PROCESS_SUBMIT_WAIT_SECONDS)
            if entry.submit_state == "queued":
                raise errors.SubmitUncertainError(
                    "an identical request is waiting its turn in the local queue (FLUX_MCP_MAX_CONCURRENT_TASKS)",
                    retryable=True,
                    hint="Call again later: the repeat re-attaches to that request instead of paying twice.",
                )
            if entry.submit_state == "submitting":
                raise errors.SubmitUncertainError(
                    "an identical request is being submitted by another piapi-flux-mcp process right now",
                    retryable=True,
                    hint="Call again in a few seconds: the repeat re-attaches to that task instead of paying twice.",
                )
        if entry.submit_state == "uncertain" or entry.task_id is None:
            when = datetime.fromtimestamp(entry.created_at, UTC).isoformat(timespec="seconds")
            seen = f" (PiAPI named task {entry.task_id}; check it with flux_get_task)" if entry.task_id else ""
            raise errors.SubmitUncertainError(
                f"an identical request submitted at {when} has an unknown outcome{seen}, so it is not sent "
                "again, however long ago that was",
                task_id=entry.task_id,
            )
        record = entry.record or TaskRecord(task_id=entry.task_id, model=entry.model, task_type=entry.task_type)
        return Submission(record=record, reattached=True)

    # --- wait, record, finish ---------------------------------------------------------------

    def wants_previews(self, entry: LedgerEntry | None) -> bool:
        """Whether the call that made this task asked to be shown its images (its
        `include_image`, else the server's default, also for a task the ledger does not hold)."""
        asked = entry.request.get("include_image") if entry is not None else None
        return (asked or self.settings.include_image) == "thumbnail"

    @contextmanager
    def showing_previews(self, task_id: str, wanted: bool = True) -> Iterator[None]:
        """While this is open (and `wanted`), something waits for `task_id` to show its images'
        previews: an image saved meanwhile gets its preview in its save step. Images saved with
        nothing waiting to show them (a call that asked for none, one that has gone, the CLI) get
        none there; a preview asked for later is made from the file."""
        if not wanted:
            yield
            return
        self._showing[task_id] = self._showing.get(task_id, 0) + 1
        try:
            yield
        finally:
            if (left := self._showing.pop(task_id) - 1) > 0:
                self._showing[task_id] = left

    async def wait(
        self,
        task_id: str,
        *,
        timeout: float,
        on_update: OnUpdate | None = None,
        initial: TaskRecord | None = None,
    ) -> TaskOutcome:
        """Wait up to `timeout` seconds, then `finish` whatever state the task is in."""
        last_known = None
        kind = self.planner.kind_of(task_id)
        if initial is None and (entry := await self.ledger.get(task_id)) is not None:
            kind = kind or TaskKind.of(entry.model, entry.task_type, entry.payload.get("input"))
            if entry.record:
                # A finished task needs no GET; a running one is polled, with the ledger as fallback.
                initial, last_known = (entry.record, None) if entry.record.is_terminal else (None, entry.record)
        last_status = initial.status if initial is not None else None
        recorded: LedgerEntry | None = None
        deadline = self._clock() + timeout
        await self._load_timings()

        async def record_then_report(record: TaskRecord, elapsed: float) -> None:
            nonlocal last_status, recorded
            if record.status != last_status:
                last_status = record.status
                recorded = await self.ledger.record(record)
            if on_update is not None:
                await on_update(record, elapsed)

        try:
            with self.events.subscribe(task_id) as inbox:
                if self.webhook is not None and initial is not None and not initial.is_terminal:
                    # A webhook that landed between the create answer and this subscription woke no
                    # one, but the receiver recorded it: start from there instead of a later poll.
                    entry = await self.ledger.get(task_id)
                    if entry is not None and entry.record is not None and is_newer(entry.record, initial):
                        initial = entry.record
                        last_status = initial.status
                record = await wait_for_task(
                    self._get_rechecked,
                    task_id,
                    timeout=timeout,
                    on_update=record_then_report,
                    schedule=self._schedule(task_id, kind),
                    clock=self._clock,
                    sleep=self._sleep,
                    initial=initial,
                    last_known=last_known,
                    inbox=inbox,
                    on_poll=lambda: self.planner.count_poll(task_id),
                    on_seen=partial(self.planner.observe, task_id, kind) if kind is not None else None,
                )
        except errors.NotFoundError:
            return await self._forgotten(task_id)
        if recorded is not None and recorded.record != record:
            recorded = None
        return await self.finish(record, patience=max(0.0, deadline - self._clock()), recorded=recorded, kind=kind)

    def suggested_poll_seconds(self, record: TaskRecord) -> float:
        """How long a client polling this task should wait before asking again (the Tasks
        extension's `pollIntervalMs`): the next step of the same schedule `wait` follows."""
        now = self._clock()
        schedule = self._schedule(record.task_id, self.planner.kind_of(record.task_id))
        return max(MIN_GAP_SECONDS, schedule.next_poll(record, now=now, scheduled=now) - now)

    def _schedule(self, task_id: str, kind: TaskKind | None) -> Schedule:
        if self.policy is not None:
            return PolicySchedule(self.policy)
        return self.planner.schedule(task_id, kind, push=self.webhook is not None)

    async def _load_timings(self) -> None:
        """Once per process: learn from the ledger's recent finished tasks (bounded)."""
        if self._timings_loaded:
            return
        self._timings_loaded = True
        try:
            rows = await self.ledger.recent_timings()
        except errors.FluxError as exc:
            log.warning("could not read past task timings: %s", exc.message)
            return
        self.planner.learn_from(rows)

    async def finish(
        self,
        record: TaskRecord,
        *,
        patience: float = 0.0,
        recorded: LedgerEntry | None = None,
        kind: TaskKind | None = None,
    ) -> TaskOutcome:
        """Record the latest state (unless `recorded`, the ledger's entry written for exactly this
        record, is given) and, for a completed task, make sure local copies exist.

        `patience` is how long to wait for another process that is saving the same images.
        """
        entry = recorded if recorded is not None else await self.ledger.record(record)
        if record.is_terminal:
            self.planner.learn(record.task_id, record, kind)
            self._slot_freed()
        outcome = TaskOutcome(record=record, images=list(entry.images))
        asked = expected_images(entry.payload)
        if len(record.image_urls) > asked:  # never fetch or show more than the task asked for
            outcome.notes.append(f"PiAPI listed {len(record.image_urls)} images; only the {asked} asked for are kept")
            outcome.record = record = record.model_copy(update={"image_urls": record.image_urls[:asked]})
        if record.status != "completed" or self.store is None or not record.image_urls:
            return outcome
        outcome.images = await self._ensure_downloads(record, entry, outcome.notes, patience)
        return outcome

    async def _ensure_downloads(
        self, record: TaskRecord, entry: LedgerEntry, notes: list[str], patience: float
    ) -> list[SavedImageRow]:
        """Local copies of a completed task's images, waiting for them at most `patience` seconds
        (the rest of the caller's deadline): a download still running then goes on in the
        background, and the result says so."""
        if _all_saved(entry.images, record.image_urls):
            return list(entry.images)
        job = self._downloads.get(record.task_id)
        if job is None:
            job = self._downloads[record.task_id] = _DownloadJob()
            if self.background is None:
                await self._download_job(record, entry, job)
            else:
                self.background.start_soon(self._download_job, record, entry, job)
        with anyio.move_on_after(max(0.0, patience)):
            await job.done.wait()
        if job.done.is_set():
            notes.extend(job.notes)
            return job.rows
        notes.append(
            f"The images are still downloading in the background; call flux_get_task with task_id "
            f"'{record.task_id}' shortly for their local paths."
        )
        saved = {row.n: row for row in await self.ledger.images(record.task_id)}
        return [saved.get(n) or SavedImageRow(n=n, url=url) for n, url in enumerate(record.image_urls)]

    async def _download_job(self, record: TaskRecord, entry: LedgerEntry, job: _DownloadJob) -> None:
        try:
            job.rows = await self._claim_and_download(record, entry, job.notes)
        except errors.FluxError as exc:
            job.notes.append(f"the images were not saved locally ({exc.message})")
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:  # a background job must never take the server down
            log.exception("saving the images of %s failed", record.task_id)
            job.notes.append("the images were not saved locally (unexpected error; see the server log)")
        finally:
            job.done.set()
            self._downloads.pop(record.task_id, None)

    async def _claim_and_download(
        self, record: TaskRecord, entry: LedgerEntry, notes: list[str]
    ) -> list[SavedImageRow]:
        deadline = self._clock() + DOWNLOAD_WAIT_SECONDS
        # One ledger step takes the lease and reads what is already saved.
        while not (claim := await self.ledger.claim_for_download(record.task_id, self._owner)).granted:
            # Another live process holds the lease: wait for its copies rather than download twice.
            if _all_saved(claim.saved, record.image_urls):
                return claim.saved
            if self._clock() >= deadline:
                notes.append("another piapi-flux-mcp process is saving these images; ask again shortly for the paths")
                return claim.saved
            await self._sleep(0.2)
        rows = {row.n: row for row in claim.saved if row.path}
        try:
            await self._download_missing(record, entry, rows, notes)
        finally:
            # Always store what was saved, which also releases the lease, even if cancelled mid-way.
            with anyio.CancelScope(shield=True):
                await self.ledger.save_images(record.task_id, [rows[n] for n in sorted(rows)])
        return [rows[n] for n in sorted(rows)]

    async def _download_missing(
        self, record: TaskRecord, entry: LedgerEntry, rows: dict[int, SavedImageRow], notes: list[str]
    ) -> None:
        store = self.store
        assert store is not None
        sidecar = {"model": record.model, "task_type": record.task_type, "tool": entry.tool, "request": entry.request}

        async def save(n: int, url: str) -> None:
            try:
                rows[n] = await store.save(
                    self.client,
                    task_id=record.task_id,
                    n=n,
                    url=url,
                    sidecar=sidecar,
                    preview=lambda: record.task_id in self._showing,
                )
            except errors.FluxError as exc:
                log.warning("could not save image %d of %s: %s", n, record.task_id, exc.message)
                notes.append(f"image {n} was not saved locally ({exc.message}); its URL is temporary")
                rows[n] = SavedImageRow(n=n, url=url, path=None, sha256=None, bytes=None)

        # The images of a batch download at once (the lease claimed above covers them all).
        async with anyio.create_task_group() as tg:
            for n, url in enumerate(record.image_urls):
                if n not in rows:
                    tg.start_soon(save, n, url)

    async def previews(self, images: list[tuple[str, str | None]], *, limit: int = 4) -> list[tuple[bytes, str]]:
        """Thumbnails of up to `limit` images `(url, local path)`: the one made when the image was
        saved, else from the local copy, else fetched into memory. A preview that fails is
        skipped; it never fails the call."""
        previews: list[tuple[bytes, str] | None] = [None] * min(limit, len(images))
        missing = []
        for i, (url, path) in enumerate(images[:limit]):
            previews[i] = self.store.take_preview(path) if path and self.store is not None else None
            if previews[i] is None:
                missing.append((i, url, path))
        if not missing:
            return [p for p in previews if p is not None]

        async def preview(i: int, url: str, path: str | None) -> None:
            try:
                source: Path | bytes = (
                    Path(path)
                    if path
                    else await fetch_image(self.client, url, max_bytes=self.settings.max_download_bytes)
                )
                previews[i] = await anyio.to_thread.run_sync(make_thumbnail, source, limiter=self._image_threads)
            except errors.FluxError as exc:
                log.warning("no preview of %s: %s", path or url, exc.message)

        # Each thumbnail is made in its own worker thread, all at once; previews are extras, so
        # they never hold the call for long (a preview still being fetched is left out).
        with anyio.move_on_after(PREVIEW_SECONDS):
            async with anyio.create_task_group() as tg:
                for i, url, path in missing:
                    tg.start_soon(preview, i, url, path)
        return [p for p in previews if p is not None]

    # --- the read side ----------------------------------------------------------------------

    async def get(self, task_id: str) -> TaskOutcome:
        """One GET from PiAPI (a task unknown to the ledger gets recorded), then `finish`."""
        try:
            record = await self._get_rechecked(task_id)
        except errors.NotFoundError:
            return await self._forgotten(task_id)
        # No wait for the task itself; its images may take up to the usual call deadline.
        return await self.finish(record, patience=self.settings.wait_seconds)

    async def _get_rechecked(self, task_id: str) -> TaskRecord:
        """GET the task; a 404 is asked once more at once (a new task may not be visible
        everywhere yet) before it counts."""
        try:
            return await self.client.get_task(task_id)
        except errors.NotFoundError:
            return await self.client.get_task(task_id)

    async def _forgotten(self, task_id: str) -> TaskOutcome:
        """PiAPI no longer knows the task. A finished one keeps its last recorded state (and local
        copies); an unfinished one is `lost` from now on, said in this very answer, never "running"."""
        entry = await self.ledger.get(task_id)
        if entry is None:
            raise errors.NotFoundError(f"neither PiAPI nor the local ledger knows task {task_id}", task_id=task_id)
        if entry.record is not None and entry.record.is_terminal:
            outcome = TaskOutcome(record=entry.record, images=list(entry.images))
            outcome.notes.append("PiAPI no longer knows this task; this is the last recorded state")
            return outcome
        last = entry.record.status if entry.record is not None else "submitted"
        lost = TaskRecord(
            task_id=task_id,
            model=entry.model,
            task_type=entry.task_type,
            status="lost",
            error=TaskError(
                message=f"PiAPI no longer knows task {task_id} (last recorded as {last}); its outcome is unknown"
            ),
            created_at=entry.record.created_at if entry.record is not None else None,
        )
        entry = await self.ledger.record(lost)
        log.warning("task %s is lost: PiAPI answered 404 twice", task_id)
        return TaskOutcome(record=lost, images=list(entry.images))

    async def cancel(self, task_id: str) -> tuple[CancelOutcome, TaskOutcome]:
        result = await self.client.cancel_task(task_id)
        log.info("cancel of %s: %s", task_id, result.message)
        return result, await self.get(task_id)

    async def cancel_quietly(self, task_id: str) -> None:
        """Best-effort cancel for an abandoned wait; must be called inside a shielded scope."""
        with anyio.move_on_after(10):
            result = await self.client.cancel_task(task_id)
            log.warning("client abandoned the wait for %s; cancel sent: %s", task_id, result.message)
            try:  # so flux_list_tasks shows the outcome without another call
                await self.ledger.record(await self.client.get_task(task_id))
            except errors.FluxError as exc:
                log.info("could not refresh %s after the cancel: %s", task_id, exc.message)


async def _fingerprint(payload: dict[str, Any]) -> str:
    """Hashing a payload that carries a 20 MB data URI takes a noticeable time: off the loop. A
    plain one takes microseconds, less than the trip to a worker thread."""
    if _carries_data_uri(payload):
        return await anyio.to_thread.run_sync(fingerprint, payload)
    return fingerprint(payload)


def _carries_data_uri(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_carries_data_uri(v) for v in value.values())
    if isinstance(value, list):
        return any(_carries_data_uri(v) for v in value)
    return isinstance(value, str) and value.startswith("data:")


@dataclass
class _DownloadJob:
    """One task's downloads in this process: callers wait on `done` as long as their deadline allows."""

    done: anyio.Event = field(default_factory=anyio.Event)
    rows: list[SavedImageRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _all_saved(rows: list[SavedImageRow], urls: list[str]) -> bool:
    saved = {row.n for row in rows if row.path}
    return all(n in saved for n in range(len(urls)))
