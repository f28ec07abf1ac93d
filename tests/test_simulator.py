"""Tests of the offline PiAPI simulator over real loopback HTTP.

Each test starts its own simulator with `running_simulator()` and talks to it with httpx2, so the
HTTP contract (envelope, status codes, headers, task object) is what is checked, not internals.
Time is a `ManualClock` the test advances, so status progression is instant and deterministic;
only the delay faults use real (short) sleeps.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest
from PIL import Image

from flux_mcp.catalog import TaskRequest
from flux_mcp.simulator import (
    DEFAULT_API_KEY,
    ManualClock,
    RunningSimulator,
    SimulatorState,
    output_size,
    running_simulator,
)

DOC_EXAMPLE: dict[str, Any] = {
    "model": "Qubico/flux1-dev",
    "task_type": "txt2img",
    "input": {"prompt": "a little cat", "width": 1024, "height": 1024},
}
UNSET = "0001-01-01T00:00:00Z"


def schnell(prompt: str = "a red fox", **extra: Any) -> dict[str, Any]:
    return {
        "model": "Qubico/flux1-schnell",
        "task_type": "txt2img",
        "input": {"prompt": prompt, "width": 256, "height": 256, **extra},
    }


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def sim(clock: ManualClock) -> AsyncIterator[RunningSimulator]:
    async with running_simulator(SimulatorState(clock=clock)) as running:
        yield running


@pytest.fixture
async def client(sim: RunningSimulator) -> AsyncIterator[httpx2.AsyncClient]:
    headers = {"X-API-Key": sim.api_key}
    async with httpx2.AsyncClient(base_url=sim.base_url, headers=headers, timeout=5) as http:
        yield http


async def create(client: httpx2.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/api/v1/task", json=body)
    assert response.status_code == 200, response.text
    envelope = response.json()
    assert envelope["code"] == 200 and envelope["message"] == "success"
    data: dict[str, Any] = envelope["data"]
    return data


async def fetch(client: httpx2.AsyncClient, task_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/task/{task_id}")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def download(url: str) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=5) as anonymous:  # no API key: files are public
        return await anonymous.get(url)


def data_uri(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# --- the happy path ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_doc_example_runs_to_completion_and_png_downloads(
    sim: RunningSimulator, client: httpx2.AsyncClient, clock: ManualClock
) -> None:
    task = await create(client, DOC_EXAMPLE)
    assert task["status"] == "pending" and task["output"] is None
    assert task["model"] == "Qubico/flux1-dev" and task["task_type"] == "txt2img"
    assert task["input"] == DOC_EXAMPLE["input"]
    assert task["config"] == {"service_mode": "", "webhook_config": {"endpoint": "", "secret": ""}}
    assert task["meta"]["started_at"] == UNSET and task["meta"]["ended_at"] == UNSET
    assert task["meta"]["created_at"].endswith("Z")
    assert task["meta"]["usage"] == {"type": "quota", "frozen": 0, "consume": 150_000}
    assert task["meta"]["is_using_private_pool"] is False
    assert task["detail"] is None and task["logs"] == []
    assert task["error"] == {"code": 0, "raw_message": "", "message": "", "detail": None}

    clock.advance(0.5)
    processing = await fetch(client, task["task_id"])
    assert processing["status"] == "processing" and processing["output"] is None
    assert processing["meta"]["started_at"] != UNSET and processing["meta"]["ended_at"] == UNSET

    clock.advance(1.5)
    done = await fetch(client, task["task_id"])
    assert done["status"] == "completed"
    assert done["meta"]["ended_at"] > done["meta"]["started_at"] > done["meta"]["created_at"]
    output = done["output"]
    assert output["image_urls"] == [] and output["image_base64"] == ""
    assert output["image_url"] == f"{sim.base_url}/files/{task['task_id']}_0.png"

    png = await download(output["image_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as image:
        assert image.format == "PNG" and image.size == (1024, 1024)

    log = (await client.get("/_simulator/log")).json()
    assert [(e["method"], e["status"], e["task_id"]) for e in log] == [
        ("POST", 200, task["task_id"]),
        ("GET", 200, task["task_id"]),
        ("GET", 200, task["task_id"]),
    ]


@pytest.mark.anyio
async def test_batch_on_schnell_gives_distinct_images(client: httpx2.AsyncClient, clock: ManualClock) -> None:
    task = await create(client, schnell(batch_size=3))
    assert task["meta"]["usage"]["consume"] == 45_000
    clock.advance(1.0)
    output = (await fetch(client, task["task_id"]))["output"]
    assert output["image_url"] == "" and len(output["image_urls"]) == 3
    bodies = [(await download(url)).content for url in output["image_urls"]]
    assert len(set(bodies)) == 3
    for body in bodies:
        with Image.open(io.BytesIO(body)) as image:
            assert image.size == (256, 256)


@pytest.mark.anyio
async def test_different_prompts_give_different_images(client: httpx2.AsyncClient, clock: ManualClock) -> None:
    first = await create(client, schnell("a lighthouse at dusk"))
    second = await create(client, schnell("a bowl of ramen"))
    clock.advance(5)
    urls = [(await fetch(client, t["task_id"]))["output"]["image_url"] for t in (first, second)]
    images = [(await download(url)).content for url in urls]
    assert images[0] != images[1]


@pytest.mark.anyio
async def test_plain_images_for_load_tests_are_one_cached_png_per_size(
    client: httpx2.AsyncClient, sim: RunningSimulator, clock: ManualClock
) -> None:
    assert (await client.post("/_simulator/config", json={"plain_images": True})).status_code == 200
    tasks = [await create(client, schnell(p, batch_size=2)) for p in ("a lighthouse", "a bowl of ramen")]
    clock.advance(5)
    urls = [url for t in tasks for url in (await fetch(client, t["task_id"]))["output"]["image_urls"]]
    bodies = {(await download(url)).content for url in urls}
    assert len(urls) == 4 and len(bodies) == 1
    with Image.open(io.BytesIO(bodies.pop())) as image:
        assert image.format == "PNG" and image.size == (256, 256)


@pytest.mark.anyio
async def test_config_and_sizes_from_input_images(client: httpx2.AsyncClient, clock: ManualClock) -> None:
    body = {
        "model": "Qubico/flux1-dev-advanced",
        "task_type": "fill-outpaint",
        "input": {
            "prompt": "a girl in a great grass sea",
            "image": data_uri(120, 80),
            "custom_settings": [{"setting_type": "outpaint", "outpaint_left": 30, "outpaint_top": 10}],
        },
        "config": {"service_mode": "public", "webhook_config": {"endpoint": "https://example.com/hook"}},
    }
    task = await create(client, body)
    assert task["config"] == {
        "service_mode": "public",
        "webhook_config": {"endpoint": "https://example.com/hook", "secret": ""},
    }
    assert task["meta"]["usage"]["consume"] == 200_000
    clock.advance(3.0)
    url = (await fetch(client, task["task_id"]))["output"]["image_url"]
    with Image.open(io.BytesIO((await download(url)).content)) as image:
        assert image.size == (150, 90)


@pytest.mark.anyio
async def test_docs_empty_webhook_endpoint_means_no_webhook(client: httpx2.AsyncClient) -> None:
    body = {
        "model": "Qubico/flux1-dev-advanced",
        "task_type": "fill-inpaint",
        "input": {
            "prompt": "a girl in blue and red skirt",
            "image": "https://i.ibb.co/TH7xMvd/girl-mask.png",
        },
        "config": {"webhook_config": {"endpoint": "", "secret": ""}},
    }
    task = await create(client, body)
    assert task["config"] == {"service_mode": "", "webhook_config": {"endpoint": "", "secret": ""}}


def test_output_size_rules() -> None:
    def size(model: str, task_type: str, **fields: Any) -> tuple[int, int]:
        body = {"model": f"Qubico/flux1-{model}", "task_type": task_type, "input": {"prompt": "x", **fields}}
        return output_size(TaskRequest.model_validate(body))

    assert size("dev", "txt2img") == (1024, 1024)
    assert size("dev", "txt2img", width=1344, height=768) == (1344, 768)
    assert size("schnell", "img2img", image="https://i.ibb.co/J7ZNgSG/01.jpg") == (1024, 1024)
    assert size("schnell", "img2img", image=data_uri(64, 48)) == (64, 48)
    control = [{"control_type": "canny", "control_image": data_uri(32, 16)}]
    assert size("dev-advanced", "controlnet-lora", control_net_settings=control) == (32, 16)


# --- errors of the contract ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_wrong_or_missing_key_is_401_without_echo(sim: RunningSimulator) -> None:
    async with httpx2.AsyncClient(base_url=sim.base_url, timeout=5) as http:
        for headers in ({}, {"X-API-Key": "wrong-secret-key"}):
            response = await http.post("/api/v1/task", json=DOC_EXAMPLE, headers=headers)
            assert response.status_code == 401
            assert response.json() == {"code": 401, "data": None, "message": "Unauthorized: invalid api key"}
            assert "wrong-secret-key" not in response.text
        assert (await http.get("/api/v1/task/whatever", headers={"X-API-Key": "nope"})).status_code == 401
        lower = await http.post("/api/v1/task", json=DOC_EXAMPLE, headers={"x-api-key": DEFAULT_API_KEY})
        assert lower.status_code == 200
    assert sim.state.tasks.keys() == {lower.json()["data"]["task_id"]}


@pytest.mark.anyio
async def test_invalid_requests_are_400(client: httpx2.AsyncClient, sim: RunningSimulator) -> None:
    lora_on_schnell = {
        "model": "Qubico/flux1-schnell",
        "task_type": "txt2img-lora",
        "input": {"prompt": "spiderman", "lora_settings": [{"lora_type": "mjv6"}]},
    }
    response = await client.post("/api/v1/task", json=lora_on_schnell)
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == 400 and body["data"] is None and "flux1-dev-advanced" in body["message"]

    too_big = await client.post("/api/v1/task", json=schnell(width=2048, height=2048))
    assert too_big.status_code == 400 and "1048576" in too_big.json()["message"]

    not_json = await client.post("/api/v1/task", content=b"{nope", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["code"] == 400
    assert sim.state.tasks == {}


@pytest.mark.anyio
async def test_unknown_task_is_404(client: httpx2.AsyncClient) -> None:
    for response in (
        await client.get("/api/v1/task/00000000-0000-0000-0000-000000000000"),
        await client.delete("/api/v1/task/00000000-0000-0000-0000-000000000000"),
    ):
        assert response.status_code == 404
        assert response.json() == {"code": 404, "data": None, "message": "task not found"}


@pytest.mark.anyio
async def test_cancel_only_while_pending(client: httpx2.AsyncClient, clock: ManualClock) -> None:
    pending = await create(client, schnell())
    cancelled = await client.delete(f"/api/v1/task/{pending['task_id']}")
    assert cancelled.status_code == 200
    assert cancelled.json()["data"]["status"] == "cancelled"
    clock.advance(10)
    later = await fetch(client, pending["task_id"])
    assert later["status"] == "cancelled" and later["output"] is None and later["meta"]["ended_at"] != UNSET

    running = await create(client, schnell())
    clock.advance(0.5)
    refused = await client.delete(f"/api/v1/task/{running['task_id']}")
    assert refused.status_code == 400
    assert refused.json() == {
        "code": 400,
        "data": None,
        "message": "task is already processing and cannot be cancelled",
    }
    clock.advance(1)
    assert (await fetch(client, running["task_id"]))["status"] == "completed"

    log = (await client.get("/_simulator/log")).json()
    deletes = [(e["status"], e["task_id"]) for e in log if e["method"] == "DELETE"]
    assert deletes == [(200, pending["task_id"]), (400, running["task_id"])]


# --- faults ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_http_error_fault_with_retry_after_and_method_filter(
    client: httpx2.AsyncClient, sim: RunningSimulator
) -> None:
    sim.state.add_fault("http_error", status=429, retry_after=1, times=2, method="GET")
    task = await create(client, schnell())  # POST is not affected
    for _ in range(2):
        limited = await client.get(f"/api/v1/task/{task['task_id']}")
        assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
        assert limited.json()["code"] == 429 and limited.json()["data"] is None
    assert (await client.get(f"/api/v1/task/{task['task_id']}")).status_code == 200

    added = await client.post("/_simulator/faults", json={"kind": "http_error", "status": 503})
    assert added.status_code == 200 and added.json()["times"] == 1
    unavailable = await client.post("/api/v1/task", json=schnell())
    assert unavailable.status_code == 503 and "retry-after" not in unavailable.headers
    assert len(sim.state.tasks) == 1 and sim.state.faults == []
    statuses = [e["status"] for e in (await client.get("/_simulator/log")).json()]
    assert statuses == [200, 429, 429, 200, 503]

    bad = await client.post("/_simulator/faults", json={"kind": "http_error"})
    assert bad.status_code == 400 and "status" in bad.json()["error"]
    assert (await client.post("/_simulator/faults", json={"kind": "nonsense"})).status_code == 400


@pytest.mark.anyio
async def test_malformed_fault_returns_html(client: httpx2.AsyncClient) -> None:
    await client.post("/_simulator/faults", json={"kind": "malformed", "times": 1, "method": "post"})
    response = await client.post("/api/v1/task", json=schnell())
    assert response.status_code == 200 and response.text == "<html>bad gateway</html>"
    with pytest.raises(ValueError):
        response.json()
    await create(client, schnell())  # one-shot: the next call is fine


@pytest.mark.anyio
async def test_fail_next_fault_fails_the_next_task(
    client: httpx2.AsyncClient, sim: RunningSimulator, clock: ManualClock
) -> None:
    sim.state.add_fault("fail_next", code=10001, message="nsfw content detected", raw_message="raw detail")
    doomed = await create(client, schnell())
    healthy = await create(client, schnell())
    clock.advance(0.5)
    assert (await fetch(client, doomed["task_id"]))["status"] == "processing"
    clock.advance(1)
    failed = await fetch(client, doomed["task_id"])
    assert failed["status"] == "failed" and failed["output"] is None
    assert failed["error"] == {
        "code": 10001,
        "raw_message": "raw detail",
        "message": "nsfw content detected",
        "detail": None,
    }
    assert failed["meta"]["ended_at"] != UNSET
    assert (await fetch(client, healthy["task_id"]))["status"] == "completed"


@pytest.mark.anyio
async def test_create_late_creates_the_task_but_answers_after_the_client_gave_up(
    client: httpx2.AsyncClient, sim: RunningSimulator
) -> None:
    await client.post("/_simulator/faults", json={"kind": "create_late", "delay": 30})
    with pytest.raises(httpx2.ReadTimeout):
        await client.post("/api/v1/task", json=schnell("lost response"), timeout=0.3)
    tasks = (await client.get("/_simulator/tasks")).json()
    assert [t["input"]["prompt"] for t in tasks] == ["lost response"]
    log = (await client.get("/_simulator/log")).json()
    assert log == [{"method": "POST", "path": "/api/v1/task", "status": 200, "task_id": tasks[0]["task_id"]}]
    # leaving the block must not wait 30 s for the sleeping response


@pytest.mark.anyio
async def test_slow_fault_and_latency_delay_responses(client: httpx2.AsyncClient, sim: RunningSimulator) -> None:
    sim.state.add_fault("slow", delay=0.3, method="GET")
    task = await create(client, schnell())
    started = time.perf_counter()
    await fetch(client, task["task_id"])
    assert time.perf_counter() - started >= 0.3
    started = time.perf_counter()
    await fetch(client, task["task_id"])
    assert time.perf_counter() - started < 0.3

    assert (await client.post("/_simulator/config", json={"latency": 0.2})).json()["latency"] == 0.2
    started = time.perf_counter()
    await fetch(client, task["task_id"])
    assert time.perf_counter() - started >= 0.2


# --- statuses, files, admin ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_status_styles(client: httpx2.AsyncClient, clock: ManualClock) -> None:
    async def statuses(style: str) -> list[str]:
        config = await client.post("/_simulator/config", json={"status_style": style})
        assert config.json()["status_style"] == style
        task = await create(client, schnell())
        seen = [task["status"]]
        for _ in range(4):  # schnell: pending until 0.2 s, done at 1.0 s
            clock.advance(0.25)
            seen.append((await fetch(client, task["task_id"]))["status"])
        return seen

    assert await statuses("lower") == ["pending", "processing", "processing", "processing", "completed"]
    assert await statuses("capitalized") == ["Pending", "Processing", "Processing", "Processing", "Completed"]
    assert await statuses("legacy") == ["pending", "starting", "starting", "processing", "success"]
    assert (await client.post("/_simulator/config", json={"status_style": "shouting"})).status_code == 400


@pytest.mark.anyio
async def test_durations_are_configurable(client: httpx2.AsyncClient, clock: ManualClock) -> None:
    config = await client.post("/_simulator/config", json={"durations": {"schnell": 5}, "pending_seconds": 0})
    assert config.json()["durations"]["Qubico/flux1-schnell"] == 5
    assert config.json()["durations"]["Qubico/flux1-dev"] == 2.0
    task = await create(client, schnell())
    assert task["status"] == "processing"
    clock.advance(4.9)
    assert (await fetch(client, task["task_id"]))["status"] == "processing"
    clock.advance(0.1)
    assert (await fetch(client, task["task_id"]))["status"] == "completed"


@pytest.mark.anyio
async def test_expire_makes_files_404(client: httpx2.AsyncClient, clock: ManualClock) -> None:
    task = await create(client, schnell())
    clock.advance(1)
    url = (await fetch(client, task["task_id"]))["output"]["image_url"]
    assert (await download(url)).status_code == 200
    assert (await client.post("/_simulator/expire")).json() == {"expired": 1}
    assert (await download(url)).status_code == 404
    assert (await fetch(client, task["task_id"]))["output"]["image_url"] == url  # the URL is still reported
    assert (await download(url)).status_code == 404
    assert (await download(url.replace("_0.png", "_7.png"))).status_code == 404


@pytest.mark.anyio
async def test_files_render_on_direct_download_and_unknown_files_404(
    client: httpx2.AsyncClient, sim: RunningSimulator, clock: ManualClock
) -> None:
    task = await create(client, schnell())
    url = f"{sim.base_url}/files/{task['task_id']}_0.png"
    assert (await download(url)).status_code == 404  # not finished yet
    clock.advance(1)
    assert (await download(url)).status_code == 200
    assert (await download(f"{sim.base_url}/files/nothing_0.png")).status_code == 404


@pytest.mark.anyio
async def test_reset_clears_tasks_faults_and_log(client: httpx2.AsyncClient, sim: RunningSimulator) -> None:
    await create(client, schnell())
    sim.state.add_fault("http_error", status=500)
    assert (await client.get("/_simulator/faults")).json()[0]["status"] == 500
    assert (await client.post("/_simulator/reset")).status_code == 200
    assert sim.state.tasks == {} and sim.state.faults == [] and sim.state.log == []
    assert (await client.get("/_simulator/tasks")).json() == []
    assert (await client.get("/_simulator/log")).json() == []


@pytest.mark.anyio
async def test_real_clock_and_clean_shutdown() -> None:
    async with running_simulator(durations={"schnell": 0}, api_key="other-key") as running:
        assert running.port > 0 and running.base_url == f"http://127.0.0.1:{running.port}"
        running.state.configure(pending_seconds=0)
        headers = {"X-API-Key": "other-key"}
        async with httpx2.AsyncClient(base_url=running.base_url, headers=headers, timeout=5) as http:
            task = await create(http, schnell())
            assert task["status"] == "completed"
            assert (await fetch(http, task["task_id"]))["output"]["image_url"]
        base_url = running.base_url
    async with httpx2.AsyncClient(timeout=1) as http:
        with pytest.raises(httpx2.ConnectError):
            await http.get(f"{base_url}/_simulator/log")
