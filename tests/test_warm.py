"""An HTTP server process is made ready before it serves (`flux_mcp.warm`): what a first call
loads is loaded, and the garbage collector no longer scans what lives as long as the process."""

from __future__ import annotations

import json
import subprocess
import sys

# Runs in its own process: freezing the collector, or loading modules, must not leak into the
# test process.
FIRST_CALL = """
import asyncio, gc, json, sys
from mcp import Client
from flux_mcp.server import create_server
from flux_mcp.settings import Settings
from flux_mcp.warm import ready_to_serve

threshold = gc.get_threshold()
ready_to_serve()
from flux_mcp.transport import tls_context

ready = {"frozen": gc.get_freeze_count(), "before": threshold, "after": gc.get_threshold()}
ready["certificates_loaded"] = tls_context.cache_info().currsize == 1
loaded = set(sys.modules)

async def first_call():
    server = create_server(Settings(base_url=sys.argv[1], api_key="sim-key"))
    async with Client(server) as client:
        result = await client.call_tool("flux_txt2img", {"prompt": "a red fox", "width": 512, "height": 512})
        assert not result.is_error, result

asyncio.run(first_call())
ours = ("flux_mcp", "aiohttp", "yarl", "PIL", "sqlite3", "httpx2", "httpcore2")
ready["loaded_by_the_call"] = sorted(m for m in set(sys.modules) - loaded if m.split(".")[0] in ours)
print(json.dumps(ready))
"""


def test_a_first_call_after_ready_to_serve_loads_nothing_more_and_startup_objects_are_frozen(
    standalone_simulator, tmp_path
):
    env = {"FLUX_MCP_DATA_DIR": str(tmp_path / "data"), "FLUX_MCP_OUTPUT_DIR": str(tmp_path / "images")}
    done = subprocess.run(
        [sys.executable, "-c", FIRST_CALL, standalone_simulator.base_url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**_plain_environment(), **env},
    )
    assert done.returncode == 0, done.stderr
    ready = json.loads(done.stdout.splitlines()[-1])
    assert ready["loaded_by_the_call"] == [], ready["loaded_by_the_call"]  # the call paid for no import
    assert ready["certificates_loaded"]  # not on the event loop during the first call
    assert ready["frozen"] > 10_000  # modules, classes, functions: never scanned again
    young, middle, full = ready["after"]
    # Collected less often: the young objects of calls in flight, and every object, fully.
    assert young >= 50_000 > ready["before"][0] and middle == ready["before"][1] and full > ready["before"][2]


def _plain_environment() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("FLUX_MCP_", "PIAPI_"))}
