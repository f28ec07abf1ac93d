"""Ledger tests run against real SQLite files in tmp_path.

Concurrency is tested with real threads, each with its own `TaskLedger` and event loop, because
that is what several server processes sharing one data directory look like to SQLite: separate
connections racing for the same write lock. A fake clock drives the idempotency window and the
download lease so no test sleeps for them.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from flux_mcp import errors
from flux_mcp.ledger import (
    SCHEMA_VERSION,
    SPENT_SINCE_SQL,
    DownloadClaim,
    LedgerEntry,
    Reservation,
    SavedImageRow,
    TaskLedger,
    fingerprint,
)
from flux_mcp.record import TaskRecord


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


PAYLOAD: dict[str, Any] = {
    "model": "Qubico/flux1-schnell",
    "task_type": "txt2img",
    "input": {"prompt": "a cat"},
}


async def reserve(ledger: TaskLedger, key: str = "k1", window: float | None = 600.0) -> Reservation:
    return await ledger.reserve(
        idempotency_key=key,
        window_seconds=window,
        tool="flux_generate",
        task_type="txt2img",
        model="Qubico/flux1-schnell",
        request={"prompt": "a cat"},
        payload=PAYLOAD,
        estimated_cost_usd=0.002,
    )


def task(task_id: str, status: str = "pending", **extra: Any) -> TaskRecord:
    return TaskRecord(task_id=task_id, model="Qubico/flux1-schnell", task_type="txt2img", status=status, **extra)


def test_fingerprint_is_canonical() -> None:
    assert fingerprint({"b": 1, "a": [1, 2]}) == fingerprint({"a": [1, 2], "b": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint({})) == 64


@pytest.mark.anyio
async def test_reserve_attach_get_list_round_trip(tmp_path: Path) -> None:
    clock = FakeClock()
    async with TaskLedger(tmp_path / "sub" / "tasks.sqlite3", clock=clock) as ledger:
        first = await reserve(ledger)
        assert first.is_new
        entry = first.entry
        assert entry.submit_state == "submitting"
        assert entry.task_id is None and entry.status is None
        assert entry.fingerprint == fingerprint(PAYLOAD)
        assert entry.payload == PAYLOAD and entry.request == {"prompt": "a cat"}
        assert entry.estimated_cost_usd == pytest.approx(0.002)

        clock.now += 5
        await ledger.attach(entry.local_id, task("t-1", "pending"))
        got = await ledger.get("t-1")
        assert got is not None
        assert got.local_id == entry.local_id
        assert got.submit_state == "submitted"
        assert got.status == "pending"
        assert got.record == task("t-1", "pending")
        assert got.created_at == 1_000_000.0 and got.updated_at == 1_000_005.0
        assert await ledger.get_local(entry.local_id) == got
        assert await ledger.get("nope") is None

        again = await reserve(ledger)
        assert not again.is_new
        assert again.entry.local_id == entry.local_id
        assert again.entry.task_id == "t-1"

        clock.now += 1
        other = await reserve(ledger, key="k2")
        listed = await ledger.list()
        assert [e.local_id for e in listed] == [other.entry.local_id, entry.local_id]
        assert [e.local_id for e in await ledger.list(status="pending")] == [entry.local_id]
        assert await ledger.list(task_type="img2img") == []
        assert len(await ledger.list(limit=1)) == 1


@pytest.mark.anyio
async def test_list_orders_same_timestamp_by_insertion(tmp_path: Path) -> None:
    async with TaskLedger(tmp_path / "t.db", clock=FakeClock()) as ledger:
        ids = [(await reserve(ledger, key=f"k{i}")).entry.local_id for i in range(4)]
        assert [e.local_id for e in await ledger.list()] == ids[::-1]


@pytest.mark.anyio
async def test_window_expiry(tmp_path: Path) -> None:
    clock = FakeClock()
    async with TaskLedger(tmp_path / "t.db", clock=clock) as ledger:
        first = await reserve(ledger, window=60)
        await ledger.attach(first.entry.local_id, task("t-1", "completed"))
        clock.now += 59
        assert not (await reserve(ledger, window=60)).is_new
        clock.now += 2
        later = await reserve(ledger, window=60)
        assert later.is_new and later.entry.local_id != first.entry.local_id
        await ledger.attach(later.entry.local_id, task("t-2", "completed"))
        clock.now += 10_000
        # No window: the newest entry with the key is found however old it is.
        unlimited = await reserve(ledger, window=None)
        assert not unlimited.is_new and unlimited.entry.local_id == later.entry.local_id


@pytest.mark.anyio
@pytest.mark.parametrize("window", [60.0, 0.0])
@pytest.mark.parametrize("jump", [61.0, 10_000_000.0, -10_000_000.0])
async def test_a_create_of_unknown_outcome_holds_its_key_whatever_the_window_or_clock(
    tmp_path: Path, window: float, jump: float
) -> None:
    clock = FakeClock()
    async with TaskLedger(tmp_path / "t.db", clock=clock) as ledger:
        first = await reserve(ledger, window=window)
        await ledger.mark_uncertain(first.entry.local_id, "the answer was lost", task_id="t-seen")
        clock.now += jump
        again = await reserve(ledger, window=window)
        assert not again.is_new and again.entry.local_id == first.entry.local_id
        assert again.entry.submit_state == "uncertain" and again.entry.task_id == "t-seen"
        # Still in flight (another caller is creating it): also held, whatever the window.
        in_flight = await reserve(ledger, key="k-flight", window=window)
        clock.now += jump
        assert not (await reserve(ledger, key="k-flight", window=window)).is_new
        assert in_flight.is_new


@pytest.mark.anyio
async def test_release_lets_a_retry_submit(tmp_path: Path) -> None:
    async with TaskLedger(tmp_path / "t.db") as ledger:
        first = await reserve(ledger)
        await ledger.release(first.entry.local_id)
        assert await ledger.get_local(first.entry.local_id) is None
        second = await reserve(ledger)
        assert second.is_new and second.entry.local_id != first.entry.local_id


@pytest.mark.anyio
async def test_release_never_forgets_an_attached_task(tmp_path: Path) -> None:
    async with TaskLedger(tmp_path / "t.db") as ledger:
        first = await reserve(ledger)
        await ledger.attach(first.entry.local_id, task("t-1"))
        await ledger.release(first.entry.local_id)
        assert await ledger.get("t-1") is not None


@pytest.mark.anyio
async def test_uncertain_entry_is_kept_and_listed(tmp_path: Path) -> None:
    async with TaskLedger(tmp_path / "t.db") as ledger:
        first = await reserve(ledger)
        await ledger.mark_uncertain(first.entry.local_id, "read timeout after sending")
        again = await reserve(ledger)
        assert not again.is_new
        assert again.entry.submit_state == "uncertain"
        assert again.entry.error is not None
        assert again.entry.error["category"] == "submit_uncertain"
        assert again.entry.error["message"] == "read timeout after sending"
        listed = await ledger.list()
        assert [(e.local_id, e.task_id) for e in listed] == [(first.entry.local_id, None)]


@pytest.mark.anyio
async def test_wait_for_submission(tmp_path: Path) -> None:
    async with TaskLedger(tmp_path / "t.db") as ledger:
        first = await reserve(ledger)
        local_id = first.entry.local_id
        still = await ledger.wait_for_submission(local_id, timeout=0.15)
        assert still.submit_state == "submitting"

        async def attach_soon() -> None:
            await anyio.sleep(0.15)
            await ledger.attach(local_id, task("t-9", "processing"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(attach_soon)
            done = await ledger.wait_for_submission(local_id, timeout=5)
        assert done.submit_state == "submitted" and done.task_id == "t-9"

        second = await reserve(ledger, key="k2")
        await ledger.release(second.entry.local_id)
        with pytest.raises(errors.UpstreamError) as info:
            await ledger.wait_for_submission(second.entry.local_id, timeout=1)
        assert info.value.retryable


@pytest.mark.anyio
async def test_record_inserts_unknown_task_and_tracks_history(tmp_path: Path) -> None:
    clock = FakeClock()
    async with TaskLedger(tmp_path / "t.db", clock=clock) as ledger:
        entry = await ledger.record(task("ext-1", "pending"))
        assert isinstance(entry, LedgerEntry)
        assert entry.tool == "external" and entry.submit_state == "submitted"
        assert entry.idempotency_key is None and entry.request == {}

        clock.now += 1
        await ledger.record(task("ext-1", "pending"))
        clock.now += 1
        await ledger.record(task("ext-1", "processing"))
        clock.now += 1
        await ledger.record(task("ext-1", "processing"))
        clock.now += 1
        done = await ledger.record(task("ext-1", "completed", image_urls=["https://cdn/x.png"]))
        assert done.status == "completed"
        assert done.record is not None and done.record.image_urls == ["https://cdn/x.png"]
        assert done.updated_at == 1_000_004.0
        assert await ledger.history("ext-1") == [
            ("pending", 1_000_000.0),
            ("processing", 1_000_002.0),
            ("completed", 1_000_004.0),
        ]

        failed = TaskRecord.from_api(
            {"task_id": "ext-2", "status": "failed", "error": {"code": 10000, "message": "nsfw"}}
        )
        named = await ledger.record(failed, tool="flux_get_task")
        assert named.tool == "flux_get_task"
        assert named.error == {"code": 10000, "message": "nsfw", "raw_message": ""}
        # A stale poll from a slower process never moves a finished task backwards.
        stale = await ledger.record(task("ext-2", "processing"))
        assert stale.status == "failed" and stale.error == named.error
        assert [s for s, _ in await ledger.history("ext-2")] == ["failed"]


@pytest.mark.anyio
async def test_attach_then_record_appends_history(tmp_path: Path) -> None:
    clock = FakeClock()
    async with TaskLedger(tmp_path / "t.db", clock=clock) as ledger:
        first = await reserve(ledger)
        await ledger.attach(first.entry.local_id, task("t-1", "pending"))
        clock.now += 3
        entry = await ledger.record(task("t-1", "completed"))
        assert entry.local_id == first.entry.local_id and entry.tool == "flux_generate"
        assert await ledger.history("t-1") == [("pending", 1_000_000.0), ("completed", 1_000_003.0)]


@pytest.mark.anyio
async def test_attach_merges_a_row_fetched_by_id_first(tmp_path: Path) -> None:
    async with TaskLedger(tmp_path / "t.db") as ledger:
        first = await reserve(ledger)
        await ledger.record(task("t-1", "pending"))
        await ledger.attach(first.entry.local_id, task("t-1", "pending"))
        await ledger.attach(first.entry.local_id, task("t-1", "processing"))
        entries = await ledger.list()
        assert [(e.local_id, e.task_id, e.tool) for e in entries] == [(first.entry.local_id, "t-1", "flux_generate")]
        assert [s for s, _ in await ledger.history("t-1")] == ["pending", "processing"]


def test_concurrent_reserve_from_threads_yields_one_new(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    barrier = threading.Barrier(8)
    results: list[Reservation] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        async def main() -> Reservation:
            ledger = TaskLedger(path)
            await ledger.open()
            barrier.wait(timeout=10)
            return await reserve(ledger, key="same-key")

        try:
            result = anyio.run(main)
        except BaseException as exc:
            with lock:
                failures.append(exc)
            return
        with lock:
            results.append(result)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not failures
    assert len(results) == 8
    assert sum(r.is_new for r in results) == 1
    assert len({r.entry.local_id for r in results}) == 1


@pytest.mark.anyio
async def test_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    async with TaskLedger(path) as ledger:
        first = await reserve(ledger)
        await ledger.attach(first.entry.local_id, task("t-1", "completed"))
    async with TaskLedger(path) as reopened:
        await reopened.open()  # idempotent
        entry = await reopened.get("t-1")
        assert entry is not None and entry.local_id == first.entry.local_id
        assert not (await reserve(reopened)).is_new
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.anyio
async def test_the_days_spend_is_summed_from_an_index_alone(tmp_path: Path) -> None:
    """Every call's result and the spend guard sum the day's spend: with thousands of tasks a day
    that must not be a table look-up per task."""
    path = tmp_path / "t.db"
    async with TaskLedger(path) as ledger:
        await ledger.attach((await reserve(ledger)).entry.local_id, task("t-1", "completed"))
        assert await ledger.spent_since(0) > 0
    with sqlite3.connect(path) as conn:
        plan = conn.execute(f"EXPLAIN QUERY PLAN {SPENT_SINCE_SQL}", (0,)).fetchall()
    assert "COVERING INDEX" in " ".join(str(row[-1]) for row in plan)


@pytest.mark.anyio
async def test_operations_open_lazily(tmp_path: Path) -> None:
    ledger = TaskLedger(tmp_path / "lazy" / "t.db")
    assert await ledger.list() == []


@pytest.mark.anyio
async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(errors.StorageError, match="newer"):
        await TaskLedger(path).open()


@pytest.mark.anyio
async def test_a_download_claim_carries_the_rows_already_saved(tmp_path: Path) -> None:
    """Taking the lease and reading what is saved is one ledger step, so a retry downloads only
    the images still missing."""
    async with TaskLedger(tmp_path / "t.db") as ledger:
        assert await ledger.claim_for_download("unknown", "a") == DownloadClaim(granted=False, saved=[])
        await ledger.record(task("t-1", "completed", image_urls=["https://cdn/1.png", "https://cdn/2.png"]))
        claim = await ledger.claim_for_download("t-1", "a")
        assert claim.granted and claim.saved == []
        first = SavedImageRow(n=0, url="https://cdn/1.png", path="/o/t-1_0.png", sha256="ab", bytes=10)
        await ledger.save_images("t-1", [first, SavedImageRow(n=1, url="https://cdn/2.png")])
        claim = await ledger.claim_for_download("t-1", "b")
        assert claim.granted and claim.saved == [first, SavedImageRow(n=1, url="https://cdn/2.png")]
        assert not (await ledger.claim_for_download("t-1", "c")).granted  # b holds the lease now
        second = SavedImageRow(n=1, url="https://cdn/2.png", path="/o/t-1_1.png", sha256="cd", bytes=11)
        await ledger.save_images("t-1", [second])
        assert await ledger.claim_for_download("t-1", "c") == DownloadClaim(granted=False, saved=[first, second])


@pytest.mark.anyio
async def test_a_download_claim_is_a_lease(tmp_path: Path) -> None:
    clock = FakeClock()
    async with TaskLedger(tmp_path / "t.db", clock=clock) as ledger:
        assert not (await ledger.claim_for_download("unknown", "a")).granted
        await ledger.record(task("t-1", "completed", image_urls=["https://cdn/1.png", "https://cdn/2.png"]))
        assert (await ledger.claim_for_download("t-1", "a", lease_seconds=60)).granted
        assert not (await ledger.claim_for_download("t-1", "b", lease_seconds=60)).granted
        assert (await ledger.claim_for_download("t-1", "a", lease_seconds=60)).granted  # renew own lease
        clock.now += 61
        assert (await ledger.claim_for_download("t-1", "b", lease_seconds=60)).granted  # expired: taken over

        # A partial save (one download failed) clears the lease but allows another attempt.
        await ledger.save_images(
            "t-1",
            [
                SavedImageRow(n=0, url="https://cdn/1.png", path="/o/t-1_0.png", sha256="ab", bytes=10),
                SavedImageRow(n=1, url="https://cdn/2.png"),
            ],
        )
        assert (await ledger.claim_for_download("t-1", "c")).granted
        await ledger.save_images(
            "t-1", [SavedImageRow(n=1, url="https://cdn/2.png", path="/o/t-1_1.png", sha256="cd", bytes=11)]
        )
        assert not (await ledger.claim_for_download("t-1", "d")).granted
        rows = await ledger.images("t-1")
        assert [(r.n, r.path, r.bytes) for r in rows] == [(0, "/o/t-1_0.png", 10), (1, "/o/t-1_1.png", 11)]
        entry = await ledger.get("t-1")
        assert entry is not None and entry.images == rows
        assert await ledger.images("unknown") == []
        with pytest.raises(errors.StorageError):
            await ledger.save_images("unknown", rows)


@pytest.mark.anyio
async def test_a_lease_held_by_a_dead_process_is_taken_over_but_a_live_one_is_not(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    from flux_mcp.ledger import new_owner_id

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    async with TaskLedger(tmp_path / "ledger.sqlite3") as ledger:
        for task_id in ("t-dead", "t-live"):
            await ledger.record(TaskRecord(task_id=task_id, status="completed", image_urls=["u"]))
        assert (await ledger.claim_for_download("t-dead", f"{socket.gethostname()}:{dead.pid}:00000000")).granted
        assert (await ledger.claim_for_download("t-dead", new_owner_id())).granted  # the holder is gone
        assert (await ledger.claim_for_download("t-live", f"{socket.gethostname()}:{os.getpid()}:00000000")).granted
        assert not (await ledger.claim_for_download("t-live", new_owner_id())).granted  # the holder is alive


@pytest.mark.anyio
async def test_a_partly_saved_batch_can_still_be_claimed(tmp_path: Path) -> None:
    async with TaskLedger(tmp_path / "ledger.sqlite3") as ledger:
        urls = [f"https://cdn/{n}.png" for n in range(4)]
        await ledger.record(TaskRecord(task_id="b", status="completed", image_urls=urls))
        assert (await ledger.claim_for_download("b", "me")).granted
        # Interrupted after the first image: only its row was stored (and the lease released).
        await ledger.save_images("b", [SavedImageRow(n=0, url=urls[0], path="/x/b_0.png")])
        assert (await ledger.claim_for_download("b", "someone-else")).granted
        await ledger.save_images("b", [SavedImageRow(n=n, url=u, path=f"/x/b_{n}.png") for n, u in enumerate(urls)])
        assert not (await ledger.claim_for_download("b", "a-third")).granted
