"""An orchestrator agent: it splits a task into one research task per topic.

It submits the subtasks inside a step, each with an idempotency key made from its own
task, so a retried or resumed plan never submits one twice, then completes with their
numbers for whoever submitted the plan (see submit_and_wait.py).
"""

import asyncio
from typing import List

import hale


async def plan(agent: hale.Agent, task: hale.Task) -> List[int]:
    async def submit_all() -> List[int]:
        numbers = []
        for topic in task.payload["topics"]:
            key = f"plan-{task.task}-{topic}"  # the same in every attempt of this task
            submitted = await agent.submit("research", {"topic": topic}, idempotency_key=key)
            numbers.append(submitted.task)
        return numbers

    subtasks: List[int] = await agent.run_step(task, "fan-out", submit_all)
    return subtasks


async def work(agent: hale.Agent) -> None:
    async for task in agent.tasks():
        await agent.complete(task, {"subtasks": await plan(agent, task)})


async def main() -> None:
    agent = await hale.Agent.from_env()
    await hale.run_until_sigterm(agent, work(agent))


asyncio.run(main())
