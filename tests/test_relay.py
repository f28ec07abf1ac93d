"""The worker relay: a webhook received by one worker process wakes the call waiting in another.

Spec, with two or three relays sharing one directory inside this process (each stands for a
worker): a record published in one wakes a subscriber in another, and is not relayed further;
a dead worker's socket is removed; junk, oversized or invalid datagrams are dropped without
harm; an update too large to relay is not sent; the directory is private (0700, sockets 0600),
moves under the temp dir when its path would be too long for AF_UNIX, and a directory open to
others switches the relay off. End to end: `serve --transport http --workers 2` with
FLUX_MCP_PUBLIC_URL and the simulator delivering webhooks; calls whose webhook reached the other
worker finish without a single GET.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from pathlib import Path

import anyio
import pytest
from mcp.client import Client

from flux_mcp.ledger import TaskLedger
from flux_mcp.polling import COLD_PUSH_GAP_SECONDS
from flux_mcp.push import Subscription, TaskEvents
from flux_mcp.record import TaskRecord
from flux_mcp.relay import MAX_DATAGRAM, MAX_SOCKET_PATH, RELAY_DIR, Relay, relay_directory
from flux_mcp.simulator import running_simulator

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not hasattr(socket, "AF_UNIX") or sys.platform == "win32", reason="unix datagram sockets"),
]


def done(task_id: str, status: str = "completed") -> TaskRecord:
    return TaskRecord(task_id=task_id, status=status, image_urls=["https://img.example/a.png"])


@asynccontextmanager
async def relays(state_dir: Path, *events: TaskEvents) -> AsyncIterator[list[Relay]]:
    """One running relay per `events` (one per pretend worker), all over `state_dir`'s ledger."""
    async with AsyncExitStack() as stack:
        running = []
        for each in events:
            relay = Relay.beside(state_dir)
            assert relay is not None
            await stack.enter_async_context(relay.running(each))
            running.append(relay)
        yield running


async def woken(inbox: Subscription) -> TaskRecord | None:
    with anyio.fail_after(10):
        await inbox.wait(anyio.sleep, 60)
    return inbox.take()


def spy(directory: Path, name: str = "1-0000beef") -> socket.socket:
    """A bare socket in the relay directory: sees exactly what the relays send."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.fspath(directory / name))
    sock.settimeout(10)
    return sock


async def test_a_record_published_in_one_worker_wakes_the_call_waiting_in_another(tmp_path) -> None:
    a, b = TaskEvents(), TaskEvents()
    async with relays(tmp_path, a, b):
        with b.subscribe("task-1") as inbox:
            assert a.publish(done("task-1")) is False  # nobody waits in A: the receiver finishes it there
            assert await woken(inbox) == done("task-1")


async def test_a_relayed_record_is_not_relayed_again(tmp_path) -> None:
    a, b = TaskEvents(), TaskEvents()
    heard_in_b: list[TaskRecord] = []
    b.add_listener(heard_in_b.append)
    async with relays(tmp_path, a, b) as (relay_a, _):
        watcher = spy(relay_a.directory)
        try:
            with b.subscribe("task-1") as inbox:
                a.publish(done("task-1"))
                assert await woken(inbox) == done("task-1")
            a.publish(done("marker"))
            # B would have re-sent task-1 while waking its caller, so before A sent the marker.
            seen = [TaskRecord.model_validate_json(watcher.recv(MAX_DATAGRAM)).task_id for _ in range(2)]
        finally:
            watcher.close()
    assert seen == ["task-1", "marker"]
    assert heard_in_b == []  # published in B without its listeners


async def test_a_dead_workers_socket_is_removed(tmp_path) -> None:
    a, b = TaskEvents(), TaskEvents()
    async with relays(tmp_path, a, b) as (relay_a, _):
        gone = relay_a.directory / "4242-deadbeef"
        corpse = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        corpse.bind(os.fspath(gone))
        corpse.close()  # its process was killed: the file stays, nobody listens
        stray = relay_a.directory / "notes.txt"
        stray.write_text("not a socket")
        with b.subscribe("task-1") as inbox:
            a.publish(done("task-1"))
            assert await woken(inbox) == done("task-1")  # the live one still got it
        assert not gone.exists()
        assert stray.exists()  # only sockets nobody listens on are removed


async def test_a_burst_larger_than_a_peers_queue_waits_for_room_instead_of_being_dropped(tmp_path) -> None:
    a, b = TaskEvents(), TaskEvents()
    ids = [f"task-{n}" for n in range(100)]
    async with relays(tmp_path, a, b):
        with ExitStack() as stack:
            inboxes = [stack.enter_context(b.subscribe(task_id)) for task_id in ids]
            for task_id in ids:  # all at once: B reads nothing until A is done, its queue holds ~10
                a.publish(done(task_id))
            for inbox, task_id in zip(inboxes, ids, strict=True):
                assert await woken(inbox) == done(task_id)


async def test_a_stuck_peer_loses_its_backlog_and_holds_up_no_one(tmp_path, caplog) -> None:
    a, b = TaskEvents(), TaskEvents()
    async with relays(tmp_path, a, b) as (relay_a, _):
        relay_a.drain_seconds = 0.2
        stuck = spy(relay_a.directory)  # bound, never read: a worker whose loop is wedged
        try:
            ids = [f"task-{n}" for n in range(40)]
            with ExitStack() as stack:
                inboxes = [stack.enter_context(b.subscribe(task_id)) for task_id in ids]
                for task_id in ids:
                    a.publish(done(task_id))
                for inbox, task_id in zip(inboxes, ids, strict=True):
                    assert await woken(inbox) == done(task_id)
            with anyio.fail_after(10):
                while "took nothing" not in caplog.text:
                    await anyio.sleep(0.05)
        finally:
            stuck.close()
    assert "1-0000beef took nothing" in caplog.text


async def test_junk_oversized_and_foreign_datagrams_are_dropped(tmp_path, caplog) -> None:
    a, b = TaskEvents(), TaskEvents()
    caplog.set_level(logging.WARNING, logger="flux_mcp.relay")
    async with relays(tmp_path, a, b) as (_, relay_b):
        assert relay_b.path is not None
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_DATAGRAM)
        try:
            with b.subscribe("task-1") as inbox:
                for junk in (
                    b"\xff\xfe not json",
                    b"[1, 2, 3]",
                    json.dumps({"task_id": "../../etc", "status": "completed"}).encode(),
                    json.dumps({"task_id": "task-1", "status": "exploded"}).encode(),
                    json.dumps(
                        {"task_id": "task-1", "status": "completed", "ended_at": "2026-01-01T00:00:00"}
                    ).encode(),
                    json.dumps({"task_id": "task-1", "status": "completed", "pad": "x" * MAX_DATAGRAM}).encode(),
                    done("someone-elses-task").model_dump_json().encode(),  # nobody waits for it here
                ):
                    sender.sendto(junk, os.fspath(relay_b.path))
                sender.sendto(done("task-1").model_dump_json().encode(), os.fspath(relay_b.path))
                assert await woken(inbox) == done("task-1")  # only the real one, after all that
        finally:
            sender.close()
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 6, dropped
    assert any("oversized" in line for line in dropped)


async def test_an_update_too_large_for_a_datagram_is_not_sent(tmp_path, caplog) -> None:
    a = TaskEvents()
    async with relays(tmp_path, a) as (relay_a,):
        watcher = spy(relay_a.directory)
        watcher.settimeout(0)
        try:
            huge = TaskRecord(task_id="task-1", status="completed", image_urls=["https://x/" + "a" * MAX_DATAGRAM])
            a.publish(huge)
            a.publish(done("task-2"))
            await anyio.sleep(0)
            assert TaskRecord.model_validate_json(watcher.recv(MAX_DATAGRAM)).task_id == "task-2"
        finally:
            watcher.close()
    assert "too large to relay" in caplog.text


async def test_the_relay_is_private_and_cleans_up(tmp_path) -> None:
    a = TaskEvents()
    async with relays(tmp_path, a) as (relay_a,):
        path = relay_a.path
        assert path is not None and path.parent == relay_a.directory
        assert stat.S_IMODE(os.stat(relay_a.directory).st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert path.name.startswith(f"{os.getpid()}-")
    assert not path.exists() and relay_a.path is None
    a.publish(done("task-1"))  # after shutdown: nothing is sent, nothing fails


async def test_sockets_left_by_killed_workers_are_swept_at_start(tmp_path) -> None:
    relay = Relay.beside(tmp_path)
    assert relay is not None
    relay.directory.mkdir(mode=0o700, parents=True)
    corpse = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    corpse.bind(os.fspath(relay.directory / "4242-deadbeef"))
    corpse.close()
    alive = spy(relay.directory)
    try:
        async with relay.running(TaskEvents()):
            assert sorted(os.listdir(relay.directory)) == sorted(["1-0000beef", relay.path.name])
    finally:
        alive.close()


async def test_a_directory_open_to_others_switches_the_relay_off(tmp_path, caplog) -> None:
    relay = Relay.beside(tmp_path)
    assert relay is not None
    relay.directory.mkdir(parents=True)
    os.chmod(relay.directory, 0o777)
    async with relay.running(TaskEvents()):
        assert relay.path is None and os.listdir(relay.directory) == []
    assert "open to other users" in caplog.text


def test_socket_paths_stay_within_af_unix_limits(tmp_path, monkeypatch) -> None:
    short = tmp_path / "d"
    if len(os.fsencode(short / RELAY_DIR)) + 20 <= MAX_SOCKET_PATH:
        assert relay_directory(short) == short / RELAY_DIR
    deep = tmp_path / ("x" * 60) / ("y" * 60)
    moved = relay_directory(deep)
    assert moved is not None and moved.parent == Path(tempfile.gettempdir())
    assert moved == relay_directory(deep) != relay_directory(tmp_path / ("z" * 120))  # one per ledger
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / ("t" * 120)))
    assert relay_directory(deep) is None and Relay.beside(deep) is None


def test_no_unix_sockets_no_relay(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.delattr(socket, "AF_UNIX")
    assert Relay.beside(tmp_path) is None
    assert "safety-net poll" in caplog.text


async def test_one_http_process_runs_no_relay(settings, tmp_path) -> None:
    from flux_mcp.http_app import build_http_app
    from flux_mcp.simulator import bind_socket, running_app

    sock = bind_socket()
    hooked = settings.model_copy(update={"public_url": f"http://127.0.0.1:{sock.getsockname()[1]}"})
    async with running_app(build_http_app(hooked), sock=sock) as url, Client(f"{url}/mcp") as client:
        result = await client.call_tool("flux_txt2img", {"prompt": "alone", "include_image": "none"})
        assert result.structured_content["status"] == "completed"
    assert not (settings.data_dir / RELAY_DIR).exists()


# --- end to end: two worker processes ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
async def test_a_webhook_reaching_one_worker_wakes_the_call_waiting_in_the_other(tmp_path) -> None:
    # Every call starts its wait well before any task ends (1 s queued), so every wait plans its one
    # safety-net GET from the priors: at the p90 of a 1024 px schnell task (~4 s in) or, while the
    # kind is cold, COLD_PUSH_GAP_SECONDS (4 s) in, whichever is sooner; twice the 2 s the tasks
    # take. A call woken only by that GET would show it in the simulator's log.
    task_seconds = 2.0
    assert 2 * task_seconds <= COLD_PUSH_GAP_SECONDS  # the premise: the safety net comes well after the push
    async with running_simulator(durations={"schnell": task_seconds}) as sim:
        sim.state.configure(pending_seconds=1.0, webhook_retry_seconds=0.2)
        port = free_port()
        log_path = tmp_path / "server.log"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("FLUX_MCP_", "PIAPI_"))},
            "PIAPI_API_KEY": sim.api_key,
            "PIAPI_BASE_URL": sim.base_url,
            "FLUX_MCP_DATA_DIR": str(tmp_path / "data"),
            "FLUX_MCP_OUTPUT_DIR": str(tmp_path / "images"),
            "FLUX_MCP_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "FLUX_MCP_LOG_LEVEL": "INFO",
        }
        argv = [sys.executable, "-m", "flux_mcp", "serve", "--transport", "http", "--port", str(port)]
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen([*argv, "--workers", "2"], env=env, stdin=subprocess.DEVNULL, stderr=log_file)
        try:
            deadline = time.monotonic() + 30
            while "MCP endpoint" not in log_path.read_text():
                assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
                await anyio.sleep(0.05)
            url = f"http://127.0.0.1:{port}/mcp"
            results: list[dict] = []

            async def one(n: int) -> None:
                async with Client(url) as client:
                    result = await client.call_tool("flux_txt2img", {"prompt": f"p{n}", "include_image": "none"})
                results.append(result.structured_content)

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for n in range(12):
                        tg.start_soon(one, n)
        finally:
            proc.terminate()
            proc.wait(15)
        log = log_path.read_text()
        assert [r["status"] for r in results] == ["completed"] * 12, log
        assert all(Path(r["images"][0]["path"]).is_file() for r in results)
        task_ids = {r["task_id"] for r in results}
        gets = [e for e in sim.state.log if e["method"] == "GET" and e["task_id"] in task_ids]
        assert gets == []  # no call needed a GET, wherever its webhook landed ...
        relayed = {t for t in task_ids if f"task {t} woke a call waiting here" in log}
        assert relayed, log  # ... and some landed on the worker the call was not waiting in
        async with TaskLedger(tmp_path / "data" / "tasks.sqlite3") as ledger:
            owners = {e.submit_owner.split(":")[1] for e in await ledger.list(limit=50)}
        assert len(owners) == 2  # both workers took calls
        assert os.listdir(tmp_path / "data" / RELAY_DIR) == []  # both sockets removed at shutdown
