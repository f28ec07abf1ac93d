"""Starting the server loads only what answering tools/list needs.

Pillow, the PiAPI client (`flux_mcp.client`), the simulator, the ledger (and sqlite3), the task
lifecycle and its polling and timing, the catalog and the task tools' arguments models, the
`generate` command and the `--help` text are loaded and built on first use. tools/list answers
from the definitions `flux_mcp.tool_list` keeps (named by a hash of the source), which must be
exactly what the code builds. uvicorn, starlette and httpx2 are a special case: the SDK's own
`mcp.server` import brings them (uvicorn through `sse_starlette`), so the check is that this
server adds nothing of its own on top of that. Each check runs in a fresh interpreter, since this
test process has imported everything already. bench/cold_start.py measures the time this saves.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mcp.types import Tool as MCPTool

from flux_mcp import tool_list

# Never loaded by the stdio start path up to an answered tools/list.
LATE_MODULES = (
    "PIL", "httpx2", "httpcore2", "aiohttp", "uvicorn", "starlette", "sqlite3", "statistics",
    "flux_mcp.simulator", "flux_mcp.client", "flux_mcp.ledger", "flux_mcp.lifecycle", "flux_mcp.polling",
    "flux_mcp.catalog", "flux_mcp.parameters", "flux_mcp.spend",
    "flux_mcp.timing", "flux_mcp.admission", "flux_mcp.download", "flux_mcp.transport", "flux_mcp.generate",
    "flux_mcp.settings_help",
    "flux_mcp.http_app", "flux_mcp.webhooks", "flux_mcp.workers", "flux_mcp.demo",
)  # fmt: skip
# Not even the SDK loads these.
NEVER_AT_START = (
    "PIL",
    "aiohttp",
    "httpcore2",
    "sqlite3",
    "pydantic_settings",
    "dotenv",
    "flux_mcp.simulator",
    "flux_mcp.ledger",
    "flux_mcp.settings_help",
)

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

    def run() -> dict[str, list[str]]:
        command = [sys.executable, "-c", PROBE]
        return json.loads(
            subprocess.run(command, capture_output=True, text=True, check=True, timeout=60, env=env).stdout
        )

    first = run()  # keeps the tool list if this source's is not kept yet (a fresh checkout)
    assert tool_list.cache_path().exists(), "the tool list could not be kept beside the package's bytecode"
    second = run()
    assert second["tools"] == first["tools"]
    return second


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


def _fresh_definitions() -> list[dict]:
    from flux_mcp.server import _tool_definitions

    return _tool_definitions()


@pytest.fixture
def keep_in(tmp_path, monkeypatch):
    """Tool lists kept in a folder of the test's own, with bytecode writing on."""
    monkeypatch.setattr(tool_list, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    return tmp_path / "cache"


def test_a_kept_tool_list_is_exactly_what_the_code_builds(keep_in):
    from flux_mcp.tools import all_tools

    computed = tool_list.tool_definitions(_fresh_definitions)
    assert [p.name for p in keep_in.iterdir()] == [tool_list.cache_path().name]

    def must_not_run() -> list[dict]:
        raise AssertionError("the kept list was not used")

    kept = [MCPTool.model_validate(d) for d in tool_list.tool_definitions(must_not_run)]
    assert kept == [MCPTool.model_validate(d) for d in computed]
    built = [tool.definition() for tool in all_tools()]
    assert kept == built  # names, order, schemas, annotations, _meta
    assert [t.model_fields_set for t in kept] == [t.model_fields_set for t in built]  # same wire JSON


def test_a_changed_source_or_sdk_names_another_file(keep_in, tmp_path, monkeypatch):
    package = tmp_path / "package"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("A = 1\n")
    (package / "sub" / "b.py").write_text("B = 1\n")
    monkeypatch.setattr(tool_list, "PACKAGE_DIR", package)
    key = tool_list.source_key()
    assert tool_list.source_key() == key
    (package / "sub" / "b.py").write_text("B = 2\n")
    changed_source = tool_list.source_key()
    monkeypatch.setattr(tool_list, "version", lambda name: "999.0")
    assert len({key, changed_source, tool_list.source_key()}) == 3


def test_a_damaged_kept_list_is_rebuilt_and_an_unwritable_folder_only_costs_time(keep_in, monkeypatch):
    keep_in.mkdir()
    tool_list.cache_path().write_text("{not json")
    assert tool_list.tool_definitions(lambda: [{"name": "x"}]) == [{"name": "x"}]
    assert json.loads(tool_list.cache_path().read_text()) == [{"name": "x"}]
    # Told not to write bytecode: computed every time, nothing written.
    tool_list.cache_path().unlink()
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert tool_list.tool_definitions(lambda: [{"name": "y"}]) == [{"name": "y"}]
    assert list(keep_in.iterdir()) == []
    # A folder that cannot be made: computed, no error.
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    keep_in.rmdir()
    keep_in.write_text("a file where the folder should be")
    assert tool_list.tool_definitions(lambda: [{"name": "z"}]) == [{"name": "z"}]
