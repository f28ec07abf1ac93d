"""The gallery as an MCP App: which tools carry the view, the `ui://` resource and its CSP, the
app-only re-run (a new task through the spend guard), and unchanged results for every host."""

from __future__ import annotations

import re

import pytest
from mcp import Client

from flux_mcp.catalog import PRICE_PER_IMAGE_USD, Model
from flux_mcp.gallery import view_html
from flux_mcp.gallery.apps import VIEW_URI

pytestmark = pytest.mark.anyio

VIEW_TOOLS = {
    "flux_txt2img", "flux_img2img", "flux_txt2img_lora", "flux_img2img_lora", "flux_fill_inpaint",
    "flux_fill_outpaint", "flux_redux_variation", "flux_controlnet_lora", "flux_get_task", "flux_wait_task",
    "flux_list_tasks",
}  # fmt: skip


def posts(sim) -> list[dict]:
    return [e for e in sim.state.log if e["method"] == "POST"]


@pytest.fixture(params=["legacy", "auto"])
async def client(request, server):
    async with Client(server, mode=request.param) as connected:
        yield connected


async def test_the_task_tools_and_get_wait_list_carry_the_view_and_rerun_is_app_only(client):
    tools = {t.name: t for t in (await client.list_tools()).tools}
    shown = {name for name, t in tools.items() if ((t.meta or {}).get("ui") or {}).get("resourceUri") == VIEW_URI}
    assert shown == VIEW_TOOLS | {"flux_rerun"}
    assert tools["flux_rerun"].meta["ui"]["visibility"] == ["app"]
    assert "visibility" not in tools["flux_txt2img"].meta["ui"]
    assert tools["flux_cancel_task"].meta is None or "ui" not in tools["flux_cancel_task"].meta


async def test_the_view_is_a_self_contained_app_resource_declaring_no_domains(client):
    result = await client.read_resource(VIEW_URI)
    (content,) = result.contents
    assert content.mime_type == "text/html;profile=mcp-app"
    assert content.text == view_html("app") and '<meta name="flux-gallery-mode" content="app">' in content.text
    assert content.meta["ui"]["csp"] == {"connectDomains": [], "resourceDomains": []}
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", content.text)
    assert "ui/initialize" in content.text and "flux_get_task" in content.text and "flux_rerun" in content.text


async def test_results_are_unchanged_for_hosts_without_apps(client):
    result = await client.call_tool("flux_txt2img", {"prompt": "the same as ever"})
    assert [c.type for c in result.content] == ["text", "image", "resource_link"]
    assert result.structured_content["status"] == "completed"


async def test_rerun_submits_the_same_request_as_a_new_task(client, sim):
    first = await client.call_tool("flux_txt2img", {"prompt": "again please", "width": 512, "height": 384})
    again = await client.call_tool("flux_rerun", {"task_id": first.structured_content["task_id"]})
    data = again.structured_content
    assert not again.is_error and data["task_id"] != first.structured_content["task_id"]
    assert data["reattached"] is False and data["status"] in ("pending", "processing", "completed")
    first_task, second_task = sim.state.tasks.values()
    assert first_task.raw_input == second_task.raw_input and first_task.raw_input["width"] == 512


async def test_rerun_of_an_unknown_task_is_not_found(client, sim):
    result = await client.call_tool("flux_rerun", {"task_id": "0f8fad5b-d9cb-469f-a165-70867728950e"})
    assert result.is_error and result.structured_content["error"]["category"] == "not_found"
    assert posts(sim) == []


async def test_rerun_goes_through_the_spend_guard(sim, settings, fast_options):
    from flux_mcp.server import create_server

    price = PRICE_PER_IMAGE_USD[Model.SCHNELL]
    server = create_server(settings.model_copy(update={"daily_budget_usd": price}), fast_options)
    async with Client(server) as client:
        first = await client.call_tool("flux_txt2img", {"prompt": "only one today"})
        again = await client.call_tool("flux_rerun", {"task_id": first.structured_content["task_id"]})
        assert again.is_error and again.structured_content["error"]["category"] == "budget_exceeded"
    server = create_server(settings.model_copy(update={"confirm_above_usd": 0.0}), fast_options)
    async with Client(server) as client:  # no elicitation: a refusal naming the setting
        again = await client.call_tool("flux_rerun", {"task_id": first.structured_content["task_id"]})
        assert again.is_error and again.structured_content["error"]["category"] == "confirmation_required"
    assert len(posts(sim)) == 1


async def test_thumbnails_are_small_previews_of_the_local_copies(client):
    import base64
    import io

    from PIL import Image

    done = await client.call_tool("flux_txt2img", {"prompt": "big", "width": 1024, "height": 768})
    task_id = done.structured_content["task_id"]
    full = (await client.read_resource(f"flux://tasks/{task_id}/images/0")).contents[0]
    thumb = (await client.read_resource(f"flux://tasks/{task_id}/thumbnails/0")).contents[0]
    assert Image.open(io.BytesIO(base64.b64decode(full.blob))).size == (1024, 768)
    preview = base64.b64decode(thumb.blob)
    assert Image.open(io.BytesIO(preview)).size == (512, 384) and len(preview) <= 200_000
