"""The HTTP face of `serve --transport http`: one Starlette app around the MCP endpoint.

`build_http_app(settings, host=...)` builds the ASGI app (a fresh MCP server inside it);
`serve_http(settings, host=..., port=...)` checks the exposure, binds the socket, prints the URL
on stderr and runs the app under uvicorn.

What every request meets, in this order:

1. **Host/Origin check, on every route and every bind** (DNS rebinding). `Host` must be a
   loopback name (`127.0.0.1`, `localhost`, `[::1]`), the bind address itself when it is a
   specific one, or a name in `FLUX_MCP_ALLOWED_HOSTS`, each on any port; a browser's `Origin`
   must be `http(s)://` one of those. Otherwise 421 (Host) or 403 (Origin). The SDK would switch
   this on only for a literal loopback bind; here it is always on, through the SDK's own
   `TransportSecurityMiddleware`.
2. **Bearer token on `/mcp`** when `FLUX_MCP_AUTH_TOKEN` is set (`Authorization: Bearer <token>`,
   compared in constant time): missing or wrong is 401 with a `WWW-Authenticate: Bearer` header.
   This is the SDK's bearer middleware with a one-token verifier. No OAuth protected-resource
   metadata is published: it would name an authorization server, and a fixed token has none, so
   a client following it would start a flow that cannot succeed.
3. **`/mcp`**: the SDK's streamable HTTP transport, at most `FLUX_MCP_MAX_SESSIONS` sessions at
   once (a client opening one more gets 503 with the JSON-RPC error "Too many open sessions", at
   once), each closed after `FLUX_MCP_SESSION_IDLE_SECONDS` with no request (the client then gets
   404 "Session not found" and opens a new one, as the spec has it). Sessions are a 2025-era
   notion; 2026-07-28 requests are sessionless and not counted.

`serve_http` refuses to start on a non-loopback address without a token (one line, exit 2) and
warns on loopback without one.

Adding a route (the PiAPI webhook receiver, `/gallery`, ...): write a function
`routes(settings: Settings) -> list[BaseRoute]` in your own module, importing what it needs, and
add it to `_route_factories()` below (one line, imported there so the stdio server never loads it).
Your routes get the Host/Origin check; they do not need the token unless you wrap the endpoint
with `require_token(endpoint, settings)` (a webhook cannot send our token; a page that spends or
shows the user's images should). Paths are yours to choose; `/mcp` is taken. The webhook receiver
(`flux_mcp/webhooks.py`, with FLUX_MCP_PUBLIC_URL) is wired in `build_http_app` instead, because it
shares the MCP server's state; the public URL's host name is an allowed `Host`.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware
from mcp.server.auth.middleware.bearer_auth import BearerAuthBackend, RequireAuthMiddleware
from mcp.server.auth.provider import AccessToken
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from flux_mcp.server import ServerOptions, create_server
from flux_mcp.settings import ConfigurationError, Settings
from flux_mcp.warm import ready_to_serve

MCP_PATH = "/mcp"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def _route_factories() -> list[Callable[[Settings], list[BaseRoute]]]:
    """The routes served beside `/mcp`, one factory per feature (see the module docstring)."""
    from flux_mcp.gallery import page

    return [page.routes]


# --- who may call -------------------------------------------------------------------------------


class StaticTokenVerifier:
    """The SDK's `TokenVerifier` for one fixed token (`FLUX_MCP_AUTH_TOKEN`), compared in constant time."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        if not hmac.compare_digest(token.encode(), self._expected):
            return None
        # The token itself is not kept in the request's auth info.
        return AccessToken(token="FLUX_MCP_AUTH_TOKEN", client_id="piapi-flux-mcp", scopes=[])


def require_token(endpoint: ASGIApp, settings: Settings) -> ASGIApp:
    """`endpoint`, answering 401 unless the request carries the configured bearer token.
    Without a configured token it is `endpoint` unchanged (loopback only; see `check_exposure`)."""
    if settings.auth_token is None:
        return endpoint
    return RequireAuthMiddleware(endpoint, required_scopes=[])


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, host: str) -> str | None:
    """Refuse (ConfigurationError) a non-loopback bind without a token; return a warning line for
    a loopback bind without one, None when a token is set."""
    if settings.auth_token is not None:
        return None
    if not is_loopback(host):
        raise ConfigurationError(
            f"refusing to serve HTTP on {host} without FLUX_MCP_AUTH_TOKEN: anyone who can reach the port could "
            "spend your PiAPI credits. Set FLUX_MCP_AUTH_TOKEN (clients send 'Authorization: Bearer <token>') "
            "or bind 127.0.0.1"
        )
    return (
        "warning: FLUX_MCP_AUTH_TOKEN is not set, so any process on this machine can call this server "
        "(and spend PiAPI credits); set it to require 'Authorization: Bearer <token>'"
    )


# --- under which names ----------------------------------------------------------------------------


def allowed_host_names(settings: Settings, host: str) -> list[str]:
    """The bare host names `Host` may carry: loopback, the bind address if specific, FLUX_MCP_ALLOWED_HOSTS."""
    names = list(LOOPBACK_HOSTS)
    bind = host.lower()
    try:
        address = ipaddress.ip_address(bind.strip("[]"))
    except ValueError:
        names.append(bind)  # a host name given to --host is a name clients use
    else:
        if not address.is_unspecified:  # 0.0.0.0 and :: are not names anyone sends
            names.append(f"[{address}]" if address.version == 6 else str(address))
    names.extend(settings.allowed_hosts)
    if settings.public_url:  # the name PiAPI's webhooks arrive under
        names.append((urlsplit(settings.public_url).hostname or "").lower())
    return list(dict.fromkeys(names))


def transport_security(settings: Settings, host: str) -> TransportSecuritySettings:
    names = allowed_host_names(settings, host)
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[form for name in names for form in (name, f"{name}:*")],
        allowed_origins=[
            form for name in names for s in ("http", "https") for form in (f"{s}://{name}", f"{s}://{name}:*")
        ],
    )


class HostCheck:
    """Host/Origin validation on every route (the SDK's check, applied app-wide)."""

    def __init__(self, app: ASGIApp, security: TransportSecuritySettings) -> None:
        self.app = app
        self.checker = TransportSecurityMiddleware(security)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Host names are case-insensitive; the SDK compares exactly, so both checks see lower case.
            scope = dict(scope)
            scope["headers"] = [(k, v.lower() if k in (b"host", b"origin") else v) for k, v in scope["headers"]]
            request = Request(scope, receive)
            refusal = await self.checker.validate_request(request)
            if refusal is not None:
                if refusal.status_code == 421:
                    refusal = PlainTextResponse(
                        f"Host {request.headers.get('host', '')!r} is not served here "
                        "(FLUX_MCP_ALLOWED_HOSTS lists the extra names this server answers to)",
                        status_code=421,
                    )
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- the app ------------------------------------------------------------------------------------


def build_http_app(
    settings: Settings, *, host: str = "127.0.0.1", options: ServerOptions | None = None, stateless: bool = False
) -> Starlette:
    """The ASGI app for `serve --transport http`, with a fresh MCP server inside. Raises
    `ConfigurationError` before anything listens (missing key, unsafe exposure). `stateless`:
    no 2025-era sessions, every request stands alone (several workers, see `flux_mcp.workers`)."""
    check_exposure(settings, host)
    options = options or ServerOptions()
    if settings.public_url and options.receiver is None:
        from flux_mcp.webhooks import WebhookReceiver

        options = dataclasses.replace(options, receiver=WebhookReceiver(settings))
    server = create_server(settings, options)
    security = transport_security(settings, host)
    sdk_app = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        transport_security=security,
        host=host,
        max_sessions=settings.max_sessions,
        session_idle_timeout=settings.session_idle_seconds,
        stateless_http=stateless,
    )
    routes: list[BaseRoute] = [Route(MCP_PATH, endpoint=require_token(sdk_app, settings))]
    for factory in _route_factories():
        routes.extend(factory(settings))
    if options.receiver is not None:  # PiAPI's webhooks (FLUX_MCP_PUBLIC_URL): the secret is their auth
        routes.extend(options.receiver.routes())
    middleware = [Middleware(HostCheck, security=security)]
    if settings.auth_token is not None:
        verifier = StaticTokenVerifier(settings.auth_token.get_secret_value())
        middleware += [
            Middleware(AuthenticationMiddleware, backend=BearerAuthBackend(verifier)),
            Middleware(AuthContextMiddleware),
        ]

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with server.session_manager.run():
            yield

    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 = any free one); a failure is one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host} port {port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def endpoint_url(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return f"http://{shown}:{port}{MCP_PATH}"


def announce(settings: Settings, sock: socket.socket, host: str, note: str = "") -> None:
    """Print the exposure warning, if any, and the endpoint URL on stderr."""
    if warning := check_exposure(settings, host):
        print(f"piapi-flux-mcp: {warning}", file=sys.stderr)
    wildcard = " (all interfaces)" if not is_loopback(host) and host.strip("[]") in ("0.0.0.0", "::") else ""
    print(f"piapi-flux-mcp: MCP endpoint {endpoint_url(sock, host)}{wildcard}{note}", file=sys.stderr, flush=True)
    gallery = endpoint_url(sock, host).removesuffix(MCP_PATH) + "/gallery/"
    print(f"piapi-flux-mcp: history page {gallery}", file=sys.stderr, flush=True)


def serve_http(settings: Settings, *, host: str, port: int, **uvicorn_options: Any) -> None:
    """Run `serve --transport http`: check, bind, print the URL (stderr), serve until stopped."""
    app = build_http_app(settings, host=host)
    sock = bind_socket(host, port)
    announce(settings, sock, host)
    config = uvicorn.Config(app, log_config=None, log_level=settings.log_level.lower(), **uvicorn_options)
    ready_to_serve()
    uvicorn.Server(config).run(sockets=[sock])
