"""FLUX_MCP_MAX_CONCURRENT_TASKS: past the limit, requests wait their turn locally.

Spec: with a limit of 1, calls made together reach PiAPI one after the other in the order they
came; a waiting call says so in its progress ("queued locally, N ahead") before anything is
sent; a call abandoned while queued sends nothing and leaves nothing behind; a server that dies
while requests wait leaves them in the ledger, and a repeat of the request after a restart
submits it exactly once.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import textwrap

import anyio
import pytest
from mcp.client import Client

from flux_mcp.server import create_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def limited(settings):
    return settings.model_copy(update={"max_concurrent_tasks": 1})


def creates(sim) -> list[str]:
    """Prompts in the order PiAPI (the simulator) received their create requests."""
    ordered = sorted(sim.state.tasks.values(), key=lambda t: t.created)
    return [t.raw_input["prompt"] for t in ordered]


async def test_calls_past_the_limit_reach_piapi_one_at_a_time_in_arrival_order(sim, limited, fast_options):
    sim.state.configure(durations={"Qubico/flux1-schnell": 0.3})
    progress: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    results = {}

    async def call(client, prompt):
        async def on_progress(value, total, message):
            progress[prompt].append(message)

        results[prompt] = await client.call_tool(
            "flux_txt2img", {"prompt": prompt, "include_image": "none"}, progress_callback=on_progress
        )

    async with Client(create_server(limited, fast_options)) as client, anyio.create_task_group() as tg:
        for prompt in ("a", "b", "c"):
            tg.start_soon(call, client, prompt)
            await anyio.sleep(0.05)  # arrival order a, b, c
    assert creates(sim) == ["a", "b", "c"]
    assert all(r.structured_content["status"] == "completed" for r in results.values())
    tasks = sorted(sim.state.tasks.values(), key=lambda t: t.created)
    for earlier, later in itertools.pairwise(tasks):  # never two running at once
        assert later.created >= earlier.created + earlier.pending_seconds + earlier.duration - 0.01
    assert progress["a"][0].startswith("pending")
    assert progress["b"][0].startswith("queued locally, 0 ahead")
    assert progress["c"][0].startswith("queued locally, 1 ahead")
    assert "nothing sent yet" in progress["c"][0]
    assert any(m.startswith("queued locally, 0 ahead") for m in progress["c"])
    assert progress["c"][-1].startswith("completed")


async def test_a_call_cancelled_while_queued_sends_nothing_and_leaves_nothing(sim, limited, fast_options):
    sim.state.configure(durations={"Qubico/flux1-schnell": 1.0})
    server = create_server(limited, fast_options)
    async with Client(server) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.call_tool, "flux_txt2img", {"prompt": "running", "include_image": "none"})
            await anyio.sleep(0.2)
            queued_seen = anyio.Event()

            async def on_progress(value, total, message):
                if message.startswith("queued locally"):
                    queued_seen.set()

            async def abandoned():
                with anyio.move_on_after(5):
                    await client.call_tool("flux_txt2img", {"prompt": "abandoned"}, progress_callback=on_progress)

            async with anyio.create_task_group() as inner:
                inner.start_soon(abandoned)
                with anyio.fail_after(5):
                    await queued_seen.wait()
                inner.cancel_scope.cancel()
        listed = await client.call_tool("flux_list_tasks", {})
    assert creates(sim) == ["running"]
    assert [t["prompt"] for t in listed.structured_content["tasks"]] == ["running"]


async def test_waiting_calls_of_two_servers_share_one_limit(sim, limited, fast_options):
    """Two servers on one ledger (as two processes would be) never run more than the limit together."""
    sim.state.configure(durations={"Qubico/flux1-schnell": 0.3})
    async with (
        Client(create_server(limited, fast_options)) as one,
        Client(create_server(limited, fast_options)) as two,
        anyio.create_task_group() as tg,
    ):
        for n, client in enumerate([one, two, one, two]):
            tg.start_soon(client.call_tool, "flux_txt2img", {"prompt": f"p{n}", "include_image": "none"})
    tasks = sorted(sim.state.tasks.values(), key=lambda t: t.created)
    assert len(tasks) == 4
    for earlier, later in itertools.pairwise(tasks):
        assert later.created >= earlier.created + earlier.pending_seconds + earlier.duration - 0.01


SERVER = textwrap.dedent(
    """
    import sys
    from flux_mcp.cli import main
    main(["serve"])
    """
)


@pytest.mark.slow
async def test_requests_queued_when_the_server_died_are_submitted_once_by_a_repeat(sim, tmp_path):
    sim.state.configure(durations={"Qubico/flux1-schnell": 2.0})
    env = {
        **os.environ,
        "PIAPI_API_KEY": sim.api_key,
        "PIAPI_BASE_URL": sim.base_url,
        "FLUX_MCP_MAX_CONCURRENT_TASKS": "1",
        "FLUX_MCP_DATA_DIR": str(tmp_path / "data"),
        "FLUX_MCP_OUTPUT_DIR": str(tmp_path / "images"),
    }
    from mcp.client.stdio import StdioServerParameters

    params = StdioServerParameters(command=sys.executable, args=["-c", SERVER], env=env)
    queued_seen = anyio.Event()

    async def on_progress(value, total, message):
        if message.startswith("queued locally"):
            queued_seen.set()

    async def call(client, prompt, **kwargs):
        with anyio.move_on_after(30):
            await client.call_tool("flux_txt2img", {"prompt": prompt, "include_image": "none"}, **kwargs)

    pid_file = tmp_path / "pid"
    params.args = ["-c", f"import os; open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n{SERVER}"]
    async with Client(params) as first, anyio.create_task_group() as tg:
        tg.start_soon(call, first, "running")
        with anyio.fail_after(20):  # its create reached PiAPI (a first call loads the core first)
            while not creates(sim):
                await anyio.sleep(0.02)
        tg.start_soon(lambda: call(first, "waiting", progress_callback=on_progress))
        with anyio.fail_after(10):
            await queued_seen.wait()
        os.kill(int(pid_file.read_text()), signal.SIGKILL)  # dies while "waiting" waits its turn
        tg.cancel_scope.cancel()
    assert creates(sim) == ["running"]

    params.args = ["-c", SERVER]
    async with Client(params) as second:
        listed = await second.call_tool("flux_list_tasks", {})
        waiting = [t for t in listed.structured_content["tasks"] if t["prompt"] == "waiting"]
        assert [t["submit_state"] for t in waiting] == ["queued"]  # kept, not lost
        result = await second.call_tool("flux_txt2img", {"prompt": "waiting", "include_image": "none"})
        assert result.structured_content["status"] == "completed"
        again = await second.call_tool("flux_txt2img", {"prompt": "waiting", "include_image": "none"})
        assert again.structured_content["reattached"] is True
    assert creates(sim) == ["running", "waiting"]  # submitted once, after the restart
