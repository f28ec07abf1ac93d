"""Durable record of every task this server submitted or looked at, shared by all its processes.

A paid task must never be lost or submitted twice, and several server processes (one per MCP
client) may share one data directory, so the ledger is a SQLite file in WAL mode, written only
inside `BEGIN IMMEDIATE` transactions with a busy timeout: SQLite's own file lock is the
cross-process mutex that makes idempotency reservations and download leases atomic. Within a
process every operation is funnelled through one connection, one at a time, in a worker thread
(`anyio.to_thread` with a limiter of one), so the event loop never blocks on disk and hundreds of
concurrent calls never race each other for the write lock: each process is a single writer, and
only processes contend (within the busy timeout; tests/test_ledger_load.py). Rows are
keyed by a local id because PiAPI's task id is unknown until the create call answers; history
and saved images hang off that local id. The schema is versioned with `PRAGMA user_version`.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import anyio.to_thread
from pydantic import BaseModel, ConfigDict

from flux_mcp import errors
from flux_mcp.record import TERMINAL_STATUSES, TaskRecord
from flux_mcp.spend import SpendLimit

log = logging.getLogger(__name__)

SubmitState = Literal["queued", "submitting", "submitted", "uncertain"]
SCHEMA_VERSION = 3
BUSY_TIMEOUT_SECONDS = 10.0
# A task counts toward FLUX_MCP_MAX_CONCURRENT_TASKS while it is pending or processing and its
# submitter lives, until its last recorded change is this old (nobody may be polling it any more).
ACTIVE_WINDOW_SECONDS = 600.0
MAX_BATCH = 200  # operations per transaction: bounds how long one process holds the write lock
_T = TypeVar("_T")
# Charged from the reservation on; PiAPI bills neither failed nor cancelled tasks.
SPENT_SINCE_SQL = (
    "SELECT COALESCE(SUM(estimated_cost_usd), 0) FROM tasks WHERE created_at >= ? "
    "AND (status IS NULL OR status NOT IN ('failed', 'cancelled'))"
)

_SCHEMA_V1 = """
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, local_id TEXT NOT NULL UNIQUE, task_id TEXT UNIQUE,
    tool TEXT NOT NULL, task_type TEXT NOT NULL, model TEXT NOT NULL,
    idempotency_key TEXT, fingerprint TEXT, submit_state TEXT NOT NULL, status TEXT,
    request_json TEXT NOT NULL DEFAULT '{}', payload_json TEXT NOT NULL DEFAULT '{}', record_json TEXT,
    image_urls_json TEXT NOT NULL DEFAULT '[]', error_json TEXT, estimated_cost_usd REAL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, download_owner TEXT, download_lease_until REAL
);
CREATE INDEX tasks_by_key ON tasks (idempotency_key, created_at);
CREATE INDEX tasks_by_created ON tasks (created_at, seq);
CREATE TABLE status_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, local_id TEXT NOT NULL, status TEXT NOT NULL, at REAL NOT NULL
);
CREATE INDEX history_by_local ON status_history (local_id, id);
CREATE TABLE images (
    local_id TEXT NOT NULL, n INTEGER NOT NULL, url TEXT NOT NULL, path TEXT, sha256 TEXT, bytes INTEGER,
    PRIMARY KEY (local_id, n)
);
"""
# Version N -> script that upgrades a version N-1 file; append, never edit, when the schema changes.
_MIGRATIONS: dict[int, str] = {
    1: _SCHEMA_V1,
    # Who is submitting a reservation, so a row left `submitting` by a dead process is recognised.
    2: "ALTER TABLE tasks ADD COLUMN submit_owner TEXT",
    # The day's spend is summed on every call's result and under the spend guard: from the index
    # alone, not a table look-up per task of the day.
    3: "CREATE INDEX tasks_spend ON tasks (created_at, status, estimated_cost_usd)",
}


def new_owner_id() -> str:
    """Who submits a task or holds a download lease: host, pid and a nonce, so that a dead
    process's reservation or lease can be recognised."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_gone(owner: str | None) -> bool:
    """True only when the owner is provably dead: a process of this host that no longer exists."""
    if not owner or os.name != "posix":  # os.kill(pid, 0) is not a probe on Windows
        return False
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return pid_is_gone(int(pid))


def pid_is_gone(pid: int) -> bool:
    """True only when no process `pid` exists on this host (never on Windows, where it cannot be probed)."""
    if os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def fingerprint(payload: dict[str, Any]) -> str:
    """sha256 of the canonical JSON payload (sorted keys, no whitespace)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class SavedImageRow(BaseModel):
    """One output image: its PiAPI URL and, once downloaded, where and what was saved."""

    model_config = ConfigDict(frozen=True)

    n: int
    url: str
    path: str | None = None
    sha256: str | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class DownloadClaim:
    """Whether a process may download a task's images now, and the image rows stored so far."""

    granted: bool
    saved: builtins.list[SavedImageRow]


class LedgerEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    local_id: str
    task_id: str | None
    tool: str
    task_type: str
    model: str
    idempotency_key: str | None
    fingerprint: str | None
    submit_state: SubmitState
    submit_owner: str | None = None
    status: str | None
    request: dict[str, Any]
    payload: dict[str, Any]
    record: TaskRecord | None
    error: dict[str, Any] | None
    images: list[SavedImageRow]
    estimated_cost_usd: float | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Reservation:
    entry: LedgerEntry
    is_new: bool


class _Operation:
    """One queued ledger operation and, once its batch ran, its outcome."""

    __slots__ = ("error", "finished", "fn", "result", "wake")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = False
        self.wake = anyio.Event()


class _Line:
    """Operations waiting for one connection, run in batches: one worker-thread call runs every
    operation queued when it starts (`execute(batch)`), so a thousand calls in flight cost a
    handful of thread hand-offs, not one round trip through a busy event loop each. Like a thread
    call, an operation that has been queued is finished before a cancellation reaches its caller."""

    def __init__(self, execute: Callable[[builtins.list[_Operation]], None], limiter: anyio.CapacityLimiter) -> None:
        self._execute = execute
        self._limiter = limiter  # one batch at a time (and nothing else on the connection meanwhile)
        self._queue: builtins.list[_Operation] = []
        self._draining = False

    async def run(self, fn: Callable[[sqlite3.Connection], Any]) -> _Operation:
        op = _Operation(fn)
        self._queue.append(op)
        with anyio.CancelScope(shield=True):
            while not op.finished:
                if self._draining:
                    await op.wake.wait()
                    op.wake = anyio.Event()
                    continue
                self._draining = True
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    await anyio.to_thread.run_sync(self._execute, batch, limiter=self._limiter)
                except BaseException as exc:  # the batch could not run at all (e.g. the file would not open)
                    for other in batch:
                        if not other.finished:
                            other.error, other.finished = exc, True
                finally:
                    self._draining = False
                    for other in batch:
                        other.wake.set()
                    if self._queue:  # hand the next batch to a caller that is waiting for it
                        self._queue[0].wake.set()
        return op


def _dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that takes SQLite's write lock up front, so read-then-write is atomic.

    Inside a batch (see `TaskLedger._execute`) the batch's transaction already holds the lock and
    each operation has its own savepoint, so there is nothing to begin here."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _record_error(record: TaskRecord) -> str | None:
    return _dumps(record.error.model_dump()) if record.error is not None else None


def _insert_task(conn: sqlite3.Connection, **values: Any) -> str:
    local_id = uuid.uuid4().hex
    values["local_id"] = local_id
    columns = ", ".join(values)
    marks = ", ".join(f":{name}" for name in values)
    conn.execute(f"INSERT INTO tasks ({columns}) VALUES ({marks})", values)
    return local_id


def _claim_task_id(conn: sqlite3.Connection, local_id: str, task_id: str) -> None:
    """Bind PiAPI's task id to a reservation; a row that already holds the id (someone fetched
    the task by id first) is folded into it."""
    clash = conn.execute(
        "SELECT local_id FROM tasks WHERE task_id = ? AND local_id != ?", (task_id, local_id)
    ).fetchone()
    if clash is not None:
        other = clash["local_id"]
        conn.execute("UPDATE status_history SET local_id = ? WHERE local_id = ?", (local_id, other))
        conn.execute("UPDATE OR IGNORE images SET local_id = ? WHERE local_id = ?", (local_id, other))
        conn.execute("DELETE FROM images WHERE local_id = ?", (other,))
        conn.execute("DELETE FROM tasks WHERE local_id = ?", (other,))
    conn.execute("UPDATE tasks SET task_id = ? WHERE local_id = ?", (task_id, local_id))


_PLAIN_COLUMNS = (
    "local_id", "task_id", "tool", "task_type", "model", "idempotency_key", "fingerprint", "submit_state",
    "submit_owner", "status", "estimated_cost_usd", "created_at", "updated_at",
)  # fmt: skip


class TaskLedger:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._opened = False
        self._open_lock = anyio.Lock()
        self._funnel = anyio.CapacityLimiter(1)  # one batch at a time on `_conn`
        self._conn: sqlite3.Connection | None = None
        # Reads run on a second connection of their own: WAL lets it read the last commit while
        # a batch of writes runs, so a listing or a status look-up never queues behind writes.
        self._reader: sqlite3.Connection | None = None
        self._reading = anyio.CapacityLimiter(1)
        self._writes = _Line(self._execute, self._funnel)
        self._reads = _Line(self._execute_reads, self._reading)

    async def __aenter__(self) -> TaskLedger:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close this process's connection (the next operation would open a new one)."""

        def close() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        def close_reader() -> None:
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.close()

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(close, limiter=self._funnel)
            await anyio.to_thread.run_sync(close_reader, limiter=self._reading)

    # --- plumbing ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # Used from whichever worker thread runs the operation, never from two at once (`_funnel`).
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.create_function("owner_is_gone", 1, owner_is_gone)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
        return conn

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `fn` on this process's connection, batched with whatever else is waiting: the next
        batch runs all of them in a single transaction (each in its own savepoint, so one failing
        rolls back only itself) and one commit, i.e. one fsync for many writes."""
        await self._ensure_open()
        return self._outcome(await self._writes.run(fn))

    async def _ensure_open(self) -> None:
        """Open the file on the first operation; many first calls at once open it once."""
        if not self._opened:
            async with self._open_lock:
                if not self._opened:
                    await self.open()

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run the read-only `fn` on this process's reading connection (see `__init__`), batched
        with the other reads waiting: it sees every write that has returned, and waits for no
        batch of writes."""
        await self._ensure_open()
        return self._outcome(await self._reads.run(fn))

    def _outcome(self, op: _Operation) -> Any:
        if op.error is not None:
            if isinstance(op.error, sqlite3.Error):
                raise errors.StorageError(f"task ledger {self.path}: {op.error}") from op.error
            raise op.error
        return op.result

    def _execute_reads(self, batch: builtins.list[_Operation]) -> None:
        """In the worker thread: each read on its own, on the reading connection (opened on first
        use; if it cannot be, `_Line` hands that error to every read of the batch)."""
        if self._reader is None:
            reader = self._connect()
            try:
                reader.execute("PRAGMA query_only = 1")
            except BaseException:
                reader.close()
                raise
            self._reader = reader
        for op in batch:
            try:
                op.result = op.fn(self._reader)
            except BaseException as exc:
                op.error = exc
            op.finished = True

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _execute(self, batch: builtins.list[_Operation]) -> None:
        """In the worker thread: one operation alone, or several in one transaction (if the
        connection cannot be opened, `_Line` hands that error to the whole batch)."""
        conn = self._connection()
        if len(batch) == 1:
            op = batch[0]
            try:
                op.result = op.fn(conn)
            except BaseException as exc:
                op.error = exc
                self._reset(conn)
            op.finished = True
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                conn.execute("SAVEPOINT op")
                try:
                    op.result = op.fn(conn)
                except BaseException as exc:
                    op.error = exc
                    conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:  # no lock within the busy timeout, or the commit failed
            self._reset(conn)
            for op in batch:
                op.result, op.error = None, op.error or exc
        finally:
            for op in batch:
                op.finished = True

    def _reset(self, conn: sqlite3.Connection) -> None:
        """Never leave the shared connection inside a transaction."""
        if not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._conn = None
            conn.close()

    async def open(self) -> None:
        """Create the directory, switch to WAL and create or migrate the schema; idempotent."""

        def setup(conn: sqlite3.Connection) -> None:
            # journal_mode is stored in the file; changing it can briefly fail while another
            # process holds the file, so retry a few times before giving up.
            for attempt in range(50):
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    break
                except sqlite3.OperationalError:
                    if attempt == 49:
                        raise
                    time.sleep(0.05)
            with _immediate(conn):
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise errors.StorageError(
                        f"task ledger {self.path} has schema version {version}, newer than this "
                        f"server understands ({SCHEMA_VERSION}); upgrade piapi-flux-mcp"
                    )
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[target].split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {target}")

        try:
            await anyio.to_thread.run_sync(lambda: self.path.parent.mkdir(parents=True, exist_ok=True))
        except OSError as exc:
            raise errors.StorageError(f"cannot create the ledger directory {self.path.parent}: {exc}") from exc

        def setup_alone() -> None:  # never batched: journal_mode cannot change inside a transaction
            conn = self._connection()
            try:
                setup(conn)
            except BaseException:
                self._reset(conn)
                raise

        try:
            await anyio.to_thread.run_sync(setup_alone, limiter=self._funnel)
        except sqlite3.Error as exc:
            raise errors.StorageError(f"task ledger {self.path}: {exc}") from exc
        self._opened = True

    # --- reading ----------------------------------------------------------------------------

    @staticmethod
    def _images_for(conn: sqlite3.Connection, local_ids: builtins.list[str]) -> dict[str, builtins.list[SavedImageRow]]:
        found: dict[str, builtins.list[SavedImageRow]] = {lid: [] for lid in local_ids}
        if not local_ids:
            return found
        marks = ",".join("?" * len(local_ids))
        rows = conn.execute(
            f"SELECT * FROM images WHERE local_id IN ({marks}) ORDER BY local_id, n", local_ids
        ).fetchall()
        for row in rows:
            found[row["local_id"]].append(SavedImageRow(**{name: row[name] for name in SavedImageRow.model_fields}))
        return found

    @classmethod
    def _entries(cls, conn: sqlite3.Connection, rows: builtins.list[sqlite3.Row]) -> builtins.list[LedgerEntry]:
        images = cls._images_for(conn, [row["local_id"] for row in rows])
        return [
            LedgerEntry(
                **{name: row[name] for name in _PLAIN_COLUMNS},
                request=json.loads(row["request_json"]),
                payload=json.loads(row["payload_json"]),
                record=TaskRecord.model_validate_json(row["record_json"]) if row["record_json"] else None,
                error=json.loads(row["error_json"]) if row["error_json"] else None,
                images=images[row["local_id"]],
            )
            for row in rows
        ]

    @classmethod
    def _one(cls, conn: sqlite3.Connection, column: str, value: str) -> LedgerEntry | None:
        row = conn.execute(f"SELECT * FROM tasks WHERE {column} = ?", (value,)).fetchone()
        return cls._entries(conn, [row])[0] if row is not None else None

    async def get(self, task_id: str) -> LedgerEntry | None:
        return await self._read(lambda conn: self._one(conn, "task_id", task_id))

    async def get_local(self, local_id: str) -> LedgerEntry | None:
        return await self._read(lambda conn: self._one(conn, "local_id", local_id))

    async def list(
        self, *, status: str | None = None, task_type: str | None = None, limit: int = 20
    ) -> builtins.list[LedgerEntry]:
        """Newest first; entries whose submission is uncertain (no task id) are included, and
        `status="uncertain"` selects those and the ones still (or forever, if their process died)
        being submitted."""
        entries, _ = await self.browse(status=status, task_type=task_type, limit=limit)
        return entries

    async def browse(
        self,
        *,
        status: str | None = None,
        task_type: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        text: str | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> tuple[builtins.list[LedgerEntry], int]:
        """`list` with more filters (model, creation time range, a substring of the prompt) and
        paging; also returns how many entries match in all."""
        where = (
            "(:status IS NULL OR status = :status OR "
            "(:status = 'uncertain' AND submit_state IN ('uncertain', 'submitting'))) AND "
            "(:task_type IS NULL OR task_type = :task_type) AND (:model IS NULL OR model = :model) AND "
            "(:since IS NULL OR created_at >= :since) AND (:until IS NULL OR created_at < :until) AND "
            "(:text IS NULL OR json_extract(request_json, '$.prompt') LIKE :text ESCAPE '\\')"
        )
        like = None
        if text:
            like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        params = {
            "status": status, "task_type": task_type, "model": model, "since": since, "until": until,
            "text": like, "limit": max(0, limit), "offset": max(0, offset),
        }  # fmt: skip

        def query(conn: sqlite3.Connection) -> tuple[builtins.list[LedgerEntry], int]:
            rows = conn.execute(
                f"SELECT * FROM tasks WHERE {where} ORDER BY created_at DESC, seq DESC LIMIT :limit OFFSET :offset",
                params,
            ).fetchall()
            total = conn.execute(f"SELECT COUNT(*) FROM tasks WHERE {where}", params).fetchone()[0]
            return self._entries(conn, rows), total

        return await self._read(query)

    async def facets(self) -> dict[str, builtins.list[str]]:
        """The task types and models present in the ledger (for filter menus)."""

        def query(conn: sqlite3.Connection) -> dict[str, builtins.list[str]]:
            return {
                column: [row[0] for row in conn.execute(f"SELECT DISTINCT {column} FROM tasks ORDER BY 1")]
                for column in ("task_type", "model")
            }

        return await self._read(query)

    async def describe(self, entry: LedgerEntry) -> dict[str, Any]:
        """An entry as JSON-ready data with its status history (the `flux://tasks/{id}` record)."""

        def query(conn: sqlite3.Connection) -> builtins.list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT status, at FROM status_history WHERE local_id = ? ORDER BY id", (entry.local_id,)
            ).fetchall()
            return [{"status": row["status"], "at": row["at"]} for row in rows]

        return {**entry.model_dump(mode="json"), "history": await self._read(query)}

    async def history(self, task_id: str) -> builtins.list[tuple[str, float]]:
        def query(conn: sqlite3.Connection) -> builtins.list[tuple[str, float]]:
            rows = conn.execute(
                "SELECT h.status, h.at FROM status_history h JOIN tasks t ON t.local_id = h.local_id "
                "WHERE t.task_id = ? ORDER BY h.id",
                (task_id,),
            ).fetchall()
            return [(row["status"], row["at"]) for row in rows]

        return await self._read(query)

    async def recent_timings(self, limit: int = 1000) -> builtins.list[tuple[str, str, dict[str, Any], TaskRecord]]:
        """`(model, task_type, request input, PiAPI record)` of the newest completed tasks, newest
        first: what the poll planner learns durations from at start-up."""

        def query(conn: sqlite3.Connection) -> builtins.list[tuple[str, str, dict[str, Any], TaskRecord]]:
            rows = conn.execute(
                "SELECT model, task_type, payload_json, record_json FROM tasks "
                "WHERE status = 'completed' AND record_json IS NOT NULL ORDER BY updated_at DESC LIMIT ?",
                (max(0, limit),),
            ).fetchall()
            found = []
            for row in rows:
                task_input = json.loads(row["payload_json"]).get("input")
                task_input = task_input if isinstance(task_input, dict) else {}
                record = TaskRecord.model_validate_json(row["record_json"])
                found.append((row["model"], row["task_type"], task_input, record))
            return found

        return await self._read(query)

    async def images(self, task_id: str) -> builtins.list[SavedImageRow]:
        entry = await self.get(task_id)
        return entry.images if entry is not None else []

    # --- submission lifecycle ---------------------------------------------------------------

    @staticmethod
    def _active_holder(
        conn: sqlite3.Connection, idempotency_key: str, window_seconds: float | None, now: float
    ) -> sqlite3.Row | None:
        """The entry a new claim of `idempotency_key` would re-attach to, if any."""
        # A failed or cancelled task cost nothing, so a repeat of it is a fresh submission.
        # A create still in flight, or of unknown outcome, holds its key whatever the window or
        # the clock says: only the caller may decide to pay again.
        sql = (
            "SELECT * FROM tasks WHERE idempotency_key = ? "
            "AND (status IS NULL OR status NOT IN ('failed', 'cancelled'))"
        )
        params: builtins.list[Any] = [idempotency_key]
        if window_seconds is not None:
            sql += " AND (submit_state IN ('queued', 'submitting', 'uncertain') OR (? > 0 AND created_at >= ?))"
            params += [window_seconds, now - window_seconds]
        return conn.execute(sql + " ORDER BY created_at DESC, seq DESC LIMIT 1", params).fetchone()

    @staticmethod
    def _spent_since(conn: sqlite3.Connection, since: float) -> float:
        row = conn.execute(SPENT_SINCE_SQL, (since,)).fetchone()
        return round(float(row[0]), 6)

    async def spent_since(self, since: float) -> float:
        """USD charged for tasks created at or after `since` (see `flux_mcp.spend`)."""
        return await self._read(lambda conn: self._spent_since(conn, since))

    async def would_reattach(self, idempotency_key: str, window_seconds: float | None) -> bool:
        """Whether `reserve` with this key would re-attach now (a read; the answer may change)."""
        now = self._clock()
        holder = await self._read(lambda conn: self._active_holder(conn, idempotency_key, window_seconds, now))
        return holder is not None

    async def reserve(
        self,
        *,
        idempotency_key: str,
        window_seconds: float | None,
        tool: str,
        task_type: str,
        model: str,
        request: dict[str, Any],
        payload: dict[str, Any],
        estimated_cost_usd: float,
        payload_fingerprint: str | None = None,
        owner: str | None = None,
        spend_limit: SpendLimit | None = None,
        queued: bool = False,
    ) -> Reservation:
        """Claim `idempotency_key`, or return the entry that already holds it within the window.

        `payload_fingerprint` identifies the exact request (default: the fingerprint of `payload`)
        and `owner` the process submitting it (see `new_owner_id`). With `spend_limit`, a new
        claim whose cost would take the spend since `spend_limit.since` past its budget raises
        `BudgetExceededError` and records nothing; a re-attach is never refused. A `queued` claim
        waits for `admit` before it may be sent (see `flux_mcp.admission`)."""
        now = self._clock()

        def reserve(conn: sqlite3.Connection) -> Reservation:
            with _immediate(conn):
                row = self._active_holder(conn, idempotency_key, window_seconds, now)
                if row is not None:
                    return Reservation(entry=self._entries(conn, [row])[0], is_new=False)
                if spend_limit is not None:
                    # Checked and charged under the same write lock: no other process can slip in.
                    spend_limit.check(estimated_cost_usd, self._spent_since(conn, spend_limit.since))
                local_id = _insert_task(
                    conn,
                    tool=tool,
                    task_type=task_type,
                    model=model,
                    idempotency_key=idempotency_key,
                    fingerprint=payload_fingerprint or fingerprint(payload),
                    submit_owner=owner,
                    submit_state="queued" if queued else "submitting",
                    request_json=_dumps(request),
                    payload_json=_dumps(payload),
                    estimated_cost_usd=estimated_cost_usd,
                    created_at=now,
                    updated_at=now,
                )
                entry = self._one(conn, "local_id", local_id)
                assert entry is not None
                return Reservation(entry=entry, is_new=True)

        return await self._run(reserve)

    async def admit(self, local_id: str, owner: str, limit: int) -> bool:
        """Move a queued claim to `submitting` if fewer than `limit` tasks are active across every
        process sharing this ledger; False if it must wait. Raises `StorageError` if the claim is gone.
        """
        since = self._clock() - ACTIVE_WINDOW_SECONDS

        def admit(conn: sqlite3.Connection) -> bool:
            with _immediate(conn):
                row = conn.execute("SELECT submit_state FROM tasks WHERE local_id = ?", (local_id,)).fetchone()
                if row is None:
                    raise errors.StorageError(f"the queued request {local_id} is no longer in the ledger")
                if row["submit_state"] != "queued":
                    return True
                active = conn.execute(
                    "SELECT COUNT(*) FROM tasks WHERE local_id != ? AND NOT owner_is_gone(submit_owner) AND "
                    "(submit_state = 'submitting' OR (submit_state = 'submitted' "
                    "AND status IN ('pending', 'processing') AND updated_at >= ?))",
                    (local_id, since),
                ).fetchone()[0]
                if active >= limit:
                    return False
                conn.execute(
                    "UPDATE tasks SET submit_state = 'submitting', submit_owner = ? WHERE local_id = ?",
                    (owner, local_id),
                )
                return True

        return await self._run(admit)

    async def adopt(self, local_id: str, owner: str) -> bool:
        """Take over a queued claim whose process died (it was never sent); True if now `owner`'s."""

        def adopt(conn: sqlite3.Connection) -> bool:
            with _immediate(conn):
                return (
                    conn.execute(
                        "UPDATE tasks SET submit_owner = ? WHERE local_id = ? AND submit_state = 'queued' "
                        "AND owner_is_gone(submit_owner)",
                        (owner, local_id),
                    ).rowcount
                    == 1
                )

        return await self._run(adopt)

    async def attach(self, local_id: str, record: TaskRecord) -> None:
        """The create call answered: bind PiAPI's task id to the reservation."""
        now = self._clock()

        def attach(conn: sqlite3.Connection) -> None:
            with _immediate(conn):
                _claim_task_id(conn, local_id, record.task_id)
                updated = conn.execute(
                    "UPDATE tasks SET submit_state = 'submitted', updated_at = ? WHERE local_id = ?",
                    (now, local_id),
                ).rowcount
                if not updated:
                    raise errors.StorageError(
                        f"no ledger reservation {local_id} for task {record.task_id}", task_id=record.task_id
                    )
                self._apply_record(conn, local_id, record, now)

        await self._run(attach)

    async def mark_uncertain(self, local_id: str, message: str, *, task_id: str | None = None) -> None:
        """The create may have reached PiAPI; keep the row so a repeat with the same key is refused.
        A `task_id` seen in the answer (a 5xx body may carry one) is stored with it."""
        now = self._clock()
        error = _dumps(errors.SubmitUncertainError(message).to_dict())

        def mark(conn: sqlite3.Connection) -> None:
            with _immediate(conn):
                updated = conn.execute(
                    "UPDATE tasks SET submit_state = 'uncertain', error_json = ?, updated_at = ? "
                    "WHERE local_id = ? AND submit_state = 'submitting'",
                    (error, now, local_id),
                ).rowcount
                if updated and task_id:
                    _claim_task_id(conn, local_id, task_id)

        await self._run(mark)

    async def release(self, local_id: str) -> None:
        """The create provably never reached PiAPI: forget the reservation so a retry may submit."""

        def release(conn: sqlite3.Connection) -> None:
            with _immediate(conn):
                row = conn.execute("SELECT task_id FROM tasks WHERE local_id = ?", (local_id,)).fetchone()
                if row is None or row["task_id"] is not None:
                    # Already gone, or PiAPI has the task after all: never forget a real task.
                    return
                conn.execute("DELETE FROM status_history WHERE local_id = ?", (local_id,))
                conn.execute("DELETE FROM images WHERE local_id = ?", (local_id,))
                conn.execute("DELETE FROM tasks WHERE local_id = ?", (local_id,))

        await self._run(release)

    # The spec'd API takes a timeout: the caller decides how long a duplicate request may wait.
    async def wait_for_submission(self, local_id: str, timeout: float) -> LedgerEntry:  # noqa: ASYNC109
        """Wait while another caller (maybe another process) is still queueing or submitting this entry.

        Returns the latest entry, possibly still `queued` or `submitting` when `timeout` passes. If the other
        caller released the reservation, raises a retryable `UpstreamError`: a new call may submit.
        """
        with anyio.move_on_after(max(0.0, timeout)):
            while True:
                entry = await self.get_local(local_id)
                if entry is None or entry.submit_state not in ("queued", "submitting"):
                    break
                await anyio.sleep(0.1)
        entry = await self.get_local(local_id)
        if entry is None:
            raise errors.UpstreamError(
                "an identical request was being submitted by another caller, but it failed before reaching PiAPI",
                retryable=True,
                hint="Call again to submit the task.",
            )
        return entry

    # --- status updates ---------------------------------------------------------------------

    @staticmethod
    def _apply_record(conn: sqlite3.Connection, local_id: str, record: TaskRecord, now: float) -> None:
        previous = conn.execute(
            "SELECT status FROM status_history WHERE local_id = ? ORDER BY id DESC LIMIT 1", (local_id,)
        ).fetchone()
        if previous is not None and previous["status"] in TERMINAL_STATUSES and not record.is_terminal:
            return  # a slower process's stale poll must not move a finished task backwards
        conn.execute(
            "UPDATE tasks SET status = :status, record_json = :record, image_urls_json = :urls, error_json = :error, "
            "task_type = COALESCE(NULLIF(:task_type, ''), task_type), model = COALESCE(NULLIF(:model, ''), model), "
            "updated_at = :now WHERE local_id = :local_id",
            {
                "status": record.status,
                "record": record.model_dump_json(),
                "urls": _dumps(record.image_urls),
                "error": _record_error(record),
                "task_type": record.task_type,
                "model": record.model,
                "now": now,
                "local_id": local_id,
            },
        )
        if previous is None or previous["status"] != record.status:
            conn.execute(
                "INSERT INTO status_history (local_id, status, at) VALUES (?, ?, ?)",
                (local_id, record.status, now),
            )

    async def record(self, record: TaskRecord, *, tool: str | None = None) -> LedgerEntry:
        """Store PiAPI's latest view of a task, inserting tasks the ledger has not seen before."""
        now = self._clock()

        def upsert(conn: sqlite3.Connection) -> LedgerEntry:
            with _immediate(conn):
                row = conn.execute("SELECT local_id FROM tasks WHERE task_id = ?", (record.task_id,)).fetchone()
                if row is None:
                    local_id = _insert_task(
                        conn,
                        task_id=record.task_id,
                        tool=tool or "external",
                        task_type=record.task_type,
                        model=record.model,
                        submit_state="submitted",
                        created_at=now,
                        updated_at=now,
                    )
                else:
                    local_id = row["local_id"]
                self._apply_record(conn, local_id, record, now)
                entry = self._one(conn, "local_id", local_id)
                assert entry is not None
                return entry

        return await self._run(upsert)

    # --- downloads --------------------------------------------------------------------------

    async def claim_for_download(self, task_id: str, owner: str, lease_seconds: float = 120) -> DownloadClaim:
        """Whether `owner` may download this task's images now (`granted`), and the image rows
        already stored, read in the same transaction.

        Not granted when the task is unknown, every image PiAPI returned already has a local copy,
        or another live owner holds an unexpired lease. Re-claiming one's own lease renews it.
        """
        now = self._clock()

        def claim(conn: sqlite3.Connection) -> DownloadClaim:
            with _immediate(conn):
                row = conn.execute(
                    "SELECT local_id, image_urls_json, download_owner, download_lease_until FROM tasks "
                    "WHERE task_id = ?",
                    (task_id,),
                ).fetchone()
                if row is None:
                    return DownloadClaim(granted=False, saved=[])
                images = self._images_for(conn, [row["local_id"]])[row["local_id"]]
                saved = sum(1 for image in images if image.path is not None)
                # Done only when every image PiAPI returned has a copy: a batch interrupted after
                # its first image stored one row, not all of them.
                if saved > 0 and saved >= len(json.loads(row["image_urls_json"])):
                    return DownloadClaim(granted=False, saved=images)
                holder, until = row["download_owner"], row["download_lease_until"]
                live = until is not None and until > now and not owner_is_gone(holder)
                if holder is not None and holder != owner and live:
                    return DownloadClaim(granted=False, saved=images)
                conn.execute(
                    "UPDATE tasks SET download_owner = ?, download_lease_until = ? WHERE local_id = ?",
                    (owner, now + lease_seconds, row["local_id"]),
                )
                return DownloadClaim(granted=True, saved=images)

        return await self._run(claim)

    async def save_images(self, task_id: str, images: builtins.list[SavedImageRow]) -> None:
        """Store the per-image rows (replacing rows with the same n) and drop the download lease."""
        now = self._clock()

        def save(conn: sqlite3.Connection) -> None:
            with _immediate(conn):
                row = conn.execute("SELECT local_id FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
                if row is None:
                    raise errors.StorageError(f"task {task_id} is not in the ledger", task_id=task_id)
                conn.executemany(
                    "INSERT OR REPLACE INTO images (local_id, n, url, path, sha256, bytes) VALUES (?, ?, ?, ?, ?, ?)",
                    [(row["local_id"], i.n, i.url, i.path, i.sha256, i.bytes) for i in images],
                )
                conn.execute(
                    "UPDATE tasks SET download_owner = NULL, download_lease_until = NULL, updated_at = ? "
                    "WHERE local_id = ?",
                    (now, row["local_id"]),
                )

        await self._run(save)
