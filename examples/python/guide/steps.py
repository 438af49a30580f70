"""Durable steps in depth: a blocking agent that writes a post about a topic.

fetch, draft and publish are steps; pick_angle runs through ``agent.run_step``. Submit
``{"topic": "tides", "crash": true}`` to watch it survive a crash: the first run dies
inside publish, right after the post went out, and the next run carries on from there.
"""

import json
import os
import random
import signal
from pathlib import Path
from typing import Any, Dict, List, Optional

import hale
import hale.sync
import fake_llm

# The "other system" publish writes to, standing in for a blog's API: it keeps each post
# under the idempotency key it was sent with, and can be asked whether a key arrived.
OUTBOX = Path("outbox.jsonl")


def post_to_blog(key: str, text: str) -> Dict[str, Any]:
    record = {"key": key, "url": f"https://blog.example/{key}", "text": text}
    with OUTBOX.open("a") as out:
        out.write(json.dumps(record) + "\n")
    return record


def find_post(key: str) -> Optional[Dict[str, Any]]:
    lines = OUTBOX.read_text().splitlines() if OUTBOX.exists() else []
    return next((post for post in map(json.loads, lines) if post["key"] == key), None)


@hale.step()
def fetch(url: str) -> List[str]:
    print("fetching", url, flush=True)  # goes to the agent's log: hale logs AGENT
    return [f"a paragraph of {url}"]


@hale.step(reserve_tokens=2_000)  # refused (hale.OverBudget) if the task cannot afford it
def draft(topic: str, angle: str, sources: List[str]) -> hale.JSON:
    response = fake_llm.complete(f"Write about {topic} ({angle}) from: {' '.join(sources)}")
    return hale.StepResult({"text": response["text"]}, llm=hale.LlmCall.from_response(response, temperature=0.7))


def already_posted(run: hale.StepRun) -> Optional[Dict[str, Any]]:
    # A lost attempt began publish: ask the blog whether the post arrived.
    return find_post(run.key)  # the post if it did (committed as the result), else None: post


@hale.step(uncertain=already_posted)
def publish(text: str, crash: bool) -> Dict[str, Any]:
    step = hale.current_step()
    post = post_to_blog(step.key, text)  # the key is the same in every attempt of the task
    if crash and step.attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # dies after the side effect, before the commit
    return post


def write_post(agent: hale.sync.Agent, task: hale.Task) -> Dict[str, Any]:
    topic = task.payload["topic"]
    with agent.work_on(task):
        # Anything that could differ on a retry is a step, so every attempt sees the same.
        angle = agent.run_step(task, "pick-angle", lambda: random.choice(["history", "physics"]))
        sources = fetch(f"https://en.example/{topic}") + fetch(f"https://news.example/{topic}")
        text = draft(topic, angle, sources)["text"]
        return publish(text, bool(task.payload.get("crash")))


def main() -> None:
    stop = hale.sync.stop_on_sigterm()
    agent = hale.sync.Agent.from_env()
    while not stop.is_set() and not agent.closed:
        task = agent.next_task(timeout=1.0)
        if task is not None:
            agent.complete(task, write_post(agent, task))
    agent.close()


main()
