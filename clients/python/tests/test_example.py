"""The example agent (examples/python/agent.py) under `hale up`, and run by hand."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from support import ADMIN, REPO, Hale, eventually, free_address, run

EXAMPLE = REPO / "examples" / "python" / "agent.py"


def check_completed(server: Hale, task: int) -> None:
    done = server.task(task)
    assert done["status"] == "completed", done
    assert done["result"]["topic"] == "tides" and done["result"]["steps"] == ["outline", "draft", "review"]
    assert [step["name"] for step in done["steps"]] == ["outline", "draft", "review"]
    llm_tokens = sum(step["llm"]["tokens_in"] + step["llm"]["tokens_out"] for step in done["steps"])
    assert all(step["llm"]["model"] == "fake-model-1" for step in done["steps"])
    assert done["spent"]["tokens"] == llm_tokens > 0, done["spent"]


@run
async def test_the_example_agent_completes_a_task_under_hale_up(tmp_path: Path) -> None:
    config = tmp_path / "hale.toml"
    env = {"PYTHONPATH": str(REPO / "clients" / "python")}
    config.write_text(
        "[[agent]]\n"
        'name = "writer-1"\n'
        'role = "writer"\n'
        f"command = {json.dumps(sys.executable)}\n"
        f"args = [{json.dumps(str(EXAMPLE))}, \"--beat\", \"0.3\"]\n"
        f"env = {{ PYTHONPATH = {json.dumps(env['PYTHONPATH'])} }}\n"
        'restart = "on-failure"\n'
    )
    server = Hale(tmp_path / "data", free_address(), up=config)
    try:
        # The agent is healthy once its first heartbeat is in.
        await eventually(
            "the example agent heartbeats",
            20,
            lambda: ((server.agent_summary("writer-1") or {}).get("health") == "alive") or None,
        )
        task = server.submit("writer", {"topic": "tides"}, budget={"tokens": 5000})
        await eventually("the task completed", 20, lambda: server.task(task)["status"] == "completed")
        check_completed(server, task)
        state = await eventually(
            "the agent checkpointed its count", 10, lambda: (s := server.state("writer-1")["state"]).get("tasks_done") == 1 and s
        )
        assert state["tokens_used"] == server.task(task)["spent"]["tokens"]
        summary = server.agent_summary("writer-1")
        assert summary is not None and summary["managed"]["status"] == "running", summary
    finally:
        assert server.stop() == 0
    logs = (tmp_path / "data" / "logs" / "writer-1.log").read_text()
    assert "run 1 resumed at version 0" in logs, logs
    assert "stopped (SIGTERM)" in logs, logs


@run
async def test_the_example_agent_runs_by_hand(server: Hale) -> None:
    task = server.submit("writer", {"topic": "tides"})
    env = dict(os.environ, HALE_URL=server.ws_url, HALE_AGENT="by-hand", HALE_ROLE="writer", HALE_TOKEN=ADMIN)
    env.pop("HALE_INCARNATION", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), "--max-tasks", "1", "--beat", "0.2", env=env, stderr=subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()
    check_completed(server, task)
    assert server.state("by-hand")["state"]["tasks_done"] == 1
