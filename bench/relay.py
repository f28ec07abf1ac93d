"""Webhooks with `--workers 2`: does a call wake as fast when its webhook reached the other worker?

Starts the built-in simulator and `piapi-flux-mcp serve --transport http` with FLUX_MCP_PUBLIC_URL
(so the simulator pushes every task to the server's own receiver), first with one worker, then
with two, and makes N `flux_txt2img` calls at once, each request on its own connection (so the
kernel spreads them over the workers). Per run it prints, for all calls and, with two workers, split by
whether the call was woken by an update relayed from the other worker (the server's log says
which): calls completed, GETs per task (status polls the simulator received) and overhead (the
moment the call answered minus the moment the simulator finished the task).

Tasks (dev-advanced, 512 px) take `--task-seconds` (2 s) where the built-in prior says ~9 s, so
every call's one safety-net GET is planned 4 s in, after its webhook: a call the push did not
wake shows up as a GET.
Without the relay, the calls whose webhook reached the other worker each cost that GET and wait
for it. The client is small (one JSON-RPC session per call, bench/scale.py's); on a loaded machine the overhead
is mostly the machine's, so compare the rows of one run. Images are not downloaded
(`FLUX_MCP_SAVE_IMAGES=false`): the simulator renders each on request, which would be measured
instead.

    python bench/relay.py            # N = 40
    python bench/relay.py -n 100
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import anyio
import httpx2
from scale import Session, clean_environment, free_port, percentile, start_simulator, stop, wait_for_http

WOKEN = "woke a call waiting here"
MODEL = "Qubico/flux1-dev-advanced"  # its prior at 512 px is ~9 s: the safety-net GET comes 4 s in
SIDE = 512  # the simulator renders each image before the task's last webhook: small ones are cheap


async def calls(url: str, n: int, tag: str) -> list[tuple[float, dict]]:
    answers: list[tuple[float, dict]] = []

    async def one(k: int) -> None:
        session = Session(url)  # every request on its own connection: any worker may get it
        await session.open()
        arguments = {"prompt": f"{tag} {k}", "model": MODEL, "width": SIDE, "height": SIDE, "include_image": "none"}
        result = await session.call("flux_txt2img", arguments)
        answers.append((time.time(), result.get("structuredContent") or {}))

    async with anyio.create_task_group() as tg:
        for k in range(n):
            tg.start_soon(one, k)
    return answers


def run(workers: int, n: int, task_seconds: float, tmp: Path) -> list[dict]:
    port = free_port()
    env = clean_environment()
    sim, sim_url = start_simulator()
    server = None
    log_path = tmp / f"server-{workers}.log"
    try:
        wait_for_http(sim_url + "/_simulator/config")
        config = {"pending_seconds": 0.5, "durations": {MODEL: task_seconds}}
        httpx2.post(sim_url + "/_simulator/config", json=config).raise_for_status()
        server_env = {
            **env,
            "PIAPI_API_KEY": "sim-key",
            "PIAPI_BASE_URL": sim_url,
            "FLUX_MCP_DATA_DIR": str(tmp / f"data-{workers}"),
            "FLUX_MCP_OUTPUT_DIR": str(tmp / f"images-{workers}"),
            "FLUX_MCP_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "FLUX_MCP_LOG_LEVEL": "INFO",
            "FLUX_MCP_SAVE_IMAGES": "false",  # the simulator renders each image on download: not measured here
        }
        argv = [sys.executable, "-m", "flux_mcp", "serve", "--transport", "http", "--port", str(port)]
        argv += ["--workers", str(workers)] if workers > 1 else []
        with log_path.open("wb") as log_file:
            server = subprocess.Popen(argv, env=server_env, stdout=subprocess.DEVNULL, stderr=log_file)
        wait_for_http(f"http://127.0.0.1:{port}/mcp")
        time.sleep(1.0)  # every worker listening
        answers = anyio.run(calls, f"http://127.0.0.1:{port}/mcp", n, f"w{workers}-{time.time_ns()}")
        log = httpx2.get(sim_url + "/_simulator/log", timeout=60).json()
    finally:
        stop(server, sim)
    text = log_path.read_text()
    rows = []
    for answered, result in answers:
        task_id = result.get("task_id", "")
        ended = result.get("ended_at")
        rows.append(
            {
                "completed": result.get("status") == "completed",
                "relayed": f"task {task_id} {WOKEN}" in text,
                "gets": sum(1 for e in log if e["method"] == "GET" and e.get("task_id") == task_id),
                "overhead": answered - datetime.fromisoformat(ended.replace("Z", "+00:00")).timestamp()
                if ended
                else None,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=40, help="concurrent calls per run (default 40)")
    parser.add_argument("--task-seconds", type=float, default=2.0, help="simulated task duration (default 2)")
    args = parser.parse_args()
    print(f"{'workers':>7} {'calls':<22} {'n':>4} {'completed':>9} {'GETs/task':>9} {'overhead p50':>12} {'p95':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            rows = run(workers, args.n, args.task_seconds, Path(tmp))
            groups = [("all", rows)]
            if workers > 1:
                groups += [
                    ("woken by the relay", [r for r in rows if r["relayed"]]),
                    ("woken in their worker", [r for r in rows if not r["relayed"]]),
                ]
            for label, group in groups:
                overheads = [r["overhead"] for r in group if r["overhead"] is not None]
                print(
                    f"{workers:>7} {label:<22} {len(group):>4} {sum(r['completed'] for r in group):>9} "
                    f"{sum(r['gets'] for r in group) / max(1, len(group)):>9.2f} "
                    f"{percentile(overheads, 0.5) * 1000:>9.0f} ms {percentile(overheads, 0.95) * 1000:>5.0f} ms",
                    flush=True,
                )
    print(
        f"simulator: dev-advanced tasks of {args.task_seconds:g} s (0.5 s queued), {SIDE} px; webhooks to the "
        "server's own receiver (FLUX_MCP_PUBLIC_URL); images not saved; one connection per request; loopback."
    )


if __name__ == "__main__":
    main()
