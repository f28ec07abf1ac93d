"""How quickly do fixed poll schedules notice a finished task, and how many GETs do they spend?

Runs piapi-flux-mcp's real `wait_for_task` on a fake clock (so the numbers are exact and the run takes
a second) against tasks whose durations are drawn uniformly from wide ranges per Flux model, once
with our fallback `BackoffPolicy` (what a kind without any duration estimate gets; the learned
schedule is measured end to end by bench/detection.py) and once with the schedules other clients
use:

- fixed `timeout / 30` (PiAPI's own MCP server: 2 s for schnell, 4 s for dev, 6 s for ControlNet),
- fixed 3 s (the n8n node),
- exponential 1 s x 1.5 capped at 30 s (PiAPI's CLI).

For each it prints the mean and 95th-percentile *detection lag* (time between the task finishing
and the poller seeing it) and the mean number of GETs, plus ratios against ours.

    python bench/poll_schedules.py [--tasks 2000] [--seed 7]
"""

from __future__ import annotations

import argparse
import random
import statistics
from dataclasses import dataclass

import anyio

from flux_mcp.polling import BackoffPolicy, PollPolicy, wait_for_task
from flux_mcp.record import TaskRecord

DURATIONS = {  # seconds from submit to completed, uniform in these ranges
    "schnell": (2.0, 8.0),
    "dev": (10.0, 40.0),
    "dev-advanced": (20.0, 60.0),
}


@dataclass(frozen=True)
class Fixed:
    seconds: float

    def interval(self, attempt: int) -> float:
        return self.seconds


@dataclass(frozen=True)
class Exponential:
    first: float
    factor: float
    cap: float

    def interval(self, attempt: int) -> float:
        return min(self.cap, self.first * self.factor**attempt)


SCHEDULES: dict[str, dict[str, PollPolicy]] = {
    "piapi-flux-mcp fallback (ours)": {m: BackoffPolicy() for m in DURATIONS},
    "fixed timeout/30 (PiAPI MCP)": {"schnell": Fixed(2.0), "dev": Fixed(4.0), "dev-advanced": Fixed(6.0)},
    "fixed 3 s (n8n)": {m: Fixed(3.0) for m in DURATIONS},
    "1 s x1.5 cap 30 s (PiAPI CLI)": {m: Exponential(1.0, 1.5, 30.0) for m in DURATIONS},
}


async def measure(policy: PollPolicy, duration: float) -> tuple[float, int]:
    now = 0.0
    polls = 0

    def clock() -> float:
        return now

    async def sleep(seconds: float) -> None:
        nonlocal now
        now += seconds

    async def fetch(task_id: str) -> TaskRecord:
        nonlocal polls
        polls += 1
        return TaskRecord(task_id=task_id, status="completed" if now >= duration else "processing")

    created = TaskRecord(task_id="t", status="pending")  # what the create response said at t=0
    await wait_for_task(
        fetch, "t", timeout=600, policy=policy, clock=clock, sleep=sleep, heartbeat_seconds=600, initial=created
    )
    return now - duration, polls


async def main(tasks: int, seed: int) -> None:
    rng = random.Random(seed)
    workload = [(model, rng.uniform(*DURATIONS[model])) for model in DURATIONS for _ in range(tasks)]
    results: dict[str, tuple[float, float, float]] = {}
    for name, per_model in SCHEDULES.items():
        lags, polls = [], []
        for model, duration in workload:
            lag, count = await measure(per_model[model], duration)
            lags.append(lag)
            polls.append(count)
        p95 = statistics.quantiles(lags, n=20)[-1]
        results[name] = (statistics.fmean(lags), p95, statistics.fmean(polls))
    ours = results["piapi-flux-mcp fallback (ours)"]
    print(f"{len(workload)} simulated tasks ({', '.join(f'{m} {a:g}-{b:g} s' for m, (a, b) in DURATIONS.items())})\n")
    print(f"{'schedule':<32}{'mean lag':>10}{'p95 lag':>10}{'GETs':>8}{'lag / ours':>12}{'GETs / ours':>13}")
    for name, (lag, p95, gets) in results.items():
        print(f"{name:<32}{lag:>9.2f}s{p95:>9.2f}s{gets:>8.1f}{lag / ours[0]:>11.2f}x{gets / ours[2]:>12.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per model")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    anyio.run(main, args.tasks, args.seed)
