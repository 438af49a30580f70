"""Tasks, steps with intents, retries, cancels and budgets against the real hale."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import pytest

import hale
from support import ADMIN, Hale, eventually, run


async def worker(server: Hale, name: str, role: str, **options: object) -> hale.Agent:
    agent = await hale.Agent.connect(server.ws_url, name, role, token=ADMIN, **options)  # type: ignore[arg-type]
    # hale routes work only to runs that heartbeat.
    await agent.heartbeat({"message": "idle"})
    return agent


@run
async def test_a_task_with_steps_is_retried_with_its_steps_and_completed(server: Hale) -> None:
    agent = await worker(server, "coder-1", "coder")
    submitted = await agent.submit(
        "coder", {"spec": "a parser"}, idempotency_key="parser-1", max_attempts=3, retry_backoff_ms=50
    )
    again = await agent.submit("coder", {"spec": "a parser"}, idempotency_key="parser-1")
    assert submitted.new and (again.task, again.new) == (submitted.task, False)

    task = await agent.next_task(timeout=10)
    assert task is not None and (task.task, task.attempts, task.steps) == (submitted.task, 1, [])
    assert task.payload == {"spec": "a parser"}
    async with agent.step(task, "plan") as step:
        assert step.prior is None and not step.uncertain
        step.result = {"outline": ["lex", "parse"]}
        step.llm = hale.LlmCall(model="fake-1", seed=7, prompt_hash="abc", tokens_in=12, tokens_out=30)
        step.compensation = {"delete": "plan.md"}
    await agent.fail(task.task, "the linter crashed", retry=True)

    # The retry comes back to the only agent of the role, with the committed step.
    retry = await agent.next_task(timeout=10)
    assert retry is not None and (retry.task, retry.attempts) == (task.task, 2)
    assert retry.done("plan") and not retry.done("write")
    plan = retry.step("plan")
    assert plan is not None and plan.result == {"outline": ["lex", "parse"]}
    assert plan.llm is not None and (plan.llm.model, plan.llm.tokens_out) == ("fake-1", 30)
    await agent.commit_step(retry.task, "write", {"lines": 120})
    await agent.complete(retry.task, {"parser": "ok"})

    done = server.task(task.task)
    assert done["status"] == "completed" and done["result"] == {"parser": "ok"}
    assert [s["name"] for s in done["steps"]] == ["plan", "write"]
    assert done["steps"][0]["compensation"] == {"delete": "plan.md"}
    # A write to an ended task is refused with a typed error.
    with pytest.raises(hale.HaleError) as late:
        await agent.complete(task.task, "again")
    assert late.value.code in ("task_ended", "lease_lost"), late.value.code

    # fail without retry ends the task; a cancel is pushed to the holder.
    doomed = (await agent.submit("coder", {"spec": "impossible"})).task
    got = await agent.next_task(timeout=10)
    assert got is not None and got.task == doomed
    await agent.fail(doomed, "cannot be done", retry=False)
    assert server.task(doomed)["status"] == "failed"

    cancelled = (await agent.submit("coder", {"spec": "soon cancelled"})).task
    got = await agent.next_task(timeout=10)
    assert got is not None and got.task == cancelled and not agent.is_cancelled(cancelled)
    server.ok("POST", f"/v1/tasks/{cancelled}/cancel")
    await asyncio.wait_for(agent.wait_cancelled(cancelled), 10)
    assert agent.is_cancelled(cancelled)
    await agent.close()


HOLDER = textwrap.dedent(
    """
    import asyncio, sys, hale
    async def main():
        agent = await hale.Agent.connect(sys.argv[1], "holder", "payments", token=sys.argv[2])
        await agent.heartbeat()
        print("READY", flush=True)
        task = await agent.next_task(timeout=20)
        await agent.intend_step(task.task, "charge-card")
        print("INTENDED", task.task, flush=True)
        await asyncio.sleep(60)
    asyncio.run(main())
    """
)


@run
async def test_an_intent_left_by_a_killed_process_comes_back_uncertain(server: Hale) -> None:
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, server.ws_url, ADMIN], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        task = server.submit("payments", {"amount": 42})
        line = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
        assert line.split() == ["INTENDED", str(task)]
    finally:
        proc.kill()
        proc.wait()
    # The process is gone mid-step. The agent starts again as a new run (as hale would
    # restart it): the task is its again, with the step it began marked uncertain.
    agent = await worker(server, "holder", "payments")
    assert agent.incarnation == 2
    again = await agent.next_task(timeout=10)
    assert again is not None and (again.task, again.attempts) == (task, 2)
    step = again.step("charge-card")
    assert step is not None and step.state == "uncertain"
    async with agent.step(again, "charge-card") as ctx:
        assert ctx.uncertain  # the application checks the card was not charged, then commits
        ctx.result = {"charged": 42, "checked": True}
    await agent.complete(task, "paid once")
    assert server.task(task)["steps"][0]["state"] == "done"
    await agent.close()


@run
async def test_budgets_refuse_a_reservation_over_the_task_budget_and_record_spend(server: Hale) -> None:
    agent = await worker(server, "spender", "summarizer")
    task = server.submit("summarizer", {"doc": "long"}, budget={"tokens": 1000})
    got = await agent.next_task(timeout=10)
    assert got is not None and got.task == task
    reservation = await agent.reserve(600, task=task)
    with pytest.raises(hale.OverBudget) as over:
        await agent.reserve(600, task=task)
    assert over.value.code == "over_budget"
    await agent.report_spend(450, task=task, reservation=reservation)
    spent = server.task(task)["spent"]
    assert spent["tokens"] == 450, spent
    # What the reservation did not use is free again.
    second = await agent.reserve(500, task=task)
    await agent.report_spend(500, task=task, reservation=second)
    await agent.complete(task, "summary")
    assert server.task(task)["spent"]["tokens"] == 950
    await agent.close()
