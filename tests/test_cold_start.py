"""Starting the server loads only what answering tools/list needs.

Pillow, the PiAPI client (`flux_mcp.client`), the ledger's connection and the simulator are loaded
and built on a tool's first use. uvicorn, starlette and httpx2 are a special case: the SDK's own
`mcp.server` import brings them (uvicorn through `sse_starlette`), so the check is that this server
adds nothing of its own on top of that. Each check runs in a fresh interpreter, since this test process has imported
everything already. bench/cold_start.py measures the time this saves.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LATE_MODULES = ("PIL", "httpx2", "httpcore2", "uvicorn", "starlette", "flux_mcp.simulator", "flux_mcp.client")

PROBE = """
import json, sys
import mcp.server
sdk = set(sys.modules)
from flux_mcp.server import create_server
from flux_mcp.settings import Settings
server = create_server(Settings(api_key="test-key"))
added = sorted(set(sys.modules) - sdk)
print(json.dumps({"added": added, "all": sorted(sys.modules)}))
"""


def _modules_after_start() -> dict[str, list[str]]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


def _is_under(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.mark.slow
def test_building_the_server_loads_no_image_http_client_or_web_server_module():
    modules = _modules_after_start()
    assert [m for m in modules["added"] if _is_under(m, LATE_MODULES)] == []
    assert [m for m in modules["all"] if _is_under(m, ("PIL", "httpx", "flux_mcp.simulator"))] == []


@pytest.mark.anyio
async def test_listing_tools_touches_no_ledger_and_the_first_call_opens_it(server, settings):
    from mcp.client import Client

    async with Client(server) as client:
        assert len((await client.list_tools()).tools) == 13  # twelve, and the gallery App's flux_rerun
        assert not settings.ledger_path.exists()
        listed = await client.call_tool("flux_list_tasks", {})
        assert listed.is_error is False
        assert settings.ledger_path.exists()
