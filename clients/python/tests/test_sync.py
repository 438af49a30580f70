"""The blocking API (``hale.sync``), test for test beside the asyncio one: state and runs
(test_session), tasks and steps (test_tasks), messages (test_messaging), surviving a
SIGKILL of hale (test_resilience), values that are not JSON and a hale that is not up yet
(test_agents). No event loop in the test: it is code that does not use asyncio."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, TypeVar

import pytest

import hale
import hale.sync
from support import ADMIN, Hale, free_address
from test_agents import NOT_JSON

T = TypeVar("T")


def until(what: str, seconds: float, check: Callable[[], Optional[T]]) -> T:
    """Waits (blocking) until ``check()`` gives something other than None or False."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for: {what}"
        time.sleep(0.05)


def connect(server: Hale, name: str, role: str = "r", **options: Any) -> hale.sync.Agent:
    return hale.sync.Agent.connect(server.ws_url, name, role, token=ADMIN, **options)


def test_sync_connect_checkpoint_recovery_point_rollback_and_resume(server: Hale) -> None:
    agent = connect(server, "writer-1", labels={"zone": "eu"})
    assert (agent.incarnation, agent.welcome.resumed, agent.version, agent.state) == (1, False, 0, {})
    assert agent.checkpoint({"plan": "outline", "files": {"a.rs": 1}}) == 1
    point = agent.recovery_point("planned")
    assert (point.name, point.version) == ("planned", 1)
    assert agent.checkpoint({"plan": None, "files": {"b.rs": 2}}) == 2
    assert agent.state == {"files": {"a.rs": 1, "b.rs": 2}}
    rolled = agent.rollback("planned")
    assert (rolled.version, rolled.target_version, rolled.state) == (3, 1, {"plan": "outline", "files": {"a.rs": 1}})
    with pytest.raises(hale.HaleError) as refused:
        agent.rollback("no-such-point")
    assert refused.value.code == "unknown_recovery_point"
    assert agent.checkpoint({"after": True}) == 4
    agent.close()
    assert "closed by the agent" in (agent.ended(5) or "")
    with pytest.raises(hale.SessionClosed):
        agent.checkpoint({"late": 1})

    again = connect(server, "writer-1", incarnation=1)
    assert (again.incarnation, again.welcome.resumed, again.version) == (1, True, 4)
    assert again.state == {"plan": "outline", "files": {"a.rs": 1}, "after": True}
    assert [p.name for p in again.welcome.recovery_points] == ["planned"]
    again.close()


def test_sync_expected_version_conflicts_and_a_new_run_fences_the_old(server: Hale) -> None:
    first = connect(server, "cas")
    assert first.checkpoint({"n": 1}, expected_version=0) == 1
    with pytest.raises(hale.VersionConflict):
        first.checkpoint({"n": 2}, expected_version=0)
    second = connect(server, "cas")
    assert second.incarnation == 2
    reason = first.ended(10)
    assert reason is not None and reason.startswith("fenced"), reason
    with pytest.raises(hale.Fenced):
        first.checkpoint({"zombie": True})
    second.close()


def test_sync_heartbeats_come_from_the_clients_thread_while_the_caller_blocks(server: Hale) -> None:
    agent = connect(server, "sleeper", heartbeat=0.2)
    agent.progress = hale.Progress(message="thinking", fraction=0.5)
    until("the progress is seen", 10, lambda: (server.agent_summary("sleeper") or {}).get("progress", {}).get("message") == "thinking")
    beats = agent.heartbeats
    time.sleep(3)  # the caller blocks, as a synchronous model call would
    assert agent.heartbeats >= beats + 5, (beats, agent.heartbeats)
    summary = server.agent_summary("sleeper")
    assert summary is not None and summary["health"] == "alive", summary
    with agent.long_call(120):
        assert agent.checkpoint({"in": "a long call"}) == 1
    agent.close()


def test_sync_tasks_steps_retries_and_cancels(server: Hale) -> None:
    agent = connect(server, "coder-1", "coder")
    submitted = agent.submit("coder", {"spec": "a parser"}, idempotency_key="parser-1", max_attempts=3, retry_backoff_ms=50)
    again = agent.submit("coder", {"spec": "a parser"}, idempotency_key="parser-1")
    assert submitted.new and (again.task, again.new) == (submitted.task, False)

    ran: List[str] = []

    @hale.step()
    def plan(spec: str) -> Any:
        ran.append("plan")
        return hale.StepResult({"outline": ["lex", spec]}, llm=hale.LlmCall(model="fake-1", tokens_in=12, tokens_out=30))

    task = agent.next_task(timeout=10)
    assert task is not None and (task.task, task.attempts) == (submitted.task, 1)
    with agent.work_on(task):
        assert plan(task.payload["spec"]) == {"outline": ["lex", "a parser"]}
    with agent.step(task, "draft") as step:
        step.result = {"lines": 10}
    agent.fail(task, "the linter crashed")

    retry = agent.next_task(timeout=10)
    assert retry is not None and (retry.task, retry.attempts) == (task.task, 2)
    with agent.work_on(retry):
        # Committed: returned without running the body.
        assert plan(retry.payload["spec"]) == {"outline": ["lex", "a parser"]}
    assert ran == ["plan"]
    def draft() -> Any:
        ran.append("draft")
        return {"lines": 99}

    assert agent.run_step(retry, "draft", draft) == {"lines": 10}
    assert agent.run_step(retry, "write", lambda: {"lines": 120}) == {"lines": 120}
    agent.complete(retry, {"parser": "ok"})
    done = server.task(task.task)
    assert done["status"] == "completed" and [s["name"] for s in done["steps"]] == ["plan", "draft", "write"]
    assert done["spent"]["tokens"] == 42
    assert ran == ["plan"]

    cancelled = agent.submit("coder", {"spec": "soon cancelled"}).task
    got = agent.next_task(timeout=10)
    assert got is not None and got.task == cancelled and not agent.is_cancelled(cancelled)
    server.ok("POST", f"/v1/tasks/{cancelled}/cancel")
    assert agent.wait_cancelled(cancelled, 10) and agent.is_cancelled(cancelled)
    agent.close()


def test_sync_messages_send_reply_and_ack(server: Hale) -> None:
    planner = connect(server, "planner", "planning")
    writer = connect(server, "writer", "writing")
    sent = planner.send({"write": "intro"}, to_agent="writer", conversation="c1", expects_reply=True)
    message = writer.next_message(timeout=10)
    assert message is not None and (message.sender, message.body, message.seq) == ("planner", {"write": "intro"}, sent.seq)
    writer.reply(message, {"done": "intro"})
    writer.ack(message)
    reply = planner.next_message(timeout=10)
    assert reply is not None and reply.reply_to == sent.message and reply.body == {"done": "intro"}
    planner.ack(reply)
    assert writer.next_message(timeout=0.3) is None
    planner.close()
    writer.close()


def test_sync_values_that_are_not_json_are_refused_and_the_session_goes_on(server: Hale) -> None:
    agent = connect(server, "strict")
    for what, value in NOT_JSON.items():
        with pytest.raises(hale.NotJson) as refused:
            agent.checkpoint({"value": value})
        assert refused.value.code == "not_json" and "checkpoint.patch.value" in refused.value.message, what
    assert agent.checkpoint({"ok": 1}) == 1
    agent.close({"closed": True})
    assert server.state("strict")["state"] == {"ok": 1, "closed": True}


def test_sync_agents_reconnect_after_hale_is_sigkilled_and_no_checkpoint_is_lost_or_doubled(tmp_path: Path) -> None:
    listen = free_address()
    server = Hale(tmp_path / "data", listen)
    policy = hale.Reconnect(base=0.02, cap=0.5)
    agents = [connect(server, f"steady-{i}", reconnect=policy) for i in range(4)]
    running = True
    acked: List[List[Tuple[int, int]]] = [[] for _ in agents]

    def work(index: int) -> None:
        n = 0
        while running:
            n += 1
            acked[index].append((n, agents[index].checkpoint({f"c{n}": n})))

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(agents))]
    for thread in threads:
        thread.start()
    try:
        until("every agent past 2 checkpoints", 30, lambda: all(len(done) > 2 for done in acked))
        server.kill()
        before = [len(done) for done in acked]
        server = Hale(tmp_path / "data", listen)
        until(
            "every agent reconnected and three checkpoints on",
            30,
            lambda: all(a.reconnects >= 1 and len(done) >= old + 3 for a, done, old in zip(agents, acked, before)),
        )
    finally:
        running = False
        for thread in threads:
            thread.join(30)
    for index, agent in enumerate(agents):
        versions = [version for _, version in acked[index]]
        assert versions == list(range(1, len(versions) + 1)), f"steady-{index}"
        state = server.state(f"steady-{index}")
        assert state["state"] == {f"c{n}": n for n, _ in acked[index]}
        agent.close()
    server.stop()


def test_sync_connect_waits_for_a_hale_that_is_not_up_yet(tmp_path: Path) -> None:
    address = free_address()
    with pytest.raises(hale.ConnectError):
        hale.sync.Agent.connect(f"http://{address}", "early", "r", token=ADMIN)
    found: List[hale.sync.Agent] = []
    connecting = threading.Thread(
        target=lambda: found.append(
            hale.sync.Agent.connect(address, "early", "r", token=ADMIN, reconnect=hale.Reconnect(base=0.05, cap=0.3))
        )
    )
    connecting.start()
    time.sleep(0.5)
    assert not found, "connected to nothing"
    server = Hale(tmp_path / "data", address)
    try:
        connecting.join(20)
        assert found and found[0].incarnation == 1
        found[0].close()
    finally:
        server.stop()
