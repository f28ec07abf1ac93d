"""Running the simulator over real HTTP: in-process for tests, or blocking for the CLI.

`running_simulator()` (through `running_app()`, which serves any ASGI app the same way) binds a
loopback socket on a free port itself (so the URL is known before uvicorn starts), runs uvicorn's
`serve()` as an asyncio task next to the caller, and on exit wakes every deliberate delay and
shuts uvicorn down gracefully inside a shielded scope, so a cancelled or failing test never
leaves a server behind. uvicorn is asyncio-only, so this works under anyio's
asyncio backend (not trio). The in-process server does not install signal handlers and does not
touch the logging configuration; `serve()` is the standalone variant for `piapi-flux-mcp simulator`,
logging to stderr only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette

from flux_mcp.simulator.app import DEFAULT_API_KEY, create_app
from flux_mcp.simulator.state import SimulatorState

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = 10.0
SHUTDOWN_TIMEOUT = 5.0


@dataclass(frozen=True)
class RunningSimulator:
    """What `running_simulator()` yields: where the server is, its state and the key it accepts."""

    base_url: str
    state: SimulatorState
    api_key: str
    app: Starlette

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])


class _InProcessServer(uvicorn.Server):
    """uvicorn without signal handling (the embedding program keeps its handlers), stopping faster."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        # uvicorn polls `should_exit` every 100 ms; poll every 10 ms so tests stop servers quickly.
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            await asyncio.sleep(0.01)


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A bound loopback TCP socket (port 0 = any free port) for `running_app`."""
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP,
    # and without it every keep-alive response waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


@contextlib.asynccontextmanager
async def running_app(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None
) -> AsyncIterator[str]:
    """Serve any ASGI app (lifespan on) on `host` (port 0 = any free port), or on `sock` from
    `bind_socket` when the URL must be known before the app is built; yields its base URL."""
    sock = sock or bind_socket(host, port)
    host, bound_port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", access_log=False, log_config=None, lifespan="on")
    server = _InProcessServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    sleeper = getattr(getattr(app, "state", None), "sleeper", None)
    try:
        with anyio.fail_after(STARTUP_TIMEOUT):
            while not server.started:
                if task.done():
                    task.result()  # re-raises the startup failure
                    raise RuntimeError("server exited during startup")
                await anyio.sleep(0.005)
        yield f"http://{host}:{bound_port}"
    finally:
        with anyio.CancelScope(shield=True):
            if sleeper is not None:
                sleeper.wake_all()
            server.should_exit = True
            if not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), SHUTDOWN_TIMEOUT)
                except TimeoutError:
                    server.force_exit = True
                    logger.warning("in-process server: graceful shutdown timed out, forcing exit")
                    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                        await asyncio.wait_for(task, 1.0)
            sock.close()


@contextlib.asynccontextmanager
async def running_simulator(
    state: SimulatorState | None = None,
    *,
    api_key: str = DEFAULT_API_KEY,
    host: str = "127.0.0.1",
    port: int = 0,
    clock: Callable[[], float] | None = None,
    durations: Mapping[str, float] | None = None,
) -> AsyncIterator[RunningSimulator]:
    """Serve a simulator on `host` (port 0 = any free port) for the duration of the block."""
    if state is None:
        state = SimulatorState(clock=clock or time.monotonic)
    if durations:
        state.configure(durations=dict(durations))
    app = create_app(state, api_key)
    async with running_app(app, host=host, port=port) as base_url:
        yield RunningSimulator(base_url, state, api_key, app)


def serve(
    host: str = "127.0.0.1",
    port: int = 8089,
    api_key: str = DEFAULT_API_KEY,
    durations: Mapping[str, float] | None = None,
) -> None:
    """Run the simulator in the foreground until interrupted (the `piapi-flux-mcp simulator` command)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    state = SimulatorState()
    if durations:
        state.configure(durations=dict(durations))
    app = create_app(state, api_key)
    key_note = f"X-API-Key {api_key!r}" if api_key == DEFAULT_API_KEY else "the configured X-API-Key"
    logger.info("PiAPI simulator listening on http://%s:%d (use %s)", host, port, key_note)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, log_config=None, lifespan="on")
