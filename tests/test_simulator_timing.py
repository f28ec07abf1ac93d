"""The simulator's queue and run phases (drawn per model, seedable) and its webhook deliveries.

Timing is checked on a `ManualClock`; webhooks over real loopback HTTP into a small receiver app,
so the body, the `x-webhook-secret` header, the retries and the drop/duplicate faults are what a
real receiver would see.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from flux_mcp.record import TaskRecord
from flux_mcp.simulator import (
    PIAPI_LIKE_PROFILES,
    ManualClock,
    RunningSimulator,
    SimulatorState,
    TimingProfile,
    running_app,
    running_simulator,
)

pytestmark = pytest.mark.anyio


def body(**config: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "model": "Qubico/flux1-schnell",
        "task_type": "txt2img",
        "input": {"prompt": "a red fox", "width": 256, "height": 256},
    }
    if config:
        request["config"] = config
    return request


async def create(http: httpx2.AsyncClient, request: dict[str, Any]) -> dict[str, Any]:
    response = await http.post("/api/v1/task", json=request)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


@pytest.fixture
async def manual() -> AsyncIterator[tuple[RunningSimulator, ManualClock, httpx2.AsyncClient]]:
    clock = ManualClock()
    async with running_simulator(SimulatorState(clock=clock)) as sim:
        async with httpx2.AsyncClient(base_url=sim.base_url, headers={"X-API-Key": sim.api_key}, timeout=5) as http:
            yield sim, clock, http


# --- queue and run phases ------------------------------------------------------------------------


async def test_profile_draws_a_queue_then_a_run_and_meta_times_match(manual) -> None:
    sim, clock, http = manual
    sim.state.configure(profiles={"schnell": {"queue_seconds": 2, "run_seconds": 5}}, seed=1)
    task = await create(http, body())
    sim_task = sim.state.tasks[task["task_id"]]
    queued, total = sim_task.pending_seconds, sim_task.duration
    assert 0 < queued < total and queued != 2 and total - queued != 5  # drawn, not the means
    assert task["status"] == "pending" and task["meta"]["started_at"].startswith("0001")

    clock.advance(queued + 0.001)
    seen = TaskRecord.from_api((await http.get(f"/api/v1/task/{task['task_id']}")).json()["data"])
    assert seen.status == "processing" and seen.created_at and seen.started_at and seen.ended_at is None
    assert (seen.started_at - seen.created_at).total_seconds() == pytest.approx(queued, abs=1e-5)

    clock.advance(total - queued)
    done = TaskRecord.from_api((await http.get(f"/api/v1/task/{task['task_id']}")).json()["data"])
    assert done.status == "completed" and done.ended_at and done.started_at
    assert (done.ended_at - done.started_at).total_seconds() == pytest.approx(total - queued, abs=1e-5)


async def test_the_run_takes_longer_for_more_pixels_and_more_images_as_at_piapi(manual) -> None:
    """A profile's run time is for one 1024x1024 image; the poll planner's priors scale the same way."""
    sim, _, http = manual
    fixed = {"queue_seconds": 0.5, "run_seconds": 4, "queue_spread": 0, "run_spread": 0}
    sim.state.configure(profiles={"schnell": fixed})

    async def run_seconds(**size: int) -> float:
        request = {"model": "Qubico/flux1-schnell", "task_type": "txt2img", "input": {"prompt": "a fox", **size}}
        task = sim.state.tasks[(await create(http, request))["task_id"]]
        assert task.pending_seconds == 0.5
        return task.duration - task.pending_seconds

    assert await run_seconds(width=1024, height=1024) == pytest.approx(4.0)
    assert await run_seconds(width=512, height=512) == pytest.approx(1.0)
    assert await run_seconds(width=1024, height=1024, batch_size=2) == pytest.approx(8.0)
    assert await run_seconds() == pytest.approx(4.0)  # no size given: PiAPI's default 1024x1024


def test_profiles_are_seedable_and_spread_like_their_parameters() -> None:
    def draws(seed: int) -> list[tuple[float, float]]:
        state = SimulatorState(clock=ManualClock())
        state.configure(profiles={"dev": PIAPI_LIKE_PROFILES["Qubico/flux1-dev"]}, seed=seed)
        return [PIAPI_LIKE_PROFILES["Qubico/flux1-dev"].draw(state.rng) for _ in range(2000)]

    first, again, other = draws(3), draws(3), draws(4)
    assert first == again and first != other
    runs = sorted(run for _, run in first)
    mean = sum(runs) / len(runs)
    assert mean == pytest.approx(19.0, rel=0.02)
    assert (sum((r - mean) ** 2 for r in runs) / len(runs)) ** 0.5 == pytest.approx(1.9, rel=0.1)
    assert all(queue > 0 for queue, _ in first)
    fixed = TimingProfile(queue_seconds=1, run_seconds=4, queue_spread=0, run_spread=0)
    assert fixed.draw(SimulatorState().rng) == (1, 4)


async def test_fixed_durations_stay_the_default(manual) -> None:
    sim, _clock, http = manual
    sim.state.configure(durations={"schnell": 3}, pending_seconds=1)
    task = await create(http, body())
    assert (sim.state.tasks[task["task_id"]].pending_seconds, sim.state.tasks[task["task_id"]].duration) == (1, 3)
    assert (await http.post("/_simulator/config", json={"profiles": {"nope": {}}})).status_code == 400


# --- webhooks ----------------------------------------------------------------------------------


class Receiver:
    """Records every webhook POST; answers with the queued statuses first, then 200."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.answers: list[int] = []
        self.arrived = anyio.Event()

    async def endpoint(self, request: Request) -> JSONResponse:
        self.calls.append((dict(request.headers), await request.json()))
        self.arrived.set()
        return JSONResponse({}, status_code=self.answers.pop(0) if self.answers else 200)

    async def wait_for(self, count: int) -> None:
        with anyio.fail_after(5):
            while len(self.calls) < count:
                self.arrived = anyio.Event()
                await self.arrived.wait()


async def logged(sim: RunningSimulator, count: int) -> None:
    """The simulator logs an attempt once the receiver's answer is in."""
    with anyio.fail_after(5):
        while len(sim.state.webhook_log) < count:
            await anyio.sleep(0.01)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = Starlette(routes=[Route("/hook", rec.endpoint, methods=["POST"])])
    async with running_app(app) as base_url:
        yield rec, f"{base_url}/hook"


@pytest.fixture
async def live() -> AsyncIterator[tuple[RunningSimulator, httpx2.AsyncClient]]:
    async with running_simulator(durations={"schnell": 0.2}) as sim:
        sim.state.configure(pending_seconds=0.05, webhook_retry_seconds=0.05)
        async with httpx2.AsyncClient(base_url=sim.base_url, headers={"X-API-Key": sim.api_key}, timeout=5) as http:
            yield sim, http


async def test_webhooks_on_create_and_completion_in_piapis_format(live, receiver) -> None:
    sim, http = live
    rec, url = receiver
    task = await create(http, body(webhook_config={"endpoint": url, "secret": "s3cret"}))
    await rec.wait_for(2)
    await logged(sim, 2)
    (headers1, first), (headers2, second) = rec.calls
    assert set(first) == {"timestamp", "data"} and isinstance(first["timestamp"], int)
    assert headers1["x-webhook-secret"] == headers2["x-webhook-secret"] == "s3cret"
    assert first["data"]["task_id"] == second["data"]["task_id"] == task["task_id"]
    assert first["data"]["status"] == "pending"
    assert second["data"]["status"] == "completed"
    # The completion body is what GET shows, and its image is ready to download.
    got = (await http.get(f"/api/v1/task/{task['task_id']}")).json()["data"]
    assert second["data"]["output"] == got["output"] and second["data"]["meta"] == got["meta"]
    assert (await http.get(second["data"]["output"]["image_url"])).status_code == 200
    assert [(w["status"], w["outcome"]) for w in sim.state.webhook_log] == [("pending", "200"), ("completed", "200")]


async def test_no_secret_no_header_and_no_endpoint_no_webhook(live, receiver) -> None:
    _sim, http = live
    rec, url = receiver
    await create(http, body())
    await create(http, body(webhook_config={"endpoint": url, "secret": ""}))
    await rec.wait_for(2)
    await anyio.sleep(0.1)
    assert len(rec.calls) == 2 and all("x-webhook-secret" not in headers for headers, _ in rec.calls)


async def test_failed_deliveries_are_retried_then_given_up(live, receiver) -> None:
    sim, http = live
    rec, url = receiver
    # The run outlasts the create delivery's retries (0.05 s apart), even on a loaded machine.
    sim.state.configure(webhook_attempts=3, durations={"schnell": 1.5})
    rec.answers = [500, 503, 500]  # the create delivery fails all three attempts
    await create(http, body(webhook_config={"endpoint": url, "secret": "x"}))
    await rec.wait_for(4)
    await logged(sim, 4)
    assert [w["outcome"] for w in sim.state.webhook_log] == ["500", "503", "500", "200"]
    assert [w["attempt"] for w in sim.state.webhook_log] == [1, 2, 3, 1]
    assert [c[1]["data"]["status"] for c in rec.calls] == ["pending"] * 3 + ["completed"]


async def test_drop_and_duplicate_faults(live, receiver) -> None:
    sim, http = live
    rec, url = receiver
    sim.state.add_fault("webhook_drop")
    sim.state.add_fault("webhook_duplicate")
    await create(http, body(webhook_config={"endpoint": url, "secret": "x"}))
    await rec.wait_for(2)
    await logged(sim, 3)
    assert [c[1]["data"]["status"] for c in rec.calls] == ["completed", "completed"]
    assert rec.calls[0][1] == rec.calls[1][1]
    assert [w["outcome"] for w in sim.state.webhook_log] == ["dropped", "200", "200"]
    assert (await http.get("/_simulator/webhooks")).json() == sim.state.webhook_log


async def test_a_cancelled_task_gets_one_cancelled_delivery(live, receiver) -> None:
    sim, http = live
    rec, url = receiver
    sim.state.configure(pending_seconds=1)
    task = await create(http, body(webhook_config={"endpoint": url, "secret": "x"}))
    await rec.wait_for(1)
    assert (await http.delete(f"/api/v1/task/{task['task_id']}")).status_code == 200
    await rec.wait_for(2)
    await anyio.sleep(0.3)  # past the time it would have completed
    assert [c[1]["data"]["status"] for c in rec.calls] == ["pending", "cancelled"]
