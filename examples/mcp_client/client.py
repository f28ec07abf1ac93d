"""The official MCP Python client against piapi-flux-mcp over stdio: no framework, no LLM.

Shows the four things a host does with this server:
1. call a task tool and follow its progress notifications (the first one names the task id);
2. resume a task that outlived its `wait_seconds` with `flux_wait_task` (it is never re-submitted);
3. read a task's ledger record and an image through the `flux://` resources;
4. list what the ledger holds (`flux_list_tasks`).

    pip install -r requirements.txt
    python client.py

Runs against the built-in simulator (`--simulate`): no key, no cost. For real images set
`PIAPI_API_KEY` and drop `--simulate`. `PIAPI_FLUX_MCP` overrides the command that starts the
server (default `uvx piapi-flux-mcp`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
from pathlib import Path

from mcp import Client, StdioServerParameters

SERVER = shlex.split(os.environ.get("PIAPI_FLUX_MCP", "uvx piapi-flux-mcp"))


async def show_progress(progress: float, total: float | None, message: str | None) -> None:
    print(f"  progress {progress:5.1f}: {message}")


async def main() -> None:
    params = StdioServerParameters(command=SERVER[0], args=[*SERVER[1:], "--simulate"], env=dict(os.environ))
    async with Client(params) as client:
        tools = await client.list_tools()
        print(f"{len(tools.tools)} tools: {', '.join(tool.name for tool in tools.tools)}")

        print("1. flux_txt2img, with progress")
        first = await client.call_tool(
            "flux_txt2img",
            {"prompt": "a tiny robot watering a bonsai", "width": 768, "height": 768, "include_image": "none"},
            progress_callback=show_progress,
        )
        done = first.structured_content
        print(f"  {done['status']}: {done['images'][0]['path']}")

        print("2. a variation that outlives a 0.2 s wait, then flux_wait_task")
        started = await client.call_tool(
            "flux_redux_variation",
            {"prompt": "the same robot, at night", "image": done["images"][0]["path"], "wait_seconds": 0.2},
        )
        task_id = started.structured_content["task_id"]
        print(f"  first answer: {started.structured_content['status']} (task {task_id})")
        resumed = await client.call_tool(
            "flux_wait_task", {"task_id": task_id, "wait_seconds": 60}, progress_callback=show_progress
        )
        print(f"  flux_wait_task: {resumed.structured_content['status']}")

        print("3. the resources")
        record = await client.read_resource(f"flux://tasks/{task_id}")
        history = json.loads(record.contents[0].text)["history"]
        print(f"  flux://tasks/{task_id}: {' -> '.join(step['status'] for step in history)}")
        image = await client.read_resource(f"flux://tasks/{task_id}/images/0")
        print(f"  flux://tasks/{task_id}/images/0: {len(image.contents[0].blob)} base64 characters")

        print("4. the ledger")
        listed = await client.call_tool("flux_list_tasks", {"limit": 5})
        for task in listed.structured_content["tasks"]:
            print(f"  {task['task_id']}  {task['task_type']:<16} {task['status']}")

        saved = [Path(i["path"]) for r in (first, resumed) for i in r.structured_content["images"]]
        print("saved:", *saved, sep="\n  ")


if __name__ == "__main__":
    asyncio.run(main())
