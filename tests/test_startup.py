"""Start-up as configured: errors name the environment variable, and what the tools publish
reflects the configured defaults rather than the built-in ones."""

from __future__ import annotations

import pytest
from mcp import Client
from pydantic import ValidationError

from flux_mcp.settings import Settings
from flux_mcp.startup import describe_settings_error

pytestmark = pytest.mark.anyio


def error_for(monkeypatch, **environment: str) -> str:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    return describe_settings_error(caught.value)


def test_a_config_error_names_each_variable_and_its_value_on_one_line(monkeypatch):
    line = error_for(monkeypatch, FLUX_MCP_WAIT_SECONDS="forever", PIAPI_BASE_URL="api.piapi.ai")
    assert "\n" not in line
    assert "FLUX_MCP_WAIT_SECONDS='forever'" in line
    assert "PIAPI_BASE_URL='api.piapi.ai'" in line
    assert "wait_seconds" not in line.replace("FLUX_MCP_WAIT_SECONDS", "")  # no internal field names


def test_a_secret_is_named_without_its_value(monkeypatch):
    line = error_for(monkeypatch, FLUX_MCP_AUTH_TOKEN="tiny-secret")
    assert line.startswith("invalid setting FLUX_MCP_AUTH_TOKEN: ")
    assert "tiny-secret" not in line


def test_a_long_value_is_cut_short(monkeypatch):
    line = error_for(monkeypatch, FLUX_MCP_LOG_LEVEL="x" * 500)
    assert len(line) < 300


async def test_tool_schemas_show_the_configured_wait_default(settings, fast_options):
    from flux_mcp.server import create_server

    configured = Settings(**(settings.model_dump() | {"wait_seconds": 12.5}))
    async with Client(create_server(configured, fast_options)) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    waiting = [tool for tool in tools.values() if "wait_seconds" in tool.input_schema.get("properties", {})]
    assert {"flux_txt2img", "flux_wait_task"} <= {tool.name for tool in waiting}
    for tool in waiting:
        text = tool.input_schema["properties"]["wait_seconds"].get("description", "")
        assert "12.5" in text and "45" not in text, (tool.name, text)
