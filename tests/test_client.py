"""The PiAPI client over `httpx2.MockTransport`: auth, error categories, and the retry policy.

The rule under test above all: GET and DELETE are retried, the create POST never is unless the
request provably did not reach PiAPI.
"""

from __future__ import annotations

import json

import anyio
import httpx2
import pytest
from conftest import until

from flux_mcp import errors
from flux_mcp.client import CONNECTIONS_PER_KIND, PiAPIClient, RetryPolicy

pytestmark = pytest.mark.anyio

KEY = "sk-very-secret-key"
BASE = "https://api.example.test"
PAYLOAD = {"model": "Qubico/flux1-dev", "task_type": "txt2img", "input": {"prompt": "a little cat"}}


def task(status="pending", **extra):
    return {"task_id": "t-1", "model": "Qubico/flux1-dev", "task_type": "txt2img", "status": status, **extra}


def ok(data):
    return httpx2.Response(200, json={"code": 200, "data": data, "message": "success"})


class Script:
    """Answers requests from a list of responses (or exceptions) and records what it saw."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def make_client(script: Script, sleeps: list[float] | None = None) -> PiAPIClient:
    async def fake_sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    return PiAPIClient(
        BASE,
        KEY,
        http=httpx2.AsyncClient(transport=httpx2.MockTransport(script)),
        retry=RetryPolicy(attempts=4, base_seconds=0.5, cap_seconds=8),
        sleep=fake_sleep,
        rand=lambda: 1.0,
    )


async def test_create_sends_the_payload_with_the_api_key():
    script = Script(ok(task()))
    record = await make_client(script).create_task(PAYLOAD)
    assert record.task_id == "t-1" and record.status == "pending"
    (request,) = script.requests
    assert request.method == "POST" and str(request.url) == f"{BASE}/api/v1/task"
    assert request.headers["x-api-key"] == KEY
    assert json.loads(request.content) == PAYLOAD


async def test_get_is_retried_with_backoff_and_retry_after():
    sleeps: list[float] = []
    script = Script(
        httpx2.Response(503, json={"code": 503, "message": "busy"}),
        httpx2.Response(429, headers={"Retry-After": "3"}, json={"code": 429, "message": "slow down"}),
        httpx2.Response(200, text="<html>bad gateway</html>"),
        ok(task("processing")),
    )
    record = await make_client(script, sleeps).get_task("t-1")
    assert record.status == "processing"
    assert len(script.requests) == 4
    assert sleeps == [0.5, 3.0, 2.0]  # backoff 0.5, Retry-After 3 wins over 1.0, backoff 2.0


async def test_get_gives_up_after_the_attempt_budget_with_a_retryable_error():
    script = Script(httpx2.Response(502, text="bad gateway"))
    with pytest.raises(errors.UpstreamError) as info:
        await make_client(script).get_task("t-1")
    assert len(script.requests) == 4
    assert info.value.retryable and info.value.task_id == "t-1" and info.value.category == "upstream"


@pytest.mark.parametrize(
    "failure",
    [
        httpx2.Response(500, json={"code": 500, "message": "internal"}),
        httpx2.Response(502, text="bad gateway"),
        httpx2.Response(200, text="not json"),
        httpx2.Response(200, json={"code": 500, "data": None, "message": "internal"}),
        httpx2.Response(504, text="gateway timeout"),
        httpx2.ReadTimeout("read timed out"),
        httpx2.RemoteProtocolError("peer closed"),
    ],
    ids=["500", "502", "non-json", "envelope-500", "504", "read-timeout", "connection-dropped"],
)
async def test_create_is_never_retried_once_the_request_may_have_reached_piapi(failure):
    script = Script(failure, ok(task()))
    with pytest.raises(errors.SubmitUncertainError) as info:
        await make_client(script).create_task(PAYLOAD)
    assert len(script.requests) == 1
    assert info.value.category == "submit_uncertain" and "may exist" in info.value.message


@pytest.mark.parametrize(
    "failure",
    [
        httpx2.ConnectError("connection refused"),
        httpx2.ConnectTimeout("connect timed out"),
        httpx2.Response(429, headers={"Retry-After": "1"}, json={"code": 429, "message": "rate"}),
    ],
    ids=["refused", "connect-timeout", "429"],
)
async def test_create_is_retried_when_piapi_provably_did_not_take_it(failure):
    script = Script(failure, ok(task()))
    record = await make_client(script).create_task(PAYLOAD)
    assert record.task_id == "t-1" and len(script.requests) == 2


@pytest.mark.parametrize(
    ("response", "error_type", "retryable"),
    [
        (httpx2.Response(401, json={"code": 401, "message": "Unauthorized"}), errors.AuthError, False),
        (httpx2.Response(400, json={"code": 400, "message": "bad prompt"}), errors.InvalidInputError, False),
        (httpx2.Response(200, json={"code": 400, "data": None, "message": "model error"}), errors.InvalidInputError,
         False),
        (httpx2.Response(200, json={"code": 500, "data": None, "message": "x"}), errors.UpstreamError, True),
        (httpx2.Response(404, json={"code": 404, "message": "task not found"}), errors.NotFoundError, False),
    ],
    ids=["401", "400", "envelope-400", "envelope-500", "404"],
)  # fmt: skip
async def test_http_and_envelope_errors_become_typed_errors(response, error_type, retryable):
    script = Script(response)
    with pytest.raises(error_type) as info:
        await make_client(script).get_task("t-1")
    assert info.value.retryable is retryable
    assert len(script.requests) == (4 if retryable else 1)


async def test_the_api_key_never_appears_in_an_error_message():
    script = Script(httpx2.Response(401, json={"code": 401, "message": f"bad key {KEY}"}))
    with pytest.raises(errors.AuthError) as info:
        await make_client(script).create_task(PAYLOAD)
    assert KEY not in str(info.value) and KEY not in json.dumps(info.value.to_dict())


async def test_cancel_reports_whether_piapi_accepted():
    accepted = await make_client(Script(ok(task("cancelled")))).cancel_task("t-1")
    assert accepted.accepted
    refused_script = Script(httpx2.Response(400, json={"code": 400, "message": "task is already processing"}))
    refused = await make_client(refused_script).cancel_task("t-1")
    assert not refused.accepted and "already processing" in refused.message
    assert refused_script.requests[0].method == "DELETE"
    assert refused_script.requests[0].url.path == "/api/v1/task/t-1"


async def test_downloads_never_carry_the_api_key():
    script = Script(httpx2.Response(200, content=b"\x89PNG...", headers={"content-type": "image/png"}))
    client = make_client(script)
    async with client.stream_download("https://img.theapi.app/temp/a.png") as response:
        assert b"".join([chunk async for chunk in response.aiter_bytes()]) == b"\x89PNG..."
    assert "x-api-key" not in script.requests[0].headers


async def test_create_without_a_task_id_is_uncertain():
    with pytest.raises(errors.SubmitUncertainError):
        await make_client(Script(ok({"status": "pending"}))).create_task(PAYLOAD)


async def test_a_4xx_answer_to_the_create_proves_nothing_was_created():
    script = Script(httpx2.Response(400, json={"code": 400, "message": "invalid model"}))
    with pytest.raises(errors.InvalidInputError) as info:
        await make_client(script).create_task(PAYLOAD)
    assert "invalid model" in info.value.message and "nothing was sent" not in info.value.hint


async def test_a_403_is_not_reported_as_a_bad_key():
    script = Script(httpx2.Response(403, json={"code": 403, "message": "plan does not include this model"}))
    with pytest.raises(errors.AuthError) as info:
        await make_client(script).create_task(PAYLOAD)
    assert "refused access" in info.value.message and "Creator plan" in info.value.hint


async def test_create_stops_retrying_429_when_the_backoff_budget_is_spent():
    sleeps: list[float] = []
    script = Script(httpx2.Response(429, headers={"Retry-After": "10"}, json={"code": 429, "message": "slow"}))
    with pytest.raises(errors.RateLimitedError):
        await make_client(script, sleeps).create_task(PAYLOAD)
    assert sleeps == [10.0] and len(script.requests) == 2  # a second 10 s would pass the 15 s budget


async def test_download_failures_of_any_kind_become_typed_errors():
    def redirect_loop(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(302, headers={"Location": str(request.url)})

    client = PiAPIClient(BASE, KEY, http=httpx2.AsyncClient(transport=httpx2.MockTransport(redirect_loop)))
    with pytest.raises(errors.NetworkError, match="TooManyRedirects"):
        async with client.stream_download("https://img.example.test/a.png"):
            pass


async def test_an_uncertain_create_keeps_any_task_id_the_answer_carried():
    script = Script(httpx2.Response(200, json={"code": 500, "data": {"task_id": "t-9"}, "message": "odd"}))
    with pytest.raises(errors.SubmitUncertainError) as info:
        await make_client(script).create_task(PAYLOAD)
    assert info.value.task_id == "t-9"


def oversized(*, gzipped: bool = False) -> httpx2.Response:
    """A 200 whose body is a task padded past MAX_ANSWER_BYTES (or, gzipped, a few kilobytes that
    decode to that: the cap counts what the answer decodes to)."""
    import gzip

    from flux_mcp.client import MAX_ANSWER_BYTES

    body = json.dumps({"code": 200, "data": task(padding="x" * MAX_ANSWER_BYTES)}).encode()
    if gzipped:
        return httpx2.Response(200, content=gzip.compress(body), headers={"Content-Encoding": "gzip"})
    return httpx2.Response(200, content=body)


@pytest.mark.parametrize("gzipped", [False, True])
async def test_an_answer_larger_than_a_task_object_is_refused(gzipped):
    script = Script(oversized(gzipped=gzipped))
    with pytest.raises(errors.UpstreamError, match="larger than") as caught:
        await make_client(script).get_task("t-1")
    assert caught.value.retryable and len(script.requests) == 4  # retried like any upstream failure
    script = Script(oversized(gzipped=gzipped))
    with pytest.raises(errors.SubmitUncertainError, match="larger than"):
        await make_client(script).create_task(PAYLOAD)
    assert len(script.requests) == 1  # the task may exist: never resent


async def test_an_answer_just_under_the_cap_is_read():
    from flux_mcp.client import MAX_ANSWER_BYTES

    padding = "x" * (MAX_ANSWER_BYTES - 200)
    record = await make_client(Script(ok(task(padding=padding)))).get_task("t-1")
    assert record.task_id == "t-1"


class Gate:
    """An async transport whose requests wait until `open` is set, counting those in flight."""

    def __init__(self) -> None:
        self.open = anyio.Event()
        self.in_flight = 0
        self.most = 0
        self.seen: list[str] = []

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.seen.append(request.url.path)
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.open.wait()
        finally:
            self.in_flight -= 1
        return ok(task("processing", task_id=request.url.path.rsplit("/", 1)[-1]))


def gated_client(gate: Gate, *, timeout_seconds: float = 30.0) -> PiAPIClient:
    return PiAPIClient(
        BASE, KEY, http=httpx2.AsyncClient(transport=httpx2.MockTransport(gate)), timeout_seconds=timeout_seconds
    )


async def test_requests_beyond_the_connection_limit_wait_their_turn_in_order():
    gate = Gate()
    ids = [f"t-{k:02d}" for k in range(CONNECTIONS_PER_KIND + 5)]
    client = gated_client(gate)
    answered: list[str] = []

    async def get(task_id: str) -> None:
        answered.append((await client.get_task(task_id)).task_id)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            for task_id in ids:
                group.start_soon(get, task_id)
                await anyio.sleep(0)  # queued in this order
            await until(lambda: len(gate.seen) == CONNECTIONS_PER_KIND)
            await anyio.sleep(0.05)
            assert len(gate.seen) == CONNECTIONS_PER_KIND  # the rest wait for a slot, not in a pool
            gate.open.set()
    assert gate.most == CONNECTIONS_PER_KIND
    assert [p.rsplit("/", 1)[-1] for p in gate.seen] == ids  # first come, first served
    assert sorted(answered) == ids


async def test_a_request_that_finds_no_free_connection_in_time_fails_retryably_unsent():
    gate = Gate()
    client = gated_client(gate, timeout_seconds=0.2)
    client.retry = RetryPolicy(attempts=1)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            for k in range(CONNECTIONS_PER_KIND):
                group.start_soon(client.get_task, f"t-{k:02d}")
            await until(lambda: len(gate.seen) == CONNECTIONS_PER_KIND)
            with pytest.raises(errors.NetworkError) as caught:
                await client.create_task(PAYLOAD)
            assert caught.value.retryable and "came free" in caught.value.message
            assert len(gate.seen) == CONNECTIONS_PER_KIND  # the create was never sent
            gate.open.set()


async def test_a_cancelled_caller_holds_no_connection_slot():
    gate = Gate()
    client = gated_client(gate)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await client.get_task("t-cancelled")  # cancelled before it takes a slot
    assert gate.seen == []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:  # every slot is still free
            for k in range(CONNECTIONS_PER_KIND):
                group.start_soon(client.get_task, f"t-{k:02d}")
            await until(lambda: len(gate.seen) == CONNECTIONS_PER_KIND)
            gate.open.set()
