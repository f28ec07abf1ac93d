"""TaskService against the simulator: the never-twice rules where processes die or answers break."""

from __future__ import annotations

import functools
import socket
import sqlite3
import subprocess
import sys

import pytest

from flux_mcp import errors
from flux_mcp.catalog import TaskType
from flux_mcp.client import PiAPIClient
from flux_mcp.ledger import SCHEMA_VERSION, TaskLedger, fingerprint
from flux_mcp.lifecycle import TaskService, idempotency_slot
from flux_mcp.parameters import build_request

pytestmark = pytest.mark.anyio


@pytest.fixture
async def service(sim, settings, make_service):
    async with PiAPIClient(sim.base_url, sim.api_key, timeout_seconds=2) as client:
        async with TaskLedger(settings.ledger_path) as ledger:
            yield make_service(settings, client, ledger)


def posts(sim) -> int:
    return sum(1 for e in sim.state.log if e["method"] == "POST")


async def test_a_gateway_error_on_create_is_uncertain_and_the_repeat_is_refused(service, sim):
    request = build_request(TaskType.TXT2IMG, {"prompt": "behind a gateway"})
    sim.state.add_fault("http_error", status=502, method="POST")
    with pytest.raises(errors.SubmitUncertainError):
        await service.submit("flux_txt2img", request)
    with pytest.raises(errors.SubmitUncertainError, match="unknown outcome"):
        await service.submit("flux_txt2img", request)
    assert posts(sim) == 1
    (entry,) = await service.ledger.list(status="uncertain")
    assert entry.submit_state == "uncertain" and entry.task_id is None


async def test_a_reservation_left_by_a_dead_process_turns_uncertain_at_once(service, sim):
    request = build_request(TaskType.TXT2IMG, {"prompt": "orphaned create"})
    payload = request.to_payload()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    # What a server killed between its reservation and PiAPI's answer leaves behind.
    await service.ledger.reserve(
        idempotency_key=idempotency_slot(service.client.base_url, "flux_txt2img", fingerprint(payload), None),
        window_seconds=600,
        tool="flux_txt2img",
        task_type="txt2img",
        model=request.model.value,
        request={"prompt": "orphaned create"},
        payload=payload,
        estimated_cost_usd=request.estimated_cost_usd,
        owner=f"{socket.gethostname()}:{dead.pid}:00000000",
    )
    with pytest.raises(errors.SubmitUncertainError, match="unknown outcome"):
        await service.submit("flux_txt2img", request)  # no 30 s wait for a process that is gone
    assert posts(sim) == 0
    (entry,) = await service.ledger.list(status="uncertain")
    assert entry.submit_state == "uncertain"


async def test_the_ledger_keeps_the_tool_arguments_and_the_payload(service):
    args = {"prompt": "kept", "width": 512, "height": 512}
    request = build_request(TaskType.TXT2IMG, args)
    submission = await service.submit("flux_txt2img", request, arguments=args)
    entry = await service.ledger.get(submission.record.task_id)
    assert entry.request == args
    assert entry.payload == request.to_payload()
    assert entry.fingerprint == fingerprint(request.to_payload())


async def test_a_version_1_ledger_is_migrated_in_place(tmp_path):
    path = tmp_path / "old.sqlite3"
    from flux_mcp.ledger import _MIGRATIONS

    with sqlite3.connect(path) as conn:
        conn.executescript(_MIGRATIONS[1])
        conn.execute(
            "INSERT INTO tasks (local_id, task_id, tool, task_type, model, submit_state, status, created_at, "
            "updated_at) VALUES ('l1', 't-old', 'flux_txt2img', 'txt2img', 'Qubico/flux1-schnell', 'submitted', "
            "'completed', 1, 1)"
        )
        conn.execute("PRAGMA user_version = 1")
    async with TaskLedger(path) as ledger:
        entry = await ledger.get("t-old")
    assert entry is not None and entry.status == "completed" and entry.submit_owner is None
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_a_create_that_outlives_its_shielded_deadline_is_uncertain(service, sim, monkeypatch):
    monkeypatch.setattr(TaskService, "_create_deadline_seconds", property(lambda self: 0.3))
    sim.state.add_fault("create_late", delay=2.0)
    request = build_request(TaskType.TXT2IMG, {"prompt": "slow upload"})
    with pytest.raises(errors.SubmitUncertainError, match="took longer"):
        await service.submit("flux_txt2img", request)
    (entry,) = await service.ledger.list(status="uncertain")
    assert entry.submit_state == "uncertain"


async def test_a_ledger_failure_after_the_create_keeps_the_task_id(service, sim, monkeypatch):
    async def broken_attach(local_id, record):
        raise errors.StorageError("database is locked")

    monkeypatch.setattr(service.ledger, "attach", broken_attach)
    with pytest.raises(errors.StorageError) as info:
        await service.submit("flux_txt2img", build_request(TaskType.TXT2IMG, {"prompt": "unrecorded"}))
    (task_id,) = sim.state.tasks
    assert info.value.task_id == task_id and task_id in info.value.message


async def test_a_cancel_that_arrives_while_reserving_sends_nothing(service, sim, monkeypatch):
    import anyio

    real_reserve = service.ledger.reserve

    async def slow_reserve(**kwargs):
        with anyio.CancelScope(shield=True):  # like the worker thread: cannot be interrupted
            await anyio.sleep(0.3)
        return await real_reserve(**kwargs)

    monkeypatch.setattr(service.ledger, "reserve", slow_reserve)
    with anyio.move_on_after(0.1):
        await service.submit("flux_txt2img", build_request(TaskType.TXT2IMG, {"prompt": "never mind"}))
    assert posts(sim) == 0
    assert await service.ledger.list() == []  # the reservation was released


async def test_a_reservation_far_older_than_any_create_is_settled_whoever_owns_it(service, sim, settings):
    import time

    request = build_request(TaskType.TXT2IMG, {"prompt": "owned elsewhere"})
    payload = request.to_payload()
    async with TaskLedger(settings.ledger_path, clock=lambda: time.time() - 3600) as old:
        await old.reserve(
            idempotency_key=idempotency_slot(service.client.base_url, "flux_txt2img", fingerprint(payload), None),
            window_seconds=None,
            tool="flux_txt2img",
            task_type="txt2img",
            model=request.model.value,
            request={},
            payload=payload,
            estimated_cost_usd=0.0015,
            owner="another-host:1:00000000",  # cannot be probed from here
        )
    service.settings = settings.model_copy(update={"idempotency_window_seconds": 7200})
    with pytest.raises(errors.SubmitUncertainError, match="unknown outcome"):
        await service.submit("flux_txt2img", request)
    assert posts(sim) == 0


async def test_a_task_is_shown_while_any_of_its_callers_waits_to_show_it(service):
    showing = functools.partial(service.showing_previews, "t-1")
    with showing():
        with showing(), showing(wanted=False):
            assert "t-1" in service._showing
        assert "t-1" in service._showing  # the first caller still waits
        with pytest.raises(ValueError), showing():
            raise ValueError("a call that failed")
        assert "t-1" in service._showing
    assert "t-1" not in service._showing  # the last one has gone
    with showing(wanted=False):
        assert "t-1" not in service._showing
