"""State that cannot lie: simulated tasks never stand in for real ones, an uncertain create is never
re-sent, a task id seen in any answer is kept, a task PiAPI forgot is `lost` at once, and secrets
PiAPI echoes never come back out. All against the simulator over loopback."""

from __future__ import annotations

import time

import pytest
from mcp import Client

from flux_mcp import errors
from flux_mcp.catalog import TaskType
from flux_mcp.client import PiAPIClient
from flux_mcp.ledger import TaskLedger
from flux_mcp.lifecycle import idempotency_slot
from flux_mcp.parameters import build_request
from flux_mcp.server import create_server

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ledger_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def service(sim, settings, ledger_clock, make_service):
    async with PiAPIClient(sim.base_url, sim.api_key, timeout_seconds=2) as client:
        async with TaskLedger(settings.ledger_path, clock=ledger_clock) as ledger:
            yield make_service(settings, client, ledger)


def count(sim, method: str) -> int:
    return sum(1 for e in sim.state.log if e["method"] == method)


# --- item 7: simulated and real state never mix ---------------------------------------------------


async def test_a_simulated_task_is_never_reattached_or_listed_for_a_real_call(settings, fast_options, sim):
    args = {"prompt": "the same request twice", "wait_seconds": 10}
    simulated = settings.model_copy(update={"simulate": True})
    async with Client(create_server(simulated, fast_options)) as client:
        fake = await client.call_tool("flux_txt2img", args)
    assert fake.structured_content["status"] == "completed"
    fake_path = fake.structured_content["images"][0]["path"]
    assert fake_path.startswith(str(settings.output_dir / "simulator"))

    # The same call, now against "real" PiAPI (the fixture simulator stands in for it).
    async with Client(create_server(settings, fast_options)) as client:
        real = await client.call_tool("flux_txt2img", args)
        listed = await client.call_tool("flux_list_tasks", {})
    assert count(sim, "POST") == 1  # really sent, not re-attached to the placeholder
    assert real.structured_content["reattached"] is False
    assert real.structured_content["task_id"] != fake.structured_content["task_id"]
    assert not real.structured_content["images"][0]["path"].startswith(str(settings.output_dir / "simulator"))
    assert [t["task_id"] for t in listed.structured_content["tasks"]] == [real.structured_content["task_id"]]


def test_the_backend_is_part_of_the_idempotency_slot():
    real, sim = "https://api.piapi.ai", "http://127.0.0.1:8089"
    for key in (None, "k"):
        assert idempotency_slot(real, "flux_txt2img", "f" * 64, key) != idempotency_slot(
            sim, "flux_txt2img", "f" * 64, key
        )


# --- item 8: an uncertain create is never re-sent by a repeat -------------------------------------


@pytest.mark.parametrize("window", [600.0, 0.0])
async def test_an_uncertain_create_is_refused_after_the_window_and_a_clock_jump(
    service, sim, settings, ledger_clock, window
):
    service.settings = settings.model_copy(update={"idempotency_window_seconds": window})
    request = build_request(TaskType.TXT2IMG, {"prompt": "behind a flaky gateway"})
    sim.state.add_fault("http_error", status=504, method="POST")
    with pytest.raises(errors.SubmitUncertainError):
        await service.submit("flux_txt2img", request)
    for jump in (window + 1, 86_400 * 365):
        ledger_clock.now += jump
        with pytest.raises(errors.SubmitUncertainError, match="not sent again") as info:
            await service.submit("flux_txt2img", request)
        assert "new idempotency_key" in info.value.hint
    assert count(sim, "POST") == 1
    # The caller decides: a new idempotency_key submits.
    fresh = await service.submit("flux_txt2img", request, idempotency_key="on-purpose")
    assert fresh.record.task_id and count(sim, "POST") == 2


# --- item 9: a task id in a failed create answer is kept first ------------------------------------


async def test_a_task_id_in_a_5xx_create_answer_is_in_the_ledger_and_resumable(service, sim):
    sim.state.add_fault("create_error", status=502)
    request = build_request(TaskType.TXT2IMG, {"prompt": "created behind a 502"})
    with pytest.raises(errors.SubmitUncertainError) as info:
        await service.submit("flux_txt2img", request)
    (task_id,) = sim.state.tasks
    assert info.value.task_id == task_id
    entry = await service.ledger.get(task_id)
    assert entry is not None and entry.submit_state == "uncertain"
    (listed,) = await service.ledger.list(status="uncertain")
    assert listed.task_id == task_id
    # A repeat is refused but names the task; the task itself can be finished.
    with pytest.raises(errors.SubmitUncertainError) as again:
        await service.submit("flux_txt2img", request)
    assert again.value.task_id == task_id and task_id in again.value.message
    outcome = await service.wait(task_id, timeout=10)
    assert outcome.record.status == "completed" and outcome.images[0].path
    assert count(sim, "POST") == 1


# --- item 10: a task PiAPI no longer knows is lost, at once ---------------------------------------


async def _forgotten_task(service, sim) -> str:
    sim.state.configure(pending_seconds=60)
    submission = await service.submit("flux_txt2img", build_request(TaskType.TXT2IMG, {"prompt": "forgotten"}))
    sim.state.tasks.clear()  # PiAPI forgets it
    return submission.record.task_id


async def test_get_reports_a_forgotten_task_as_lost_after_one_recheck(service, sim):
    task_id = await _forgotten_task(service, sim)
    outcome = await service.get(task_id)
    assert outcome.record.status == "lost" and "no longer knows" in outcome.record.error.message
    assert count(sim, "GET") == 2  # the GET and one immediate re-check
    assert (await service.ledger.get(task_id)).status == "lost"


async def test_wait_ends_at_once_on_a_forgotten_task(service, sim):
    task_id = await _forgotten_task(service, sim)
    started = time.monotonic()
    outcome = await service.wait(task_id, timeout=20)
    assert outcome.record.status == "lost"
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("tool", ["flux_get_task", "flux_wait_task", "flux_cancel_task"])
async def test_every_tool_says_lost_with_a_hint_never_still_running(server, sim, tool):
    sim.state.configure(pending_seconds=60)
    async with Client(server) as client:
        created = await client.call_tool("flux_txt2img", {"prompt": "soon forgotten", "wait_seconds": 0})
        task_id = created.structured_content["task_id"]
        assert created.structured_content["status"] == "pending"
        sim.state.tasks.clear()
        result = await client.call_tool(tool, {"task_id": task_id})
    body = result.structured_content
    assert result.is_error is True
    assert body["status"] == "lost" and body["task_id"] == task_id
    assert body["error"]["category"] == "task_lost" and "dashboard" in body["error"]["hint"]
    text = result.content[0].text
    assert "Still running" not in text and "flux_wait_task" not in (body.get("next_step") or "")


async def test_a_simulated_task_pending_when_the_process_exited_is_lost_afterwards(settings, fast_options):
    simulated = settings.model_copy(update={"simulate": True})
    async with Client(create_server(simulated, fast_options)) as client:
        created = await client.call_tool("flux_txt2img", {"prompt": "left behind", "wait_seconds": 0})
    task_id = created.structured_content["task_id"]
    assert created.structured_content["status"] in ("pending", "processing")
    async with Client(create_server(simulated, fast_options)) as client:  # a new process, a new simulator
        result = await client.call_tool("flux_wait_task", {"task_id": task_id, "wait_seconds": 30})
        listed = await client.call_tool("flux_list_tasks", {"status": "lost"})
    assert result.structured_content["status"] == "lost"
    assert [t["task_id"] for t in listed.structured_content["tasks"]] == [task_id]


# --- item 5: secrets PiAPI echoes are scrubbed before anything returns, logs or stores them --------


async def test_a_task_error_echoing_the_key_and_webhook_secret_is_scrubbed_everywhere(
    sim, settings, fast_options, caplog
):
    from pydantic import SecretStr

    from flux_mcp.server import create_server

    secret = "hook-s3cr3t-value"
    echo = {"message": f"bad key {sim.api_key} / {secret}", "raw_message": f"x-api-key={sim.api_key}"}
    sim.state.add_fault("fail_next", **echo)
    hooked = {"webhook_endpoint": "https://hooks.example/x", "webhook_secret": SecretStr(secret)}
    server = create_server(settings.model_copy(update=hooked), fast_options)
    args = {"prompt": "echo"}
    caplog.set_level("DEBUG")
    async with Client(server) as client:
        result = await client.call_tool("flux_txt2img", args)
        task_id = result.structured_content["task_id"]
        listed = await client.call_tool("flux_list_tasks", {})
        again = await client.call_tool("flux_get_task", {"task_id": task_id})
        record = (await client.read_resource(f"flux://tasks/{task_id}")).contents[0].text
    assert result.structured_content["status"] == "failed"
    assert "bad key ***" in result.structured_content["error"]["message"]
    ledger = b"".join(p.read_bytes() for p in settings.data_dir.glob("tasks.sqlite3*")).decode("latin-1")
    assert "bad key" in ledger  # the check below reads the right files
    seen = [str(result.model_dump()), str(listed.model_dump()), str(again.model_dump()), record, ledger, caplog.text]
    for text in seen:
        assert sim.api_key not in text and secret not in text
