"""Starting the server loads only what answering tools/list needs.

Pillow, the PiAPI client (`flux_mcp.client`), the simulator, the ledger (and sqlite3), the task
lifecycle and its polling and timing, the `generate` command and the `--help` text are loaded and
built on first use. uvicorn, starlette and httpx2 are a special case: the SDK's own `mcp.server`
import brings them (uvicorn through `sse_starlette`), so the check is that this server adds
nothing of its own on top of that. Each check runs in a fresh interpreter, since this test process has imported
everything already. bench/cold_start.py measures the time this saves.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Never loaded by the stdio start path up to an answered tools/list.
LATE_MODULES = (
    "PIL", "httpx2", "httpcore2", "uvicorn", "starlette", "sqlite3", "statistics",
    "flux_mcp.simulator", "flux_mcp.client", "flux_mcp.ledger", "flux_mcp.lifecycle", "flux_mcp.polling",
    "flux_mcp.timing", "flux_mcp.admission", "flux_mcp.download", "flux_mcp.generate", "flux_mcp.settings_help",
    "flux_mcp.http_app", "flux_mcp.webhooks", "flux_mcp.workers", "flux_mcp.demo",
)  # fmt: skip
# Not even the SDK loads these.
NEVER_AT_START = ("PIL", "httpcore2", "sqlite3", "flux_mcp.simulator", "flux_mcp.ledger", "flux_mcp.settings_help")

# `piapi-flux-mcp` with no command, as an MCP host starts it, up to the point where it would
# serve stdio: there it lists its tools instead and reports what is loaded.
PROBE = """
import json, sys
import anyio
import mcp.server
sdk = set(sys.modules)
from flux_mcp import server

def list_and_report(self, *args, **kwargs):
    names = [tool.name for tool in anyio.run(self.list_tools)]
    added = sorted(set(sys.modules) - sdk)
    print(json.dumps({"tools": names, "added": added, "all": sorted(sys.modules)}))

server.FluxServer.run = list_and_report
from flux_mcp.cli import main
main([])
"""


def _modules_after_start(tmp_path) -> dict[str, list[str]]:
    env = {"PATH": "/usr/bin:/bin", "PIAPI_API_KEY": "test-key", "FLUX_MCP_DATA_DIR": str(tmp_path / "data")}
    env["FLUX_MCP_OUTPUT_DIR"] = str(tmp_path / "images")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60, env=env)
    return json.loads(out.stdout)


def _is_under(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.mark.slow
def test_the_stdio_start_up_to_tools_list_loads_nothing_a_tool_call_needs_first(tmp_path):
    modules = _modules_after_start(tmp_path)
    assert len(modules["tools"]) == 13  # the probe really got as far as listing the tools
    assert [m for m in modules["added"] if _is_under(m, LATE_MODULES)] == []
    assert [m for m in modules["all"] if _is_under(m, NEVER_AT_START)] == []


@pytest.mark.anyio
async def test_listing_tools_touches_no_ledger_and_the_first_call_opens_it(server, settings):
    from mcp.client import Client

    async with Client(server) as client:
        assert len((await client.list_tools()).tools) == 13  # twelve, and the gallery App's flux_rerun
        assert not settings.ledger_path.exists()
        listed = await client.call_tool("flux_list_tasks", {})
        assert listed.is_error is False
        assert settings.ledger_path.exists()
