"""Python agents as people write them, under ``hale up``: blocking model calls, deadlocks,
durable steps across a SIGKILL, values that are not JSON, and starting before hale."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import os
import signal
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

import hale
from support import ADMIN, Hale, eventually, free_address, run, run_within, up_python

# An async agent whose step calls a synchronous "model SDK" that blocks its loop for 30 s.
BLOCKER = textwrap.dedent(
    """
    import asyncio, time, hale

    @hale.step()
    async def think(topic):
        time.sleep(30)  # a synchronous model call: this loop is blocked, the heartbeats are not
        return {"thought": "about " + topic}

    async def main():
        agent = await hale.Agent.from_env()
        async for task in agent.tasks():
            async with agent.work_on(task):
                thought = await think(task.payload["topic"])
            await agent.complete(task, thought)

    asyncio.run(main())
    """
)

# A blocking agent whose step deadlocks while it holds a task.
DEADLOCK = textwrap.dedent(
    """
    import threading, hale, hale.sync

    lock = threading.Lock()

    @hale.step()
    def write(topic):
        with lock:
            with lock:  # never acquired: the work is stuck, the heartbeats go on
                return {"text": topic}

    agent = hale.sync.Agent.from_env()
    for task in agent.tasks():
        with agent.work_on(task):
            write(task.payload["topic"])
        agent.complete(task, "unreachable")
    """
)


def summary(server: Hale, agent: str) -> Dict[str, Any]:
    found = server.agent_summary(agent)
    assert found is not None, f"{agent} is not listed"
    return found


@run_within(150)
async def test_a_step_that_blocks_for_30_s_is_not_down_and_a_deadlocked_holder_is_stalled(tmp_path: Path) -> None:
    server = up_python(
        tmp_path,
        {
            "blocker": (BLOCKER, 'role = "thinker"'),
            "deadlock": (DEADLOCK, 'role = "writer"\nstall = { quiet_ms = 3000 }'),
        },
        supervision="stop_grace_ms = 500",
    )
    try:
        for agent in ("blocker", "deadlock"):
            await eventually(f"{agent} heartbeats", 30, lambda: summary(server, agent).get("health") == "alive")
        think = server.submit("thinker", {"topic": "tides"})
        write = server.submit("writer", {"topic": "tides"})

        # The deadlocked holder: heartbeats from the client's thread, no work: stalled.
        down = await eventually(
            "the deadlocked holder is declared stalled", 40, lambda: summary(server, "deadlock").get("last_down")
        )
        assert (down["incarnation"], down["detector"]) == (1, "stall"), down
        assert "no sign of work for 3000 ms while holding a task" in down["cause"], down
        assert server.task(write)["attempts"] >= 1

        # The blocked one: 30 s inside one step, alive throughout, done on its first attempt.
        done = await eventually(
            "the blocking step's task completed", 90, lambda: (t := server.task(think))["status"] == "completed" and t
        )
        assert done["result"] == {"thought": "about tides"} and done["attempts"] == 1, done
        blocker = summary(server, "blocker")
        assert blocker["incarnation"] == 1 and blocker.get("last_down") is None, blocker
        assert [step["name"] for step in done["steps"]] == ["think"]
    finally:
        server.stop()


def resumer(log: Path) -> str:
    return textwrap.dedent(
        f"""
        import os, time, hale, hale.sync

        LOG = {str(log)!r}
        RUN = os.environ["HALE_INCARNATION"]

        def note(line):
            with open(LOG, "a") as out:
                out.write(line + "\\n")

        @hale.step()
        def fetch(topic):
            note("fetch ran in run " + RUN)
            return {{"pages": [topic, topic + " (2)"]}}

        @hale.step()
        def summarize(pages):
            note("summarize ran in run " + RUN)
            llm = hale.LlmCall(model="fake-model", tokens_in=100, tokens_out=20)
            return hale.StepResult({{"summary": " / ".join(pages)}}, llm=llm)

        def happened(run):
            # Ask the other system, by the step's idempotency key, whether the write landed.
            note("publish was uncertain; key " + run.key)
            return None  # it did not: run the step again

        @hale.step(uncertain=happened)
        def publish(text):
            note("publish ran in run " + RUN + ", uncertain " + str(hale.current_step().uncertain))
            if RUN == "1":
                note("publish waits in pid " + str(os.getpid()))
                time.sleep(600)  # the test SIGKILLs the process here
            return {{"url": "https://example.test/posts/1", "text": text}}

        agent = hale.sync.Agent.from_env()
        for task in agent.tasks():
            with agent.work_on(task):
                pages = fetch(task.payload["topic"])
                summary = summarize(pages["pages"])
                posted = publish(summary["summary"])
            agent.complete(task, posted)
        """
    )


@run_within(90)
async def test_a_holder_sigkilled_mid_step_resumes_without_rerunning_committed_steps(tmp_path: Path) -> None:
    log = tmp_path / "steps.log"
    server = up_python(tmp_path, {"resumer": (resumer(log), 'role = "publisher"\nrestart = "always"')})

    def lines() -> List[str]:
        return log.read_text().splitlines() if log.exists() else []

    try:
        await eventually("the agent heartbeats", 30, lambda: summary(server, "resumer").get("health") == "alive")
        task = server.submit("publisher", {"topic": "tides"}, budget={"tokens": 1000})
        waiting = await eventually(
            "the first run is inside publish", 30, lambda: next((l for l in lines() if "publish waits" in l), None)
        )
        os.kill(int(waiting.rsplit(" ", 1)[1]), signal.SIGKILL)

        done = await eventually(
            "the task completed on the next run", 40, lambda: (t := server.task(task))["status"] == "completed" and t
        )
        assert done["result"] == {"url": "https://example.test/posts/1", "text": "tides / tides (2)"}, done
        assert done["attempts"] == 2, done
        assert [(s["name"], s["state"], s["attempt"]) for s in done["steps"]] == [
            ("fetch", "done", 1),
            ("summarize", "done", 1),
            ("publish", "done", 2),
        ], done["steps"]
        # The model call's tokens were spent once, with the step, against the task's budget.
        assert done["spent"]["tokens"] == 120, done["spent"]
        assert lines() == [
            "fetch ran in run 1",
            "summarize ran in run 1",
            "publish ran in run 1, uncertain False",
            waiting,
            f"publish was uncertain; key hale-{task}-publish",
            "publish ran in run 2, uncertain True",
        ], lines()
        assert summary(server, "resumer")["incarnation"] == 2
    finally:
        server.stop()


NOT_JSON: Dict[str, Any] = {
    "a datetime": datetime.datetime(2026, 12, 8, 9, 30),
    "a set": {"a", "b"},
    "bytes": b"\x00\x01",
    "a tuple key": {("x", 1): "v"},
    "an int key": {1: "v"},
    "a Decimal": decimal.Decimal("1.10"),
    "an object": object(),
    "NaN": float("nan"),
    "infinity": float("inf"),
    "-infinity": float("-inf"),
}


@run
async def test_values_that_are_not_json_are_refused_at_the_call_and_the_session_goes_on(server: Hale) -> None:
    agent = await hale.Agent.connect(server.ws_url, "strict", "r", token=ADMIN)
    for what, value in NOT_JSON.items():
        with pytest.raises(hale.NotJson) as refused:
            await asyncio.wait_for(agent.checkpoint({"deep": [1, {"value": value}]}), 5)
        assert refused.value.code == hale.Code.NOT_JSON == "not_json", what
        assert refused.value.message.startswith("checkpoint.patch.deep[1].value"), (what, refused.value.message)
        assert "nothing was sent" in refused.value.message, refused.value.message
    with pytest.raises(hale.NotJson):
        await asyncio.wait_for(agent.submit("r", {"due": datetime.date(2027, 1, 1)}), 5)
    with pytest.raises(hale.NotJson):
        await asyncio.wait_for(agent.send({"score": float("nan")}, to_agent="strict"), 5)
    with pytest.raises(hale.NotJson):
        agent.progress = hale.Progress(fields={"at": datetime.datetime(2026, 1, 1)})
        await asyncio.wait_for(agent.heartbeat(agent.progress), 5)
    agent.progress = None
    # Nothing reached hale, and the session carries on.
    assert await agent.checkpoint({"ok": 1}) == 1
    assert server.state("strict")["state"] == {"ok": 1}
    await asyncio.wait_for(agent.close({"closed": True}), 10)
    assert server.state("strict")["state"] == {"ok": 1, "closed": True}


@run
async def test_connect_waits_for_a_hale_that_is_not_up_yet_and_takes_http_urls(tmp_path: Path) -> None:
    address = free_address()
    # Without a reconnect policy, an unreachable hale is an error at once.
    started = time.monotonic()
    with pytest.raises(hale.ConnectError):
        await hale.Agent.connect(f"http://{address}", "early", "r", token=ADMIN)
    assert time.monotonic() - started < 5

    # With one, the first connection waits for hale with the policy's backoff.
    policy = hale.Reconnect(base=0.05, cap=0.3)
    connecting = asyncio.ensure_future(
        hale.Agent.connect(f"http://{address}/", "early", "r", token=ADMIN, reconnect=policy)
    )
    await asyncio.sleep(0.5)
    assert not connecting.done(), "connected to nothing"
    server = Hale(tmp_path / "data", address)
    try:
        agent = await asyncio.wait_for(connecting, 20)
        assert (agent.incarnation, agent.url) == (1, f"ws://{address}")
        assert await agent.checkpoint({"started": "before hale"}) == 1
        await agent.close()
    finally:
        server.stop()


def orchestrator(work: Path) -> str:
    return textwrap.dedent(
        f"""
        import json, os, time, hale, hale.sync

        WORK = {str(work)!r}
        RUN = os.environ["HALE_INCARNATION"]

        def note(line):
            with open(os.path.join(WORK, "orchestrator.log"), "a") as out:
                out.write(line + "\\n")

        if RUN == "2":
            # Down (not connected) until the test has seen the task end.
            while not os.path.exists(os.path.join(WORK, "come-back")):
                time.sleep(0.05)
        agent = hale.sync.Agent.from_env()
        state = agent.state
        if "submitted" not in state:
            handle = agent.submit("worker", {{"question": "6 x 7"}}, idempotency_key="job-1")
            agent.checkpoint({{"submitted": handle.task}})
            note("submitted " + str(handle.task) + " in pid " + str(os.getpid()))
            time.sleep(600)  # the test SIGKILLs the process here
        elif "done" not in state:
            outcome = agent.result(state["submitted"], timeout=30)
            note("run " + RUN + " got task " + str(outcome.task) + " " + outcome.status + " "
                 + json.dumps(outcome.result) + " at " + str(outcome.level))
            agent.checkpoint({{"done": True}})
        else:
            note("run " + RUN + " was pushed " + repr(agent.next_outcome(timeout=2)))
        for task in agent.tasks():
            pass
        """
    )


def worker(work: Path) -> str:
    return textwrap.dedent(
        f"""
        import os, time, hale, hale.sync

        agent = hale.sync.Agent.from_env()
        for task in agent.tasks():
            while not os.path.exists(os.path.join({str(work)!r}, "go")):
                time.sleep(0.05)
            agent.complete(task, {{"answer": 42}})
        """
    )


@run_within(90)
async def test_an_orchestrator_sigkilled_after_submitting_gets_the_outcome_when_it_comes_back(tmp_path: Path) -> None:
    log = tmp_path / "orchestrator.log"
    server = up_python(
        tmp_path,
        {
            "orch": (orchestrator(tmp_path), 'role = "orchestrator"\nrestart = "always"'),
            "worker": (worker(tmp_path), 'role = "worker"'),
        },
    )

    def lines() -> List[str]:
        return log.read_text().splitlines() if log.exists() else []

    try:
        submitted = await eventually("the orchestrator submitted", 30, lambda: next(iter(lines()), None))
        task = int(submitted.split()[1])
        os.kill(int(submitted.rsplit(" ", 1)[1]), signal.SIGKILL)
        # The task ends while the orchestrator is down.
        (tmp_path / "go").touch()
        await eventually("the task completed", 30, lambda: server.task(task)["status"] == "completed")
        await eventually("the orchestrator was restarted", 30, lambda: summary(server, "orch")["incarnation"] == 2)
        (tmp_path / "come-back").touch()
        await eventually("run 2 got the outcome", 30, lambda: len(lines()) >= 2)
        assert lines()[1] == f'run 2 got task {task} completed {{"answer": 42}} at optimal', lines()
        await eventually("run 2 checkpointed", 10, lambda: server.state("orch")["state"].get("done"))

        # Taken for good: a later run is not pushed it again.
        server.ok("POST", "/v1/agents/orch/restart")
        await eventually("run 3 looked for outcomes", 30, lambda: len(lines()) >= 3)
        assert lines()[2] == "run 3 was pushed None", lines()
    finally:
        server.stop()


@run
async def test_the_submitter_reads_its_task_over_http_and_waits_for_it(server: Hale) -> None:
    orch_tokens = server.issue_tokens("orch")
    orch = await hale.Agent.connect(server.ws_url, "orch", "orchestrator", token=orch_tokens["access_token"])
    other_tokens = server.issue_tokens("other")
    worker = await hale.Agent.connect(server.ws_url, "worker-1", "worker", token=ADMIN)
    handle = await orch.submit("worker", {"n": 1})

    def get(path: str, token: str) -> Tuple[int, Any]:
        return server.http("GET", path, token=token)

    # The submitter may read it (another agent is told it does not exist).
    status, info = await asyncio.to_thread(get, f"/v1/tasks/{handle.task}", orch_tokens["access_token"])
    assert status == 200 and info["task"] == handle.task, info
    status, info = await asyncio.to_thread(get, f"/v1/tasks/{handle.task}", other_tokens["access_token"])
    assert status == 404 and info["error"]["code"] == "unknown_task", info
    status, info = await asyncio.to_thread(get, f"/v1/tasks/{handle.task}?wait=forever", orch_tokens["access_token"])
    assert status == 400 and "wait" in info["error"]["message"], info
    # A long poll that runs out answers with the task as it is.
    started = time.monotonic()
    status, info = await asyncio.to_thread(get, f"/v1/tasks/{handle.task}?wait=0.5", orch_tokens["access_token"])
    assert status == 200 and info["status"] in ("pending", "running") and time.monotonic() - started >= 0.5

    # One that the end arrives in answers at once with the end.
    waiting = asyncio.ensure_future(
        asyncio.to_thread(get, f"/v1/tasks/{handle.task}?wait=60", orch_tokens["access_token"])
    )
    task = await worker.next_task(timeout=10)
    assert task is not None and task.task == handle.task
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await worker.complete(task, {"answer": 42})
    status, info = await asyncio.wait_for(waiting, 10)
    assert status == 200 and info["status"] == "completed" and info["result"] == {"answer": 42}, info

    # And over the session: the outcome, with its level; a failure raises.
    outcome = await handle.result(timeout=10)
    assert (outcome.ok, outcome.result, outcome.level, outcome.agent) == (True, {"answer": 42}, "optimal", "worker-1")
    doomed = await orch.submit("worker", {"n": 2})
    got = await worker.next_task(timeout=10)
    assert got is not None
    await worker.fail(got, "the model refused", retry=False)
    with pytest.raises(hale.TaskFailed) as failed:
        await doomed.result(timeout=10)
    assert failed.value.code == "task_failed" and "the model refused" in failed.value.message
    assert failed.value.outcome.status == "failed"
    with pytest.raises(TimeoutError):
        await (await orch.submit("worker", {"n": 3})).result(timeout=0.3)
    await orch.close()
    await worker.close()


def ladder_agent(work: Path, level: str) -> str:
    return textwrap.dedent(
        f"""
        import os, time, hale, hale.sync

        WORK = {str(work)!r}
        RUN = os.environ["HALE_INCARNATION"]
        agent = hale.sync.Agent.from_env()
        for task in agent.tasks():
            with open(os.path.join(WORK, "ladder.log"), "a") as out:
                out.write({level!r} + " run " + RUN + " pid " + str(os.getpid()) + " took " + str(task.task) + "\\n")
            if {level!r} == "full" and RUN == "1":
                time.sleep(600)  # the test SIGKILLs the process here
            agent.complete(task, {{"by": {level!r}}})
        """
    )


FLAKY = textwrap.dedent(
    """
    import os, hale, hale.sync

    agent = hale.sync.Agent.from_env()
    for task in agent.tasks():
        if agent.name == "flaky":
            agent.fail(task, "the search tool is down")
        else:
            agent.complete(task, {"by": agent.name})
    """
)


@run_within(90)
async def test_a_crash_does_not_send_work_down_the_ladder_and_a_retry_avoids_the_agent_that_failed(tmp_path: Path) -> None:
    log = tmp_path / "ladder.log"
    server = up_python(
        tmp_path,
        {
            "full": (ladder_agent(tmp_path, "full"), 'role = "writer"\nrestart = "always"'),
            "small": (ladder_agent(tmp_path, "small"), 'role = "writer-small"'),
            "flaky": (FLAKY, 'role = "searcher"'),
            "steady": (FLAKY, 'role = "searcher"'),
        },
    )

    def lines() -> List[str]:
        return log.read_text().splitlines() if log.exists() else []

    try:
        for agent in ("full", "small", "flaky", "steady"):
            await eventually(f"{agent} heartbeats", 30, lambda: summary(server, agent).get("health") == "alive")
        task = server.submit("writer", {"topic": "tides"}, fallback=[{"role": "writer-small", "level": "good_enough"}])
        taken = await eventually("the full agent took it", 30, lambda: next(iter(lines()), None))
        assert taken.startswith("full run 1"), taken
        os.kill(int(taken.split(" pid ")[1].split()[0]), signal.SIGKILL)
        done = await eventually("the task completed", 30, lambda: (t := server.task(task))["status"] == "completed" and t)
        assert (done["result"], done["level"]) == ({"by": "full"}, "optimal"), (done, lines())
        assert [line.split(" pid ")[0] for line in lines()] == ["full run 1", "full run 2"], lines()

        # Three attempts; the first may land on either agent, and a retry never stays on the
        # one whose attempt failed while the other has room.
        search = server.submit("searcher", {"q": "tides"}, max_attempts=3)
        done = await eventually("the search completed", 30, lambda: (t := server.task(search))["status"] == "completed" and t)
        assert done["result"] == {"by": "steady"} and done["attempts"] <= 2, done
    finally:
        server.stop()
