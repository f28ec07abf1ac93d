"""Shared fixtures: every test runs on asyncio, with its data and output under tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path, monkeypatch):
    """No test reads the developer's real settings or writes into their folders."""
    for name in ("PIAPI_API_KEY", "PIAPI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    import os

    for name in list(os.environ):
        if name.startswith("FLUX_MCP_"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLUX_MCP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FLUX_MCP_OUTPUT_DIR", str(tmp_path / "images"))


async def until(predicate, seconds: float = 10.0) -> None:
    """Wait (polling every 20 ms, at most `seconds`) until `predicate()` holds."""
    import anyio

    with anyio.fail_after(seconds):
        while not predicate():
            await anyio.sleep(0.02)


async def warm_up(client) -> None:
    """Load what a server's first calls load (the core; the HTTP client and the certificate
    store, on the first request to PiAPI), so a deadline after this times the call alone."""
    await client.call_tool("flux_txt2img", {"prompt": "warm up", "dry_run": True})
    unknown = await client.call_tool("flux_get_task", {"task_id": "00000000-0000-4000-8000-000000000000"})
    assert unknown.is_error


# --- a fast simulator and a server wired to it ------------------------------------------------

FAST_DURATIONS = {
    "Qubico/flux1-schnell": 0.05,
    "Qubico/flux1-dev": 0.08,
    "Qubico/flux1-dev-advanced": 0.1,
}


@pytest.fixture
async def sim():
    from flux_mcp.simulator import running_simulator

    async with running_simulator(durations=FAST_DURATIONS) as running:
        running.state.configure(pending_seconds=0.02)
        yield running


@pytest.fixture
def settings(sim, tmp_path):
    from flux_mcp.settings import Settings

    (tmp_path / "work").mkdir()
    return Settings(
        api_key=sim.api_key,
        base_url=sim.base_url,
        data_dir=tmp_path / "data",
        output_dir=tmp_path / "images",
        image_roots=[tmp_path / "work", tmp_path / "images"],
        wait_seconds=20,
        request_timeout_seconds=5,
    )


@pytest.fixture
def fast_options():
    from flux_mcp.polling import BackoffPolicy
    from flux_mcp.server import ServerOptions

    return ServerOptions(policy=BackoffPolicy(first=(0.02, 0.02), factor=1.5, cap=0.1))


@pytest.fixture
def server(settings, fast_options):
    from flux_mcp.server import create_server

    return create_server(settings, fast_options)


@pytest.fixture
def make_service():
    """`make_service(settings, client, ledger)`: a `TaskService` wired like the server's."""
    return _task_service


def _task_service(settings, client, ledger):
    from flux_mcp.files import ImageStore, InputResolver
    from flux_mcp.lifecycle import TaskService

    return TaskService(
        settings,
        client,
        ledger,
        store=ImageStore(settings.images_dir, max_bytes=settings.max_download_bytes),
        resolver=InputResolver(settings.allowed_image_roots(), max_bytes=settings.max_input_bytes),
    )


# --- a ledger to look at (gallery page and App view) --------------------------------------------

GALLERY_PROMPTS = {
    "batch": "four lighthouses at dusk",
    "failed": "a forbidden picture",
    "running": "a slow dev portrait",
}


@pytest.fixture
async def seeded_ledger(server, sim):
    """Through the real tools: a finished batch of 4, a failed task and a still running one.
    Returns each one's structured result, keyed like `GALLERY_PROMPTS`."""
    from mcp import Client

    async with Client(server) as client:
        batch = await client.call_tool("flux_txt2img", {"prompt": GALLERY_PROMPTS["batch"], "batch_size": 4})
        sim.state.add_fault("fail_next", code=10001, message="nsfw content detected")
        failed = await client.call_tool("flux_txt2img", {"prompt": GALLERY_PROMPTS["failed"]})
        sim.state.configure(durations={**FAST_DURATIONS, "Qubico/flux1-dev": 600})
        running = await client.call_tool(
            "flux_txt2img", {"prompt": GALLERY_PROMPTS["running"], "model": "Qubico/flux1-dev", "wait_seconds": 0}
        )
    seeded = {"batch": batch, "failed": failed, "running": running}
    statuses = [r.structured_content["status"] for r in seeded.values()]
    assert statuses[:2] == ["completed", "failed"] and statuses[2] in ("pending", "processing")
    return {name: result.structured_content for name, result in seeded.items()}


# --- browser test artifacts ---------------------------------------------------------------------

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
_artifact_dirs: list[Path] = []


@pytest.fixture
def artifact_dir(request) -> Path:
    """A kept (gitignored) folder for this test's screenshots; listed at the end of the run."""
    folder = ARTIFACTS / request.node.module.__name__.rpartition(".")[2]
    folder.mkdir(parents=True, exist_ok=True)
    if folder not in _artifact_dirs:
        _artifact_dirs.append(folder)
    return folder


def pytest_terminal_summary(terminalreporter):
    for folder in _artifact_dirs:
        shots = sorted(p.name for p in folder.glob("*.png"))
        terminalreporter.write_line(f"screenshots in {folder}: {', '.join(shots)}")


# --- a simulator in its own process, for tests that run the command line or other programs --------


class StandaloneSimulator:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.api_key = "sim-key"

    def configure(self, **config):
        import httpx2

        httpx2.post(f"{self.base_url}/_simulator/config", json=config).raise_for_status()

    def fault(self, kind: str, **options):
        import httpx2

        httpx2.post(f"{self.base_url}/_simulator/faults", json={"kind": kind, **options}).raise_for_status()

    def tasks(self) -> list[dict]:
        import httpx2

        return httpx2.get(f"{self.base_url}/_simulator/tasks").json()

    def env(self) -> dict[str, str]:
        """What a program needs to use this simulator as PiAPI."""
        return {"PIAPI_BASE_URL": self.base_url, "PIAPI_API_KEY": self.api_key}


@pytest.fixture(scope="session")
def _simulator_process():
    import socket
    import subprocess
    import sys
    import time

    import httpx2

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flux_mcp", "simulator", "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sim = StandaloneSimulator(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx2.get(f"{sim.base_url}/_simulator/config").raise_for_status()
                break
            except httpx2.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "simulator did not start"
                time.sleep(0.1)
        yield sim
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def standalone_simulator(_simulator_process):
    """`piapi-flux-mcp simulator` in its own process on a free loopback port (one per test session),
    reset for each test: no tasks or faults, fast durations."""
    import httpx2

    sim = _simulator_process
    httpx2.post(f"{sim.base_url}/_simulator/reset").raise_for_status()
    sim.configure(durations={"schnell": 0.3, "dev": 1.5, "dev-advanced": 1.5}, pending_seconds=0.2)
    return sim
