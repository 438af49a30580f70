"""The errors an agent handles, in an asyncio agent run by hand against ``hale serve``.

Every failure is a ``hale.HaleError`` with a ``code``; the ones an agent meets most have
a class of their own. This agent writes a short text per task and shows what to do when
the task's budget is too small, when a value is not JSON, when the task is cancelled
under it, and when its run is over.
"""

import asyncio
import logging
from typing import Any, Dict

import hale
import fake_llm


@hale.step(reserve_tokens=500)
async def write(topic: str, tags: Any, seconds: float) -> hale.JSON:
    await asyncio.sleep(seconds)  # a slow call (the task may be cancelled meanwhile)
    response = fake_llm.complete(f"Write about {topic}")
    # A set is not JSON: with tags in the payload this step has a bug, on purpose.
    result = {"text": response["text"], "tags": set(tags)} if tags else {"text": response["text"]}
    return hale.StepResult(result, llm=hale.LlmCall.from_response(response))


async def handle(agent: hale.Agent, task: hale.Task) -> None:
    payload: Dict[str, Any] = task.payload
    try:
        async with agent.work_on(task):
            text = await write(payload["topic"], payload.get("tags"), payload.get("seconds", 0))
        await agent.complete(task, text)
    except hale.OverBudget as error:  # the reservation would take the task over its budget
        await agent.fail(task, f"over budget: {error.message}", retry=False)
    except hale.NotJson as error:  # a bug in this code: nothing was sent, a retry would not help
        await agent.fail(task, f"bug: {error.message}", retry=False)
    except hale.LeaseLost:  # cancelled, or moved to another run: no longer ours to write
        logging.info("task %d is no longer this run's", task.task)
    except hale.ServerError as error:
        if error.code != hale.Code.TASK_ENDED:  # ended (cancelled) while we worked on it
            raise
        logging.info("task %d ended under us", task.task)


async def work(agent: hale.Agent) -> None:
    async for task in agent.tasks():
        await handle(agent, task)


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    agent = await hale.Agent.from_env(reconnect=hale.Reconnect(cap=2))
    try:
        await hale.run_until_sigterm(agent, work(agent), lambda: {"stopped": True})
    except hale.Fenced as error:  # a newer run of this agent started, or this one was declared down
        logging.warning("this run is over: %s", error.message)


asyncio.run(main())
