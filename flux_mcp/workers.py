"""`serve --transport http --workers N`: N server processes answering on one port.

One Python process runs one core, so a server carrying hundreds of generations at once spreads
them over several. The parent makes the same checks as one process would, reserves the port,
starts N workers that each listen on it with `SO_REUSEPORT` (the kernel spreads new connections
evenly over them; one shared socket would hand most to whichever worker woke first), and prints
the URL once all of them listen. Each worker is a whole server (its own PiAPI client, image store and event loop) over
the one shared ledger, which is what makes them one service: idempotent repeats re-attach, a
cancel or `flux_wait_task` works on a task another worker submitted, downloads are leased, the
spend guard and FLUX_MCP_MAX_CONCURRENT_TASKS hold across all of them. With FLUX_MCP_PUBLIC_URL,
PiAPI's webhook for a task reaches any one worker; `flux_mcp.relay` carries it to the others, so
the call waiting for it wakes at once wherever it runs.

A 2025-era MCP session lives in the memory of the process that opened it, and the next request
of that session may reach another worker, so with more than one worker the endpoint is
stateless: every request stands alone (2026-07-28 requests always do), progress still streams
back with its call, and FLUX_MCP_MAX_SESSIONS / FLUX_MCP_SESSION_IDLE_SECONDS have nothing to
count. `--simulate` is refused: each worker would start a simulator of its own.

The parent stops the workers on SIGINT/SIGTERM and exits when they are gone; if one dies, the
others keep serving.
"""

from __future__ import annotations

import multiprocessing
import signal
import socket
import sys
import time
from types import FrameType
from typing import Any

from flux_mcp.settings import ConfigurationError, Settings

STARTUP_SECONDS = 60.0


def serve_workers(settings: Settings, *, host: str, port: int, workers: int) -> None:
    from flux_mcp.http_app import announce, build_http_app

    if settings.simulate:
        raise ConfigurationError("--workers needs a real PiAPI (or a simulator started on its own): drop --simulate")
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigurationError("--workers needs SO_REUSEPORT (Linux, macOS, BSD); run one process here")
    build_http_app(settings, host=host)  # every check a worker would make, before anything listens
    reserved = _reuseport_socket(host, port)  # bound, never listening: holds the port, takes no connection
    port = reserved.getsockname()[1]
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter each: no state forked
    ready = [spawn.Event() for _ in range(workers)]
    processes = [
        spawn.Process(target=_worker, args=(settings, host, port, event), name=f"piapi-flux-mcp worker {n + 1}")
        for n, event in enumerate(ready)
    ]

    def stop(signum: int, _frame: FrameType | None) -> None:
        for process in processes:
            if process.is_alive():
                process.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for process in processes:
        process.start()
    deadline = time.monotonic() + STARTUP_SECONDS
    for event, process in zip(ready, processes, strict=True):
        while not event.wait(0.1):
            if not process.is_alive() or time.monotonic() > deadline:
                stop(signal.SIGTERM, None)
                raise ConfigurationError(f"{process.name} did not start (its error is above)")
    announce(settings, reserved, host, f" ({workers} workers)")
    for process in processes:
        process.join()
    reserved.close()


def _reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host} port {port}: {exc.strerror or exc}") from None
    return sock


def _worker(settings: Settings, host: str, port: int, ready: Any) -> None:
    import uvicorn

    from flux_mcp.cli import _configure_logging
    from flux_mcp.http_app import build_http_app
    from flux_mcp.server import ServerOptions
    from flux_mcp.warm import ready_to_serve

    _configure_logging(settings.log_level)
    options = ServerOptions()
    if settings.public_url:  # a webhook reaching this worker wakes the call waiting in another
        from flux_mcp.relay import Relay

        options.relay = Relay.beside(settings.state_dir)
    app = build_http_app(settings, host=host, options=options, stateless=True)
    sock = _reuseport_socket(host, port)
    sock.listen(2048)  # connections queue here from now on, while uvicorn starts
    ready.set()
    config = uvicorn.Config(app, log_config=None, log_level=settings.log_level.lower())
    ready_to_serve()
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # pragma: no cover - the parent's terminal sent it to everyone
        sys.exit(0)
