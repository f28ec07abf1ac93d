"""The ledger under load: many tasks at once in one process, and two processes on one file.

Every task walks the whole life a tool gives it (reserve, attach, three status changes, claim the
download lease, save the image rows) while the others do the same, so SQLite's one write lock is
contended as hard as a server carrying hundreds of generations contends it. Nothing may fail
with "database is locked", and every task must end up recorded exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from flux_mcp import errors
from flux_mcp.ledger import SavedImageRow, TaskLedger
from flux_mcp.record import TaskRecord

pytestmark = pytest.mark.anyio


async def one_task(ledger: TaskLedger, name: str, key: str | None = None) -> bool:
    """The ledger traffic of one tool call; True if this call created the task."""
    reservation = await ledger.reserve(
        idempotency_key=key or f"key:{name}",
        window_seconds=None,
        tool="flux_txt2img",
        task_type="txt2img",
        model="Qubico/flux1-schnell",
        request={"prompt": name},
        payload={"model": "Qubico/flux1-schnell", "task_type": "txt2img", "input": {"prompt": name}},
        estimated_cost_usd=0.0015,
    )
    if not reservation.is_new:
        return False
    task_id = f"t-{name}"

    def record(status: str, **extra: object) -> TaskRecord:
        return TaskRecord(task_id=task_id, model="Qubico/flux1-schnell", task_type="txt2img", status=status, **extra)

    await ledger.attach(reservation.entry.local_id, record("pending"))
    await ledger.record(record("processing"))
    url = f"http://127.0.0.1/files/{task_id}.png"
    await ledger.record(record("completed", image_urls=[url]))
    assert (await ledger.claim_for_download(task_id, owner="me")).granted
    await ledger.save_images(task_id, [SavedImageRow(n=0, url=url, path=f"/x/{task_id}.png", sha256="0", bytes=1)])
    return True


async def test_a_thousand_concurrent_tasks_in_one_process(tmp_path: Path):
    ledger = TaskLedger(tmp_path / "tasks.sqlite3")
    async with ledger, anyio.create_task_group() as tg:
        for n in range(1000):
            tg.start_soon(one_task, ledger, f"p{n}")
    async with TaskLedger(tmp_path / "tasks.sqlite3") as check:
        completed = await check.list(status="completed", limit=2000)
        assert len(completed) == 1000
        assert all(len(entry.images) == 1 and entry.images[0].path for entry in completed)


def recording(outcomes: dict[str, object]):
    """`call(name, coro_fn)`: awaits `coro_fn()` and records its result or exception under `name`."""

    async def call(name: str, coro_fn) -> None:
        try:
            outcomes[name] = await coro_fn()
        except Exception as exc:
            outcomes[name] = exc

    return call


WORKER = textwrap.dedent(
    """
    import json, sys
    import anyio
    sys.path.insert(0, sys.argv[3])
    from test_ledger_load import one_task
    from flux_mcp.ledger import TaskLedger

    async def main():
        created = []
        async def run(n):
            # Half the keys are shared with the other process: exactly one of the two may create each.
            shared = n % 2 == 0
            name = f"shared{n}" if shared else f"{sys.argv[2]}{n}"
            if await one_task(ledger, name, key=f"key:{name}"):
                created.append(name)
        async with TaskLedger(sys.argv[1]) as ledger, anyio.create_task_group() as tg:
            for n in range(300):
                tg.start_soon(run, n)
        print(json.dumps(created))

    anyio.run(main)
    """
)


@pytest.mark.slow
async def test_two_processes_on_one_ledger_under_load(tmp_path: Path):
    path = tmp_path / "tasks.sqlite3"
    async with TaskLedger(path):  # created (and migrated) once, as a first server would
        pass
    argv = [sys.executable, "-c", WORKER, str(path)]
    tests_dir = str(Path(__file__).parent)
    procs = [
        subprocess.Popen([*argv, name, tests_dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    created: list[str] = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        created += json.loads(out)
    shared = [name for name in created if name.startswith("shared")]
    assert sorted(shared) == sorted(f"shared{n}" for n in range(0, 300, 2))  # each shared key created once
    assert len(created) == 150 + 2 * 150
    async with TaskLedger(path) as check:
        assert len(await check.list(status="completed", limit=1000)) == 450


async def test_a_failing_operation_in_a_batch_rolls_back_alone(tmp_path: Path):
    """Calls made at once share one transaction; one that fails must not take the others with it."""
    outcomes: dict[str, object] = {}
    call = recording(outcomes)

    async with TaskLedger(tmp_path / "tasks.sqlite3") as ledger:
        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(call, f"ok{n}", lambda n=n: one_task(ledger, f"ok{n}"))
            bad = TaskRecord(task_id="t-bad", model="Qubico/flux1-schnell", task_type="txt2img", status="pending")
            tg.start_soon(call, "bad", lambda: ledger.attach("no-such-reservation", bad))
        assert isinstance(outcomes.pop("bad"), errors.StorageError)
        assert set(outcomes.values()) == {True}
        assert len(await ledger.list(status="completed", limit=100)) == 20
        assert await ledger.get("t-bad") is None


async def test_a_cancelled_caller_neither_loses_its_write_nor_stalls_the_others(tmp_path: Path):
    async with TaskLedger(tmp_path / "tasks.sqlite3") as ledger:
        async with anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(one_task, ledger, f"n{n}")
            await anyio.sleep(0)
            tg.cancel_scope.cancel()  # every caller is cancelled while its operations are queued
        with anyio.fail_after(10):
            assert await one_task(ledger, "after")
        reserved = await ledger.list(limit=100)
        assert "after" in {entry.request["prompt"] for entry in reserved}
        # Whatever each cancelled caller had started was finished: no reservation is half written.
        assert all(entry.submit_state in ("submitting", "submitted") for entry in reserved)


async def test_reads_never_wait_for_a_batch_of_writes(tmp_path: Path):
    """A listing (what flux_list_tasks and the status look-ups do) is answered from the last
    commit while a batch of writes still runs."""
    import threading

    async with TaskLedger(tmp_path / "tasks.sqlite3") as ledger:
        assert await one_task(ledger, "done")
        inside, release, written = threading.Event(), threading.Event(), threading.Event()

        def slow_write(conn):
            conn.execute("UPDATE tasks SET updated_at = updated_at")
            inside.set()
            release.wait(3)
            written.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(ledger._run, slow_write)
            await anyio.to_thread.run_sync(inside.wait, 10)
            try:
                listed = await ledger.list()
                spent = await ledger.spent_since(0)
                answered_during_the_write = not written.is_set()
            finally:
                release.set()
        assert answered_during_the_write
        assert [e.request["prompt"] for e in listed] == ["done"] and spent > 0


async def test_reads_made_at_once_share_a_few_thread_calls_and_fail_alone(tmp_path: Path):
    """A thousand calls in flight each look something up: the reads waiting when a batch starts
    run in that one worker-thread call (one hand-off through a busy event loop, not one each),
    and a read that fails fails only its own caller."""
    outcomes: dict[str, object] = {}
    call = recording(outcomes)

    async with TaskLedger(tmp_path / "tasks.sqlite3") as ledger:
        for n in range(5):
            assert await one_task(ledger, f"t{n}")
        batches: list[int] = []
        execute = ledger._reads._execute
        ledger._reads._execute = lambda batch: (batches.append(len(batch)), execute(batch))
        async with anyio.create_task_group() as tg:
            for n in range(100):
                tg.start_soon(call, f"list{n}", lambda: ledger.list(limit=10))
            tg.start_soon(call, "broken", lambda: ledger._read(lambda conn: conn.execute("SELECT nonsense")))
            tg.start_soon(call, "spent", lambda: ledger.spent_since(0))
        assert sum(batches) == 102 and len(batches) <= 3, batches
        assert isinstance(outcomes.pop("broken"), errors.StorageError)
        assert outcomes.pop("spent") == pytest.approx(5 * 0.0015)
        assert all(len(listed) == 5 for listed in outcomes.values())


@pytest.mark.parametrize("broken", ["writes", "reads"])
async def test_a_connection_that_cannot_be_opened_fails_every_waiting_caller_and_hangs_none(tmp_path: Path, broken):
    """The ledger reopens a connection it had to drop (or after `aclose`). If that fails, every
    caller whose operation was queued gets the error, at once; the next operation opens it again."""
    import sqlite3

    async with TaskLedger(tmp_path / "tasks.sqlite3") as ledger:
        assert await one_task(ledger, "before")
        await ledger.aclose()  # both connections are reopened on the next use
        real_connect, failures = ledger._connect, [1]

        def connect_failing_once():
            if failures:
                failures.pop()
                raise sqlite3.OperationalError("unable to open database file")
            return real_connect()

        ledger._connect = connect_failing_once
        outcomes: dict[str, object] = {}
        call = recording(outcomes)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for n in range(20):
                    if broken == "writes":
                        tg.start_soon(call, f"w{n}", lambda n=n: one_task(ledger, f"w{n}"))
                    else:
                        tg.start_soon(call, f"r{n}", lambda: ledger.list(limit=10))
        failed = [o for o in outcomes.values() if isinstance(o, errors.StorageError)]
        assert failed and "unable to open database file" in str(failed[0])
        assert all(isinstance(o, errors.StorageError) or o is True or isinstance(o, list) for o in outcomes.values())
        if broken == "reads":  # a read that fails never passes for an empty answer
            assert all(isinstance(o, errors.StorageError) or len(o) >= 1 for o in outcomes.values())
        with anyio.fail_after(10):
            assert await one_task(ledger, "after")
            assert len(await ledger.list(limit=100)) >= 2
