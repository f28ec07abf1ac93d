"""tools/list: what every request of every agent pays for. Size budget, order, annotations.

The size is counted in cl100k_base tokens (the tokenizer of the GPT-4 family, the yardstick
hosts quote for tool-list cost) with `bpe-openai`, which has the encoding built in: nothing is
downloaded at run time. What is counted is the `tools/list` result exactly as a client receives
it, serialized as compact JSON, less the tools only an MCP App view calls (hosts hide those from
the model; a host without Apps lists `flux_rerun` as one more tool).
"""

from __future__ import annotations

import json

import pytest
from mcp import Client

from flux_mcp.parameters import TASK_TOOLS

pytestmark = pytest.mark.anyio

TOOLS_LIST_BUDGET_TOKENS = 5_000
EXPECTED_ORDER = [
    *(t.name for t in TASK_TOOLS),
    "flux_get_task",
    "flux_wait_task",
    "flux_cancel_task",
    "flux_list_tasks",
    "flux_rerun",  # the gallery App's own tool (visibility "app"), from the SDK's Apps extension
]


def model_visible(tools: list[dict]) -> list[dict]:
    """What a model is shown: hosts with Apps keep app-only tools to the view."""
    return [t for t in tools if t.get("_meta", {}).get("ui", {}).get("visibility") != ["app"]]


def cl100k_tokens(text: str) -> int:
    import bpe_openai

    return len(bpe_openai.get_encoding("cl100k_base").encode(text))


def test_the_token_counter_is_cl100k():
    # Known cl100k_base ids, so the budget below is measured with the right encoding.
    import bpe_openai

    assert bpe_openai.get_encoding("cl100k_base").encode("hello world") == [15339, 1917]


@pytest.fixture(params=["legacy", "auto"])
async def listed(request, server):
    async with Client(server, mode=request.param) as client:
        yield [t.model_dump(by_alias=True, mode="json", exclude_none=True) for t in (await client.list_tools()).tools]


async def test_tools_list_stays_within_its_token_budget(listed):
    assert [t["name"] for t in model_visible(listed)] == EXPECTED_ORDER[:-1]
    body = json.dumps({"tools": model_visible(listed)}, separators=(",", ":"))
    tokens = cl100k_tokens(body)
    assert tokens <= TOOLS_LIST_BUDGET_TOKENS, f"tools/list grew to {tokens} cl100k tokens ({len(body)} chars)"


async def test_tools_are_listed_in_a_fixed_order_every_time(server):
    async with Client(server) as client:
        first = [t.name for t in (await client.list_tools()).tools]
        second = [t.name for t in (await client.list_tools()).tools]
    assert first == second == EXPECTED_ORDER


async def test_every_tool_has_annotations_a_title_and_an_output_schema(listed):
    for tool in model_visible(listed):
        assert tool["title"] and tool["description"], tool["name"]
        assert tool["outputSchema"]["type"] == "object", tool["name"]
        hints = tool["annotations"]
        assert {"readOnlyHint", "openWorldHint"} <= set(hints), tool["name"]
        if not hints["readOnlyHint"]:
            assert "destructiveHint" in hints and "idempotentHint" in hints, tool["name"]


async def test_deployment_options_are_not_tool_arguments(listed):
    for tool in listed:
        assert not {"service_mode", "webhook_endpoint", "webhook_secret"} & set(tool["inputSchema"]["properties"])


async def test_prices_and_handle_lifetime_are_stated_once_per_tool_from_the_catalog(listed):
    from flux_mcp.catalog import PRICE_PER_IMAGE_USD, Model

    tools = {t["name"]: t for t in listed}
    for task_tool in TASK_TOOLS:
        description = tools[task_tool.name]["description"]
        assert description.count("task_id never expires") == 1
        assert f"{PRICE_PER_IMAGE_USD[Model.DEV_ADVANCED]:g}" in description
