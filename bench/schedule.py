"""The poll schedule alone, on a fake clock: how long after a task ends does its next GET come?

No server, no HTTP, no CPU contention: batches of tasks with the simulator's PiAPI-like durations
(`PIAPI_LIKE_PROFILES`, seeded), each batch of 15 started at once against one `PollPlanner` (as
`bench/detection.py` runs them), after 5 warm-up tasks of the kind (learned) or none (cold).
Every GET is answered instantly and a task that has ended is seen as completed at its next GET,
so the lag printed is what the schedule adds, and `bench/detection.py`'s overhead is this plus
our own work on the result plus waiting for a CPU. Per profile: the median, 80th and 95th
percentile over batches of the batch's p50 lag (one batch is one row of `bench/detection.py`),
the p95 over all tasks, and GETs per task (mean and most); for comparison, PiAPI's MCP server's
fixed interval (2 s for schnell, 4 s for the others) on the same durations. Last, in how many
batches (and groups of three batches, as `bench/detection.py` pools its rounds) cold's p50 and
GETs per task are no worse than the fixed policy's on the same durations.

    python bench/schedule.py [--batches 80] [--seed 11]
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
from datetime import UTC, datetime, timedelta

from flux_mcp.polling import PollPlanner
from flux_mcp.record import TaskRecord
from flux_mcp.simulator import PIAPI_LIKE_PROFILES
from flux_mcp.timing import Sample, TaskKind

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
TASKS = 15
WARMUPS = 5

Batch = tuple[list[float], list[int]]  # each task's lag and GETs


def record(task_id: str, queue: float, run: float, now: float) -> TaskRecord:
    """The task as PiAPI would show it `now` seconds after it was created (at 0)."""
    status = "pending" if now < queue else "processing" if now < queue + run else "completed"
    return TaskRecord(
        task_id=task_id,
        status=status,
        created_at=EPOCH,
        started_at=EPOCH + timedelta(seconds=queue) if status != "pending" else None,
        ended_at=EPOCH + timedelta(seconds=queue + run) if status == "completed" else None,
    )


def batch(model: str, rng: random.Random, *, warm: bool) -> tuple[list[float], list[int]]:
    """One batch started at once; returns each task's lag (seconds) and GETs."""
    profile = PIAPI_LIKE_PROFILES[model]
    kind = TaskKind.of(model, "txt2img", {"width": 1024, "height": 1024})
    now = 0.0
    planner = PollPlanner(clock=lambda: now, wall=lambda: EPOCH.timestamp() + now)
    if warm:
        for _ in range(WARMUPS):
            planner.stats.add(kind, Sample(*profile.draw(rng)))
    tasks: dict[str, tuple[float, float]] = {}
    schedules = {}
    due: list[tuple[float, str]] = []
    for i in range(TASKS):
        task_id = f"t{i}"
        tasks[task_id] = profile.draw(rng)
        created = record(task_id, *tasks[task_id], now)
        planner.note_created(created, kind, sent_wall=EPOCH.timestamp(), answered_wall=EPOCH.timestamp())
        schedules[task_id] = planner.schedule(task_id, kind)
        heapq.heappush(due, (schedules[task_id].next_poll(created, now=now, scheduled=now), task_id))
    lags, gets = [], []
    while due:
        scheduled, task_id = heapq.heappop(due)
        now = max(now, scheduled)
        planner.count_poll(task_id)
        seen = record(task_id, *tasks[task_id], now)
        planner.observe(task_id, kind, seen, now)  # as the server's wait does with every answer
        if seen.is_terminal:
            lags.append(now - sum(tasks[task_id]))
            gets.append(planner.spent(task_id))
            planner.learn(task_id, seen)
            continue
        heapq.heappush(due, (schedules[task_id].next_poll(seen, now=now, scheduled=scheduled), task_id))
    return lags, gets


def fixed_batch(model: str, rng: random.Random) -> tuple[list[float], list[int]]:
    """The same durations polled every `interval` seconds from the start."""
    interval = 2.0 if "schnell" in model else 4.0
    lags, gets = [], []
    for _ in range(TASKS):
        total = sum(PIAPI_LIKE_PROFILES[model].draw(rng))
        polls = math.ceil(total / interval)
        lags.append(polls * interval - total)
        gets.append(polls)
    return lags, gets


def main(args: argparse.Namespace) -> None:
    print(f"{TASKS} tasks per batch, {args.batches} batches per row; lag = next GET after the task ended")
    print(f"{'profile':<36}{'batch p50: median':>18}{'p80':>10}{'p95':>10}{'all p95':>10}{'GETs/task':>11}{'most':>6}")
    verdicts = []
    for model in PIAPI_LIKE_PROFILES:
        batches: dict[str, list[Batch]] = {}
        for policy in ("learned", "cold", "PiAPI MCP fixed"):
            rng = random.Random(args.seed)
            if policy == "PiAPI MCP fixed":
                batches[policy] = [fixed_batch(model, rng) for _ in range(args.batches)]
            else:
                batches[policy] = [batch(model, rng, warm=policy == "learned") for _ in range(args.batches)]
            p50s = sorted(statistics.median(lags) for lags, _ in batches[policy])
            every = sorted(lag for lags, _ in batches[policy] for lag in lags)
            gets = [n for _, spent in batches[policy] for n in spent]

            def ms(values: list[float], q: float) -> str:
                return f"{values[min(len(values) - 1, int(q * len(values)))] * 1000:,.0f} ms"

            label = f"{model.split('/')[-1]}, {policy}"
            print(
                f"{label:<36}{ms(p50s, 0.5):>18}{ms(p50s, 0.8):>10}{ms(p50s, 0.95):>10}{ms(every, 0.95):>10}"
                f"{statistics.fmean(gets):>11.1f}{max(gets):>6}"
            )
        verdicts.append((model, paired(batches["cold"], batches["PiAPI MCP fixed"])))
    # Cold and fixed ran the same durations batch by batch (the learned rows draw warm-ups too).
    print("\ncold against the fixed policy on the same durations: how often its p50 and its GETs per task are no worse")
    for model, (single, grouped, groups) in verdicts:
        print(
            f"  {model.split('/')[-1]:<20} single batches: p50 {single[0]}, GETs {single[1]} of {args.batches}; "
            f"pooled by 3 (as bench/detection.py's rounds): p50 {grouped[0]}, GETs {grouped[1]} of {groups}"
        )


def paired(cold: list[Batch], fixed: list[Batch]) -> tuple[tuple[int, int], tuple[int, int], int]:
    """In how many batches, and groups of three, cold's p50 and mean GETs are no worse than fixed's."""

    def pooled(group: list[Batch]) -> tuple[float, float]:
        lags = [lag for batch_lags, _ in group for lag in batch_lags]
        return statistics.median(lags), statistics.fmean(n for _, spent in group for n in spent)

    def no_worse(ours: list[Batch], theirs: list[Batch]) -> tuple[int, int]:
        (p50, gets), (their_p50, their_gets) = pooled(ours), pooled(theirs)
        return int(p50 <= their_p50), int(gets <= their_gets)

    def count(results: list[tuple[int, int]]) -> tuple[int, int]:
        return sum(p for p, _ in results), sum(g for _, g in results)

    groups = len(cold) // 3
    single = [no_worse([c], [f]) for c, f in zip(cold, fixed, strict=True)]
    grouped = [no_worse(cold[3 * g : 3 * g + 3], fixed[3 * g : 3 * g + 3]) for g in range(groups)]
    return count(single), count(grouped), groups


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=80, help="batches of 15 tasks per row")
    parser.add_argument("--seed", type=int, default=11, help="seeds the durations")
    main(parser.parse_args())
