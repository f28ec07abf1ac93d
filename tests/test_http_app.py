"""HTTP access control over real HTTP: the bearer token, Host/Origin checks on every bind, the
session cap and idle expiry, and `serve --transport http` as a user meets it.

The app runs under uvicorn in this process on a loopback socket of port 0 (or, for the command
line, as a subprocess); every request is a real HTTP request. An app built for `--host 0.0.0.0`
is still served on 127.0.0.1 here: its checks are a property of the app, and no test listens
beyond loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette

from flux_mcp.http_app import bind_socket, build_http_app, check_exposure
from flux_mcp.settings import ConfigurationError, Settings

pytestmark = pytest.mark.anyio

TOKEN = "test-token-0123456789abcdef"
LEGACY = "2025-06-18"  # a 2025-era client: the era that has sessions
MCP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def initialize(version: str = LEGACY) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}},
    }


@asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1:<free port>; yield its base URL."""
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
    sock.close()


def changed(settings: Settings, **changes: Any) -> Settings:
    """`settings` with `changes`, validated as the environment would be."""
    return Settings(**(settings.model_dump() | changes))


@pytest.fixture
def http_settings(settings):
    return changed(settings, auth_token=TOKEN, allowed_hosts="mcp.example.com")


async def post_initialize(http: httpx2.AsyncClient, url: str, **headers: str) -> httpx2.Response:
    return await http.post(f"{url}/mcp", json=initialize(), headers=MCP_HEADERS | headers)


# --- who may call ---------------------------------------------------------------------------------


async def test_mcp_endpoint_refuses_missing_or_wrong_token_with_401(http_settings, fast_options):
    app = build_http_app(http_settings, host="0.0.0.0", options=fast_options)
    async with serving(app) as url, httpx2.AsyncClient(timeout=10) as http:
        missing = await post_initialize(http, url)
        wrong = await post_initialize(http, url, Authorization="Bearer not-the-token-at-all")
        not_bearer = await post_initialize(http, url, Authorization=f"Basic {TOKEN}")
        right = await post_initialize(http, url, Authorization=f"Bearer {TOKEN}")
    for refused in (missing, wrong, not_bearer):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer ")
        assert refused.json()["error"] == "invalid_token"
        assert TOKEN not in refused.text
    assert right.status_code == 200
    assert right.headers.get("mcp-session-id")


async def test_an_mcp_client_with_the_token_lists_tools_and_calls_one(http_settings, fast_options):
    app = build_http_app(http_settings, host="0.0.0.0", options=fast_options)
    async with serving(app) as url:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        with anyio.fail_after(20):
            async with Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
                tools = await client.list_tools()
                listed = await client.call_tool("flux_list_tasks", {"limit": 1})
    assert "flux_txt2img" in {tool.name for tool in tools.tools}
    assert listed.is_error is False


# --- under which names ----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
async def test_foreign_host_and_origin_are_refused_on_every_bind_even_with_the_token(http_settings, fast_options, host):
    app = build_http_app(http_settings, host=host, options=fast_options)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with serving(app) as url, httpx2.AsyncClient(timeout=10) as http:
        foreign = await post_initialize(http, url, Host="attacker.example:8000", **bearer)
        rebinding = await post_initialize(http, url, Host="mcp.example.com.attacker.example", **bearer)
        bad_origin = await post_initialize(http, url, Origin="http://attacker.example", **bearer)
        unknown_path = await http.get(f"{url}/anything", headers={"Host": "attacker.example"})
    assert foreign.status_code == 421 and "FLUX_MCP_ALLOWED_HOSTS" in foreign.text
    assert rebinding.status_code == 421
    assert bad_origin.status_code == 403
    assert unknown_path.status_code == 421  # every route, not only /mcp


@pytest.mark.parametrize(
    ("host_header", "origin"),
    [
        ("mcp.example.com", None),
        ("mcp.example.com:8443", "https://mcp.example.com:8443"),
        ("MCP.example.com", "https://mcp.example.com"),
        ("localhost:1234", "http://localhost:1234"),
        ("[::1]:80", None),
    ],
)
async def test_allowed_and_loopback_host_names_are_accepted_on_any_port(
    http_settings, fast_options, host_header, origin
):
    app = build_http_app(http_settings, host="0.0.0.0", options=fast_options)
    headers = {"Authorization": f"Bearer {TOKEN}", "Host": host_header} | ({"Origin": origin} if origin else {})
    async with serving(app) as url, httpx2.AsyncClient(timeout=10) as http:
        response = await post_initialize(http, url, **headers)
    assert response.status_code == 200, response.text


def test_no_token_refuses_any_non_loopback_bind_and_warns_on_loopback():
    settings = Settings(simulate=True)
    for host in ("0.0.0.0", "::", "192.168.1.20", "my-host.lan"):
        with pytest.raises(ConfigurationError, match="FLUX_MCP_AUTH_TOKEN"):
            check_exposure(settings, host)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert "FLUX_MCP_AUTH_TOKEN is not set" in (check_exposure(settings, host) or "")
    assert check_exposure(changed(settings, auth_token=TOKEN), "0.0.0.0") is None


# --- how many sessions, for how long --------------------------------------------------------------


async def test_session_cap_answers_503_at_once_and_frees_a_slot_on_close(settings, fast_options):
    app = build_http_app(changed(settings, max_sessions=2), options=fast_options)
    async with serving(app) as url, httpx2.AsyncClient(timeout=10) as http:
        first = await post_initialize(http, url)
        second = await post_initialize(http, url)
        with anyio.fail_after(5):  # a clear answer, not a hang
            over = await post_initialize(http, url)
        assert [first.status_code, second.status_code] == [200, 200]
        assert over.status_code == 503
        assert over.json()["error"]["message"] == "Too many open sessions"
        closed = await http.delete(f"{url}/mcp", headers={"mcp-session-id": first.headers["mcp-session-id"]})
        assert closed.status_code == 200
        again = await post_initialize(http, url)
        assert again.status_code == 200


async def test_idle_sessions_expire_and_free_their_slot(settings, fast_options):
    app = build_http_app(changed(settings, max_sessions=1, session_idle_seconds=0.3), options=fast_options)
    async with serving(app) as url, httpx2.AsyncClient(timeout=10) as http:
        first = await post_initialize(http, url)
        session = first.headers["mcp-session-id"]
        assert (await post_initialize(http, url)).status_code == 503  # the one slot is taken
        await anyio.sleep(1.0)
        stale = await http.post(
            f"{url}/mcp",
            json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
            headers=MCP_HEADERS | {"mcp-session-id": session, "mcp-protocol-version": LEGACY},
        )
        fresh = await post_initialize(http, url)
    assert first.status_code == 200
    assert stale.status_code == 404  # expired: the client opens a new session
    assert fresh.status_code == 200


# --- the command line -----------------------------------------------------------------------------


def cli_env(tmp_path, **extra: str) -> dict[str, str]:
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("PIAPI_", "FLUX_MCP_")) and "proxy" not in k.lower()
    }
    return base | {"FLUX_MCP_DATA_DIR": str(tmp_path / "data"), "FLUX_MCP_OUTPUT_DIR": str(tmp_path / "images")} | extra


def test_serve_http_on_all_interfaces_without_a_token_refuses_to_start(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flux_mcp", "serve", "--transport", "http", "--host", "0.0.0.0", "--simulate"],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "refusing to serve HTTP on 0.0.0.0 without FLUX_MCP_AUTH_TOKEN" in lines[0]


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path):
    taken = bind_socket("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        result = subprocess.run(
            [sys.executable, "-m", "flux_mcp", "serve", "--transport", "http", "--port", str(port), "--simulate"],
            env=cli_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    finally:
        taken.close()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"piapi-flux-mcp: cannot listen on 127.0.0.1 port {port}: ")


@pytest.mark.slow
def test_serve_http_prints_its_url_and_enforces_the_token(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "flux_mcp", "--simulate", "serve", "--transport", "http", "--port", "0"],
        env=cli_env(tmp_path, FLUX_MCP_AUTH_TOKEN=TOKEN),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        seen = []
        while not any("MCP endpoint" in line for line in seen):
            assert time.monotonic() < deadline and proc.poll() is None, seen
            seen.append(proc.stderr.readline())
        url = next(line for line in seen if "MCP endpoint" in line).split("MCP endpoint ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/mcp")
        assert not any("FLUX_MCP_AUTH_TOKEN is not set" in line for line in seen)
        with httpx2.Client(timeout=10) as http:
            deadline = time.monotonic() + 20
            while True:  # the URL is printed once the socket listens; the app may still be starting
                try:
                    refused = http.post(url, json=initialize(), headers=MCP_HEADERS)
                    break
                except httpx2.TransportError:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            accepted = http.post(url, json=initialize(), headers=MCP_HEADERS | {"Authorization": f"Bearer {TOKEN}"})
        assert refused.status_code == 401
        assert accepted.status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
