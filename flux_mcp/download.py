"""The one download policy: every image fetched from a URL that PiAPI returned goes through here.

A URL in a task's output is upstream text: it can point anywhere, redirect anywhere, and drip or
never end. So, for every download, on every redirect hop:
- Only `http(s)`. The host is resolved here, every address checked, and the connection made to
  the checked address itself (the TLS name stays the host's), so a name cannot resolve to one
  address for the check and another for the connection (DNS rebinding). Loopback, private,
  link-local, shared, reserved and multicast addresses are refused, in every spelling
  (`127.0.0.2`, `[::ffff:127.0.0.2]`, `2130706434`, a name resolving to one). The one exception is
  the PiAPI base URL's own origin (host and port) when it is itself loopback: the simulator serves
  its images there.
- Time: at most `max_seconds` per image, and after `grace_seconds` the body must keep arriving at
  `min_bytes_per_second` on average, else the download stops (a URL that drips bytes cannot hold a
  call). The caller's own deadline is applied above this (see `TaskService`).
- Size and type are checked by the image store as the bytes arrive (`flux_mcp.files`).

`GuardedTransport` is an `httpx2` transport, so the rules hold for every request made through the
download client, redirects included; `limited_body` is the time/rate rule. Both are safe to use
from many concurrent downloads.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
import httpx2

from flux_mcp import errors
from flux_mcp.transport import PooledTransport

Resolve = Callable[[str, int], Awaitable[list[str]]]
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class DownloadLimits:
    max_seconds: float = 120.0
    min_bytes_per_second: float = 16 * 1024
    grace_seconds: float = 5.0
    max_redirects: int = 5


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (an IP literal, in any spelling, resolves to itself)."""
    try:
        return [str(ipaddress.ip_address(host))]  # a plain literal: no look-up (and no thread) needed
    except ValueError:
        pass  # a name, or a literal in another spelling (`2130706434`, `0x7f.1`): the resolver decides
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise errors.NetworkError(f"cannot resolve {host}: {exc.strerror or exc}") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _origin(url: httpx2.URL) -> tuple[str, int]:
    return url.host.lower(), url.port or _DEFAULT_PORTS.get(url.scheme, 0)


class AddressPolicy:
    """Which addresses a download may connect to (see the module docstring)."""

    def __init__(self, base_url: str, *, resolve: Resolve = resolve_host) -> None:
        self._resolve = resolve
        base = httpx2.URL(base_url)
        self._trusted_origin = _origin(base)

    async def address_for(self, url: httpx2.URL) -> str:
        """The checked address to connect to for `url`, or a `StorageError` saying why not."""
        if url.scheme not in _DEFAULT_PORTS or not url.host:
            raise errors.StorageError(f"refused to download {url}: only http(s) URLs with a host")
        host, port = _origin(url)
        addresses = await self._resolve(host, port)
        trusted = (host, port) == self._trusted_origin
        refused = [a for a in addresses if not (_is_public(a) or (trusted and _is_loopback(a)))]
        if refused or not addresses:
            raise errors.StorageError(
                f"refused to download {url}: {host} is {', '.join(refused) or 'no address'}, "
                "not a public internet address",
                hint="Image URLs must point to a public host; PiAPI's own file URLs always do.",
            )
        return addresses[0]


# Host names whose connections are kept alive between downloads (PiAPI serves its images from one
# or two); downloads from any further host open a connection each.
KEEP_ALIVE_HOSTS = 8
CONNECTIONS_PER_HOST = 20  # the client admits at most as many downloads at once in any case


class GuardedTransport(httpx2.AsyncBaseTransport):
    """Connects every request (and so every redirect hop) only to an address `policy` allows."""

    def __init__(self, policy: AddressPolicy, inner: httpx2.AsyncBaseTransport | None = None) -> None:
        self._policy = policy
        self._inner = inner
        # A pooled connection is keyed by the address it was made to, so one pool per host name:
        # a connection whose TLS session was checked for one name never carries a request for
        # another name at the same address. The address is still checked on every request.
        self._by_host: dict[str, httpx2.AsyncBaseTransport] = {}
        self._one_shot: httpx2.AsyncBaseTransport | None = None

    def _transport_for(self, host: str) -> httpx2.AsyncBaseTransport:
        if self._inner is not None:
            return self._inner
        if (transport := self._by_host.get(host)) is not None:
            return transport
        if len(self._by_host) < KEEP_ALIVE_HOSTS:
            transport = self._by_host[host] = PooledTransport(connections=CONNECTIONS_PER_HOST)
            return transport
        if self._one_shot is None:
            self._one_shot = PooledTransport(connections=CONNECTIONS_PER_HOST, keep_alive=False)
        return self._one_shot

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        address = await self._policy.address_for(request.url)
        host = request.url.host
        pinned = httpx2.Request(
            request.method,
            request.url.copy_with(host=address),
            headers=request.headers,  # keeps `Host: <name>`
            stream=request.stream,
            extensions={**request.extensions, "sni_hostname": host},  # TLS checks the name, not the address
        )
        return await self._transport_for(host.lower()).handle_async_request(pinned)

    async def aclose(self) -> None:
        transports = [*self._by_host.values(), self._one_shot, self._inner]
        self._by_host.clear()
        for transport in transports:
            if transport is not None:
                await transport.aclose()


def download_client(policy: AddressPolicy, *, timeout: httpx2.Timeout, limits: DownloadLimits) -> httpx2.AsyncClient:
    """The HTTP client downloads use: guarded on every hop, at most `limits.max_redirects` hops."""
    return httpx2.AsyncClient(
        transport=GuardedTransport(policy),
        timeout=timeout,
        follow_redirects=True,
        max_redirects=limits.max_redirects,
        trust_env=False,
    )


async def limited_body(
    response: httpx2.Response, url: str, limits: DownloadLimits, *, started: float, clock: Callable[[], float]
) -> AsyncIterator[bytes]:
    """The response body, stopped with a retryable `RequestTimeoutError` when it arrives too slowly
    (below `min_bytes_per_second` on average, counted from the headers, after `grace_seconds`) or
    the download takes over `max_seconds` from its request (`started`)."""
    received = 0
    body_started = clock()  # the wait for the headers is the request time-out's business
    chunks = response.aiter_bytes().__aiter__()
    while True:
        rate_deadline = body_started + max(limits.grace_seconds, received / limits.min_bytes_per_second)
        remaining = min(rate_deadline, started + limits.max_seconds) - clock()
        chunk = None
        if remaining > 0:
            with anyio.move_on_after(remaining):
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
        if chunk is None:
            elapsed = clock() - body_started
            raise errors.RequestTimeoutError(
                f"downloading {url} stopped after {elapsed:.0f} s: {received} bytes arrived, slower than "
                f"{limits.min_bytes_per_second:.0f} B/s or longer than {limits.max_seconds:.0f} s"
            )
        received += len(chunk)
        yield chunk


__all__ = [
    "AddressPolicy",
    "DownloadLimits",
    "GuardedTransport",
    "download_client",
    "limited_body",
    "resolve_host",
]
