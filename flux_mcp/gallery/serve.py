"""`piapi-flux-mcp gallery`: serve the history page on loopback and print its URL."""

from __future__ import annotations

import errno
import socket
import sys

from flux_mcp.settings import ConfigurationError, Settings

HOST = "127.0.0.1"


def bind_loopback(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((HOST, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigurationError(f"port {port} is in use; pass --port 0 to pick a free one") from None
        raise ConfigurationError(f"cannot listen on {HOST}:{port}: {exc.strerror}") from None
    return sock


def serve_gallery(settings: Settings, *, port: int) -> None:
    import uvicorn

    from flux_mcp.gallery.page import gallery_app

    if not settings.ledger_path.exists():
        print(f"piapi-flux-mcp: no ledger yet at {settings.ledger_path}; the page stays empty", file=sys.stderr)
    sock = bind_loopback(port)
    url = f"http://{HOST}:{sock.getsockname()[1]}/"
    print(f"piapi-flux-mcp gallery: {url}  (ledger {settings.ledger_path}; Ctrl-C to stop)", flush=True)
    config = uvicorn.Config(gallery_app(settings), log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
