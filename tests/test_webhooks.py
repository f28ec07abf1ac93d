"""Webhook push in HTTP mode, over real loopback HTTP: the simulator delivers PiAPI-format webhooks
to the server's own receiver, and an MCP client talks to the same server over streamable HTTP.

Pinned: every create carries our `webhook_config`; the receiver's secret check, unknown task ids,
duplicates, out-of-order deliveries and oversized bodies; a waiting call woken at once (no GET);
a task whose call already returned a handle finished in the background, so `flux_wait_task`
answers at once; the secret made once and kept beside the ledger (mode 0600).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from conftest import until
from mcp import Client

from flux_mcp import lifecycle
from flux_mcp.http_app import build_http_app
from flux_mcp.settings import Settings
from flux_mcp.simulator import RunningSimulator, bind_socket, running_app, running_simulator
from flux_mcp.webhooks import SECRET_FILE, WEBHOOK_PATH, WebhookReceiver, webhook_secret

pytestmark = pytest.mark.anyio

SECRET = "test-webhook-secret"


@dataclass
class Hooked:
    sim: RunningSimulator
    url: str  # the MCP server's base URL (= FLUX_MCP_PUBLIC_URL)
    settings: Settings

    @property
    def hook(self) -> str:
        return self.url + WEBHOOK_PATH

    def gets(self, task_id: str) -> int:
        return sum(1 for e in self.sim.state.log if e["method"] == "GET" and e["task_id"] == task_id)

    async def post(self, body: bytes | dict[str, Any], secret: str | None = SECRET) -> httpx2.Response:
        headers = {"x-webhook-secret": secret} if secret is not None else {}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with httpx2.AsyncClient(timeout=5) as http:
            return await http.post(self.hook, content=content, headers=headers)


@pytest.fixture
async def hooked(tmp_path) -> AsyncIterator[Hooked]:
    async with running_simulator(durations={"schnell": 0.6, "dev": 3.0}) as sim:
        sim.state.configure(pending_seconds=0.05, webhook_retry_seconds=0.2)
        sock = bind_socket()
        port = sock.getsockname()[1]
        (tmp_path / "work").mkdir()
        settings = Settings(
            api_key=sim.api_key,
            base_url=sim.base_url,
            data_dir=tmp_path / "data",
            output_dir=tmp_path / "images",
            image_roots=[tmp_path / "work"],
            request_timeout_seconds=5,
            public_url=f"http://127.0.0.1:{port}",
            webhook_secret=SECRET,
            max_input_bytes=64 * 1024,
        )
        async with running_app(build_http_app(settings), sock=sock) as url:
            yield Hooked(sim, url, settings)


def structured(result: Any) -> dict[str, Any]:
    assert result.structured_content is not None, result
    body: dict[str, Any] = result.structured_content
    return body


async def call(hooked: Hooked, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    async with Client(f"{hooked.url}/mcp") as client:
        return structured(await client.call_tool(tool, args))


async def test_a_generation_returns_on_the_webhook_without_a_poll(hooked: Hooked) -> None:
    started = anyio.current_time()
    body = await call(hooked, "flux_txt2img", {"prompt": "pushed", "width": 256, "height": 256, "wait_seconds": 30})
    elapsed = anyio.current_time() - started
    assert body["status"] == "completed" and body["images"][0]["path"]
    assert Path(body["images"][0]["path"]).is_file()
    task = hooked.sim.state.tasks[body["task_id"]]
    assert task.request.config is not None and task.request.config.webhook_config is not None
    assert task.request.config.webhook_config.endpoint == hooked.hook
    assert task.request.config.webhook_config.secret == SECRET
    assert hooked.gets(body["task_id"]) == 0  # woken by the push: not one GET
    assert elapsed < 3.0  # the safety-net poll would come seconds later
    assert ("completed", "200") in [(w["status"], w["outcome"]) for w in hooked.sim.state.webhook_log]


async def test_a_call_that_returned_a_handle_is_finished_in_the_background(hooked: Hooked) -> None:
    handle = await call(hooked, "flux_txt2img", {"prompt": "later", "width": 256, "height": 256, "wait_seconds": 0})
    assert handle["status"] in ("pending", "processing")
    task_id = handle["task_id"]
    saved = hooked.settings.output_dir / f"{task_id}_0.png"
    await until(saved.is_file)  # no call is waiting: the receiver finished it
    gets_before = hooked.gets(task_id)
    body = await call(hooked, "flux_wait_task", {"task_id": task_id, "wait_seconds": 10})
    assert body["status"] == "completed" and body["images"][0]["path"] == str(saved)
    assert hooked.gets(task_id) == gets_before == 0  # answered from the ledger at once


async def test_a_task_finished_by_its_webhook_has_its_preview_ready_for_the_next_call(
    hooked: Hooked, monkeypatch: pytest.MonkeyPatch
) -> None:
    made_later: list[object] = []  # previews made from the file, after the save
    monkeypatch.setattr(lifecycle, "make_thumbnail", lambda *a, **k: made_later.append(a))
    handle = await call(
        hooked, "flux_txt2img", {"prompt": "shown later", "width": 256, "height": 256, "wait_seconds": 0}
    )
    saved = hooked.settings.output_dir / f"{handle['task_id']}_0.png"
    await until(saved.is_file)  # no call is waiting: the receiver saved it, with its preview
    async with Client(f"{hooked.url}/mcp") as client:
        result = await client.call_tool("flux_wait_task", {"task_id": handle["task_id"]})
    assert [c.type for c in result.content] == ["text", "image", "resource_link"]
    assert made_later == []


async def test_the_secret_is_checked_and_only_our_tasks_are_accepted(hooked: Hooked) -> None:
    hooked.sim.state.add_fault("webhook_drop", times=2)  # we deliver by hand below
    handle = await call(hooked, "flux_txt2img", {"prompt": "manual", "width": 256, "height": 256, "wait_seconds": 0})
    task_id = handle["task_id"]
    await anyio.sleep(0.7)
    data = hooked.sim.state.task_object(hooked.sim.state.tasks[task_id], hooked.sim.base_url)
    assert data["status"] == "completed"
    envelope = {"timestamp": 1, "data": data}

    assert (await hooked.post(envelope, secret=None)).status_code == 401
    assert (await hooked.post(envelope, secret="wrong")).status_code == 401
    assert (await hooked.post(envelope, secret=SECRET + "x")).status_code == 401
    stranger = {"timestamp": 1, "data": {**data, "task_id": "0b7c2e4e-not-ours"}}
    assert (await hooked.post(stranger)).status_code == 404
    assert (await hooked.post(b"not json")).status_code == 400
    assert (await hooked.post({"timestamp": 1})).status_code == 400
    assert (await hooked.post({"timestamp": 1, "data": {**data, "task_id": "../../etc"}})).status_code == 400
    # None of those touched the task.
    listed = await call(hooked, "flux_list_tasks", {})
    assert [t["status"] for t in listed["tasks"] if t["task_id"] == task_id] == [handle["status"]]

    accepted = await hooked.post(envelope)
    assert accepted.status_code == 200 and accepted.json() == {"status": "accepted"}
    saved = hooked.settings.output_dir / f"{task_id}_0.png"
    await until(saved.is_file)


async def test_duplicates_and_out_of_order_deliveries_are_no_ops(hooked: Hooked) -> None:
    hooked.sim.state.add_fault("webhook_drop", times=2)
    handle = await call(hooked, "flux_txt2img", {"prompt": "twice", "width": 256, "height": 256, "wait_seconds": 0})
    task_id = handle["task_id"]
    await anyio.sleep(0.7)
    done = hooked.sim.state.task_object(hooked.sim.state.tasks[task_id], hooked.sim.base_url)
    stale = {**done, "status": "pending", "output": None}
    stale["meta"] = {**done["meta"], "started_at": "0001-01-01T00:00:00Z", "ended_at": "0001-01-01T00:00:00Z"}

    assert (await hooked.post({"timestamp": 1, "data": done})).json() == {"status": "accepted"}
    assert (await hooked.post({"timestamp": 1, "data": done})).json() == {"status": "already known"}
    assert (await hooked.post({"timestamp": 0, "data": stale})).json() == {"status": "already known"}
    await until((hooked.settings.output_dir / f"{task_id}_0.png").is_file)
    body = await call(hooked, "flux_get_task", {"task_id": task_id})
    assert body["status"] == "completed"
    resource = await _history(hooked, task_id)
    assert [h["status"] for h in resource] == [handle["status"], "completed"]  # never moved back


async def _history(hooked: Hooked, task_id: str) -> list[dict[str, Any]]:
    async with Client(f"{hooked.url}/mcp") as client:
        contents = (await client.read_resource(f"flux://tasks/{task_id}")).contents
    record: dict[str, Any] = json.loads(contents[0].text)  # type: ignore[union-attr]
    history: list[dict[str, Any]] = record["history"]
    return history


async def test_oversized_bodies_are_refused(hooked: Hooked) -> None:
    receiver_cap = 2 * (hooked.settings.max_input_bytes * 4 // 3 + 64) + 1024 * 1024
    huge = b"{" + b" " * (receiver_cap + 10) + b"}"
    assert (await hooked.post(huge)).status_code == 413
    assert (await hooked.post(huge, secret="wrong")).status_code == 413  # refused before reading it

    async def chunks():  # no Content-Length: the cap holds while streaming
        for _ in range(receiver_cap // 65536 + 2):
            yield b" " * 65536

    async with httpx2.AsyncClient(timeout=5) as http:
        response = await http.post(hooked.hook, content=chunks(), headers={"x-webhook-secret": SECRET})
    assert response.status_code == 413


def test_the_secret_is_made_once_and_kept_beside_the_ledger(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path / "data", public_url="https://flux.example.org/")
    first = webhook_secret(settings)
    path = tmp_path / "data" / SECRET_FILE
    assert len(first) >= 32 and path.read_text().strip() == first
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert webhook_secret(settings) == first  # a restart, or another worker, reads the same one
    receiver = WebhookReceiver(settings)
    assert receiver.config == {"endpoint": "https://flux.example.org/webhooks/piapi", "secret": first}
    assert webhook_secret(Settings(data_dir=tmp_path / "data", webhook_secret=" mine ")) == "mine"


async def test_a_task_whose_create_was_uncertain_is_still_ours(hooked: Hooked) -> None:
    """A 5xx create answer that carried a task id leaves an `uncertain` entry holding that id: a
    webhook for it is PiAPI telling us what happened, so it is recorded."""
    from flux_mcp.ledger import TaskLedger

    ledger = TaskLedger(hooked.settings.ledger_path)
    reservation = await ledger.reserve(
        idempotency_key="key:uncertain",
        window_seconds=None,
        tool="flux_txt2img",
        task_type="txt2img",
        model="Qubico/flux1-schnell",
        request={},
        payload={},
        estimated_cost_usd=0.0015,
    )
    await ledger.mark_uncertain(reservation.entry.local_id, "502 from the gateway", task_id="5ec0e2a4-uncertain")
    failed = {
        "task_id": "5ec0e2a4-uncertain",
        "model": "Qubico/flux1-schnell",
        "task_type": "txt2img",
        "status": "failed",
        "error": {"code": 10000, "message": "task failed", "raw_message": ""},
    }
    assert (await hooked.post({"timestamp": 1, "data": failed})).json() == {"status": "accepted"}
    entry = await ledger.get("5ec0e2a4-uncertain")
    assert entry is not None and entry.status == "failed"


async def test_a_webhook_that_lands_before_the_wait_begins_still_ends_it(tmp_path, make_service) -> None:
    """The receiver recorded the task's end between the create answer and the call's subscription
    (it woke no one): the wait starts from the ledger's state, not from its first safety-net poll."""
    from flux_mcp.client import PiAPIClient
    from flux_mcp.ledger import TaskLedger
    from flux_mcp.lifecycle import TaskService

    async with running_simulator(durations={"schnell": 0.2}) as sim:
        settings = Settings(
            api_key=sim.api_key, base_url=sim.base_url, data_dir=tmp_path / "d", output_dir=tmp_path / "i"
        )
        async with PiAPIClient(sim.base_url, sim.api_key) as client, TaskLedger(tmp_path / "t.sqlite3") as ledger:
            plain = make_service(settings, client, ledger)
            service = TaskService(
                settings,
                client,
                ledger,
                store=plain.store,
                resolver=plain.resolver,
                webhook={"endpoint": "http://127.0.0.1:9/webhooks/piapi", "secret": SECRET},
            )
            request = await service.prepare("txt2img", {"prompt": "early", "width": 256, "height": 256})
            created = (await service.submit("flux_txt2img", request)).record
            await anyio.sleep(0.5)
            await ledger.record(await client.get_task(created.task_id))  # what the receiver writes
            sim.state.log.clear()
            with anyio.fail_after(3):  # the first safety-net poll of a push schedule comes later
                outcome = await service.wait(created.task_id, timeout=30, initial=created)
    assert outcome.record.status == "completed" and outcome.images[0].path
    assert [e for e in sim.state.log if e["method"] == "GET" and e["task_id"] == created.task_id] == []
