"""The local history page: `gallery_app(settings)` serves the view over the task ledger.

Routes (relative to wherever the app is mounted): `/` the page, `/api/tasks` the ledger newest
first with filters (status, task_type, model, since/until as POSIX times, q = a substring of the
prompt) and paging, `/api/tasks/{local_id}` one task with its history, `/images/{local_id}/{n}`
an image from its local copy (only files the ledger recorded for that task) and
`/thumbnails/{local_id}/{n}` a preview of it (<= 512 px). Everything is read
only. The page is meant for loopback: a Host check refuses other names (DNS rebinding), and on the
HTTP transport (`routes`, mounted at `/gallery` by `flux_mcp.http_app`) it sits behind the same
token as `/mcp`: a browser cannot send a bearer header when it opens a page, so it may also open
`/gallery/?token=<FLUX_MCP_AUTH_TOKEN>` once, which sets a cookie (HttpOnly, SameSite=Strict,
scoped to `/gallery`, holding a keyed hash of the token, not the token) and redirects to the
clean URL.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from flux_mcp.errors import FluxError
from flux_mcp.files import make_thumbnail, mime_of
from flux_mcp.gallery import view_html
from flux_mcp.ledger import TaskLedger
from flux_mcp.settings import Settings
from flux_mcp.spend import day_start

MAX_PAGE = 200
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]", "::1"]
_SECURITY_HEADERS = {
    # The page loads nothing from elsewhere; the CSP says so.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _no_image() -> Response:
    return Response("no readable local copy of that image", status_code=404, media_type="text/plain")


def _number(value: str | None, *, integer: bool = False) -> float | None:
    if value in (None, ""):
        return None
    try:
        return int(value) if integer else float(value)
    except ValueError:
        return None


def gallery_routes(ledger: TaskLedger, settings: Settings) -> list[Route]:
    """The page's routes, for mounting inside another Starlette app (e.g. at `/gallery`)."""

    async def page(request: Request) -> Response:
        return HTMLResponse(view_html("page"), headers=_SECURITY_HEADERS)

    async def tasks(request: Request) -> Response:
        q = request.query_params
        limit = int(min(MAX_PAGE, max(1, _number(q.get("limit"), integer=True) or 48)))
        entries, total = await ledger.browse(
            status=q.get("status") or None,
            task_type=q.get("task_type") or None,
            model=q.get("model") or None,
            since=_number(q.get("since")),
            until=_number(q.get("until")),
            text=(q.get("q") or "").strip()[:200] or None,
            limit=limit,
            offset=int(max(0, _number(q.get("offset"), integer=True) or 0)),
        )
        body: dict[str, Any] = {
            "tasks": [entry.model_dump(mode="json") for entry in entries],
            "total": total,
            "facets": await ledger.facets(),
            "spent_today_usd": await ledger.spent_since(day_start(time.time())),
            "daily_budget_usd": settings.daily_budget_usd,
        }
        return JSONResponse(body, headers=_SECURITY_HEADERS)

    async def task(request: Request) -> Response:
        entry = await ledger.get_local(request.path_params["local_id"])
        if entry is None:
            return JSONResponse({"error": "no such task in the ledger"}, status_code=404)
        return JSONResponse(await ledger.describe(entry), headers=_SECURITY_HEADERS)

    async def local_copy(request: Request) -> Path | None:
        """The file the ledger recorded for this task's image n, if it is still there."""
        entry = await ledger.get_local(request.path_params["local_id"])
        n = request.path_params["n"]
        row = next((r for r in entry.images if r.n == n and r.path), None) if entry is not None else None
        return Path(row.path) if row is not None and row.path and await anyio.Path(row.path).is_file() else None

    async def image(request: Request) -> Response:
        if (path := await local_copy(request)) is None:
            return _no_image()
        return FileResponse(path, media_type=mime_of(str(path)), headers=_SECURITY_HEADERS)

    async def thumbnail(request: Request) -> Response:
        if (path := await local_copy(request)) is None:
            return _no_image()
        try:
            data, mime = await anyio.to_thread.run_sync(make_thumbnail, path)
        except FluxError:
            return _no_image()
        return Response(data, media_type=mime, headers={**_SECURITY_HEADERS, "Cache-Control": "max-age=3600"})

    async def no_icon(request: Request) -> Response:
        return Response(status_code=204)

    return [
        Route("/", page),
        Route("/favicon.ico", no_icon),
        Route("/api/tasks", tasks),
        Route("/api/tasks/{local_id:str}", task),
        Route("/images/{local_id:str}/{n:int}", image),
        Route("/thumbnails/{local_id:str}/{n:int}", thumbnail),
    ]


def gallery_app(settings: Settings, *, ledger: TaskLedger | None = None) -> Starlette:
    """The history page as its own app (loopback names only)."""
    ledger = ledger or TaskLedger(settings.ledger_path)
    return Starlette(
        routes=gallery_routes(ledger, settings),
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_NAMES)],
    )


# --- on the HTTP transport: /gallery behind the same token ------------------------------------------

GALLERY_PATH = "/gallery"
_COOKIE = "flux_gallery"


class TokenGate:
    """Lets a request through with the bearer token (header), the gallery cookie, or `?token=`."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()
        self._cookie = hmac.new(self._token, b"piapi-flux-mcp gallery", hashlib.sha256).hexdigest()

    def _is_token(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self._token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer ") and self._is_token(header[7:].strip()):
            await self.app(scope, receive, send)
            return
        if hmac.compare_digest(request.cookies.get(_COOKIE, ""), self._cookie):
            await self.app(scope, receive, send)
            return
        if self._is_token(request.query_params.get("token")):
            rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            target = request.url.path + (f"?{rest}" if rest else "")
            response: Response = RedirectResponse(target, status_code=303)
            response.set_cookie(
                _COOKIE, self._cookie, path=GALLERY_PATH, httponly=True, samesite="strict", secure=False
            )
        else:
            response = PlainTextResponse(
                f"The gallery needs the server's token: open {GALLERY_PATH}/?token=<FLUX_MCP_AUTH_TOKEN> once.",
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        await response(scope, receive, send)


def routes(settings: Settings) -> list[BaseRoute]:
    """`/gallery/` on the HTTP transport (see `flux_mcp.http_app`), behind its token when one is set."""
    inner: ASGIApp = Starlette(routes=gallery_routes(TaskLedger(settings.ledger_path), settings))
    if settings.auth_token is not None:
        inner = TokenGate(inner, settings.auth_token.get_secret_value())

    async def add_slash(request: Request) -> Response:
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(GALLERY_PATH + "/" + query, status_code=307)

    return [Route(GALLERY_PATH, add_slash), Mount(GALLERY_PATH, app=inner)]
