#!/usr/bin/env python3
"""An example hale agent that does LLM-style work with a fake model.

Each task it is leased is written in three durable steps (outline, draft, review). Each
step reserves tokens from the task's budget, calls the (fake, deterministic) model and
commits the text with the model call behind it (whose tokens count against the budget in
the same commit); then the agent checkpoints how far it got. A retried task gets the
steps an earlier attempt committed back without calling the model again. The model call
may block (``--blocking-seconds``, as a synchronous SDK does): the client heartbeats
from its own thread. SIGTERM checkpoints and closes the session.

Under `hale up` (hale.toml)::

    [[agent]]
    name = "writer-1"
    role = "writer"
    command = "python3"
    args = ["examples/python/agent.py"]
    restart = "on-failure"

then ``hale submit writer --payload '{"topic": "tides"}' --budget-tokens 5000``.

By hand, against a ``hale serve``::

    HALE_URL=ws://127.0.0.1:7700 HALE_AGENT=writer-1 HALE_ROLE=writer \\
        HALE_TOKEN=$(cat hale-data/admin.token) python3 examples/python/agent.py

(``pip install -e clients/python`` first, or run it from the repository: it finds the
client there.)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

try:
    import hale
except ImportError:  # run from a checkout without installing the client
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python"))
    import hale

STEPS = ["outline", "draft", "review"]
MODEL = os.environ.get("MODEL", "fake-model-1")


class FakeModel:
    """A deterministic stand-in for an LLM: the same prompt and seed give the same text and
    token counts, and a call takes a little while (``blocking`` seconds of it blocking the
    thread, as a synchronous SDK would)."""

    def __init__(self, name: str, latency: float = 0.05, blocking: float = 0.0) -> None:
        self.name = name
        self.latency = latency
        self.blocking = blocking

    @staticmethod
    def estimate(prompt: str, max_tokens: int) -> int:
        return len(prompt.split()) + max_tokens

    async def complete(self, prompt: str, seed: int, max_tokens: int = 200) -> Tuple[str, int, int]:
        await asyncio.sleep(self.latency)
        if self.blocking:
            time.sleep(self.blocking)  # a synchronous SDK call: blocks this loop, not the heartbeats
        digest = hashlib.sha256(f"{self.name}|{seed}|{prompt}".encode()).hexdigest()
        words = [digest[i : i + 5] for i in range(0, 60, 5)]
        tokens_out = min(max_tokens, 40 + int(digest[:2], 16) % 80)
        return " ".join(words), len(prompt.split()), tokens_out


IDLE = hale.Progress(message="idle")


class Worker:
    def __init__(self, agent: hale.Agent, model: FakeModel) -> None:
        self.agent = agent
        self.model = model
        state = agent.welcome.state
        self.tasks_done = int(state.get("tasks_done", 0))
        self.tokens_used = int(state.get("tokens_used", 0))
        agent.progress = IDLE

    async def write(self, name: str, prompt: str, seed: int) -> hale.StepResult:
        """One model call, as a step's body: the text, and the call behind it."""
        text, tokens_in, tokens_out = await self.model.complete(prompt, seed)
        self.tokens_used += tokens_in + tokens_out
        llm = hale.LlmCall(
            model=self.model.name,
            seed=seed,
            max_tokens=200,
            temperature=0.0,
            prompt_hash=hashlib.sha256(prompt.encode()).hexdigest()[:16],
            tokens_in=tokens_in,
            tokens_out=tokens_out,
        )
        return hale.StepResult({"text": text}, llm=llm)

    async def run_task(self, task: hale.Task) -> None:
        payload: Dict[str, Any] = task.payload if isinstance(task.payload, dict) else {"topic": str(task.payload)}
        topic = str(payload.get("topic", "something"))
        texts: Dict[str, str] = {}
        for index, name in enumerate(STEPS):
            if self.agent.is_cancelled(task):
                return
            self.agent.progress = hale.Progress(
                fraction=index / len(STEPS), message=f"task {task.task}: {name}", task=str(task.task)
            )
            prompt = f"{name} a piece about {topic}. Before: {' '.join(texts.values())}"
            seed = task.task * 100 + index
            try:
                # Committed by an earlier attempt: its result comes back, the model is not called.
                result = await self.agent.run_step(
                    task,
                    name,
                    lambda: self.write(name, prompt, seed),
                    reserve_tokens=self.model.estimate(prompt, 200),
                )
            except hale.OverBudget as error:
                await self.agent.fail(task, f"over budget at {name}: {error.message}", retry=False)
                return
            texts[name] = str(result["text"])
            await self.agent.checkpoint({"current": {"task": task.task, "step": name}, "tokens_used": self.tokens_used})
        await self.agent.complete(task, {"topic": topic, "text": texts.get("review", ""), "steps": list(texts)})
        self.tasks_done += 1
        await self.agent.checkpoint({"current": None, "tasks_done": self.tasks_done})

    async def loop(self, max_tasks: Optional[int]) -> None:
        handled = 0
        while max_tasks is None or handled < max_tasks:
            task = await self.agent.next_task()
            if task is None:
                return
            try:
                await self.run_task(task)
            finally:
                self.agent.progress = IDLE
            handled += 1


async def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", help="the role (default HALE_ROLE, else the agent's name)")
    parser.add_argument("--max-tasks", type=int, help="exit after this many tasks (default: run until SIGTERM)")
    parser.add_argument("--beat", type=float, default=0.5, help="seconds between heartbeats")
    parser.add_argument(
        "--blocking-seconds", type=float, default=0.0, help="how long each model call blocks its thread"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    agent = await hale.Agent.from_env(args.role, heartbeat=args.beat)
    welcome = agent.welcome
    logging.info(
        "%s (%s) run %d %s at version %d",
        agent.name,
        welcome.role,
        welcome.incarnation,
        "resumed" if welcome.resumed else "started",
        welcome.version,
    )
    worker = Worker(agent, FakeModel(MODEL, blocking=args.blocking_seconds))
    stopped = await hale.run_until_sigterm(
        agent,
        worker.loop(args.max_tasks),
        lambda: {"stopped": True, "tasks_done": worker.tasks_done},
    )
    if not stopped:
        await agent.close({"stopped": False, "tasks_done": worker.tasks_done})
    logging.info("stopped (%s); %d tasks done", "SIGTERM" if stopped else "done", worker.tasks_done)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
