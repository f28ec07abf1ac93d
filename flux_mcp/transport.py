"""The connections under our HTTP client: an `httpx2` transport on aiohttp's connection pool.

Every request to PiAPI and every image download is made by an `httpx2.AsyncClient`, so the request
policy (`flux_mcp.client`), the download guard (`flux_mcp.download`), redirects and tests'
`MockTransport` all stay on one API. Only the connections below it come from aiohttp, because
that is where the time went: with hundreds of tasks in flight, httpx2's own pool re-checked every
pooled socket (`getpeername` plus a poll) on each request. `python bench/transport.py` (3,000
requests at once against the simulator, 20 in flight): a status GET cost 0.72 ms of CPU through
httpx2's pool and 0.33 ms through this one, a download 1.05 and 0.43 ms.

What it keeps from httpx2's own transport, so nothing above it changes:
- the timeouts each request carries (`connect`, `read`; `write` bounds the sending of a body);
- the `sni_hostname` extension (the download guard connects to a checked address and has TLS check
  the host name);
- the body as sent (aiohttp decompresses nothing; httpx2 decodes as before);
- the same certificate store (`httpx2.create_ssl_context()`), loaded once (`tls_context`);
- errors as httpx2's own exception types: a refused or timed-out connect (nothing was sent) stays
  apart from a failure after the request went out, which the client needs to never pay twice.
A proxy set up for the URL's scheme (environment or system settings) keeps httpx2's own transport
(`needs_env_proxy`), which knows every proxy kind httpx2 does.
"""

from __future__ import annotations

import functools
import ssl
import urllib.request
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
import httpx2

if TYPE_CHECKING:
    import aiohttp


def needs_env_proxy(url: str) -> bool:
    """Whether a proxy is set up for `url`'s scheme (`HTTPS_PROXY`, `ALL_PROXY`, or the system's
    settings on macOS and Windows): then httpx2's own transport decides everything, `NO_PROXY`
    included, exactly as it did before this module existed."""
    proxies = urllib.request.getproxies()
    return bool(proxies.get(httpx2.URL(url).scheme) or proxies.get("all"))


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One certificate store for every connection: loading it takes a tenth of a second or more
    and some memory, so it is loaded once, off the event loop (`PooledTransport`), or before an
    HTTP server serves (`flux_mcp.warm`)."""
    return httpx2.create_ssl_context()


def _as_httpx2(exc: BaseException, request: httpx2.Request) -> httpx2.TransportError:
    """An aiohttp failure (while sending, or while reading the body) as httpx2 would have raised
    it. Only a failed connect says nothing was sent."""
    import aiohttp

    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx2.ConnectTimeout(str(exc) or "connect timed out", request=request)
    if isinstance(exc, TimeoutError):
        return httpx2.ReadTimeout(str(exc) or "read timed out", request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, unresolvable, TLS refused: nothing sent
        return httpx2.ConnectError(str(exc), request=request)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return httpx2.RemoteProtocolError(str(exc) or "server disconnected", request=request)
    if isinstance(exc, aiohttp.ClientResponseError):  # an answer that is not HTTP
        return httpx2.RemoteProtocolError(exc.message or type(exc).__name__, request=request)
    return httpx2.ReadError(str(exc) or type(exc).__name__, request=request)


class _Body(httpx2.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx2.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        import aiohttp

        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _as_httpx2(exc, self._request) from exc

    async def aclose(self) -> None:
        # A body read to its end returns the connection to the pool; one cut short closes it.
        if self._response.content.is_eof():
            self._response.release()
        else:
            self._response.close()


class PooledTransport(httpx2.AsyncBaseTransport):
    """Up to `connections` connections, kept alive between requests unless `keep_alive=False`."""

    def __init__(self, *, connections: int, keep_alive: bool = True) -> None:
        self._connections = connections
        self._keep_alive = keep_alive
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp  # on the first request: the server starts and lists its tools without it

        connector = aiohttp.TCPConnector(limit=self._connections, force_close=not self._keep_alive, ssl=tls_context())
        # Everything about the request (headers, redirects, cookies, decoding) stays httpx2's.
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
        )
        return self._session

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        import aiohttp
        import yarl

        if self._session is None:
            await anyio.to_thread.run_sync(tls_context)  # cached: the first request loads it
        if self._closed:
            raise httpx2.ConnectError("the connection pool is closed", request=request)
        session = self._session or self._open()
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.get("connect"),  # we never wait in aiohttp's queue: callers hold a slot each
            sock_connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
        )
        body = await request.aread()
        # aiohttp has no write time-out (its read time-out starts once the body is sent): a request
        # with a body gets as long as all its time-outs together, then fails as httpx2's would.
        write = timeouts.get("write")
        sending = None if not body or write is None else sum(t or 0.0 for t in timeouts.values()) or None
        sni = request.extensions.get("sni_hostname")
        response = None
        with anyio.move_on_after(sending):
            try:
                response = await session.request(
                    request.method,
                    yarl.URL(str(request.url), encoded=True),
                    headers=request.headers.multi_items(),
                    data=body or None,
                    allow_redirects=False,
                    timeout=timeout,
                    server_hostname=sni.decode() if isinstance(sni, bytes) else sni,
                )
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise _as_httpx2(exc, request) from exc
        if response is None:
            raise httpx2.WriteTimeout("the request could not be sent within its time-outs", request=request)
        # The status line's reason is bytes; aiohttp decoded them as UTF-8, keeping any others as
        # surrogates: this gives the bytes back whatever they were.
        reason = (response.reason or "").encode("utf-8", "surrogateescape")
        return httpx2.Response(
            response.status,
            headers=list(response.raw_headers),
            stream=_Body(response, request),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason},
        )

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
