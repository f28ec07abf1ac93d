"""End to end: the server as a real `python -m flux_mcp` subprocess, the simulator in this process.

Every test talks MCP over a real transport (stdio, or streamable HTTP) to a server process that
talks HTTP over loopback to the `sim` fixture, so the whole path is exercised: argument schemas,
progress notifications, cancellation, the ledger on disk, downloads and sidecars, and the
process boundary itself (a server killed with SIGKILL mid-wait, and a new one that finishes).
The server's stderr goes to a file under tmp_path and is printed when a test fails.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx2
import pytest
from conftest import warm_up
from mcp import Client, MCPError, StdioServerParameters, stdio_client
from PIL import Image

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SCHNELL = "Qubico/flux1-schnell"
DEV_ADVANCED = "Qubico/flux1-dev-advanced"
TASK_TOOL_NAMES = (
    "flux_txt2img",
    "flux_img2img",
    "flux_txt2img_lora",
    "flux_img2img_lora",
    "flux_fill_inpaint",
    "flux_fill_outpaint",
    "flux_redux_variation",
    "flux_controlnet_lora",
)
RESULT_KEYS = {"task_id", "model", "task_type", "status", "images", "error", "created_at", "elapsed_seconds"}
STARTUP_SECONDS = 10.0


# --- helpers --------------------------------------------------------------------------------------


def write_png(path: Path, size: tuple[int, int] = (96, 64), colour: tuple[int, int, int] = (200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")
    return path


def server_env(sim: Any, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "PIAPI_BASE_URL": sim.base_url,
        "PIAPI_API_KEY": sim.api_key,
        "FLUX_MCP_DATA_DIR": str(tmp_path / "data"),
        "FLUX_MCP_OUTPUT_DIR": str(tmp_path / "images"),
        "FLUX_MCP_IMAGE_ROOTS": str(tmp_path / "work"),
        "FLUX_MCP_WAIT_SECONDS": "20",
        "FLUX_MCP_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


@asynccontextmanager
async def stdio_server(sim: Any, tmp_path: Path, name: str = "server", **extra: str) -> AsyncIterator[Client]:
    """A `python -m flux_mcp` subprocess over stdio; its stderr goes to tmp_path/<name>.stderr."""
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "flux_mcp"], env=server_env(sim, tmp_path, **extra)
    )
    errlog_path = tmp_path / f"{name}.stderr"
    with errlog_path.open("w") as errlog:
        try:
            async with Client(stdio_client(params, errlog=errlog)) as client:
                yield client
        except BaseException:
            errlog.flush()
            sys.stderr.write(f"--- {name} stderr ---\n{errlog_path.read_text()}\n")
            raise


class ProgressLog:
    """Collects progress notifications as (progress, total, message)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, float | None, str | None]] = []
        self.first_seen = anyio.Event()

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.events.append((progress, total, message))
        self.first_seen.set()

    @property
    def first_message(self) -> str:
        assert self.events, "no progress notification arrived"
        return self.events[0][2] or ""


def structured(result: Any) -> dict[str, Any]:
    assert result.structured_content is not None, result.content
    return result.structured_content


def posts(sim: Any) -> list[dict[str, Any]]:
    return [e for e in sim.state.log if e["method"] == "POST" and e["path"] == "/api/v1/task"]


async def assert_completed_with_local_copies(sim: Any, result: Any, tool: str) -> dict[str, Any]:
    """The full contract of a finished task result, checked against the disk and the simulator."""
    body = structured(result)
    assert not result.is_error, (tool, result.content)
    assert RESULT_KEYS <= body.keys(), (tool, sorted(body))
    assert body["status"] == "completed", (tool, body)
    assert body["error"] is None
    assert body["task_id"] and body["task_id"] in sim.state.tasks
    assert body["images"], (tool, body)
    types = {block.type for block in result.content}
    assert {"text", "resource_link"} <= types, (tool, types)
    async with httpx2.AsyncClient(timeout=10) as http:
        for image in body["images"]:
            path = Path(image["path"])
            assert path.is_file(), (tool, image)
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as opened:
                assert opened.format == "PNG"
                opened.load()
            fresh = await http.get(image["url"])
            assert fresh.status_code == 200, image["url"]
            assert fresh.content == data, f"{tool}: local copy differs from {image['url']}"
            sidecar = json.loads(path.with_suffix(".json").read_text())
            assert sidecar["sha256"] == hashlib.sha256(data).hexdigest()
            assert sidecar["task_id"] == body["task_id"]
            assert sidecar["bytes"] == len(data)
    return body


def task_files(output_dir: Path, task_id: str) -> list[str]:
    return sorted(p.name for p in output_dir.iterdir() if task_id in p.name) if output_dir.exists() else []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = STARTUP_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            stream = await anyio.connect_tcp("127.0.0.1", port)
        except OSError:
            await anyio.sleep(0.1)
            continue
        await stream.aclose()
        return
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def child_pids(parent: int) -> list[int]:
    """Direct children of `parent`, read from /proc (Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces, so split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent:
            found.append(int(entry.name))
    return found


def stop_process(proc: subprocess.Popen[bytes], *, grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)


async def wait_for(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await anyio.sleep(interval)
    return bool(predicate())


# --- 1. every task tool ---------------------------------------------------------------------------


async def test_all_eight_task_tools_complete_with_verified_local_copies(sim, tmp_path):
    work = tmp_path / "work"
    photo = str(write_png(work / "photo.png"))
    masked = str(write_png(work / "masked.png", colour=(255, 255, 255)))
    control = str(write_png(work / "edges.png", size=(128, 96), colour=(10, 10, 10)))
    calls: dict[str, dict[str, Any]] = {
        "flux_txt2img": {"prompt": "a red fox", "width": 320, "height": 256},
        "flux_img2img": {"prompt": "as a watercolour", "image": photo, "denoise": 0.5},
        "flux_txt2img_lora": {"prompt": "a castle", "lora_type": "anime", "width": 256, "height": 256},
        # An http URL is passed through untouched (the simulator does not download it).
        "flux_img2img_lora": {"prompt": "a portrait", "image": "https://example.com/x.png", "lora_type": "disney"},
        "flux_fill_inpaint": {"prompt": "a hat", "image": masked},
        "flux_fill_outpaint": {"prompt": "more sky", "image": photo, "outpaint_top": 32, "outpaint_right": 16},
        "flux_redux_variation": {"prompt": "at night", "image": photo},
        "flux_controlnet_lora": {
            "prompt": "a robot",
            "control_type": "canny",
            "control_image": control,
            "width": 256,
            "height": 256,
        },
    }
    assert set(calls) == set(TASK_TOOL_NAMES)
    results: dict[str, Any] = {}
    async with stdio_server(sim, tmp_path) as client:

        async def run(tool: str) -> None:
            results[tool] = await client.call_tool(tool, calls[tool])

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for tool in calls:
                    tg.start_soon(run, tool)

    seen_ids = set()
    for tool in TASK_TOOL_NAMES:
        body = await assert_completed_with_local_copies(sim, results[tool], tool)
        seen_ids.add(body["task_id"])
        sim_task = sim.state.tasks[body["task_id"]]
        assert body["task_type"] == sim_task.request.task_type.value
        assert body["model"] == sim_task.model
    assert len(seen_ids) == 8
    assert len(posts(sim)) == 8
    # Local paths went up as data URIs; the URL went up as given.
    by_type = {t.request.task_type.value: t for t in sim.state.tasks.values()}
    assert by_type["img2img"].raw_input["image"].startswith("data:image/png;base64,")
    assert by_type["img2img-lora"].raw_input["image"] == "https://example.com/x.png"
    assert by_type["controlnet-lora"].raw_input["control_net_settings"][0]["control_image"].startswith("data:image/")
    # The outpainted image is the input grown by the requested borders.
    with Image.open(results["flux_fill_outpaint"].structured_content["images"][0]["path"]) as out:
        assert out.size == (96 + 16, 64 + 32)


# --- 2. a long task returns "processing", then flux_wait_task finishes it -------------------------


async def test_long_task_returns_processing_then_wait_task_completes(sim, tmp_path):
    sim.state.configure(durations={SCHNELL: 3.0}, pending_seconds=0.2)
    progress = ProgressLog()
    async with stdio_server(sim, tmp_path) as client:
        await warm_up(client)  # what the first calls load is not what this deadline is about
        started = time.monotonic()
        result = await client.call_tool(
            "flux_txt2img",
            {"prompt": "a slow lighthouse", "width": 256, "height": 256, "wait_seconds": 0.3},
            progress_callback=progress,
        )
        elapsed = time.monotonic() - started
        assert elapsed < 2.0, elapsed
        body = structured(result)
        assert not result.is_error, result.content
        assert body["status"] in ("pending", "processing")
        task_id = body["task_id"]
        assert task_id and task_id in sim.state.tasks
        assert "flux_wait_task" in (body.get("next_step") or "")
        assert body["images"] == []
        assert task_id in progress.first_message

        waited_progress = ProgressLog()
        with anyio.fail_after(15):
            done = await client.call_tool(
                "flux_wait_task", {"task_id": task_id, "wait_seconds": 10}, progress_callback=waited_progress
            )
    body = await assert_completed_with_local_copies(sim, done, "flux_wait_task")
    assert body["task_id"] == task_id
    assert len(posts(sim)) == 1
    values = [p for p, _, _ in progress.events + waited_progress.events]
    assert values, "no progress at all"
    assert [p for p, _, _ in progress.events] == sorted({p for p, _, _ in progress.events})


# --- 3. a client-side cancel reaches PiAPI as a DELETE --------------------------------------------


async def test_client_cancel_sends_delete_and_task_ends_cancelled(sim, tmp_path):
    sim.state.configure(durations={SCHNELL: 8.0}, pending_seconds=5.0)
    progress = ProgressLog()
    async with stdio_server(sim, tmp_path) as client:
        with pytest.raises(MCPError):
            await client.call_tool(
                "flux_txt2img",
                {"prompt": "never mind", "width": 256, "height": 256, "wait_seconds": 30},
                progress_callback=progress,
                read_timeout_seconds=1.5,
            )
        assert len(sim.state.tasks) == 1
        task_id = next(iter(sim.state.tasks))
        assert task_id in progress.first_message

        def deleted() -> bool:
            return any(e["method"] == "DELETE" and e["task_id"] == task_id for e in sim.state.log)

        assert await wait_for(deleted, 3.0), sim.state.log
        task = sim.state.tasks[task_id]
        assert sim.state.phase(task) == "cancelled"
        delete = next(e for e in sim.state.log if e["method"] == "DELETE")
        assert delete["status"] == 200

        # The server is still healthy, and reports the task as cancelled.
        got = await client.call_tool("flux_get_task", {"task_id": task_id})
        assert structured(got)["status"] == "cancelled"


# --- 4. a failed task is an error result with the upstream reason ---------------------------------


async def test_failed_task_is_error_result_with_simulator_message(sim, tmp_path):
    sim.state.add_fault("fail_next", code=10001, message="nsfw content detected")
    async with stdio_server(sim, tmp_path) as client:
        result = await client.call_tool("flux_txt2img", {"prompt": "something", "width": 256, "height": 256})
    body = structured(result)
    assert result.is_error is True
    assert body["status"] == "failed"
    assert body["task_id"] in sim.state.tasks
    assert body["error"]["code"] == 10001
    assert body["error"]["category"] == "task_failed"
    assert "nsfw content detected" in body["error"]["message"]
    assert body["images"] == []
    text = " ".join(block.text for block in result.content if block.type == "text")
    assert "nsfw content detected" in text


# --- 5. streamable HTTP -----------------------------------------------------------------------------


async def test_streamable_http_transport_lists_tools_and_completes_a_task(sim, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(server_env(sim, tmp_path), NO_PROXY="127.0.0.1,localhost")
    errlog_path = tmp_path / "http.stderr"
    with errlog_path.open("wb") as errlog:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flux_mcp",
                "serve",
                "--transport",
                "http",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=errlog,
            stderr=errlog,
        )
        try:
            await wait_until_listening(port, proc)
            progress = ProgressLog()
            with anyio.fail_after(30):
                async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                    tools = await client.list_tools()
                    names = {tool.name for tool in tools.tools}
                    assert len(names) == 13, sorted(names)  # twelve, and the gallery App's flux_rerun
                    assert set(TASK_TOOL_NAMES) <= names
                    assert {"flux_get_task", "flux_wait_task", "flux_cancel_task", "flux_list_tasks"} <= names
                    result = await client.call_tool(
                        "flux_txt2img",
                        {"prompt": "over http", "width": 256, "height": 256},
                        progress_callback=progress,
                    )
            body = await assert_completed_with_local_copies(sim, result, "flux_txt2img (http)")
            assert progress.events, "no progress notification over streamable HTTP"
            assert body["task_id"] in progress.first_message
        except BaseException:
            sys.stderr.write(f"--- http server output ---\n{errlog_path.read_text()}\n")
            raise
        finally:
            await anyio.to_thread.run_sync(stop_process, proc)
    assert proc.returncode is not None


# --- 6. a server killed mid-wait; a new one finishes the task with one download --------------------

HELPER = """
import json, sys
import anyio
from mcp import Client, StdioServerParameters, stdio_client

async def main():
    params = StdioServerParameters(command=sys.executable, args=["-m", "flux_mcp"], env=json.loads(sys.argv[1]))
    printed = False

    async def progress(value, total, message):
        nonlocal printed
        if not printed:
            printed = True
            print("PROGRESS " + (message or ""), flush=True)

    with open(sys.argv[2], "w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:
            await client.call_tool(
                "flux_txt2img",
                {"prompt": "survives a crash", "width": 256, "height": 256, "wait_seconds": 60},
                progress_callback=progress,
            )
    print("RETURNED", flush=True)

anyio.run(main)
"""


async def test_server_killed_mid_wait_new_server_finishes_with_one_download(sim, tmp_path):
    sim.state.configure(durations={SCHNELL: 4.0}, pending_seconds=0.3)
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER)
    env = server_env(sim, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, str(helper), json.dumps(env), str(tmp_path / "server_a.stderr")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        with anyio.fail_after(15):
            line = (await anyio.to_thread.run_sync(proc.stdout.readline)).decode()
        assert line.startswith("PROGRESS "), (line, proc.stderr.read() if proc.poll() is not None else "")
        assert len(sim.state.tasks) == 1
        task_id = next(iter(sim.state.tasks))
        assert task_id in line
        # The SDK starts the server in its own session: SIGKILL it first (a helper dying first
        # would close the server's stdin and let it shut down gracefully), then the helper.
        servers = child_pids(proc.pid)
        assert len(servers) == 1, servers
        os.killpg(servers[0], signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        await anyio.to_thread.run_sync(proc.wait, 5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert sim.state.phase(sim.state.tasks[task_id]) in ("pending", "processing")
    assert not any(e["method"] == "DELETE" for e in sim.state.log)
    output_dir = tmp_path / "images"
    assert task_files(output_dir, task_id) == []

    async with stdio_server(sim, tmp_path, name="server_b") as client:
        listed = structured(await client.call_tool("flux_list_tasks", {}))["tasks"]
        mine = [t for t in listed if t["task_id"] == task_id]
        assert len(mine) == 1, listed
        assert mine[0]["status"] in ("pending", "processing")
        assert mine[0]["submit_state"] == "submitted"

        with anyio.fail_after(20):
            done = await client.call_tool("flux_wait_task", {"task_id": task_id, "wait_seconds": 15})
        body = await assert_completed_with_local_copies(sim, done, "flux_wait_task after restart")
        path = body["images"][0]["path"]
        files = task_files(output_dir, task_id)
        assert files == [f"{task_id}_0.json", f"{task_id}_0.png"], files
        mtime = Path(path).stat().st_mtime_ns

        again = structured(await client.call_tool("flux_wait_task", {"task_id": task_id, "wait_seconds": 1}))
        got = structured(await client.call_tool("flux_get_task", {"task_id": task_id}))
        for later in (again, got):
            assert later["status"] == "completed"
            assert [i["path"] for i in later["images"]] == [path]
        assert task_files(output_dir, task_id) == files
        assert Path(path).stat().st_mtime_ns == mtime, "the image was downloaded again"
    assert len(posts(sim)) == 1


# --- 6b. a dead process's download lease -----------------------------------------------------------


async def test_dead_processes_download_lease_does_not_block_reads(sim, tmp_path):
    from flux_mcp.ledger import TaskLedger

    sim.state.configure(durations={SCHNELL: 0.5}, pending_seconds=0.05)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    async with stdio_server(sim, tmp_path) as client:
        submitted = await client.call_tool(
            "flux_txt2img", {"prompt": "orphaned lease", "width": 256, "height": 256, "wait_seconds": 0}
        )
        task_id = structured(submitted)["task_id"]
        assert structured(submitted)["status"] in ("pending", "processing")
        # What a server SIGKILLed while downloading leaves behind: a lease owned by a dead pid.
        async with TaskLedger(tmp_path / "data" / "tasks.sqlite3") as ledger:
            assert (await ledger.claim_for_download(task_id, f"{socket.gethostname()}:{dead.pid}:deadbeef")).granted
        task = sim.state.tasks[task_id]
        assert await wait_for(lambda: sim.state.phase(task) == "completed", 5)

        started = time.monotonic()
        try:
            got = await client.call_tool("flux_get_task", {"task_id": task_id}, read_timeout_seconds=5)
        except MCPError as exc:
            blocked: MCPError | None = exc  # re-raised below, outside the client's task group
        else:
            blocked = None
    if blocked is not None:
        raise blocked
    assert time.monotonic() - started < 5
    body = structured(got)
    assert body["status"] == "completed"
    # The dead holder's lease is taken over at once: the copy is made by this call.
    assert all(image["path"] for image in body["images"]), body


# --- 7. an identical repeat re-attaches instead of paying twice ------------------------------------


async def test_identical_repeat_reattaches_without_second_post(sim, tmp_path):
    args = {"prompt": "exactly once", "width": 256, "height": 256}
    async with stdio_server(sim, tmp_path) as client:
        first = await client.call_tool("flux_txt2img", args)
        second = await client.call_tool("flux_txt2img", args)
    one = await assert_completed_with_local_copies(sim, first, "first call")
    two = structured(second)
    assert not second.is_error, second.content
    assert one.get("reattached", False) is False
    assert two["reattached"] is True
    assert two["task_id"] == one["task_id"]
    assert two["status"] == "completed"
    assert [i["path"] for i in two["images"]] == [i["path"] for i in one["images"]]
    assert len(posts(sim)) == 1
    assert len(sim.state.tasks) == 1


# --- 8. a create with an unknown outcome is never resent ---------------------------------------------


async def test_submit_uncertain_is_reported_and_never_resent(sim, tmp_path):
    sim.state.add_fault("create_late", delay=3)
    args = {"prompt": "lost in the post", "width": 256, "height": 256}
    async with stdio_server(sim, tmp_path, FLUX_MCP_REQUEST_TIMEOUT_SECONDS="1") as client:
        with anyio.fail_after(10):
            first = await client.call_tool("flux_txt2img", args)
        body = structured(first)
        assert first.is_error is True
        assert body["error"]["category"] == "submit_uncertain"
        assert isinstance(body["error"]["retryable"], bool)
        assert "flux_list_tasks" in body["error"]["hint"]
        assert len(sim.state.tasks) == 1
        assert len(posts(sim)) == 1

        second = await client.call_tool("flux_txt2img", args)
        again = structured(second)
        assert second.is_error is True
        assert again["error"]["category"] == "submit_uncertain"
        assert "flux_list_tasks" in again["error"]["hint"]
        assert len(posts(sim)) == 1
        assert len(sim.state.tasks) == 1

        listed = structured(await client.call_tool("flux_list_tasks", {"status": "uncertain"}))["tasks"]
        assert len(listed) == 1, listed
        assert listed[0]["submit_state"] == "uncertain"
        assert listed[0]["prompt"] == "lost in the post"
