"""Detection overhead: how long after PiAPI finishes a task does the tool call return?

Runs the real server (tool calls over MCP: submit, wait, save, thumbnail) against the built-in
simulator with PiAPI-like durations (`PIAPI_LIKE_PROFILES`: queue and run times drawn per model,
seeded) and measures, for every task,

    overhead = when the tool call returned - when the simulator finished the task

(both on this process's monotonic clock), and the GETs the task cost at the simulator. Per
duration profile (~4 s schnell, ~20 s dev, ~33 s dev-advanced, each with some queue time) it runs
15 concurrent tasks, after 5 warm-up tasks of the same kind where the policy may learn, for:

- ours, learned: the default learned schedule, after the warm-ups;
- ours, cold: the same with an empty ledger and no warm-ups (built-in priors only);
- ours + webhooks: HTTP mode with FLUX_MCP_PUBLIC_URL, the simulator pushing PiAPI-format
  webhooks to the server's receiver, after the warm-ups (also shown: the overhead counted from
  when the completion webhook was sent);
- PiAPI's MCP server's fixed interval (timeout / 30: 2 s for schnell, 4 s for the others);
- a fixed 0.5 s poller;
- PiAPI's CLI backoff (1 s x 1.5, capped at 30 s).

The fixed policies run inside this same server (`ServerOptions(policy=...)`), so every row pays
the same save and thumbnail costs and the differences are the schedules'. The 5 warm-ups run
at once; every policy runs them (the cold one against a throwaway ledger) so that all measured
batches are alike. All policies warm up side by side against one simulator; then their measured
batches start 5 s apart, so one batch's finishes do not meet another's on the same CPUs, each
after the simulator is reseeded, so every policy is measured on the same 15 durations; the
simulator renders each image while its task runs, as PiAPI does.

All of that is one round; `--rounds` (3 by default) repeats it, each round with fresh servers,
fresh warm-ups and its own 15 durations, and the p50 and p95 are over all rounds' tasks. One
batch's median depends much on where its 15 durations happen to fall against a fixed
interval's polls (a batch ending just before the fixed poller's 4 s steps flatters it; over 80
batches its p50 ranges from about 1.2 to 2.8 s on ~20 s tasks, `bench/schedule.py`), so each
round's p50 is printed too. A full run takes about fifteen minutes, `--quick` (the ~4 s profile
only) about two. Figures are noisy on a busy machine: run it twice.

    python bench/detection.py [--quick] [--rounds 3] [--tasks 15] [--warmups 5] [--seed 1]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
from anyio.abc import TaskGroup
from mcp import Client

from flux_mcp.http_app import build_http_app
from flux_mcp.polling import BackoffPolicy, PollPolicy
from flux_mcp.record import parse_time
from flux_mcp.server import ServerOptions, create_server
from flux_mcp.settings import Settings
from flux_mcp.simulator import (
    DEFAULT_API_KEY,
    PIAPI_LIKE_PROFILES,
    SimTask,
    SimulatorState,
    bind_socket,
    running_app,
    running_simulator,
)
from flux_mcp.simulator.app import ensure_rendered

# The measured batches start this far apart, so one batch's 15 finishes do not meet another's on
# the same CPUs (which would measure the machine, not the schedules).
STAGGER_SECONDS = 5.0
MEASURED_SEED_OFFSET = 1000  # the measured batches' draws: not a replay of the warm-ups'
PROFILES = {  # label -> model; PIAPI_LIKE_PROFILES[model] sets the durations
    "~4 s (schnell)": "Qubico/flux1-schnell",
    "~20 s (dev)": "Qubico/flux1-dev",
    "~33 s (dev-advanced)": "Qubico/flux1-dev-advanced",
}


@dataclass(frozen=True)
class Fixed:
    seconds: float

    def interval(self, attempt: int) -> float:
        return self.seconds


@dataclass(frozen=True)
class Policy:
    name: str
    policy: PollPolicy | None = None  # None: the learned schedule
    warm: bool = True  # False: measured with an empty ledger (its warm-ups go to a throwaway one)
    webhooks: bool = False
    piapi_mcp: bool = False  # the interval depends on the model


POLICIES = [
    Policy("ours, learned"),
    Policy("ours, cold", warm=False),
    Policy("ours + webhooks", webhooks=True),
    Policy("PiAPI MCP fixed 2 s / 4 s", piapi_mcp=True),
    Policy("fixed 0.5 s", Fixed(0.5)),
    Policy("PiAPI CLI 1 s x1.5", BackoffPolicy(first=(1.0,), factor=1.5, cap=30.0)),
]


@dataclass(frozen=True)
class Sim:
    """Where the simulator answers, and how to read back what it did (over its admin routes)."""

    base_url: str
    api_key: str = DEFAULT_API_KEY

    async def reseed(self, seed: int) -> None:
        """Restart the simulator's draws: every batch started after this runs the same durations."""
        async with httpx2.AsyncClient(base_url=self.base_url, timeout=30) as http:
            (await http.post("/_simulator/config", json={"seed": seed})).raise_for_status()

    async def finished(self, task_ids: list[str]) -> dict[str, tuple[float, int, list[float]]]:
        """Per task: when it ended (wall clock), the GETs it got, and when its completion webhooks
        were sent (monotonic clock)."""
        async with httpx2.AsyncClient(base_url=self.base_url, timeout=30) as http:
            tasks = (await http.get("/_simulator/tasks")).json()
            log = (await http.get("/_simulator/log")).json()
            webhooks = (await http.get("/_simulator/webhooks")).json()
        wanted = set(task_ids)
        out: dict[str, tuple[float, int, list[float]]] = {}
        for task in tasks:
            if task["task_id"] in wanted:
                ended = parse_time(task["meta"]["ended_at"])
                assert ended is not None, task["status"]
                gets = sum(1 for e in log if e["method"] == "GET" and e["task_id"] == task["task_id"])
                sent = [w["sent"] for w in webhooks if w["task_id"] == task["task_id"] and w["status"] == "completed"]
                out[task["task_id"]] = (ended.timestamp(), gets, sent)
        return out


@dataclass
class Measured:
    overheads: list[float] = field(default_factory=list)
    after_push: list[float] = field(default_factory=list)
    gets: list[int] = field(default_factory=list)
    batch_p50s: list[float] = field(default_factory=list)  # one per round


@contextlib.asynccontextmanager
async def connect(sim: Sim, policy: Policy, model: str, folder: Path) -> AsyncIterator[Client]:
    settings = Settings(
        api_key=sim.api_key,
        base_url=sim.base_url,
        data_dir=folder / "data",
        output_dir=folder / "images",
        image_roots=[folder],
        wait_seconds=300,
    )
    chosen = Fixed(2.0 if "schnell" in model else 4.0) if policy.piapi_mcp else policy.policy
    if not policy.webhooks:
        async with Client(create_server(settings, ServerOptions(policy=chosen))) as client:
            yield client
        return
    sock = bind_socket()
    settings = settings.model_copy(update={"public_url": f"http://127.0.0.1:{sock.getsockname()[1]}"})
    app = build_http_app(settings, options=ServerOptions(policy=chosen))
    async with running_app(app, sock=sock) as url, Client(f"{url}/mcp") as client:
        yield client


async def generate(client: Client, model: str, prompt: str) -> tuple[str, float, float]:
    """The task id, and when the call returned on the wall and the monotonic clocks."""
    args = {"prompt": prompt, "model": model, "width": 1024, "height": 1024}
    result = await client.call_tool("flux_txt2img", args)
    returned = time.time(), time.monotonic()
    body: dict[str, Any] = result.structured_content or {}
    if body.get("status") != "completed":
        raise RuntimeError(f"a task did not complete: {body.get('status')} {body.get('error')}")
    return str(body["task_id"]), *returned


async def warm_up(client: Client, model: str, count: int) -> None:
    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(generate, client, model, f"warm-up {i}")


class Start:
    """Lets the measured batches go one at a time, `STAGGER_SECONDS` apart, once all have warmed up."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.ready: set[str] = set()
        self.all_ready = anyio.Event()

    async def wait_turn(self, name: str) -> None:
        self.ready.add(name)
        if len(self.ready) == len(self.names):
            self.all_ready.set()
        await self.all_ready.wait()
        await anyio.sleep(self.names.index(name) * STAGGER_SECONDS)


async def run_policy(
    sim: Sim,
    policy: Policy,
    model: str,
    args: argparse.Namespace,
    root: Path,
    out: Measured,
    start: Start,
    round_no: int,
) -> None:
    results: list[tuple[str, float, float]] = []
    # Every policy runs its warm-ups (the cold one against a throwaway ledger, so it measures with an
    # empty one); then the measured batches start one after another.
    with tempfile.TemporaryDirectory(dir=root) as folder:
        async with connect(sim, policy, model, Path(folder)) as client:
            if policy.warm:
                await warm_up(client, model, args.warmups)
            else:
                with tempfile.TemporaryDirectory(dir=root) as throwaway:
                    async with connect(sim, policy, model, Path(throwaway)) as other:
                        await warm_up(other, model, args.warmups)
            await start.wait_turn(policy.name)
            # Every policy's measured batch runs the same 15 durations, drawn apart from the warm-ups'.
            await sim.reseed(args.seed + MEASURED_SEED_OFFSET * (round_no + 1))

            async def one(i: int) -> None:
                results.append(await generate(client, model, f"{policy.name} {i}"))

            async with anyio.create_task_group() as tg:
                for i in range(args.tasks):
                    tg.start_soon(one, i)
    finished = await sim.finished([task_id for task_id, _, _ in results])
    batch: list[float] = []
    for task_id, returned_wall, returned in results:
        ended, gets, sent = finished[task_id]
        batch.append(returned_wall - ended)
        out.gets.append(gets)
        if sent:
            out.after_push.append(returned - min(sent))
    out.overheads += batch
    out.batch_p50s.append(statistics.median(batch))


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.ERROR)
    chosen = dict(list(PROFILES.items())[:1]) if args.quick else PROFILES
    simulator = simulator_here(args.seed) if args.in_process else simulator_process(args.seed)
    async with simulator as sim:
        with tempfile.TemporaryDirectory() as root:
            for label, model in chosen.items():
                measured = {policy.name: Measured() for policy in POLICIES}
                for round_no in range(args.rounds):
                    start = Start([policy.name for policy in POLICIES])
                    async with anyio.create_task_group() as tg:
                        for policy in POLICIES:
                            out = measured[policy.name]
                            tg.start_soon(run_policy, sim, policy, model, args, Path(root), out, start, round_no)
                report(label, model, args, measured)


@contextlib.asynccontextmanager
async def simulator_here(seed: int) -> AsyncIterator[Sim]:
    """The simulator on this process's event loop, configured for the bench."""
    async with running_simulator() as sim, anyio.create_task_group() as renders:
        prerender(sim.state, renders)
        profiles_config = {m: PIAPI_LIKE_PROFILES[m].model_dump() for m in PROFILES.values()}
        sim.state.configure(profiles=profiles_config, seed=seed)
        yield Sim(sim.base_url, sim.api_key)
        renders.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def simulator_process(seed: int) -> AsyncIterator[Sim]:
    """The simulator in a child process (this script with `--serve-simulator`); it prints its URL
    and serves until its stdin closes, so it never outlives this process."""
    async with await anyio.open_process(
        [sys.executable, __file__, "--serve-simulator", "--seed", str(seed)], stderr=None
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        try:
            line = b""
            with anyio.fail_after(30):
                while not line.endswith(b"\n"):
                    line += await child.stdout.receive()
            if not line.startswith(b"http"):
                raise RuntimeError(f"the simulator did not start: {line!r}")
            yield Sim(line.decode().strip())
        finally:
            with anyio.CancelScope(shield=True):
                await child.stdin.aclose()
                with anyio.move_on_after(10):
                    await child.wait()
                if child.returncode is None:
                    child.kill()
                    await child.wait()


async def serve_simulator(seed: int) -> None:
    async with simulator_here(seed) as sim:
        print(sim.base_url, flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


def prerender(state: SimulatorState, renders: TaskGroup) -> None:
    """The simulator renders each task's PNG while it runs, as PiAPI would, instead of inside the
    first GET that sees it completed: that CPU time is PiAPI's, not part of anyone's overhead."""
    create = state.create_task

    def create_and_render(*args: Any, **kwargs: Any) -> SimTask:
        task = create(*args, **kwargs)
        renders.start_soon(ensure_rendered, state, task)
        return task

    state.create_task = create_and_render  # type: ignore[method-assign]


def report(label: str, model: str, args: argparse.Namespace, measured: dict[str, Measured]) -> None:
    profile = PIAPI_LIKE_PROFILES[model]
    print(
        f"\n{label}: queue ~{profile.queue_seconds:g} s + run ~{profile.run_seconds:g} s, "
        f"{args.tasks} concurrent tasks per policy (after {args.warmups} warm-ups where marked), "
        f"{args.rounds} round{'s' if args.rounds != 1 else ''}"
    )
    base = measured["ours, learned"]
    base_p50, base_gets = statistics.median(base.overheads), statistics.fmean(base.gets)
    print(
        f"{'policy':<28}{'p50':>10}{'p95':>10}{'GETs/task':>11}{'p50 / ours':>12}{'GETs / ours':>13}"
        f"   {'each round p50'}"
    )
    for name, m in measured.items():
        p50, gets = statistics.median(m.overheads), statistics.fmean(m.gets)
        rounds = " / ".join(f"{x * 1000:,.0f}" for x in m.batch_p50s)
        print(
            f"{name:<28}{ms(p50):>10}{ms(p(m.overheads, 0.95)):>10}{gets:>11.1f}"
            f"{p50 / base_p50:>11.1f}x{gets / base_gets:>12.2f}x   {rounds} ms"
        )
    push = measured["ours + webhooks"].after_push
    if push:
        print(f"{'  (webhooks, after the push)':<28}{ms(statistics.median(push)):>10}{ms(p(push, 0.95)):>10}")


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the ~4 s profile only")
    parser.add_argument("--tasks", type=at_least_one, default=15, help="concurrent tasks per policy and profile")
    parser.add_argument("--warmups", type=int, default=5, help="tasks of the same kind before measuring")
    parser.add_argument(
        "--rounds", type=at_least_one, default=3, help="measured batches per policy and profile, each on new durations"
    )
    parser.add_argument("--seed", type=int, default=1, help="seeds the simulated durations")
    parser.add_argument("--in-process", action="store_true", help="run the simulator on this process's event loop")
    parser.add_argument("--serve-simulator", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    anyio.run(serve_simulator, arguments.seed) if arguments.serve_simulator else anyio.run(main, arguments)
