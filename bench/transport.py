"""The connections under the HTTP client: CPU per request through httpx2's own pool and ours.

Starts the built-in simulator in its own process, creates one task and waits for it, then sends
N requests (default 3,000), all at once, through an `httpx2.AsyncClient` on each transport in
turn, 20 in flight at a time as `PiAPIClient` admits them: status GETs with the API key (what a
poll costs) and downloads of the task's image (what keeping a copy costs). It prints this
process's CPU time per request for httpx2's own `AsyncHTTPTransport` and for
`flux_mcp.transport.PooledTransport` (aiohttp's pool under the same httpx2 client), each the
median of `--rounds` rounds run alternately, and the ratio. Raw aiohttp with no httpx2 client
above it is shown for reference: what the client layer itself costs.

    python bench/transport.py [-n 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable

import anyio
import httpx2
from scale import start_simulator, stop, wait_for_http

from flux_mcp.simulator import DEFAULT_API_KEY
from flux_mcp.transport import PooledTransport

IN_FLIGHT = 20  # PiAPIClient's CONNECTIONS_PER_KIND
HEADERS = {"X-API-Key": DEFAULT_API_KEY, "Accept": "application/json"}


async def completed_task(base: str) -> tuple[str, str]:
    """A finished task's status URL and image URL."""
    async with httpx2.AsyncClient(headers=HEADERS) as http:
        body = {"model": "Qubico/flux1-schnell", "task_type": "txt2img", "input": {"prompt": "a red fox"}}
        task_id = (await http.post(base + "/api/v1/task", json=body)).json()["data"]["task_id"]
        status_url = f"{base}/api/v1/task/{task_id}"
        for _ in range(600):
            data = (await http.get(status_url)).json()["data"]
            if data["status"] == "completed":
                return status_url, data["output"]["image_url"]
            await anyio.sleep(0.05)
    raise SystemExit("the simulator did not finish the task")


async def cpu_per_request(n: int, one: Callable[[], Awaitable[None]]) -> float:
    """Milliseconds of this process's CPU per request, n requests at once, IN_FLIGHT at a time."""
    slots = anyio.CapacityLimiter(IN_FLIGHT)

    async def request() -> None:
        async with slots:
            await one()

    for _ in range(IN_FLIGHT):  # connections opened and warm before the clock starts
        await one()
    started = time.process_time()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(request)
    return (time.process_time() - started) / n * 1000


async def through_httpx2(transport: httpx2.AsyncBaseTransport, url: str, n: int) -> float:
    async with httpx2.AsyncClient(transport=transport, headers=HEADERS) as http:

        async def one() -> None:
            response = await http.get(url)
            response.raise_for_status()

        return await cpu_per_request(n, one)


async def through_aiohttp(url: str, n: int) -> float:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=IN_FLIGHT), headers=HEADERS) as session:

        async def one() -> None:
            async with session.get(url) as response:
                response.raise_for_status()
                await response.read()

        return await cpu_per_request(n, one)


async def main(n: int, rounds: int) -> None:
    sim, base = start_simulator()
    try:
        wait_for_http(base + "/_simulator/config")
        status_url, image_url = await completed_task(base)
        print(f"{n} requests at once, {IN_FLIGHT} in flight, median of {rounds} rounds; this process's CPU per request")
        print(f"{'request':<10} {'httpx2 own pool':>16} {'PooledTransport':>16} {'ratio':>7} {'raw aiohttp':>12}")
        for label, url in (("status GET", status_url), ("download", image_url)):
            own: list[float] = []
            pooled: list[float] = []
            raw: list[float] = []
            for _ in range(rounds):
                limits = httpx2.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
                own.append(await through_httpx2(httpx2.AsyncHTTPTransport(limits=limits), url, n))
                pooled.append(await through_httpx2(PooledTransport(connections=IN_FLIGHT), url, n))
                raw.append(await through_aiohttp(url, n))
            a, b, c = statistics.median(own), statistics.median(pooled), statistics.median(raw)
            print(f"{label:<10} {a:>13.3f} ms {b:>13.3f} ms {a / b:>6.2f}x {c:>9.3f} ms")
    finally:
        stop(sim)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per transport (median)")
    args = parser.parse_args()
    anyio.run(main, args.n, args.rounds)
