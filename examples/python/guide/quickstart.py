"""A hale agent written with asyncio: it researches a topic in two durable steps.

Under hale: ``hale up -c examples/python/guide/hale.toml``, then
``hale submit research --payload '{"topic": "tides"}'``.
"""

import asyncio
from typing import List

import hale
import fake_llm


@hale.step()
async def search(topic: str) -> List[str]:
    # A durable step: once it returned, a retried task gets this result back.
    return [f"{topic}: a page", f"{topic}: another page"]


@hale.step()
async def summarize(pages: List[str]) -> hale.JSON:  # a StepResult; callers get its value
    response = fake_llm.complete("Summarize: " + " / ".join(pages))
    # The model call behind the result: its tokens count against the task's budget.
    return hale.StepResult({"summary": response["text"]}, llm=hale.LlmCall.from_response(response))


async def work(agent: hale.Agent) -> None:
    done = agent.state.get("done", 0)  # what this agent's earlier runs checkpointed
    async for task in agent.tasks():
        async with agent.work_on(task):
            pages = await search(task.payload["topic"])
            summary = await summarize(pages)
        await agent.complete(task, summary)
        done += 1
        await agent.checkpoint({"done": done})  # durable when it returns


async def main() -> None:
    agent = await hale.Agent.from_env()  # HALE_URL, HALE_AGENT, HALE_TOKEN… set by hale
    # SIGTERM (hale stopping the agent) ends the work, checkpoints and closes the session.
    await hale.run_until_sigterm(agent, work(agent), lambda: {"stopped": True})


asyncio.run(main())
