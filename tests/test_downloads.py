"""The one download policy, over real loopback HTTP where it matters: addresses checked on every
hop and pinned for the connection, slow bodies cut off, the call's deadline respected with the
download going on in the background, never more images than asked for, huge canvases refused
before decoding, and local inputs that cannot be swapped for an outside file mid-open."""

from __future__ import annotations

import base64
import io
import os
import shutil
import struct
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import anyio
import httpx2
import pytest
from conftest import warm_up
from mcp import Client
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from flux_mcp import errors
from flux_mcp.catalog import TaskType
from flux_mcp.client import PiAPIClient
from flux_mcp.download import AddressPolicy, DownloadLimits, download_client
from flux_mcp.files import MAX_IMAGE_PIXELS, InputResolver, make_thumbnail
from flux_mcp.ledger import TaskLedger
from flux_mcp.parameters import build_request
from flux_mcp.record import TaskRecord
from flux_mcp.simulator.server import running_app

pytestmark = pytest.mark.anyio


def png(size=(32, 24), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png_header(width: int = 12_000, height: int = 12_000) -> bytes:
    """A small PNG file whose header claims `width` x `height` pixels (what a decompression bomb
    looks like before decoding): a 1x1 PNG with its IHDR rewritten."""
    data = bytearray(png((1, 1)))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


# --- addresses: every spelling of "not the internet" is refused --------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2/a.png",
        "http://[::ffff:127.0.0.2]/a.png",
        "http://2130706434/a.png",
        "http://[::1]:8089/a.png",
        "http://10.0.0.7/a.png",
        "http://192.168.1.1/a.png",
        "http://169.254.169.254/latest/meta-data",
        "http://100.64.0.1/a.png",
        "http://0.0.0.0/a.png",
        "http://evil.test/a.png",  # resolves to loopback (see `resolve`)
        "http://127.0.0.1:9999/a.png",  # the trusted host on another port
        "ftp://files.example/a.png",
    ],
)
async def test_downloads_to_anything_but_a_public_address_are_refused(url):
    async def resolve(host: str, port: int) -> list[str]:
        from flux_mcp.download import resolve_host

        return ["127.0.0.1"] if host == "evil.test" else await resolve_host(host, port)

    policy = AddressPolicy("http://127.0.0.1:8089", resolve=resolve)
    with pytest.raises(errors.StorageError, match="refused to download"):
        await policy.address_for(httpx2.URL(url))


async def test_the_simulators_own_origin_and_public_addresses_are_allowed():
    policy = AddressPolicy("http://127.0.0.1:8089")
    assert await policy.address_for(httpx2.URL("http://127.0.0.1:8089/files/a.png")) == "127.0.0.1"
    assert await policy.address_for(httpx2.URL("https://93.184.216.34/a.png")) == "93.184.216.34"
    real = AddressPolicy("https://api.piapi.ai")  # PiAPI's own host is not loopback: no exception at all
    with pytest.raises(errors.StorageError):
        await real.address_for(httpx2.URL("http://127.0.0.1:8089/files/a.png"))


@pytest.fixture
async def internal():
    """A service on another loopback port that must never be reached by a download."""
    hits: list[str] = []

    async def secret(request):
        hits.append(request.url.path)
        return Response(png(), media_type="image/png")

    async with running_app(Starlette(routes=[Route("/secret.png", secret)])) as url:
        yield url, hits


@pytest.fixture
async def redirector(internal):
    internal_url, _ = internal

    async def hop(request):
        n = int(request.path_params["n"])
        target = request.query_params.get("to", f"{internal_url}/secret.png")
        return RedirectResponse(f"/hop/{n - 1}?to={target}" if n > 1 else target, status_code=302)

    async def image(request):
        return Response(png(), media_type="image/png")

    async with running_app(Starlette(routes=[Route("/hop/{n}", hop), Route("/ok.png", image)])) as url:
        yield url


@pytest.mark.parametrize("target", [None, "http://127.0.0.2:{port}/secret.png", "file:///etc/passwd"])
async def test_a_redirect_chain_to_an_internal_address_is_refused_on_its_last_hop(redirector, internal, target):
    internal_url, hits = internal
    port = internal_url.rsplit(":", 1)[1]
    url = f"{redirector}/hop/3" + (f"?to={target.format(port=port)}" if target else "")
    async with PiAPIClient(redirector, "key-0000") as client:  # the redirector is "PiAPI" here
        with pytest.raises((errors.StorageError, errors.NetworkError)):
            async with client.stream_download(url) as download:
                [chunk async for chunk in download.aiter_bytes()]
        async with client.stream_download(f"{redirector}/ok.png") as download:  # the origin itself is fine
            assert b"".join([chunk async for chunk in download.aiter_bytes()]).startswith(b"\x89PNG")
    assert hits == []


async def test_the_connection_goes_to_the_address_that_was_checked(redirector):
    port = int(redirector.rsplit(":", 1)[1])
    resolved: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        resolved.append(host)
        return ["127.0.0.1"]  # what the name resolved to when it was checked; the system cannot resolve it

    base = f"http://files.invalid:{port}"
    policy = AddressPolicy(base, resolve=resolve)
    timeout = httpx2.Timeout(5.0)
    async with PiAPIClient(
        base, "key-0000", download_http=download_client(policy, timeout=timeout, limits=DownloadLimits())
    ) as client:
        async with client.stream_download(f"{base}/ok.png") as download:
            assert b"".join([chunk async for chunk in download.aiter_bytes()]).startswith(b"\x89PNG")
    assert resolved == ["files.invalid"]


async def test_downloads_reuse_a_connection_per_host_name_and_never_across_names(monkeypatch):
    """Images from one host share kept-alive connections; a second name at the same address gets
    its own (a connection checked for one name never carries another's request); past
    KEEP_ALIVE_HOSTS names, each download opens and closes its own connection."""
    from flux_mcp import download

    peers: list[tuple[str, int]] = []

    async def image(request):
        peers.append((request.headers["host"].split(":")[0], request.client.port))
        return Response(png(), media_type="image/png")

    monkeypatch.setattr(download, "_is_public", lambda address: True)  # *.test all resolve to loopback

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    async with running_app(Starlette(routes=[Route("/i.png", image)])) as url:
        port = int(url.rsplit(":", 1)[1])
        policy = AddressPolicy("https://api.piapi.ai", resolve=resolve)
        overflow = [f"h{k}.test" for k in range(download.KEEP_ALIVE_HOSTS)]  # a.test and b.test fill two slots
        names = ["a.test", "a.test", "b.test", "a.test", *overflow, overflow[-1]]
        async with PiAPIClient(
            "https://api.piapi.ai",
            "key-0000",
            download_http=download_client(policy, timeout=httpx2.Timeout(5.0), limits=DownloadLimits()),
        ) as client:
            for name in names:
                async with client.stream_download(f"http://{name}:{port}/i.png") as body:
                    assert b"".join([chunk async for chunk in body.aiter_bytes()]).startswith(b"\x89PNG")
    a_ports = {p for host, p in peers if host == "a.test"}
    b_ports = {p for host, p in peers if host == "b.test"}
    assert len(a_ports) == 1 and len(b_ports) == 1 and a_ports != b_ports
    last = [p for host, p in peers if host == overflow[-1]]
    assert len(last) == 2 and last[0] != last[1]  # a name past the kept-alive ones: a connection each
    assert len({p for _, p in peers}) == len(set(names)) + 1  # otherwise one per name, never shared


async def test_tls_to_a_pinned_address_checks_the_certificate_against_the_host_name(monkeypatch):
    """The guard connects to the address it checked, not to the name: TLS must still verify the
    certificate for the name (sent as SNI). A name the certificate does not cover, at the same
    address, gets nothing: the connection fails before any request is sent."""
    import asyncio
    import ssl

    import trustme

    from flux_mcp import download, transport

    ca = trustme.CA()
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("images.example.com").configure_cert(served)
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    monkeypatch.setattr(transport, "tls_context", lambda: trusted)
    monkeypatch.setattr(download, "_is_public", lambda address: True)  # both names resolve to loopback
    requests: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            requests.append(await reader.readuntil(b"\r\n\r\n"))
            body = png()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        writer.close()

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=served)
    port = server.sockets[0].getsockname()[1]
    policy = AddressPolicy("https://api.piapi.ai", resolve=resolve)
    try:
        async with PiAPIClient(
            "https://api.piapi.ai",
            "key-0000",
            download_http=download_client(policy, timeout=httpx2.Timeout(5.0), limits=DownloadLimits()),
        ) as client:
            async with client.stream_download(f"https://images.example.com:{port}/i.png") as body:
                assert b"".join([chunk async for chunk in body.aiter_bytes()]).startswith(b"\x89PNG")
            with pytest.raises(errors.NetworkError, match="ConnectError"):
                async with client.stream_download(f"https://evil.example.com:{port}/i.png"):
                    pass
    finally:
        server.close()
    assert len(requests) == 1 and requests[0].startswith(b"GET /i.png HTTP/1.1\r\n")
    assert b"host: images.example.com" in requests[0].lower()


# --- time: a dripping body cannot hold a call ------------------------------------------------------


async def test_a_body_that_drips_is_cut_off_by_the_minimum_rate():
    async def drip():
        yield png()[:8]
        while True:
            await anyio.sleep(0.05)
            yield b"x" * 5

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(lambda r: httpx2.Response(200, content=drip())))
    limits = DownloadLimits(grace_seconds=0.3, min_bytes_per_second=1000, max_seconds=30)
    started = time.monotonic()
    async with PiAPIClient("http://piapi.test", "key-0000", http=http, download_limits=limits) as client:
        with pytest.raises(errors.RequestTimeoutError, match="slower than 1000 B/s"):
            async with client.stream_download("http://files.test/a.png") as download:
                [chunk async for chunk in download.aiter_bytes()]
    assert time.monotonic() - started < 2


async def test_a_download_still_running_at_the_calls_deadline_finishes_in_the_background(server, sim, settings):
    sim.state.add_fault("slow_file", delay=3.0)
    async with Client(server) as client:
        await warm_up(client)  # what the first calls load is not what this deadline is about
        started = time.monotonic()
        result = await client.call_tool("flux_txt2img", {"prompt": "slow file", "wait_seconds": 1.5})
        took = time.monotonic() - started
        body = result.structured_content
        assert took < 2.8, took
        assert body["status"] == "completed" and body["images"][0]["path"] is None
        assert "still downloading in the background" in body["next_step"]
        await anyio.sleep(3.5)
        later = await client.call_tool("flux_get_task", {"task_id": body["task_id"]})
    path = later.structured_content["images"][0]["path"]
    assert path and Path(path).read_bytes().startswith(b"\x89PNG")


# --- count: never more images than the task asked for ----------------------------------------------


async def test_a_task_listing_forty_images_stores_only_the_one_asked_for(sim, settings, make_service):
    async with PiAPIClient(sim.base_url, sim.api_key) as client, TaskLedger(settings.ledger_path) as ledger:
        service = make_service(settings, client, ledger)
        submission = await service.submit("flux_txt2img", build_request(TaskType.TXT2IMG, {"prompt": "one"}))
        done = await service.wait(submission.record.task_id, timeout=10)
        url = done.record.image_urls[0]
        flood = TaskRecord(**{**done.record.model_dump(), "image_urls": [f"{url}?copy={i}" for i in range(40)]})
        outcome = await service.finish(flood, patience=10)
    assert len(outcome.record.image_urls) == 1 and len(outcome.images) == 1
    assert "40 images" in " ".join(outcome.notes)
    assert len(list(settings.images_dir.glob("*.png"))) == 1


# --- pixels: a huge canvas is refused before it is decoded ------------------------------------------


def test_a_12000_by_12000_png_costs_no_more_than_a_normal_one(tmp_path):
    bomb = huge_png_header()
    assert len(bomb) < 1000
    tracemalloc.start()
    try:
        with pytest.raises(errors.StorageError, match="12000x12000"):
            make_thumbnail(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak  # decoding it would take 144 MB at least
    normal = make_thumbnail(png((1024, 1024)))
    assert normal[0]


async def test_a_huge_input_image_is_refused_before_it_is_sent(tmp_path):
    (tmp_path / "bomb.png").write_bytes(huge_png_header())
    resolver = InputResolver([tmp_path], max_bytes=1_000_000)
    with pytest.raises(errors.InvalidInputError, match=f"more than the {MAX_IMAGE_PIXELS}"):
        await resolver.resolve(str(tmp_path / "bomb.png"), field="image")
    uri = "data:image/png;base64," + base64.b64encode(huge_png_header()).decode()
    with pytest.raises(errors.InvalidInputError, match="12000x12000"):
        await resolver.resolve(uri, field="image")


# --- item 3: a directory swapped for a symlink mid-call never sends the outside file ----------------


def test_a_symlink_swapped_in_while_inputs_are_opened_never_leads_outside(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "pics").mkdir(parents=True)
    (outside / "pics").mkdir(parents=True)
    inside_png, secret_png = png(color=(0, 200, 0)), png(color=(0, 0, 255))
    (root / "pics" / "a.png").write_bytes(inside_png)
    (outside / "pics" / "a.png").write_bytes(secret_png)
    real, link = root / "pics", root / "pics-real"
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:  # pics <-> symlink to ../outside/pics, each state held ~0.2 ms
        nonlocal swaps
        while not stop.is_set():
            os.rename(real, link)
            os.symlink(outside / "pics", real)
            time.sleep(0.0002)
            os.unlink(real)
            os.rename(link, real)
            time.sleep(0.0002)
            swaps += 1

    resolver = InputResolver([root], max_bytes=1_000_000)
    sent = {"inside": 0, "outside": 0, "refused": 0}
    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    try:
        # Checking, then opening by path, sent the outside file in about 2 % of calls like these.
        deadline = time.monotonic() + 5
        calls = 0
        while time.monotonic() < deadline and calls < 1000:
            calls += 1
            time.sleep(0.0001)  # let the swapper run between calls
            try:
                uri = resolver._local_to_data_uri(str(root / "pics" / "a.png"), "image")
            except errors.InvalidInputError:
                sent["refused"] += 1
                continue
            data = base64.b64decode(uri.split(",", 1)[1])
            sent["inside" if data == inside_png else "outside"] += 1
    finally:
        stop.set()
        thread.join(5)
    assert swaps > 50 and sent["inside"] > 0 and sent["refused"] > 0, (swaps, sent)
    assert sent["outside"] == 0, sent
    shutil.rmtree(tmp_path, ignore_errors=True)
