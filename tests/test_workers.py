"""`serve --transport http --workers 2`: two processes on one port act as one server.

Spec: one client's calls are answered by both workers (the ledger shows two submitting
processes); a task submitted through one worker is cancelled through whichever worker the
cancel reaches, and an abandoned call's task is cancelled at PiAPI; a repeat re-attaches
whichever worker gets it. The server runs as a subprocess against the in-test simulator.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp.client import Client

from flux_mcp.ledger import TaskLedger

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def workers_url(sim, tmp_path: Path):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("FLUX_MCP_", "PIAPI_"))},
        "PIAPI_API_KEY": sim.api_key,
        "PIAPI_BASE_URL": sim.base_url,
        "FLUX_MCP_DATA_DIR": str(tmp_path / "data"),
        "FLUX_MCP_OUTPUT_DIR": str(tmp_path / "images"),
    }
    argv = [sys.executable, "-m", "flux_mcp", "serve", "--transport", "http", "--port", "0", "--workers", "2"]
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        line = b""
        while b"MCP endpoint" not in line:
            assert time.monotonic() < deadline and proc.poll() is None, line
            line = proc.stderr.readline()
        assert b"(2 workers)" in line
        yield line.decode().split("MCP endpoint ")[1].split()[0]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode is not None


async def call(url: str, tool: str, arguments: dict, **kwargs):
    """One call on a fresh connection (the socket listens before the workers start: it waits)."""
    with anyio.fail_after(60):
        async with Client(url) as client:
            return await client.call_tool(tool, arguments, **kwargs)


async def test_two_workers_serve_one_clients_calls_over_one_ledger(sim, workers_url, tmp_path):
    results = []

    async def one(n: int) -> None:
        results.append(await call(workers_url, "flux_txt2img", {"prompt": f"p{n}", "include_image": "none"}))

    async with anyio.create_task_group() as tg:
        for n in range(12):
            tg.start_soon(one, n)
    assert [r.structured_content["status"] for r in results] == ["completed"] * 12
    async with TaskLedger(tmp_path / "data" / "tasks.sqlite3") as ledger:
        entries = await ledger.list(limit=50)
    pids = {entry.submit_owner.split(":")[1] for entry in entries}
    assert len(entries) == 12 and len(pids) == 2  # both workers took calls, one ledger holds all

    again = await call(workers_url, "flux_txt2img", {"prompt": "p3", "include_image": "none"})
    assert again.structured_content["reattached"] is True  # whichever worker got the repeat
    assert len(sim.state.tasks) == 12


async def test_cancels_reach_the_task_whichever_worker_gets_them(sim, workers_url):
    sim.state.configure(pending_seconds=30)
    first = await call(workers_url, "flux_txt2img", {"prompt": "cancel me", "wait_seconds": 0})
    task_id = first.structured_content["task_id"]
    cancelled = [await call(workers_url, "flux_cancel_task", {"task_id": task_id})]
    assert cancelled[0].structured_content["cancel_accepted"] is True
    assert cancelled[0].structured_content["status"] == "cancelled"
    listed = await call(workers_url, "flux_list_tasks", {"status": "cancelled"})
    assert [t["task_id"] for t in listed.structured_content["tasks"]] == [task_id]

    with anyio.move_on_after(2):  # a call abandoned by its client: its worker cancels the task
        await call(workers_url, "flux_txt2img", {"prompt": "abandoned"})
    with anyio.fail_after(10):
        while sum(e["method"] == "DELETE" for e in sim.state.log) < 2:
            await anyio.sleep(0.1)
    abandoned = next(t for t in sim.state.tasks.values() if t.raw_input["prompt"] == "abandoned")
    assert sim.state.phase(abandoned) == "cancelled"
