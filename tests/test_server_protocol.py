"""The MCP surface, in memory, in both protocol eras, asserting the JSON clients see on the wire.

The server talks to the real simulator over loopback; only the MCP hop is in memory.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
from pathlib import Path

import anyio
import pytest
from mcp import Client
from PIL import Image

from flux_mcp import files, lifecycle
from flux_mcp.parameters import TASK_TOOLS

pytestmark = pytest.mark.anyio

TASK_TOOL_NAMES = [t.name for t in TASK_TOOLS]
MODEL_TOOL_NAMES = [*TASK_TOOL_NAMES, "flux_get_task", "flux_wait_task", "flux_cancel_task", "flux_list_tasks"]
ALL_TOOL_NAMES = [*MODEL_TOOL_NAMES, "flux_rerun"]  # flux_rerun: the gallery App's own (visibility "app")
RESULT_KEYS = {"task_id", "model", "task_type", "status", "images", "error", "created_at", "elapsed_seconds"}


@pytest.fixture(params=["legacy", "auto"])
async def client(request, server):
    async with Client(server, mode=request.param) as connected:
        yield connected


def wire(model) -> dict:
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


def posts(sim) -> list[dict]:
    return [e for e in sim.state.log if e["method"] == "POST"]


def png(path: Path, size=(64, 48), color=(200, 30, 30)) -> str:
    Image.new("RGB", size, color).save(path)
    return str(path)


# --- tools/list --------------------------------------------------------------------------------


async def test_tools_list_names_annotations_and_descriptions(client):
    tools = {t.name: wire(t) for t in (await client.list_tools()).tools}
    assert sorted(tools) == sorted(ALL_TOOL_NAMES)
    for name in TASK_TOOL_NAMES:
        assert tools[name]["annotations"] == {
            "readOnlyHint": False,
            "destructiveHint": False,
            "idempotentHint": False,
            "openWorldHint": True,
        }
    for name in ("flux_get_task", "flux_wait_task"):
        assert tools[name]["annotations"]["readOnlyHint"] is True
    for tool in tools.values():
        assert tool["description"] and tool["outputSchema"]["type"] == "object"
        for prop_name, prop in tool["inputSchema"]["properties"].items():
            assert prop.get("description"), f"{tool['name']}.{prop_name} has no description"
            assert "title" not in prop


async def test_task_tool_schemas_come_from_the_catalog(client):
    tools = {t.name: wire(t)["inputSchema"] for t in (await client.list_tools()).tools}
    txt = tools["flux_txt2img"]["properties"]
    assert txt["model"]["enum"] == ["Qubico/flux1-schnell", "Qubico/flux1-dev", "Qubico/flux1-dev-advanced"]
    assert txt["model"]["default"] == "Qubico/flux1-schnell"
    assert (txt["guidance_scale"]["minimum"], txt["guidance_scale"]["maximum"]) == (1.5, 5)
    assert (txt["batch_size"]["minimum"], txt["batch_size"]["maximum"], txt["batch_size"]["default"]) == (1, 4, 1)
    assert tools["flux_txt2img"]["required"] == ["prompt"]
    assert "model" not in tools["flux_fill_inpaint"]["properties"]
    assert "white" in tools["flux_fill_inpaint"]["properties"]["image"]["description"]
    assert len(tools["flux_txt2img_lora"]["properties"]["lora_type"]["enum"]) == 23
    assert tools["flux_controlnet_lora"]["properties"]["control_type"]["enum"] == [
        "depth",
        "canny",
        "soft_edge",
        "openpose",
    ]
    assert set(tools["flux_controlnet_lora"]["required"]) == {"prompt", "control_type", "control_image"}
    assert tools["flux_img2img"]["properties"]["denoise"] == {
        "default": 0.7,
        "description": "How much to change the image.",
        "exclusiveMinimum": 0,
        "maximum": 1,
        "type": "number",
    }


# --- a task from submit to images --------------------------------------------------------------


async def test_txt2img_result_on_the_wire(client, sim):
    progress: list[tuple[float, str]] = []

    async def on_progress(value, total, message):
        progress.append((value, message))

    result = await client.call_tool(
        "flux_txt2img", {"prompt": "a little cat", "width": 640, "height": 480}, progress_callback=on_progress
    )
    body = wire(result)
    assert body["isError"] is False
    data = body["structuredContent"]
    assert RESULT_KEYS <= set(data)
    assert data["status"] == "completed" and data["error"] is None
    assert data["model"] == "Qubico/flux1-schnell" and data["task_type"] == "txt2img"
    assert data["estimated_cost_usd"] == 0.0015 and data["reattached"] is False
    (image,) = data["images"]
    assert Path(image["path"]).is_file() and image["url"].startswith(sim.base_url)
    with Image.open(image["path"]) as saved:
        assert saved.size == (640, 480)
    assert [c["type"] for c in body["content"]] == ["text", "image", "resource_link"]
    assert body["content"][2]["uri"] == f"flux://tasks/{data['task_id']}/images/0"
    summary, serialized = body["content"][0]["text"].split("\n", 1)
    assert data["task_id"] in summary and json.loads(serialized) == data
    # Real progress: strictly increasing elapsed seconds, task id in the very first message.
    assert data["task_id"] in progress[0][1]
    assert all(b[0] > a[0] for a, b in itertools.pairwise(progress))
    assert progress[-1][1].startswith("completed")


async def test_thumbnail_respects_the_caps_and_can_be_switched_off(client):
    result = await client.call_tool("flux_txt2img", {"prompt": "big", "width": 1024, "height": 1024})
    (thumb,) = [c for c in result.content if c.type == "image"]
    data = base64.b64decode(thumb.data)
    assert len(data) <= 200_000 and thumb.mime_type in ("image/webp", "image/jpeg")
    with Image.open(io.BytesIO(data)) as image:
        assert max(image.size) <= 512
    off = await client.call_tool("flux_txt2img", {"prompt": "big", "include_image": "none", "idempotency_key": "x"})
    assert [c.type for c in off.content] == ["text", "resource_link"]


async def test_a_call_shows_the_preview_made_while_saving_with_no_second_thumbnail(client, monkeypatch):
    made_later = []
    monkeypatch.setattr(lifecycle, "make_thumbnail", lambda *a, **k: made_later.append(a))
    result = await client.call_tool("flux_txt2img", {"prompt": "once", "width": 512, "height": 512})
    (thumb,) = [c for c in result.content if c.type == "image"]
    (image,) = result.structured_content["images"]
    assert base64.b64decode(thumb.data) == Path(image["path"]).read_bytes()  # 512 px: it is its own preview
    assert made_later == []


async def test_a_call_that_shows_no_image_makes_no_preview(client, monkeypatch):
    made = []
    real = files.make_thumbnail
    monkeypatch.setattr(files, "make_thumbnail", lambda *a, **k: made.append(a) or real(*a, **k))
    monkeypatch.setattr(lifecycle, "make_thumbnail", files.make_thumbnail)
    off = await client.call_tool("flux_txt2img", {"prompt": "no preview", "include_image": "none"})
    assert off.structured_content["status"] == "completed" and off.structured_content["images"][0]["path"]
    assert made == []  # neither in the save step nor after it
    on = await client.call_tool("flux_txt2img", {"prompt": "a preview", "width": 1024, "height": 1024})
    assert [c.type for c in on.content] == ["text", "image", "resource_link"] and len(made) == 1


async def test_a_call_asking_for_a_preview_gets_it_from_its_save_even_when_the_default_is_none(
    settings, fast_options, monkeypatch
):
    from flux_mcp.server import create_server

    made_later = []
    monkeypatch.setattr(lifecycle, "make_thumbnail", lambda *a, **k: made_later.append(a))
    server = create_server(settings.model_copy(update={"include_image": "none"}), fast_options)
    async with Client(server) as connected:
        shown = await connected.call_tool("flux_txt2img", {"prompt": "asked", "include_image": "thumbnail"})
        plain = await connected.call_tool("flux_txt2img", {"prompt": "default"})
    assert [c.type for c in shown.content] == ["text", "image", "resource_link"]
    assert [c.type for c in plain.content] == ["text", "resource_link"]
    assert made_later == []


async def test_flux_wait_task_and_flux_get_task_show_the_preview_made_while_saving(client, sim, monkeypatch):
    made_later = []  # previews made from the file, after the save
    monkeypatch.setattr(lifecycle, "make_thumbnail", lambda *a, **k: made_later.append(a))
    sim.state.configure(durations={"Qubico/flux1-schnell": 0.3})
    waited = await client.call_tool("flux_txt2img", {"prompt": "waited for", "wait_seconds": 0})
    assert waited.structured_content["status"] in ("pending", "processing")
    done = await client.call_tool("flux_wait_task", {"task_id": waited.structured_content["task_id"]})
    got = await client.call_tool("flux_txt2img", {"prompt": "got", "wait_seconds": 0})
    await anyio.sleep(0.6)  # finished at PiAPI; its first GET is flux_get_task's
    fetched = await client.call_tool("flux_get_task", {"task_id": got.structured_content["task_id"]})
    for result in (done, fetched):
        assert result.structured_content["status"] == "completed"
        assert [c.type for c in result.content] == ["text", "image", "resource_link"]
    assert made_later == []


async def test_a_later_look_at_a_task_shows_what_its_call_asked_for(settings, fast_options):
    from flux_mcp.server import create_server

    for default, asked, shown in (("thumbnail", "none", False), ("none", "thumbnail", True)):
        server = create_server(settings.model_copy(update={"include_image": default}), fast_options)
        async with Client(server) as connected:
            first = await connected.call_tool("flux_txt2img", {"prompt": asked, "include_image": asked})
            task_id = first.structured_content["task_id"]
            for tool in ("flux_get_task", "flux_wait_task"):
                later = await connected.call_tool(tool, {"task_id": task_id})
                assert later.structured_content["status"] == "completed"
                assert ("image" in [c.type for c in later.content]) is shown, (default, asked, tool)


async def test_batch_gives_every_image_and_at_most_four_thumbnails(client):
    result = await client.call_tool("flux_txt2img", {"prompt": "four", "batch_size": 4, "width": 256, "height": 256})
    data = result.structured_content
    assert len(data["images"]) == 4 and data["estimated_cost_usd"] == 0.006
    assert len({i["path"] for i in data["images"]}) == 4
    assert [c.type for c in result.content].count("image") == 4


async def test_dry_run_returns_the_exact_payload_and_sends_nothing(client, sim):
    result = await client.call_tool(
        "flux_txt2img_lora", {"prompt": "spiderman", "lora_type": "mjv6", "dry_run": True, "width": 768}
    )
    data = result.structured_content
    assert result.is_error is False and data["task_id"] is None and data["status"] is None
    assert data["payload"] == {
        "model": "Qubico/flux1-dev-advanced",
        "task_type": "txt2img-lora",
        "input": {
            "prompt": "spiderman",
            "width": 768,
            "height": 1024,
            "lora_settings": [{"lora_type": "mjv6", "lora_strength": 1.0}],
        },
    }
    assert data["estimated_cost_usd"] == 0.02
    assert sim.state.log == []


@pytest.mark.parametrize(
    ("tool", "args", "expected"),
    [
        ("flux_txt2img", {"prompt": "x", "model": "Qubico/flux1-dev", "batch_size": 2}, "batch_size > 1 works only"),
        ("flux_txt2img", {"prompt": "x", "width": 2048, "height": 1024}, "exceeds PiAPI's limit"),
        ("flux_txt2img", {"prompt": "   "}, "prompt: must not be empty"),
        ("flux_img2img", {"prompt": "x", "image": "/etc/passwd"}, "outside the allowed image roots"),
        ("flux_img2img", {"prompt": "x", "image": "ftp://host/a.png"}, "image"),
        ("flux_fill_outpaint", {"prompt": "x", "image": "https://e.com/a.png"}, "at least one of outpaint"),
    ],
)
async def test_invalid_arguments_are_rejected_before_any_request(client, sim, tool, args, expected):
    result = await client.call_tool(tool, args)
    assert result.is_error is True
    data = result.structured_content
    assert data["error"]["category"] == "invalid_input" and data["error"]["retryable"] is False
    assert expected in data["error"]["message"]
    assert sim.state.log == []


@pytest.mark.parametrize(
    ("tool", "args", "expected"),
    [
        (
            "flux_txt2img",
            {"prompt": "x", "guidance_scale": 9},
            "guidance_scale: Input should be less than or equal to 5",
        ),
        ("flux_txt2img_lora", {"prompt": "x", "lora_type": "nope"}, "lora_type: Input should be 'anime'"),
        ("flux_txt2img", {}, "prompt: Field required"),
        ("flux_txt2img", {"prompt": "x", "wait_seconds": -1}, "wait_seconds"),
        ("flux_txt2img", {"prompt": "x", "include_image": "full"}, "'none' or 'thumbnail'"),
    ],
)
async def test_schema_violations_come_back_as_the_same_structured_error(client, sim, tool, args, expected):
    result = await client.call_tool(tool, args)
    assert result.is_error is True
    assert result.structured_content["error"]["category"] == "invalid_input"
    assert expected in result.structured_content["error"]["message"]
    assert sim.state.log == []


async def test_local_image_inputs_become_data_uris(client, settings, sim):
    path = png(settings.image_roots[0] / "input.png")
    result = await client.call_tool("flux_redux_variation", {"prompt": "variation", "image": path})
    assert result.structured_content["status"] == "completed"
    (task,) = sim.state.tasks.values()
    assert task.request.input.image.startswith("data:image/png;base64,")


# --- long tasks, failures, cancellation ----------------------------------------------------------


async def test_a_wait_that_runs_out_returns_a_live_handle_then_wait_task_finishes(client, sim):
    sim.state.configure(durations={"Qubico/flux1-dev": 1.0})
    first = await client.call_tool("flux_txt2img", {"prompt": "slow", "model": "Qubico/flux1-dev", "wait_seconds": 0})
    data = first.structured_content
    assert first.is_error is False and data["status"] in ("pending", "processing")
    assert "flux_wait_task" in data["next_step"] and data["task_id"] in data["next_step"]
    done = await client.call_tool("flux_wait_task", {"task_id": data["task_id"], "wait_seconds": 10})
    assert done.structured_content["status"] == "completed"
    assert Path(done.structured_content["images"][0]["path"]).is_file()
    again = await client.call_tool("flux_get_task", {"task_id": data["task_id"]})
    assert again.structured_content["images"] == done.structured_content["images"]


async def test_a_failed_task_is_an_error_result_with_piapi_code(client, sim):
    sim.state.add_fault("fail_next", code=10001, message="nsfw content detected", raw_message="nsfw")
    result = await client.call_tool("flux_txt2img", {"prompt": "x"})
    data = result.structured_content
    assert result.is_error is True and data["status"] == "failed" and data["task_id"]
    assert data["error"]["code"] == 10001 and data["error"]["category"] == "task_failed"
    assert "nsfw content detected" in data["error"]["message"]


async def test_upstream_auth_failure_is_actionable_and_never_leaks_the_key(client, sim, settings):
    sim.state.add_fault("http_error", status=401, times=1)
    result = await client.call_tool("flux_txt2img", {"prompt": "x"})
    assert result.is_error is True
    assert result.structured_content["error"]["category"] == "auth"
    assert settings.api_key.get_secret_value() not in json.dumps(wire(result))


async def test_client_cancellation_sends_piapi_a_cancel(client, sim):
    sim.state.configure(pending_seconds=30)
    with anyio.move_on_after(0.5):
        await client.call_tool("flux_txt2img", {"prompt": "abandoned"})
    with anyio.fail_after(5):
        while not any(e["method"] == "DELETE" for e in sim.state.log):
            await anyio.sleep(0.05)
    (task,) = sim.state.tasks.values()
    assert sim.state.phase(task) == "cancelled"


async def test_cancel_tool_reports_whether_piapi_accepted(client, sim):
    sim.state.configure(pending_seconds=30)
    first = await client.call_tool("flux_txt2img", {"prompt": "x", "wait_seconds": 0})
    task_id = first.structured_content["task_id"]
    result = await client.call_tool("flux_cancel_task", {"task_id": task_id})
    assert result.is_error is False
    assert result.structured_content["cancel_accepted"] is True
    assert result.structured_content["status"] == "cancelled"
    again = await client.call_tool("flux_cancel_task", {"task_id": task_id})
    assert again.structured_content["cancel_accepted"] is False


# --- never twice, never lost ---------------------------------------------------------------------


async def test_an_identical_request_reattaches_instead_of_paying_again(client, sim):
    args = {"prompt": "same", "width": 512, "height": 512}
    first = await client.call_tool("flux_txt2img", args)
    second = await client.call_tool("flux_txt2img", args)
    assert second.structured_content["reattached"] is True
    assert second.structured_content["task_id"] == first.structured_content["task_id"]
    assert "already submitted" in second.structured_content["next_step"]
    assert len(posts(sim)) == 1
    third = await client.call_tool("flux_txt2img", {**args, "idempotency_key": "new"})
    assert third.structured_content["task_id"] != first.structured_content["task_id"]
    assert len(posts(sim)) == 2


async def test_an_idempotency_key_reattaches_the_same_request_and_refuses_a_different_one(client, sim):
    first = await client.call_tool("flux_txt2img", {"prompt": "one", "idempotency_key": "k1"})
    again = await client.call_tool("flux_txt2img", {"prompt": "one", "idempotency_key": "k1", "wait_seconds": 1})
    assert again.structured_content["task_id"] == first.structured_content["task_id"]
    other = await client.call_tool("flux_txt2img", {"prompt": "two", "idempotency_key": "k1"})
    assert other.is_error and other.structured_content["error"]["category"] == "invalid_input"
    assert "already used for a different request" in other.structured_content["error"]["message"]
    assert len(posts(sim)) == 1


async def test_task_ids_are_validated_before_they_reach_a_url(client, sim):
    result = await client.call_tool("flux_get_task", {"task_id": "../../account/info"})
    assert result.is_error and result.structured_content["error"]["category"] == "invalid_input"
    assert sim.state.log == []


async def test_list_tasks_shows_the_ledger_newest_first(client):
    a = await client.call_tool("flux_txt2img", {"prompt": "first"})
    b = await client.call_tool("flux_txt2img", {"prompt": "second"})
    listed = (await client.call_tool("flux_list_tasks", {})).structured_content["tasks"]
    assert [t["task_id"] for t in listed] == [b.structured_content["task_id"], a.structured_content["task_id"]]
    assert listed[0]["prompt"] == "second" and listed[0]["status"] == "completed"
    assert listed[0]["images"] == [b.structured_content["images"][0]["path"]]
    assert (await client.call_tool("flux_list_tasks", {"status": "failed"})).structured_content["tasks"] == []


# --- resources ---------------------------------------------------------------------------------


async def test_resources_outlive_piapi_urls(client, sim):
    result = await client.call_tool("flux_txt2img", {"prompt": "keep me"})
    task_id = result.structured_content["task_id"]
    templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
    assert templates == {
        "flux://tasks/{task_id}",
        "flux://tasks/{task_id}/images/{n}",
        "flux://tasks/{task_id}/thumbnails/{n}",
    }
    sim.state.expire_files()
    image = await client.read_resource(f"flux://tasks/{task_id}/images/0")
    blob = base64.b64decode(image.contents[0].blob)
    assert blob == Path(result.structured_content["images"][0]["path"]).read_bytes()
    record = json.loads((await client.read_resource(f"flux://tasks/{task_id}")).contents[0].text)
    assert record["task_id"] == task_id and record["status"] == "completed"
    assert [h["status"] for h in record["history"]][-1] == "completed"


async def test_a_task_submitted_elsewhere_is_fetched_and_recorded(client, sim):
    import httpx2

    async with httpx2.AsyncClient() as http:
        created = await http.post(
            f"{sim.base_url}/api/v1/task",
            headers={"X-API-Key": sim.api_key},
            json={"model": "Qubico/flux1-schnell", "task_type": "txt2img", "input": {"prompt": "from the dashboard"}},
        )
    task_id = created.json()["data"]["task_id"]
    done = await client.call_tool("flux_wait_task", {"task_id": task_id, "wait_seconds": 10})
    assert done.structured_content["status"] == "completed"
    assert Path(done.structured_content["images"][0]["path"]).is_file()
    listed = (await client.call_tool("flux_list_tasks", {})).structured_content["tasks"]
    assert [(t["task_id"], t["tool"]) for t in listed] == [(task_id, "external")]


async def test_a_task_piapi_forgot_is_answered_from_the_ledger(client, sim):
    result = await client.call_tool("flux_txt2img", {"prompt": "remember me"})
    task_id = result.structured_content["task_id"]
    sim.state.reset()  # PiAPI's retention ran out: the task and its files are gone
    for tool in ("flux_get_task", "flux_wait_task"):
        again = await client.call_tool(tool, {"task_id": task_id})
        assert again.is_error is False
        assert again.structured_content["status"] == "completed"
        assert again.structured_content["images"] == result.structured_content["images"]
    get = await client.call_tool("flux_get_task", {"task_id": task_id})
    assert "no longer knows" in get.structured_content["next_step"]
    assert sim.state.log == [e for e in sim.state.log if e["method"] == "GET"]  # nothing was re-sent


async def test_waiting_on_a_finished_task_needs_no_request(client, sim):
    result = await client.call_tool("flux_txt2img", {"prompt": "done already"})
    sim.state.log.clear()
    again = await client.call_tool("flux_wait_task", {"task_id": result.structured_content["task_id"]})
    assert again.structured_content["status"] == "completed" and sim.state.log == []


async def test_an_unknown_task_is_a_not_found_error(client):
    result = await client.call_tool("flux_get_task", {"task_id": "0b0e6a8c-0000-4000-8000-000000000000"})
    assert result.is_error is True
    assert result.structured_content["error"]["category"] == "not_found"


# --- every result, success or error, matches the schema the tool publishes ---------------------

ERROR_CALLS = [
    ("flux_txt2img", {"prompt": "x", "guidance_scale": 9}),
    ("flux_txt2img", {"prompt": "x", "dry_run": True}),
    ("flux_fill_inpaint", {"prompt": "x", "image": "/etc/passwd"}),
    ("flux_get_task", {"task_id": "../etc"}),
    ("flux_get_task", {"task_id": "0b0e6a8c-0000-4000-8000-000000000000"}),
    ("flux_wait_task", {"task_id": "nope nope"}),
    ("flux_cancel_task", {"task_id": "../../etc"}),
    ("flux_cancel_task", {"task_id": "0b0e6a8c-0000-4000-8000-000000000000"}),
    ("flux_list_tasks", {"status": "uncertain"}),
]


@pytest.mark.parametrize(("tool", "args"), ERROR_CALLS, ids=[f"{t}-{i}" for i, (t, _) in enumerate(ERROR_CALLS)])
async def test_error_and_edge_results_match_the_published_output_schema(client, tool, args):
    import jsonschema

    schemas = {t.name: t.output_schema for t in (await client.list_tools()).tools}
    result = await client.call_tool(tool, args)
    assert result.structured_content is not None
    jsonschema.validate(result.structured_content, schemas[tool])


async def test_missing_resources_are_not_found_errors_with_their_reason(client):
    from mcp import MCPError

    with pytest.raises(MCPError) as info:
        await client.read_resource("flux://tasks/nope")
    assert info.value.error.code == -32602 and "not in the local ledger" in info.value.error.message


async def test_an_abandoned_wait_leaves_the_ledger_up_to_date(client, sim):
    sim.state.configure(pending_seconds=30)
    with anyio.move_on_after(0.5):
        await client.call_tool("flux_txt2img", {"prompt": "abandoned"})
    with anyio.fail_after(5):
        while True:
            listed = (await client.call_tool("flux_list_tasks", {})).structured_content["tasks"]
            if listed and listed[0]["status"] == "cancelled":
                break
            await anyio.sleep(0.05)


async def test_a_create_whose_answer_is_lost_is_reported_uncertain_and_never_resent(sim, settings, fast_options):
    from flux_mcp.server import create_server

    impatient = create_server(settings.model_copy(update={"request_timeout_seconds": 0.3}), fast_options)
    sim.state.add_fault("create_late", delay=1.0)
    async with Client(impatient) as client:
        first = await client.call_tool("flux_txt2img", {"prompt": "lost answer"})
        error = first.structured_content["error"]
        assert first.is_error and error["category"] == "submit_uncertain"
        assert "may exist" in error["message"] and "flux_list_tasks" in error["hint"]
        again = await client.call_tool("flux_txt2img", {"prompt": "lost answer"})
        assert again.structured_content["error"]["category"] == "submit_uncertain"
        uncertain = (await client.call_tool("flux_list_tasks", {"status": "uncertain"})).structured_content["tasks"]
        assert [(t["submit_state"], t["prompt"]) for t in uncertain] == [("uncertain", "lost answer")]
    assert len(posts(sim)) == 1 and len(sim.state.tasks) == 1


async def test_a_repeat_of_a_failed_task_submits_again_because_failures_cost_nothing(client, sim):
    sim.state.add_fault("fail_next", code=10001, message="transient failure")
    failed = await client.call_tool("flux_txt2img", {"prompt": "try again"})
    assert failed.structured_content["status"] == "failed"
    retried = await client.call_tool("flux_txt2img", {"prompt": "try again"})
    assert retried.structured_content["status"] == "completed"
    assert retried.structured_content["reattached"] is False
    assert retried.structured_content["task_id"] != failed.structured_content["task_id"]
    assert len(posts(sim)) == 2


async def test_with_saving_off_nothing_is_written_but_the_preview_still_comes(sim, settings, fast_options):
    from flux_mcp.server import create_server

    server = create_server(settings.model_copy(update={"save_images": False}), fast_options)
    async with Client(server) as client:
        result = await client.call_tool("flux_txt2img", {"prompt": "ephemeral", "width": 800, "height": 600})
    data = result.structured_content
    assert data["status"] == "completed" and data["images"][0]["path"] is None
    assert "no local copy" in data["next_step"]
    (thumb,) = [c for c in result.content if c.type == "image"]
    with Image.open(io.BytesIO(base64.b64decode(thumb.data))) as image:
        assert image.size == (512, 384)
    assert not settings.output_dir.exists() or not any(settings.output_dir.iterdir())


async def test_an_unknown_tool_is_a_protocol_error(client):
    from mcp import MCPError

    with pytest.raises(MCPError) as info:
        await client.call_tool("flux_text2img", {"prompt": "typo"})
    assert info.value.error.code == -32602 and "Unknown tool: flux_text2img" in info.value.error.message


async def test_strict_mode_clients_sending_every_property_get_the_same_payload(client):
    """OpenAI-style strict function calling sends every property; unset ones arrive as "" or null."""
    strict_args = {
        "prompt": "a lighthouse", "model": "Qubico/flux1-schnell", "negative_prompt": "", "width": 1024,
        "height": 1024, "guidance_scale": None, "batch_size": 1, "wait_seconds": None, "dry_run": True,
        "idempotency_key": "", "include_image": None,
    }  # fmt: skip
    strict = await client.call_tool("flux_txt2img", strict_args)
    plain = await client.call_tool("flux_txt2img", {"prompt": "a lighthouse", "dry_run": True})
    assert strict.is_error is False
    assert strict.structured_content["payload"] == plain.structured_content["payload"]
    listed = await client.call_tool("flux_list_tasks", {"status": None, "task_type": None, "limit": 5})
    assert listed.is_error is False


async def test_unknown_arguments_are_refused_not_silently_dropped(client, sim):
    result = await client.call_tool("flux_fill_inpaint", {"prompt": "x", "image": "https://e.com/a.png", "mask": "m"})
    assert result.is_error and result.structured_content["error"]["category"] == "invalid_input"
    assert "mask: is not a parameter" in result.structured_content["error"]["message"]
    other = await client.call_tool("flux_get_task", {"task_id": "t", "verbose": True})
    assert other.is_error and other.structured_content["error"]["category"] == "invalid_input"
    assert "verbose: is not a parameter" in other.structured_content["error"]["message"]
    assert sim.state.log == []


@pytest.mark.parametrize("prompt", ["null", '["a cat"]', '{"x": 1}', "42"])
async def test_text_that_looks_like_json_stays_text(client, prompt):
    result = await client.call_tool("flux_txt2img", {"prompt": prompt, "dry_run": True})
    assert result.is_error is False
    assert result.structured_content["payload"]["input"]["prompt"] == prompt


async def test_deployment_config_comes_from_settings_and_its_secret_is_masked_where_stored(sim, settings, fast_options):
    from pydantic import SecretStr

    from flux_mcp.server import create_server

    configured = settings.model_copy(
        update={
            "webhook_endpoint": "https://hooks.example/x",
            "webhook_secret": SecretStr("s3cr3t"),
            "service_mode": "private",
        }
    )
    async with Client(create_server(configured, fast_options)) as client:
        tools = {t.name: t.input_schema["properties"] for t in (await client.list_tools()).tools}
        assert not {"webhook_endpoint", "webhook_secret", "service_mode"} & set(tools["flux_txt2img"])
        dry = await client.call_tool("flux_txt2img", {"prompt": "hooked", "dry_run": True})
        assert dry.structured_content["payload"]["config"] == {
            "webhook_config": {"endpoint": "https://hooks.example/x", "secret": "***"},
            "service_mode": "private",
        }
        result = await client.call_tool("flux_txt2img", {"prompt": "hooked"})
        task_id = result.structured_content["task_id"]
        record = (await client.read_resource(f"flux://tasks/{task_id}")).contents[0].text
    (task,) = sim.state.tasks.values()
    assert task.request.config.webhook_config.secret == "s3cr3t"  # PiAPI itself gets the real secret
    sidecar = Path(result.structured_content["images"][0]["path"]).with_suffix(".json").read_text()
    ledger = b"".join(p.read_bytes() for p in settings.data_dir.glob("tasks.sqlite3*"))  # with the WAL
    assert b"hooks.example" in ledger  # the check below reads the right files
    for stored in (record, sidecar, ledger.decode("latin-1"), json.dumps(wire(result))):
        assert "s3cr3t" not in stored


async def test_an_unknown_prompt_is_invalid_params_not_an_internal_error(client):
    from mcp import MCPError

    with pytest.raises(MCPError) as info:
        await client.get_prompt("nope")
    assert info.value.error.code == -32602 and "Unknown prompt: nope" in info.value.error.message


@pytest.mark.parametrize(
    ("tool", "args", "expected"),
    [
        ("flux_wait_task", {"task_id": "t", "wait_seconds": -1}, "wait_seconds: Input should be greater"),
        ("flux_cancel_task", {}, "task_id: Field required"),
        ("flux_get_task", {"task_id": 7}, "task_id: Input should be a valid string"),
    ],
)
async def test_management_tools_report_bad_arguments_the_same_way(client, tool, args, expected):
    import jsonschema

    schemas = {t.name: t.output_schema for t in (await client.list_tools()).tools}
    result = await client.call_tool(tool, args)
    assert result.is_error and result.structured_content["error"]["category"] == "invalid_input"
    assert expected in result.structured_content["error"]["message"]
    jsonschema.validate(result.structured_content, schemas[tool])


async def test_list_tasks_reports_bad_arguments_like_every_other_tool(client):
    import jsonschema

    schemas = {t.name: t.output_schema for t in (await client.list_tools()).tools}
    for bad in ({"limit": 0}, {"limit": "5"}, {"limit": True}, {"status": "done"}):
        result = await client.call_tool("flux_list_tasks", bad)
        error = result.structured_content["error"]
        assert result.is_error and error["category"] == "invalid_input"
        assert next(iter(bad)) in error["message"] and error["message"] in result.content[0].text
        jsonschema.validate(result.structured_content, schemas["flux_list_tasks"])


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        ("flux_txt2img", {"prompt": "x", "dry_run": True}),
        ("flux_txt2img", {"prompt": "x", "guidance_scale": 9}),
        ("flux_get_task", {"task_id": "0b0e6a8c-0000-4000-8000-000000000000"}),
        ("flux_cancel_task", {"task_id": "../x"}),
        ("flux_list_tasks", {}),
    ],
)
async def test_the_text_block_carries_the_structured_result_for_clients_that_read_only_text(client, tool, args):
    result = await client.call_tool(tool, args)
    (text,) = [c.text for c in result.content if c.type == "text"]
    summary, serialized = text.split("\n", 1)
    assert summary and "\n" not in summary
    assert json.loads(serialized) == result.structured_content
