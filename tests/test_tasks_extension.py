"""The MCP Tasks extension (SEP-2663, `io.modelcontextprotocol/tasks`) on the wire.

A client that declares the extension on its request (2026-07-28 era) gets a task handle for a
task tool at once; `tasks/get` answers from the ledger and, once the task is done, carries the very
result the tool returns; `tasks/cancel` cancels at PiAPI; an unknown handle is -32602; a client
that did not declare the extension gets the ordinary result. In memory, over stdio (with a server
restart between the handle and `tasks/get`) and over streamable HTTP.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.to_thread
import pytest
from mcp import Client, MCPError, StdioServerParameters, stdio_client
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.types import CallToolResult, Request, RequestParams, Result
from pydantic import ConfigDict, Field, TypeAdapter
from test_end_to_end import free_port, server_env, stop_process, wait_until_listening

from flux_mcp import lifecycle

pytestmark = pytest.mark.anyio

EXTENSION = "io.modelcontextprotocol/tasks"
TERMINAL = {"completed", "failed", "cancelled"}


# --- a client side of the extension, as small as the spec allows ----------------------------------


class CreateTaskResult(Result):
    model_config = ConfigDict(extra="allow")

    result_type: Literal["task"] = "task"
    task_id: str
    status: str
    ttl_ms: int | None
    poll_interval_ms: int | None = None
    created_at: str
    last_updated_at: str


class TaskParams(RequestParams):
    task_id: str = Field(alias="taskId")


class TaskRequest(Request[TaskParams, str]):
    name_param = "taskId"  # SEP-2663: tasks/* carry the task id in the Mcp-Name header over HTTP


async def task_request(client: Client, method: str, task_id: str) -> dict[str, Any]:
    request = TaskRequest(method=method, params=TaskParams(taskId=task_id))
    return await client.session.send_request(request, TypeAdapter(dict[str, Any]))


async def poll_until_done(client: Client, task_id: str, *, timeout: float = 20) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while (task := await task_request(client, "tasks/get", task_id))["status"] not in TERMINAL:
            await anyio.sleep(min(task["pollIntervalMs"], 200) / 1000)
    return task


class Tasks(ClientExtension):
    """Declares the extension; a task handle from `call_tool` is polled to its result."""

    identifier = EXTENSION

    def claims(self) -> list[ResultClaim[Any]]:
        return [ResultClaim(result_type="task", model=CreateTaskResult, resolve=self._finish)]

    async def _finish(self, created: CreateTaskResult, ctx: ClaimContext) -> CallToolResult:
        with anyio.fail_after(20):
            while True:
                request = TaskRequest(method="tasks/get", params=TaskParams(taskId=created.task_id))
                task = await ctx.session.send_request(request, TypeAdapter(dict[str, Any]))
                if task["status"] == "completed":
                    return CallToolResult.model_validate(task["result"])
                assert task["status"] == "working", task
                await anyio.sleep(task["pollIntervalMs"] / 1000)


async def call_as_task(client: Client, tool: str, args: dict[str, Any]) -> Any:
    """The raw answer to a task-augmented call: a `CreateTaskResult`, or an ordinary result."""
    return await client.session.call_tool(tool, args, allow_claimed=True)


def deletes(sim: Any) -> list[dict[str, Any]]:
    return [e for e in sim.state.log if e["method"] == "DELETE"]


def wire(result: CallToolResult) -> dict[str, Any]:
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)


# --- the whole contract, run over each transport ---------------------------------------------------


async def check_the_contract(tasks: Client, plain: Client, sim: Any) -> None:
    """`tasks` declares the extension, `plain` does not; both talk to servers on one ledger."""
    sim.state.configure(durations={"Qubico/flux1-schnell": 1.0})
    created = await call_as_task(tasks, "flux_txt2img", {"prompt": "a handle at once", "width": 256, "height": 256})
    assert isinstance(created, CreateTaskResult), created
    assert created.status == "working" and created.ttl_ms is None and created.poll_interval_ms > 0
    assert created.task_id in sim.state.tasks  # the handle is PiAPI's task id, in the ledger before the answer

    running = await task_request(tasks, "tasks/get", created.task_id)
    assert running["status"] == "working" and "result" not in running

    done = await poll_until_done(tasks, created.task_id)
    assert done["status"] == "completed" and done["taskId"] == created.task_id
    result = CallToolResult.model_validate(done["result"])
    assert result.is_error is False and result.structured_content["status"] == "completed"
    assert Path(result.structured_content["images"][0]["path"]).is_file()
    assert result.structured_content["estimated_cost_usd"] == 0.0015  # the task tool's own result
    # flux_get_task reads back the same task (it does not know the price, the rest is equal).
    again = await plain.call_tool("flux_get_task", {"task_id": created.task_id})
    varying = {"spent_today_usd": 0, "estimated_cost_usd": 0}
    assert {**again.structured_content, **varying} == {**result.structured_content, **varying}
    assert [c.type for c in again.content] == [c.type for c in result.content]

    # A client that did not declare the extension gets the ordinary, waited-for result.
    ordinary = await plain.call_tool("flux_txt2img", {"prompt": "no extension", "width": 256, "height": 256})
    assert ordinary.structured_content["status"] == "completed"
    # ... and tasks/get of that task is exactly that result: one way of building results.
    same = await task_request(tasks, "tasks/get", ordinary.structured_content["task_id"])
    assert same["status"] == "completed" and same["result"]["structuredContent"] == ordinary.structured_content
    assert same["result"]["content"] == wire(ordinary)["content"]

    # tasks/cancel is a cancel at PiAPI (which cancels only pending tasks).
    sim.state.configure(pending_seconds=30)
    pending = await call_as_task(tasks, "flux_txt2img", {"prompt": "cancel me", "width": 256, "height": 256})
    assert isinstance(pending, CreateTaskResult)
    await task_request(tasks, "tasks/cancel", pending.task_id)  # an empty acknowledgement
    assert [e["path"] for e in deletes(sim)] == [f"/api/v1/task/{pending.task_id}"]
    cancelled = await task_request(tasks, "tasks/get", pending.task_id)
    assert cancelled["status"] == "cancelled" and "result" not in cancelled

    # An unknown handle is a protocol error (SEP-2663: -32602), for get and cancel alike.
    for method in ("tasks/get", "tasks/cancel"):
        with pytest.raises(MCPError) as info:
            await task_request(tasks, method, "0b0e6a8c-0000-4000-8000-000000000000")
        assert info.value.error.code == -32602


# --- in memory -----------------------------------------------------------------------------------


async def test_the_contract_in_memory(server, sim):
    async with Client(server, extensions=[Tasks()]) as tasks, Client(server) as plain:
        assert tasks.server_capabilities.extensions is not None
        assert EXTENSION in tasks.server_capabilities.extensions
        await check_the_contract(tasks, plain, sim)


async def test_tasks_get_shows_the_preview_made_while_saving(server, sim, monkeypatch):
    made_later: list[object] = []  # previews made from the file, after the save
    monkeypatch.setattr(lifecycle, "make_thumbnail", lambda *a, **k: made_later.append(a))
    sim.state.configure(durations={"Qubico/flux1-schnell": 0.3})
    async with Client(server, extensions=[Tasks()]) as tasks:
        created = await call_as_task(tasks, "flux_txt2img", {"prompt": "a handle", "width": 256, "height": 256})
        assert isinstance(created, CreateTaskResult)
        done = await poll_until_done(tasks, created.task_id)
    assert [c["type"] for c in done["result"]["content"]] == ["text", "image", "resource_link"]
    assert made_later == []


async def test_a_client_speaking_the_extension_gets_the_final_result_from_call_tool(server, sim):
    async with Client(server, extensions=[Tasks()]) as client:
        result = await client.call_tool("flux_txt2img", {"prompt": "driven by the claim", "width": 256})
    assert result.structured_content["status"] == "completed"
    assert Path(result.structured_content["images"][0]["path"]).is_file()


@pytest.mark.parametrize(
    "args", [{"prompt": "x", "dry_run": True}, {"prompt": "x", "guidance_scale": 9}], ids=["dry run", "bad argument"]
)
async def test_nothing_to_wait_for_is_answered_directly_even_to_a_task_client(server, sim, args):
    async with Client(server, extensions=[Tasks()]) as client:
        result = await call_as_task(client, "flux_txt2img", args)
    assert isinstance(result, CallToolResult)
    assert sim.state.log == []


async def test_legacy_era_clients_never_get_a_task(server, sim):
    async with Client(server, mode="legacy", extensions=[Tasks()]) as client:
        result = await call_as_task(client, "flux_txt2img", {"prompt": "legacy", "width": 256})
    assert isinstance(result, CallToolResult) and result.structured_content["status"] == "completed"


async def test_management_tools_are_never_tasks(server, sim):
    async with Client(server, extensions=[Tasks()]) as client:
        result = await call_as_task(client, "flux_list_tasks", {})
    assert isinstance(result, CallToolResult)


async def test_task_tool_descriptions_state_how_long_handles_live(server):
    async with Client(server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert "task_id never expires" in tools["flux_txt2img"].description


# --- over stdio, with a restart between the handle and tasks/get -----------------------------------


def stdio_params(sim: Any, tmp_path: Path) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "flux_mcp"], env=server_env(sim, tmp_path))


@pytest.mark.slow
async def test_the_contract_over_stdio_and_across_a_restart(sim, tmp_path):
    (tmp_path / "work").mkdir()
    params = stdio_params(sim, tmp_path)
    with (tmp_path / "stdio.stderr").open("w") as errlog:
        sim.state.configure(pending_seconds=0.02, durations={"Qubico/flux1-schnell": 2.0})
        async with Client(stdio_client(params, errlog=errlog), extensions=[Tasks()]) as first:
            created = await call_as_task(first, "flux_txt2img", {"prompt": "outlives its server", "width": 256})
        assert isinstance(created, CreateTaskResult)  # the first server process has exited
        async with (
            Client(stdio_client(params, errlog=errlog), extensions=[Tasks()]) as tasks,
            Client(stdio_client(params, errlog=errlog)) as plain,
        ):
            done = await poll_until_done(tasks, created.task_id)
            assert done["status"] == "completed"
            assert Path(done["result"]["structuredContent"]["images"][0]["path"]).is_file()
            await check_the_contract(tasks, plain, sim)


# --- over streamable HTTP --------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_contract_over_http(sim, tmp_path):
    (tmp_path / "work").mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(server_env(sim, tmp_path), NO_PROXY="127.0.0.1,localhost")
    command = [sys.executable, "-m", "flux_mcp", "serve", "--transport", "http", "--port", str(port)]
    errlog_path = tmp_path / "http.stderr"
    with errlog_path.open("wb") as errlog:
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog)
        try:
            await wait_until_listening(port, proc)
            url = f"http://127.0.0.1:{port}/mcp"
            async with Client(url, extensions=[Tasks()]) as tasks, Client(url) as plain:
                await check_the_contract(tasks, plain, sim)
        except BaseException:
            sys.stderr.write(f"--- http server output ---\n{errlog_path.read_text()}\n")
            raise
        finally:
            await anyio.to_thread.run_sync(stop_process, proc)
