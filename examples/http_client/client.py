"""piapi-flux-mcp over streamable HTTP with a bearer token, and the official MCP client.

Starts `piapi-flux-mcp serve --transport http` on a free loopback port with a fresh
`FLUX_MCP_AUTH_TOKEN`, reads the URL it prints, shows that a request without the token is
refused (401), then connects with `Authorization: Bearer <token>` and makes an image.

    pip install -r requirements.txt
    python client.py

Runs against the built-in simulator (`--simulate`): no key, no cost. For real images set
`PIAPI_API_KEY` and drop `--simulate`. Against a server you run
elsewhere (e.g. the Docker image), set `FLUX_MCP_URL` and `FLUX_MCP_AUTH_TOKEN` and this program
connects to it instead of starting one. `PIAPI_FLUX_MCP` overrides the command that starts the
server (default `uvx piapi-flux-mcp`).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
from contextlib import asynccontextmanager

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

SERVER = shlex.split(os.environ.get("PIAPI_FLUX_MCP", "uvx piapi-flux-mcp"))


@asynccontextmanager
async def http_server():
    """`(url, token)`: the one named by FLUX_MCP_URL, or a local server started for the block."""
    if os.environ.get("FLUX_MCP_URL"):
        yield os.environ["FLUX_MCP_URL"], os.environ["FLUX_MCP_AUTH_TOKEN"]
        return
    token = secrets.token_urlsafe(32)
    command = [*SERVER, "serve", "--transport", "http", "--host", "127.0.0.1", "--port", "0", "--simulate"]
    env = dict(os.environ, FLUX_MCP_AUTH_TOKEN=token)
    proc = await asyncio.create_subprocess_exec(*command, env=env, stderr=asyncio.subprocess.PIPE)
    try:
        url = None
        while url is None:  # the server prints "piapi-flux-mcp: MCP endpoint <url>" once it listens
            line = (await proc.stderr.readline()).decode()
            if not line:
                raise RuntimeError(f"the server exited with code {await proc.wait()}")
            if "MCP endpoint " in line:
                url = line.split("MCP endpoint ", 1)[1].split()[0]
        drain = asyncio.create_task(proc.stderr.read())  # keep reading its log so it never blocks
        yield url, token
    finally:
        proc.terminate()
        await proc.wait()
    await drain


async def main() -> None:
    async with http_server() as (url, token):
        print(f"server: {url}")
        async with httpx2.AsyncClient(timeout=10) as anonymous:
            refused = await anonymous.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        print(f"without the token: HTTP {refused.status_code}")

        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(10, read=120))
        async with http, Client(streamable_http_client(url, http_client=http)) as client:
            tools = await client.list_tools()
            print(f"with the token: {len(tools.tools)} tools")
            result = await client.call_tool("flux_txt2img", {"prompt": "a hot-air balloon over hills", "batch_size": 2})
        data = result.structured_content
        print(f"{data['status']}: task {data['task_id']}")
        print("saved:", *(image["path"] for image in data["images"]), sep="\n  ")


if __name__ == "__main__":
    asyncio.run(main())
