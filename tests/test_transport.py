"""The connections under the HTTP client (`flux_mcp.transport`), over real loopback sockets.

The request policy is pinned elsewhere against `httpx2.MockTransport`; these tests pin what the
transport must hand that policy: what goes on the wire, and which failure is which. A refused
connection proves nothing was sent (a create may be retried); a connection that drops, stalls or
answers garbage after the request went out does not (a create must not be sent twice).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import httpx2
import pytest
from anyio.abc import SocketStream

from flux_mcp import errors
from flux_mcp.client import PiAPIClient, RetryPolicy
from flux_mcp.transport import PooledTransport, needs_env_proxy

pytestmark = pytest.mark.anyio

Handler = Callable[[SocketStream, bytes], Awaitable[None]]


async def read_request(stream: SocketStream) -> bytes:
    """One whole HTTP/1.1 request (head and a Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive()
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length:
        body += await stream.receive()
    return head + b"\r\n\r\n" + body


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A loopback server that runs `handler(stream, request)` for each request it reads; yields its
    base URL and every request received, byte for byte."""
    received: list[bytes] = []
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")

    async def serve(stream: SocketStream) -> None:
        async with stream:
            try:
                while True:
                    request = await read_request(stream)
                    received.append(request)
                    await handler(stream, request)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        yield f"http://127.0.0.1:{port}", received
        tg.cancel_scope.cancel()


def task_answer(task_id: str = "t-1") -> bytes:
    body = json.dumps({"code": 200, "data": {"task_id": task_id, "status": "pending"}, "message": "ok"}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def answer(stream: SocketStream, request: bytes) -> None:
    await stream.send(task_answer())


def client(base: str, **kwargs) -> PiAPIClient:
    async def no_sleep(seconds: float) -> None:
        pass

    return PiAPIClient(base, "key-0123456789", sleep=no_sleep, retry=RetryPolicy(attempts=3), **kwargs)


PAYLOAD = {"model": "Qubico/flux1-schnell", "task_type": "txt2img", "input": {"prompt": "a fox"}}


async def test_a_request_goes_out_once_with_its_headers_and_body_and_the_connection_is_reused():
    async with raw_server(answer) as (base, received), client(base) as api:
        assert (await api.create_task(PAYLOAD)).task_id == "t-1"
        assert (await api.get_task("t-1")).task_id == "t-1"
    assert len(received) == 2  # one connection carried both (the server reads requests in a loop)
    head, _, body = received[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /api/v1/task HTTP/1.1"
    names = [line.split(":", 1)[0].lower() for line in lines[1:]]
    headers = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in lines[1:]}
    assert all(names.count(name) == 1 for name in names), names  # nothing sent twice (Host, Content-Length...)
    assert headers["x-api-key"] == "key-0123456789"
    assert headers["content-type"] == "application/json"
    assert headers["host"] == base.removeprefix("http://")
    assert json.loads(body) == PAYLOAD
    assert received[1].startswith(b"GET /api/v1/task/t-1 HTTP/1.1\r\n")


async def test_a_compressed_answer_is_decoded_once():
    body = json.dumps({"code": 200, "data": {"task_id": "t-9", "status": "completed"}}).encode()
    packed = gzip.compress(body)

    async def gzipped(stream: SocketStream, request: bytes) -> None:
        await stream.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(packed), packed)
        )

    async with raw_server(gzipped) as (base, _), client(base) as api:
        assert (await api.get_task("t-9")).status == "completed"


async def test_a_refused_connection_lets_a_create_be_retried_because_nothing_was_sent():
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there now
    async with client(f"http://127.0.0.1:{port}") as api:
        with pytest.raises(errors.NetworkError) as caught:
            await api.create_task(PAYLOAD)
    assert caught.value.retryable


async def test_a_connection_dropped_after_the_create_was_sent_is_uncertain_and_never_resent():
    async def hang_up(stream: SocketStream, request: bytes) -> None:
        await stream.aclose()

    async with raw_server(hang_up) as (base, received), client(base) as api:
        with pytest.raises(errors.SubmitUncertainError):
            await api.create_task(PAYLOAD)
    assert len(received) == 1  # a duplicate paid task is worse than an error


async def test_a_dropped_poll_is_retried():
    async def drop_first(stream: SocketStream, request: bytes) -> None:
        if len(calls) == 0:
            calls.append(request)
            await stream.aclose()
        else:
            await stream.send(task_answer())

    calls: list[bytes] = []
    async with raw_server(drop_first) as (base, received), client(base) as api:
        assert (await api.get_task("t-1")).task_id == "t-1"
    assert len(received) >= 2


async def stall(stream: SocketStream, request: bytes) -> None:
    await anyio.sleep(30)


async def not_http(stream: SocketStream, request: bytes) -> None:
    await stream.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    await stream.aclose()


@pytest.mark.parametrize(
    ("misbehave", "poll_error"), [(stall, errors.RequestTimeoutError), (not_http, errors.NetworkError)]
)
async def test_a_create_without_a_usable_answer_is_uncertain_and_sent_once(misbehave, poll_error):
    """No answer in time, or an answer that is not HTTP: the task may exist, so the create is not
    sent again; a poll's failure is a plain (retryable) one."""
    async with raw_server(misbehave) as (base, received), client(base, timeout_seconds=0.3) as api:
        with pytest.raises(errors.SubmitUncertainError):
            await api.create_task(PAYLOAD)
        with pytest.raises(poll_error):
            await api.get_task("t-1")
    assert sum(r.startswith(b"POST") for r in received) == 1


async def test_a_body_cut_short_is_a_read_error():
    async def short(stream: SocketStream, request: bytes) -> None:
        await stream.send(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await stream.aclose()

    transport = PooledTransport(connections=2)
    async with raw_server(short) as (base, _), httpx2.AsyncClient(transport=transport) as http:
        with pytest.raises(httpx2.ReadError):
            await http.get(base + "/i.png")


async def test_the_request_timeouts_are_the_ones_httpx2_was_given():
    async def slow_body(stream: SocketStream, request: bytes) -> None:
        await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        await anyio.sleep(30)

    async with (
        raw_server(slow_body) as (base, _),
        httpx2.AsyncClient(transport=PooledTransport(connections=2), timeout=httpx2.Timeout(0.3)) as http,
    ):
        with anyio.fail_after(10):  # the read time-out ends it, not this
            with pytest.raises(httpx2.ReadTimeout):
                await http.get(base + "/")


@pytest.mark.parametrize(
    ("environment", "url", "expected"),
    [
        ({}, "https://api.piapi.ai", False),
        ({"HTTPS_PROXY": "http://proxy.corp:3128"}, "https://api.piapi.ai", True),
        ({"HTTPS_PROXY": "http://proxy.corp:3128"}, "http://127.0.0.1:9000", False),  # only https is proxied
        ({"ALL_PROXY": "socks5://proxy.corp:1080"}, "http://127.0.0.1:9000", True),
        # NO_PROXY included: httpx2 reads it by its own rules, which differ from urllib's.
        ({"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "piapi.ai"}, "https://api.piapi.ai", True),
    ],
)
def test_a_proxy_set_up_for_the_scheme_is_left_to_httpx2(monkeypatch, environment, url, expected):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert needs_env_proxy(url) is expected


def test_a_system_proxy_without_environment_variables_is_left_to_httpx2(monkeypatch):
    """On macOS and Windows the proxy often comes from the system's settings alone."""
    import urllib.request

    monkeypatch.setattr(urllib.request, "getproxies", lambda: {"https": "http://proxy.corp:3128"})
    assert needs_env_proxy("https://api.piapi.ai")


async def test_a_body_the_server_never_reads_ends_at_the_time_outs_and_a_create_is_uncertain():
    """aiohttp has no write time-out of its own: a stalled upload (a create carrying a large data
    URI) must still end once the request's time-outs are spent, and the create is never resent."""
    import asyncio

    accepted: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing: past the stream's small buffer, the sender stalls

    server = await asyncio.start_server(hold, "127.0.0.1", 0, limit=1024)
    port = server.sockets[0].getsockname()[1]
    data_uri = "data:image/png;base64," + "A" * 30_000_000
    big = {"model": "Qubico/flux1-dev", "task_type": "img2img", "input": {"image": data_uri}}
    try:
        async with client(f"http://127.0.0.1:{port}", timeout_seconds=0.5) as api:
            with anyio.fail_after(15):  # connect + write + read + pool = 2 s, not this
                with pytest.raises(errors.SubmitUncertainError):
                    await api.create_task(big)
        assert len(accepted) == 1
    finally:
        for writer in accepted:
            writer.close()
        server.close()


async def test_a_reason_phrase_in_any_bytes_is_not_a_crash():
    """RFC 9112 allows any byte above 0x7f in the reason phrase."""

    async def odd_reason(stream: SocketStream, request: bytes) -> None:
        await stream.send(task_answer().replace(b"200 OK", "200 N\u00e3o".encode("latin-1"), 1))

    async with raw_server(odd_reason) as (base, _), client(base) as api:
        assert (await api.get_task("t-1")).task_id == "t-1"
        assert (await api.create_task(PAYLOAD)).task_id == "t-1"


async def test_a_closed_pool_opens_no_new_connections():
    transport = PooledTransport(connections=2)
    async with raw_server(answer) as (base, received):
        async with httpx2.AsyncClient(transport=transport) as http:
            await http.get(base + "/")
        with pytest.raises(httpx2.ConnectError):
            await transport.handle_async_request(httpx2.Request("GET", base + "/"))
    assert len(received) == 1
