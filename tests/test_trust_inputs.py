"""What the caller sends is what it means, and what comes back can be used: strict argument types,
URLs with a host, no dead resource links, no leftovers from killed downloads."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from mcp import Client

from flux_mcp.files import STALE_PART_SECONDS, sweep_partial_files
from flux_mcp.server import create_server

pytestmark = pytest.mark.anyio


def posts(sim) -> int:
    return sum(1 for e in sim.state.log if e["method"] == "POST")


# --- item 4: strict types ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "args", "field"),
    [
        ("flux_txt2img", {"width": True}, "width"),
        ("flux_txt2img", {"width": "  512 "}, "width"),
        ("flux_txt2img", {"width": 512.0}, "width"),
        ("flux_txt2img", {"batch_size": True}, "batch_size"),
        ("flux_txt2img", {"width": None}, "width"),  # a real default takes no null
        ("flux_txt2img", {"dry_run": "off"}, "dry_run"),
        ("flux_txt2img", {"dry_run": "no"}, "dry_run"),
        ("flux_txt2img", {"dry_run": 0}, "dry_run"),
        ("flux_txt2img", {"dry_run": None}, "dry_run"),
        ("flux_txt2img", {"guidance_scale": "3"}, "guidance_scale"),
        ("flux_img2img", {"image": "http:///in.png"}, "image"),
        ("flux_controlnet_lora", {"control_type": "depth", "control_image": "x.png", "return_preprocessed_image": 1},
         "return_preprocessed_image"),
        ("flux_wait_task", {"task_id": "t-1", "wait_seconds": True}, "wait_seconds"),
        ("flux_list_tasks", {"limit": "5"}, "limit"),
    ],
)  # fmt: skip
async def test_a_value_of_the_wrong_json_type_is_refused_naming_the_field(server, sim, tool, args, field):
    if tool.startswith(("flux_txt2img", "flux_img2img", "flux_controlnet")):
        args = {"prompt": "strict", **({"image": "https://e.example/a.png"} if tool == "flux_img2img" else {}), **args}
    async with Client(server) as client:
        result = await client.call_tool(tool, args)
    error = result.structured_content["error"]
    assert result.is_error and error["category"] == "invalid_input"
    assert error["message"].startswith(f"{field}:") or f"; {field}:" in error["message"], error["message"]
    assert posts(sim) == 0


async def test_null_and_empty_still_mean_not_given_for_optional_arguments(server, sim):
    args = {"prompt": "loose", "guidance_scale": None, "negative_prompt": "",
            "wait_seconds": None, "include_image": None, "dry_run": True}  # fmt: skip
    async with Client(server) as client:
        result = await client.call_tool("flux_txt2img", args)
    assert result.is_error is False and "guidance_scale" not in result.structured_content["payload"]["input"]


# --- item 11: no resource links that fail, no leftovers -----------------------------------------------


async def test_with_saving_off_no_result_carries_a_resource_link(settings, fast_options, sim):
    server = create_server(settings.model_copy(update={"save_images": False}), fast_options)
    async with Client(server) as client:
        result = await client.call_tool("flux_txt2img", {"prompt": "unsaved", "include_image": "none"})
        again = await client.call_tool("flux_get_task", {"task_id": result.structured_content["task_id"]})
    assert result.structured_content["images"][0]["path"] is None
    for answer in (result, again):
        assert "resource_link" not in [c.type for c in answer.content]


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    return dead.pid


async def test_partial_files_of_killed_downloads_are_swept_at_start_up(settings, fast_options, sim):
    images = settings.images_dir
    images.mkdir(parents=True, exist_ok=True)
    dead, alive = _dead_pid(), os.getppid()
    killed = [images / f".t-1_0.{dead}.abcd1234.part", images / f".t-1_0.{dead}.abcd1234.json.part"]
    old = images / f".t-2_0.{alive}.zz.part"
    live = images / f".t-3_0.{alive}.yy.part"
    for path in (*killed, old, live):
        path.write_bytes(b"half an image")
    os.utime(old, (time.time() - STALE_PART_SECONDS - 5,) * 2)
    server = create_server(settings, fast_options)
    assert sorted(p.name for p in images.glob(".*.part")) == [live.name]
    async with Client(server) as client:
        result = await client.call_tool("flux_txt2img", {"prompt": "after a crash"})
    assert result.structured_content["status"] == "completed"
    assert sorted(p.name for p in images.glob(".*.part")) == [live.name]


def test_sweeping_an_unreadable_directory_is_harmless(tmp_path):
    assert sweep_partial_files(tmp_path / "missing") == []
