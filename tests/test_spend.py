"""The spend guard: a daily budget checked and charged atomically in the ledger, refunds for tasks
PiAPI does not bill, and a confirmation above the per-call threshold through elicitation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime

import anyio
import pytest
from mcp import Client
from mcp.types import ElicitResult

from flux_mcp.catalog import PRICE_PER_IMAGE_USD, Model
from flux_mcp.errors import BudgetExceededError
from flux_mcp.ledger import TaskLedger
from flux_mcp.spend import SpendGuard, SpendLimit, day_start

pytestmark = pytest.mark.anyio

SCHNELL = PRICE_PER_IMAGE_USD[Model.SCHNELL]


def posts(sim) -> list[dict]:
    return [e for e in sim.state.log if e["method"] == "POST"]


def guarded(settings, fast_options, **limits):
    from flux_mcp.server import create_server

    return create_server(settings.model_copy(update=limits), fast_options)


# --- the pure rules ----------------------------------------------------------------------------


def test_the_day_starts_at_utc_midnight():
    noon = datetime(2026, 12, 3, 12, 30, tzinfo=UTC).timestamp()
    assert day_start(noon) == datetime(2026, 12, 3, tzinfo=UTC).timestamp()


def test_decisions_follow_the_budget_then_the_threshold():
    guard = SpendGuard(daily_budget_usd=3 * SCHNELL, confirm_above_usd=SCHNELL)
    assert guard.decide(SCHNELL, 2 * SCHNELL) == "allowed"  # exactly meets the budget
    assert guard.decide(2 * SCHNELL, 0) == "needs_confirmation"
    assert guard.decide(2 * SCHNELL, 2 * SCHNELL) == "over_budget"
    assert SpendGuard().decide(1000.0, 1000.0) == "allowed"  # unset = no limit


# --- the budget --------------------------------------------------------------------------------


async def test_an_exhausted_budget_sends_nothing_but_a_repeat_still_reattaches(sim, settings, fast_options):
    server = guarded(settings, fast_options, daily_budget_usd=SCHNELL)
    async with Client(server) as client:
        first = await client.call_tool("flux_txt2img", {"prompt": "the only one today"})
        assert first.structured_content["status"] == "completed"
        assert first.structured_content["spent_today_usd"] == pytest.approx(SCHNELL)

        dry = await client.call_tool("flux_txt2img", {"prompt": "another", "dry_run": True})
        assert dry.structured_content["spend_guard"] == "over_budget"

        refused = await client.call_tool("flux_txt2img", {"prompt": "another"})
        error = refused.structured_content["error"]
        assert refused.is_error and error["category"] == "budget_exceeded" and not error["retryable"]
        assert "FLUX_MCP_DAILY_BUDGET_USD" in error["hint"] and "Nothing was sent" in error["hint"]
        assert refused.structured_content["spent_today_usd"] == pytest.approx(SCHNELL)
        assert len(posts(sim)) == 1

        again = await client.call_tool("flux_txt2img", {"prompt": "the only one today"})
        assert again.structured_content["reattached"] is True and not again.is_error
        listed = (await client.call_tool("flux_list_tasks", {})).structured_content
        assert listed["spent_today_usd"] == pytest.approx(SCHNELL) and listed["daily_budget_usd"] == SCHNELL
    assert len(posts(sim)) == 1


async def test_failed_tasks_are_given_back_to_the_budget(sim, settings, fast_options):
    server = guarded(settings, fast_options, daily_budget_usd=SCHNELL)
    async with Client(server) as client:
        sim.state.add_fault("fail_next", code=10001, message="not billed")
        failed = await client.call_tool("flux_txt2img", {"prompt": "fails"})
        assert failed.structured_content["status"] == "failed"
        assert failed.structured_content["spent_today_usd"] == 0
        done = await client.call_tool("flux_txt2img", {"prompt": "fits again"})
        assert done.structured_content["status"] == "completed"
    assert len(posts(sim)) == 2


async def test_a_cancelled_task_is_given_back(tmp_path):
    from flux_mcp.record import TaskRecord

    ledger = TaskLedger(tmp_path / "tasks.sqlite3")
    limit = SpendLimit(since=0, budget_usd=SCHNELL)

    async def reserve(key: str):
        return await ledger.reserve(
            idempotency_key=key, window_seconds=None, tool="t", task_type="txt2img", model="Qubico/flux1-schnell",
            request={}, payload={"key": key}, estimated_cost_usd=SCHNELL, spend_limit=limit,
        )  # fmt: skip

    first = await reserve("a")
    await ledger.attach(first.entry.local_id, TaskRecord(task_id="t-1", status="pending"))
    with pytest.raises(BudgetExceededError):
        await reserve("b")
    await ledger.record(TaskRecord(task_id="t-1", status="cancelled"))
    assert await ledger.spent_since(0) == 0
    assert (await reserve("b")).is_new


async def test_two_processes_sharing_the_ledger_cannot_overspend_together(tmp_path):
    """Each process races to reserve many tasks against a budget of three: three pass in total."""
    path = tmp_path / "shared.sqlite3"
    go = tmp_path / "go"
    script = textwrap.dedent(
        f"""
        import anyio, json, os, sys, time
        from pathlib import Path
        from flux_mcp.errors import BudgetExceededError
        from flux_mcp.ledger import TaskLedger
        from flux_mcp.spend import SpendLimit

        async def main():
            ledger = TaskLedger(Path({str(path)!r}))
            await ledger.open()
            while not Path({str(go)!r}).exists():
                time.sleep(0.005)
            won = 0
            async def one(n):
                nonlocal won
                try:
                    await ledger.reserve(
                        idempotency_key=f"{{os.getpid()}}-{{n}}", window_seconds=None, tool="t",
                        task_type="txt2img", model="m", request={{}}, payload={{"n": n}},
                        estimated_cost_usd={SCHNELL}, spend_limit=SpendLimit(0, {3 * SCHNELL}),
                    )
                    won += 1
                except BudgetExceededError:
                    pass
            async with anyio.create_task_group() as tg:
                for n in range(6):
                    tg.start_soon(one, n)
            print(json.dumps(won))

        anyio.run(main)
        """
    )
    await TaskLedger(path).open()
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    won = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(won) == 3
    assert await TaskLedger(path).spent_since(0) == pytest.approx(3 * SCHNELL)


# --- confirmation above the threshold ------------------------------------------------------------

BATCH_OF_TWO = {"prompt": "two of them", "batch_size": 2}  # 2 x schnell, above a one-image threshold


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_call_above_the_threshold_is_confirmed_by_the_user_first(sim, settings, fast_options, mode):
    asked = []

    async def accept(context, params):
        asked.append(params)
        return ElicitResult(action="accept", content={"confirm": True})

    server = guarded(settings, fast_options, confirm_above_usd=SCHNELL)
    async with Client(server, mode=mode, elicitation_callback=accept) as client:
        cheap = await client.call_tool("flux_txt2img", {"prompt": "one"})
        assert cheap.structured_content["status"] == "completed" and asked == []
        result = await client.call_tool("flux_txt2img", BATCH_OF_TWO)
        assert result.structured_content["status"] == "completed" and len(result.structured_content["images"]) == 2
        assert len(asked) == 1
        assert "$0.003" in asked[0].message and "FLUX_MCP_CONFIRM_ABOVE_USD" in asked[0].message
        assert asked[0].requested_schema["properties"]["confirm"]["type"] == "boolean"
        again = await client.call_tool("flux_txt2img", BATCH_OF_TWO)  # re-attaching costs nothing: no question
        assert again.structured_content["reattached"] is True and len(asked) == 1
    assert len(posts(sim)) == 2


@pytest.mark.parametrize("mode", ["legacy", "auto"])
@pytest.mark.parametrize("answer", [{"action": "decline"}, {"action": "accept", "content": {"confirm": False}}])
async def test_a_declined_confirmation_sends_nothing(sim, settings, fast_options, mode, answer):
    async def decline(context, params):
        return ElicitResult(**answer)

    server = guarded(settings, fast_options, confirm_above_usd=SCHNELL)
    async with Client(server, mode=mode, elicitation_callback=decline) as client:
        result = await client.call_tool("flux_txt2img", BATCH_OF_TWO)
        error = result.structured_content["error"]
        assert result.is_error and error["category"] == "not_confirmed" and not error["retryable"]
        assert result.structured_content["task_id"] is None
    assert posts(sim) == []


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_without_elicitation_a_call_above_the_threshold_is_refused_naming_the_setting(
    sim, settings, fast_options, mode
):
    server = guarded(settings, fast_options, confirm_above_usd=SCHNELL)
    async with Client(server, mode=mode) as client:
        dry = await client.call_tool("flux_txt2img", {**BATCH_OF_TWO, "dry_run": True})
        assert dry.structured_content["spend_guard"] == "needs_confirmation"
        result = await client.call_tool("flux_txt2img", BATCH_OF_TWO)
        error = result.structured_content["error"]
        assert result.is_error and error["category"] == "confirmation_required"
        assert "FLUX_MCP_CONFIRM_ABOVE_USD" in error["message"] + error["hint"]
        cheap = await client.call_tool("flux_txt2img", {"prompt": "one"})
        assert cheap.structured_content["status"] == "completed"
    assert len(posts(sim)) == 1


async def test_calls_finishing_together_share_one_read_of_the_day_s_spend(tmp_path, make_service, settings):
    """A read of today's spend begun after a call's outcome was recorded serves it, however many
    calls finish at once; a read begun earlier does not."""
    async with TaskLedger(tmp_path / "tasks.sqlite3") as ledger:
        service = make_service(settings, None, ledger)
        await ledger.reserve(
            idempotency_key="k", window_seconds=None, tool="t", task_type="txt2img", model="Qubico/flux1-schnell",
            request={}, payload={}, estimated_cost_usd=SCHNELL,
        )  # fmt: skip
        reads, release, real = [], anyio.Event(), ledger.spent_since

        async def held_read(since: float) -> float:
            reads.append(since)
            await release.wait()
            return await real(since)

        ledger.spent_since = held_read
        settled, answers = service.spend_mark(), []

        async def finishing_call() -> None:
            answers.append(await service.spent_today(after=settled))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(finishing_call)
            await anyio.wait_all_tasks_blocked()
            release.set()
        assert len(reads) == 1 and answers == [SCHNELL] * 20
        assert await service.spent_today(after=service.spend_mark()) == SCHNELL and len(reads) == 2  # settled later
        assert await service.spent_today() == SCHNELL and len(reads) == 3  # the spend guard reads for itself
