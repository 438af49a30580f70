"""How a long piece of work looks to hale's stall detector, in an asyncio agent.

A run that holds a task must show a sign of work (a step, a checkpoint, a change of its
progress) at least every ``stall.quiet_ms`` (ten minutes by default), or it is declared
stalled and restarted. The payload says how long the work takes and how it says so:
``{"seconds": 90, "how": "step-timeout"}``, ``"long-call"``, ``"progress"``, or
``"nothing"``, which holds the task without a sign of work: stalled past quiet_ms.
"""

import asyncio
import time
from typing import Any, Dict

import hale


@hale.step(timeout=1800)  # may take up to 30 minutes (then the stall clock runs again)
async def deep_research(topic: str, seconds: float) -> Dict[str, Any]:
    time.sleep(seconds)  # a synchronous SDK call: it blocks this loop, not the heartbeats
    return {"topic": topic, "took": seconds}


async def research(agent: hale.Agent, task: hale.Task) -> Dict[str, Any]:
    seconds, how = float(task.payload["seconds"]), task.payload["how"]
    if how == "step-timeout":
        async with agent.work_on(task):
            return await deep_research(task.payload["topic"], seconds)
    if how == "long-call":  # the same outside a step
        async with agent.long_call(1800):
            await asyncio.sleep(seconds)
        return {"took": seconds}
    if how == "progress":  # work that can say how far it got
        for second in range(int(seconds)):
            agent.progress = hale.Progress(fraction=second / seconds, message=f"page {second + 1}")
            await asyncio.sleep(1)
        agent.progress = hale.Progress(message="idle")
        return {"took": seconds}
    time.sleep(seconds)  # "nothing": as a deadlock or a hung call looks from outside
    return {"took": seconds}


async def work(agent: hale.Agent) -> None:
    async for task in agent.tasks():
        await agent.complete(task, await research(agent, task))


async def main() -> None:
    agent = await hale.Agent.from_env()
    await hale.run_until_sigterm(agent, work(agent))


asyncio.run(main())
