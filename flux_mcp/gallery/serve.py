"""`piapi-flux-mcp gallery`: serve the history page on loopback and print its URL."""

from __future__ import annotations

import sys

from flux_mcp.settings import Settings

HOST = "127.0.0.1"


def serve_gallery(settings: Settings, *, port: int) -> None:
    import uvicorn

    from flux_mcp.gallery.page import gallery_app
    from flux_mcp.http_app import bind_socket

    if not settings.ledger_path.exists():
        print(f"piapi-flux-mcp: no ledger yet at {settings.ledger_path}; the page stays empty", file=sys.stderr)
    sock = bind_socket(HOST, port)
    url = f"http://{HOST}:{sock.getsockname()[1]}/"
    print(f"piapi-flux-mcp gallery: {url}  (ledger {settings.ledger_path}; Ctrl-C to stop)", flush=True)
    config = uvicorn.Config(gallery_app(settings), log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
