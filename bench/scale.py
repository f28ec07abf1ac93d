"""Many generations at once over streamable HTTP: does one server carry them without stalling?

Starts, each in its own process, the built-in PiAPI simulator (tasks take PiAPI-like schnell times
for the image size, the ~1-1.5 s the poll planner expects at 512 px, or a fixed `--task-seconds`;
its images are plain PNGs of the asked size, drawn once, so that the stand-in stays cheap)
and `piapi-flux-mcp serve --transport http` against it (with `--workers N`, that many processes on
one port; give `--workers` twice to compare throughput side by side), then, from this process,
opens 10 client sessions and makes N `flux_txt2img` calls at once, spread over the sessions, while
an eleventh session calls `flux_list_tasks` every 100 ms as a probe. For each N it prints:

- completed: calls that returned a completed task; wall: first call sent -> last call answered;
  tasks/s: completed / wall (with short tasks, the throughput the server process(es) can carry);
- server CPU / task: user+system CPU of the server process(es) during the run, per call;
- peak RSS: the server's high-water mark (the largest worker's with --workers);
- probe p50 / p99: latency of the cheap probe call under the load;
- overhead p50: a call's answer time minus the moment the simulator finished its task;
- GETs / task: status polls the simulator received per task;
- simulator CPU: how busy the stand-in was (it keeps up while well under one core).

The client here is a small JSON-RPC-over-HTTP client (initialize once per session, then
`tools/call` POSTs reading the SSE answer, with a progress token as real clients send): h11 on a
connection per call, no pool, so that the load generator is not what is measured; the probe runs
in a process of its own. Everything runs on loopback. Linux only
(CPU and RSS are read from /proc).

    python bench/scale.py                  # N = 100, 300, 1000
    python bench/scale.py --quick          # N = 100, 300
    python bench/scale.py -n 1000 --workers 1 --workers 2   # throughput of one and two processes
    python bench/scale.py -n 1000 --floor  # beside a bare MCPServer whose tool only sleeps as long
    python bench/scale.py -n 1000 --workers 1 --workers 2 --rounds 5   # ratios as median and range

To compare two revisions, run each from its own checkout (`cd` into it): the servers start as
`python -m flux_mcp`, which finds the package in the working directory before `PYTHONPATH` or an
installed copy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import httpx2
from mcp.server.mcpserver import Context, MCPServer

from flux_mcp.catalog import Model
from flux_mcp.simulator import PIAPI_LIKE_PROFILES

SCHNELL = Model.SCHNELL.value

SESSIONS = 10
PROBE_INTERVAL = 0.1
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def process_tree(pid: int) -> list[int]:
    found = [pid]
    for child in children(pid):
        found += process_tree(child)
    return found


def wait_for_http(url: str, patience: float = 30.0) -> None:
    deadline = time.monotonic() + patience
    while True:
        try:
            with httpx2.stream("GET", url):  # headers are enough (GET /mcp may open an event stream)
                return
        except httpx2.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


async def http_post(host: str, port: int, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
    """One POST on its own connection, read to the end: status, headers (lower-case) and body.

    A load generator with a connection pool would spend its own CPU scanning a thousand open
    connections on every request; h11 over a plain asyncio connection costs next to nothing."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        conn = h11.Connection(h11.CLIENT)
        head = [("host", f"{host}:{port}"), ("content-length", str(len(body))), *headers.items()]
        writer.write(conn.send(h11.Request(method="POST", target=path, headers=head)) + conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        status, answer_headers, chunks = 0, {}, []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                answer_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, answer_headers, b"".join(chunks)
    finally:
        writer.close()


class Session:
    """One MCP session over streamable HTTP (2025-11-25 handshake), kept deliberately thin."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path
        self.headers, self.next_id = dict(HEADERS), 0

    async def _post(self, message: dict) -> dict | None:
        status, headers, body = await http_post(
            self.host, self.port, self.path, self.headers, json.dumps(message).encode()
        )
        if "mcp-session-id" in headers:
            self.headers["mcp-session-id"] = headers["mcp-session-id"]
        if status == 202:
            return None
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        if headers.get("content-type", "").startswith("application/json"):
            return json.loads(body)
        for line in body.decode().splitlines():
            if line.startswith("data:"):
                data = json.loads(line[5:])
                if data.get("id") == message.get("id"):
                    return data
        raise RuntimeError("no answer")

    async def open(self) -> None:
        await self.request(
            "initialize",
            {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "scale-bench", "version": "1"},
            },
        )
        self.headers["mcp-protocol-version"] = "2025-11-25"
        await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def request(self, method: str, params: dict) -> dict:
        self.next_id += 1
        answer = await self._post({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        assert answer is not None
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer["result"]

    async def call(self, name: str, arguments: dict) -> dict:
        self.next_id += 1
        params = {"name": name, "arguments": arguments, "_meta": {"progressToken": f"p{self.next_id}"}}
        answer = await self._post({"jsonrpc": "2.0", "id": self.next_id, "method": "tools/call", "params": params})
        assert answer is not None
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer["result"]


def probe_process(mcp_url: str, stop: Any, out: Any) -> None:
    """In its own process, so the load generator's own work never shows up as server latency:
    `flux_list_tasks` every PROBE_INTERVAL until `stop` is set; the latencies go to `out`."""

    async def probing() -> list[float]:
        session = Session(mcp_url)
        await session.open()
        times: list[float] = []
        while not stop.is_set():
            started = time.perf_counter()
            await session.call("flux_list_tasks", {"limit": 5})
            times.append(time.perf_counter() - started)
            await asyncio.sleep(max(0.0, PROBE_INTERVAL - (time.perf_counter() - started)))
        return times

    out.send(asyncio.run(probing()))


async def warm_up(mcp_url: str, k: int, side: int) -> None:
    """`k` calls of the measured kind, 10 at a time, before measuring: the poll planner learns the
    tasks' durations from them (as a server that has run for a while has), and every module a call
    loads is loaded."""
    session = Session(mcp_url)
    await session.open()
    for start in range(0, k, 10):
        arguments = [
            {"prompt": f"warm-up {i}", "width": side, "height": side} for i in range(start, min(k, start + 10))
        ]
        await asyncio.gather(*(session.call("flux_txt2img", a) for a in arguments))


async def run_load(mcp_url: str, n: int, run_id: str, include_image: str, side: int) -> dict:
    sessions = [Session(mcp_url) for _ in range(SESSIONS)]
    for session in sessions:
        await session.open()
    answers: list[tuple[float, dict]] = []

    async def one(k: int) -> None:
        arguments = {
            "prompt": f"{run_id} call {k}",
            "width": side,
            "height": side,
            "idempotency_key": f"{run_id}-{k}",
            "include_image": include_image,
        }
        result = await sessions[k % SESSIONS].call("flux_txt2img", arguments)
        answers.append((time.time(), result))

    stop = multiprocessing.Event()
    receive, send = multiprocessing.Pipe(duplex=False)
    prober = multiprocessing.Process(target=probe_process, args=(mcp_url, stop, send), daemon=True)
    prober.start()
    started = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(n)))
    wall = time.perf_counter() - started
    stop.set()
    probe_times = receive.recv()
    prober.join(10)
    overheads = []
    completed = 0
    for answered, result in answers:
        structured = result.get("structuredContent")
        if structured is None:  # the floor server's plain-dict result comes as JSON text
            structured = json.loads(result["content"][0]["text"])
        if structured.get("status") == "completed":
            completed += 1
            if structured.get("ended_at"):
                ended = datetime.fromisoformat(structured["ended_at"].replace("Z", "+00:00")).timestamp()
                overheads.append(answered - ended)
    return {"completed": completed, "wall": wall, "probe": probe_times, "overheads": overheads}


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def spread(ratios: list[float]) -> str:
    """A ratio measured in several rounds: its median and its range."""
    return f"median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}x)"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def serve_floor(port: int, task_seconds: float) -> None:
    """The floor: a bare one-process `MCPServer` whose `flux_txt2img` only sleeps as long as a task
    runs, reports progress three times and returns a small result (no PiAPI, no ledger, no image),
    and whose `flux_list_tasks` returns an empty list. What the SDK itself costs per call."""
    import uvicorn

    mcp = MCPServer("floor")

    @mcp.tool()
    async def flux_txt2img(
        ctx: Context,
        prompt: str,
        width: int = 1024,
        height: int = 1024,
        idempotency_key: str = "",
        include_image: str = "",
    ) -> dict:
        await ctx.report_progress(0, None, "pending")
        await asyncio.sleep(0.1)
        await ctx.report_progress(0.1, None, "processing")
        await asyncio.sleep(task_seconds)
        ended = datetime.now().astimezone().isoformat()
        await ctx.report_progress(task_seconds, None, "completed")
        return {"status": "completed", "ended_at": ended, "prompt": prompt}

    @mcp.tool()
    async def flux_list_tasks(limit: int = 5) -> dict:
        return {"tasks": []}

    uvicorn.run(mcp.streamable_http_app(host="127.0.0.1"), host="127.0.0.1", port=port, log_level="warning")


def bench_floor(n: int, args: argparse.Namespace) -> dict:
    port = free_port()
    like = PIAPI_LIKE_PROFILES[SCHNELL]  # the mean of the simulator's draws at this size
    seconds = args.task_seconds or like.queue_seconds + like.run_seconds * args.side**2 / 1024**2
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve-floor", str(port), "--task-seconds", str(seconds)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        wait_for_http(url)
        cpu_before = cpu_seconds(server.pid)
        client_before = time.process_time()
        load = asyncio.run(run_load(url, n, f"floor{n}", args.include_image, args.side))
        return {
            "n": n,
            **load,
            "cpu": cpu_seconds(server.pid) - cpu_before,
            "sim_cpu": 0.0,
            "client_cpu": time.process_time() - client_before,
            "rss": peak_rss_mb(server.pid),
            "gets_per_task": 0.0,
        }
    finally:
        stop(server)


def clean_environment() -> dict[str, str]:
    """This environment without any server setting, so a run measures only what it sets."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("FLUX_MCP_", "PIAPI_"))}


def start_simulator() -> tuple[subprocess.Popen, str]:
    """The built-in simulator in a process of its own on a free port: (process, base URL). The
    caller waits for it (`wait_for_http(url + "/_simulator/config")`) and stops it (`stop`)."""
    port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "flux_mcp", "simulator", "--port", str(port)],
        env=clean_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return sim, f"http://127.0.0.1:{port}"


def stop(*procs: subprocess.Popen | None) -> None:
    """SIGINT each (a profiler in --server-prefix writes its file), then kill what does not exit."""
    for proc in procs:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def bench_one(n: int, workers: int, args: argparse.Namespace, tmp: Path) -> dict:
    port = free_port()
    env = clean_environment()
    sim, sim_url = start_simulator()
    server = None
    try:
        wait_for_http(sim_url + "/_simulator/config")
        # Plain images (one PNG per size, drawn once): drawing a labelled image per task would cost
        # the simulator more CPU than the server spends on the whole task.
        config: dict = {"plain_images": True}
        if args.task_seconds:
            config |= {"durations": {SCHNELL: args.task_seconds}, "pending_seconds": 0.2}
        else:  # PiAPI-like schnell timing (the simulator scales the run by pixels: side x side), repeatable
            config |= {"profiles": {SCHNELL: PIAPI_LIKE_PROFILES[SCHNELL].model_dump()}, "seed": 7}
        httpx2.post(sim_url + "/_simulator/config", json=config).raise_for_status()
        run_dir = tmp / f"n{n}-w{workers}"
        server_env = {
            **env,
            "PIAPI_API_KEY": "sim-key",
            "PIAPI_BASE_URL": sim_url,
            "FLUX_MCP_DATA_DIR": str(run_dir / "data"),
            "FLUX_MCP_OUTPUT_DIR": str(run_dir / "images"),
            "FLUX_MCP_WAIT_SECONDS": "600",
        }
        argv = [sys.executable, "-m", "flux_mcp", "serve", "--transport", "http", "--port", str(port)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        argv = [*args.server_prefix.split(), *argv]
        server = subprocess.Popen(argv, env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_http(f"http://127.0.0.1:{port}/mcp")
        time.sleep(1.0 if workers > 1 else 0.0)
        url = f"http://127.0.0.1:{port}/mcp"
        if args.warm_up:
            asyncio.run(warm_up(url, args.warm_up, args.side))
        pids = process_tree(server.pid)
        cpu_before = sum(cpu_seconds(p) for p in pids)
        sim_before = cpu_seconds(sim.pid)
        httpx2.post(sim_url + "/_simulator/reset").raise_for_status()  # GETs/task counts the measured calls only
        client_before = time.process_time()
        load = asyncio.run(run_load(url, n, f"n{n}-{time.time_ns()}", args.include_image, args.side))
        pids = [p for p in process_tree(server.pid) if Path(f"/proc/{p}").exists()]
        client_cpu = time.process_time() - client_before
        cpu = sum(cpu_seconds(p) for p in pids) - cpu_before
        sim_cpu = cpu_seconds(sim.pid) - sim_before
        rss = max(peak_rss_mb(p) for p in pids)
        log = httpx2.get(sim_url + "/_simulator/log", timeout=60).json()
        entries = log if isinstance(log, list) else log.get("entries", log.get("log", []))
        gets = sum(1 for e in entries if e["method"] == "GET" and e["path"].startswith("/api/v1/task/"))
        creates = sum(1 for e in entries if e["method"] == "POST")
        return {
            "n": n,
            **load,
            "cpu": cpu,
            "sim_cpu": sim_cpu,
            "client_cpu": client_cpu,
            "rss": rss,
            "gets_per_task": gets / max(1, creates),
        }
    finally:
        stop(server, sim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, action="append", help="concurrent calls (repeatable; default 100, 300, 1000)")
    parser.add_argument("--quick", action="store_true", help="N = 100 and 300 only")
    parser.add_argument(
        "--workers",
        type=int,
        action="append",
        help="server processes on the one port (repeatable: each N is run with each, and throughput compared)",
    )
    parser.add_argument(
        "--server-prefix",
        default="",
        help='wrap the server command, e.g. "py-spy record -o profile.txt --format raw --" (profiling runs only)',
    )
    parser.add_argument(
        "--include-image", choices=["thumbnail", "none"], default="thumbnail", help="what each call asks for"
    )
    parser.add_argument("--side", type=int, default=512, help="image width and height in pixels (default 512)")
    parser.add_argument(
        "--warm-up", type=int, default=20, help="calls made before measuring, so the poll planner has learned (0: cold)"
    )
    parser.add_argument(
        "--task-seconds",
        type=float,
        default=0.0,
        help="fixed simulated task duration (default: PiAPI-like schnell timing for the image size)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also run a bare MCPServer whose tool only sleeps as long (what the SDK itself costs per call)",
    )
    parser.add_argument(
        "--rounds",
        type=positive,
        default=1,
        help="run every configuration this many times, side by side, and print the ratios' median and range "
        "(a shared machine drifts between runs; ratios from adjacent runs drift less)",
    )
    parser.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor(args.serve_floor, args.task_seconds)
        return
    sizes = args.n or ([100, 300] if args.quick else [100, 300, 1000])
    worker_counts = args.workers or [1]

    print(
        f"{'N':>5} {'workers':>7} {'completed':>9} {'wall':>7} {'tasks/s':>7} {'CPU/task':>9} {'peak RSS':>9} "
        f"{'probe p50':>9} {'probe p99':>9} {'overhead p50':>12} {'GETs/task':>9} {'simulator CPU':>13}"
    )

    def row(n: int, label: str, r: dict) -> float:
        sim_share = r["sim_cpu"] / r["wall"]
        print(
            f"{n:>5} {label:>7} {r['completed']:>9} {r['wall']:>6.1f}s {r['completed'] / r['wall']:>7.1f} "
            f"{r['cpu'] / n * 1000:>7.1f}ms {r['rss']:>7.0f}MB "
            f"{percentile(r['probe'], 0.5) * 1000:>7.0f}ms {percentile(r['probe'], 0.99) * 1000:>7.0f}ms "
            f"{percentile(r['overheads'], 0.5):>11.2f}s {r['gets_per_task']:>9.1f} "
            f"{sim_share * 100:>6.0f}% core"
            + ("" if sim_share < 0.7 else "  (simulator near its limit)")
            + f"   [load generator {r['client_cpu'] / r['wall'] * 100:.0f}% core, "
            f"server {r['cpu'] / r['wall'] * 100:.0f}% core]",
            flush=True,
        )
        return r["completed"] / r["wall"]

    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            worker_ratios: dict[int, list[float]] = {w: [] for w in worker_counts[1:]}
            floor_ratios: list[float] = []
            for _ in range(args.rounds):  # each round runs every configuration once, side by side
                throughput: dict[int, float] = {}
                cpu: dict[int, float] = {}
                for workers in worker_counts:
                    r = bench_one(n, workers, args, Path(tmp))
                    throughput[workers], cpu[workers] = row(n, str(workers), r), r["cpu"]
                first = worker_counts[0]
                for workers in worker_counts[1:]:
                    worker_ratios[workers].append(throughput[workers] / throughput[first])
                    print(
                        f"      N = {n}: {workers} workers carry {worker_ratios[workers][-1]:.2f}x "
                        f"the throughput of {first}",
                        flush=True,
                    )
                if args.floor:
                    floor = bench_floor(n, args)
                    row(n, "floor", floor)
                    floor_ratios.append(cpu[first] / max(floor["cpu"], 1e-9))
                    print(
                        f"      N = {n}: server CPU per call {floor_ratios[-1]:.1f}x the bare "
                        f"MCPServer's ({cpu[first] / n * 1000:.1f} ms against {floor['cpu'] / n * 1000:.1f} ms)",
                        flush=True,
                    )
            if args.rounds > 1:
                for workers, ratios in worker_ratios.items():
                    print(
                        f"      N = {n}, {args.rounds} rounds: {workers} workers / {worker_counts[0]}: {spread(ratios)}"
                    )
                if floor_ratios:
                    print(
                        f"      N = {n}, {args.rounds} rounds: CPU per call / the bare MCPServer's: "
                        + spread(floor_ratios)
                    )
    timing = f"tasks {args.task_seconds:g} s" if args.task_seconds else "PiAPI-like schnell timing for that size"
    print(
        f"server: piapi-flux-mcp serve --transport http; include_image={args.include_image}; "
        f"{args.side}x{args.side} px, {timing} in the simulator (its own process, plain images drawn once per "
        f"size); {SESSIONS} client sessions + 1 probe session; loopback. tasks/s = completed / wall. "
        "Simulator CPU well under 100% of a core = it kept up."
        + (
            " floor: a bare MCPServer (same SDK) whose tool only sleeps as long and reports progress."
            if args.floor
            else ""
        )
    )


if __name__ == "__main__":
    main()
