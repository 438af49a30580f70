"""The quickstart agent without asyncio: the same steps as plain functions, hale.sync's
blocking calls, and a SIGTERM that lets the task in hand finish first."""

from typing import List

import hale
import hale.sync
import fake_llm


@hale.step()
def search(topic: str) -> List[str]:
    return [f"{topic}: a page", f"{topic}: another page"]


@hale.step()
def summarize(pages: List[str]) -> hale.JSON:  # a StepResult; callers get its value
    response = fake_llm.complete("Summarize: " + " / ".join(pages))
    return hale.StepResult({"summary": response["text"]}, llm=hale.LlmCall.from_response(response))


def main() -> None:
    stop = hale.sync.stop_on_sigterm()
    agent = hale.sync.Agent.from_env()
    done = agent.state.get("done", 0)
    while not stop.is_set() and not agent.closed:
        task = agent.next_task(timeout=1.0)  # None after a second without work: check `stop`
        if task is None:
            continue
        with agent.work_on(task):
            pages = search(task.payload["topic"])
            summary = summarize(pages)
        agent.complete(task, summary)
        done += 1
        agent.checkpoint({"done": done})
    agent.close({"stopped": True})


main()
