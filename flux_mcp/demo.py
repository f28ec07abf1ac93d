"""`piapi-flux-mcp demo`: the whole product end to end, with no key and no network.

Starts the PiAPI simulator on loopback, launches `piapi-flux-mcp` as a stdio subprocess pointed at it
(exactly as Claude Desktop or Cursor would), connects the official MCP client, and runs every
task tool once: text-to-image, image-to-image from a local file, LoRA, inpaint, outpaint,
variation and ControlNet. It then shows a re-submission being re-attached instead of paid twice,
a short wait that returns `processing` and is finished by `flux_wait_task`, and the ledger.
Each run gets a fresh folder under the output directory (`run-<date>-<time>`) with its images and
JSON sidecars, its ledger and its inputs, so a second run starts from nothing and re-attaches to
nothing but its own repeat.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters
from PIL import Image, ImageDraw

from flux_mcp.simulator import running_simulator


def _write_inputs(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.new("RGB", (512, 512), (40, 90, 160))
    draw = ImageDraw.Draw(photo)
    draw.ellipse((140, 110, 372, 342), fill=(230, 190, 150))
    draw.rectangle((120, 340, 392, 512), fill=(200, 60, 60))
    photo_path = folder / "portrait.png"
    photo.save(photo_path)
    masked = photo.copy()
    ImageDraw.Draw(masked).rectangle((120, 340, 392, 512), fill=(255, 255, 255))  # white = repaint
    masked_path = folder / "portrait-masked.png"
    masked.save(masked_path)
    return {"photo": str(photo_path), "masked": str(masked_path)}


def _calls(inputs: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("flux_txt2img", {"prompt": "a little cat", "width": 1024, "height": 1024, "model": "Qubico/flux1-dev"}),
        ("flux_txt2img", {"prompt": "four lighthouses at dusk", "batch_size": 2, "width": 768, "height": 512}),
        ("flux_img2img", {"prompt": "the same portrait as an oil painting", "image": inputs["photo"]}),
        ("flux_txt2img_lora", {"prompt": "spiderman", "lora_type": "mjv6", "width": 768, "height": 768}),
        ("flux_img2img_lora", {"prompt": "anime version", "image": inputs["photo"], "lora_type": "anime"}),
        ("flux_fill_inpaint", {"prompt": "a girl in a blue and red skirt", "image": inputs["masked"]}),
        (
            "flux_fill_outpaint",
            {"prompt": "a girl in a great grass sea", "image": inputs["photo"], "outpaint_left": 256,
             "outpaint_right": 256},
        ),
        ("flux_redux_variation", {"prompt": "a superman", "image": inputs["photo"]}),
        (
            "flux_controlnet_lora",
            {"prompt": "a girl in city, futuristic", "control_type": "canny", "control_image": inputs["photo"],
             "control_strength": 0.45, "lora_type": "graphic-portrait", "width": 768, "height": 768},
        ),
    ]  # fmt: skip


def _line(result: Any) -> str:
    s = result.structured_content or {}
    images = s.get("images") or []
    status = "ERROR " + (s.get("error") or {}).get("message", "") if result.is_error else s.get("status")
    again = " (re-attached)" if s.get("reattached") else ""
    return f"{status:<10} task {s.get('task_id')}  {len(images)} image(s){again}" + "".join(
        f"\n      {i.get('path') or i.get('url')}" for i in images
    )


def _fresh_run_folder(base: Path) -> Path:
    """A new folder under `base` for this run's images, ledger and inputs: a run never sees an
    earlier run's tasks, so nothing it does re-attaches to them."""
    stamp = time.strftime("run-%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        folder = base / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            continue
        return folder
    raise AssertionError("unreachable")


async def run_demo(output_dir: str = "demo-output") -> int:
    base = Path(await anyio.Path(output_dir).absolute())
    out = await anyio.to_thread.run_sync(_fresh_run_folder, base)
    inputs = await anyio.to_thread.run_sync(_write_inputs, out / "inputs")
    print(f"piapi-flux-mcp demo - everything goes to {out}\n")
    failures = 0
    durations = {"Qubico/flux1-schnell": 0.6, "Qubico/flux1-dev": 1.0, "Qubico/flux1-dev-advanced": 1.5}
    async with running_simulator(durations=durations) as sim:
        env = {
            "PIAPI_BASE_URL": sim.base_url,
            "PIAPI_API_KEY": sim.api_key,
            "FLUX_MCP_OUTPUT_DIR": str(out / "images"),
            "FLUX_MCP_DATA_DIR": str(out / "data"),
            "FLUX_MCP_IMAGE_ROOTS": str(out),
            "FLUX_MCP_WAIT_SECONDS": "30",
        }
        params = StdioServerParameters(command=sys.executable, args=["-m", "flux_mcp"], env=env)
        print(f"simulator: {sim.base_url}   server: {sys.executable} -m flux_mcp (stdio)")
        async with Client(params) as client:
            tools = await client.list_tools()
            print(f"connected; {len(tools.tools)} tools: {', '.join(t.name for t in tools.tools)}\n")
            for name, args in _calls(inputs):
                started = time.monotonic()
                messages: list[str] = []

                async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                    messages.append(message or f"{progress}")  # noqa: B023 - consumed in this iteration

                result = await client.call_tool(name, args, progress_callback=on_progress)
                failures += bool(result.is_error)
                took = time.monotonic() - started
                print(f"{name:<22} {took:4.1f}s  {_line(result)}")
                if messages:
                    print(f"      progress: {' | '.join(messages[:4])}{' ...' if len(messages) > 4 else ''}")

            print("\nre-submitting the first request (same arguments) ...")
            again = await client.call_tool("flux_txt2img", _calls(inputs)[0][1])
            s = again.structured_content or {}
            print(f"      reattached={s.get('reattached')} task {s.get('task_id')} - no second charge")

            print("\na task that outlives its wait: wait_seconds=0.5, then flux_wait_task ...")
            sim.state.configure(durations={"Qubico/flux1-dev-advanced": 4.0})
            first = await client.call_tool(
                "flux_redux_variation", {"prompt": "a slow one", "image": inputs["photo"], "wait_seconds": 0.5}
            )
            task_id = (first.structured_content or {}).get("task_id")
            first_status = (first.structured_content or {}).get("status")
            print(f"      first call: {first_status} task {task_id}")
            if first_status != "processing":
                print("      (expected 'processing': the task should have outlived its 0.5 s wait)")
                failures += 1
            done = await client.call_tool("flux_wait_task", {"task_id": task_id, "wait_seconds": 30})
            print(f"      flux_wait_task: {_line(done)}")
            failures += bool(done.is_error)

            listed = await client.call_tool("flux_list_tasks", {"limit": 50})
            tasks = (listed.structured_content or {}).get("tasks", [])
            print(f"\nledger: {len(tasks)} tasks recorded in {out / 'data'}")
    print(f"\nimages and JSON sidecars: {out / 'images'}")
    print(f"browse them with their prompts: {sys.executable} -m flux_mcp gallery --data-dir {out / 'data'}")
    print("all tools completed" if not failures else f"{failures} call(s) failed")
    return 1 if failures else 0
