"""The admin (HTTP) API of the Python client, SyncAdmin and Admin, against the real hale:
every method's answer is checked against what the server holds (read back over HTTP by
the test's own helper, or through another method)."""

from __future__ import annotations

import asyncio
import inspect
import json
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple, TypeVar

import pytest

import hale
from hale.admin import AgentSummary, EventInfo, NodeSummary
from support import ADMIN, REPO, Hale, eventually, free_address, run

EXAMPLE = REPO / "examples" / "python" / "agent.py"
T = TypeVar("T")


def wait_until(what: str, seconds: float, probe: Callable[[], Optional[T]]) -> T:
    """The blocking twin of ``support.eventually``: polls ``probe`` every 50 ms until it
    returns something other than None/False, for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for: {what}"
        time.sleep(0.05)


def hello(server: Hale, agent: str, role: str = "r") -> int:
    """Starts a run of ``agent`` over HTTP; its incarnation."""
    return int(server.ok("POST", f"/v1/agents/{agent}/hello", {"role": role})["incarnation"])


def checkpoint(server: Hale, agent: str, incarnation: int, patch: object) -> int:
    return int(server.ok("POST", f"/v1/agents/{agent}/checkpoint", {"incarnation": incarnation, "patch": patch})["version"])


def summary(admin: hale.SyncAdmin, agent: str) -> Optional[AgentSummary]:
    return next((one for one in admin.agents() if one.agent == agent), None)


def test_every_method_has_an_async_twin_and_documents_what_it_raises() -> None:
    members = vars(hale.SyncAdmin)
    methods = [name for name in members if not name.startswith("_") and not isinstance(members[name], property)]
    assert len(methods) == 22, methods  # from_env and the 21 calls of the HTTP API
    for name in methods:
        blocking, twin = getattr(hale.SyncAdmin, name), getattr(hale.Admin, name)
        if name == "follow_events":
            assert inspect.isgeneratorfunction(blocking) and inspect.isasyncgenfunction(twin)
        elif name != "from_env":
            assert inspect.iscoroutinefunction(twin), name
        for method in (blocking, twin):
            assert "Raises" in (method.__doc__ or ""), f"{method.__qualname__} does not say what it raises"
    for name in ("url", "urls"):
        assert getattr(hale.SyncAdmin, name).__doc__ and getattr(hale.Admin, name).__doc__


# ---- SyncAdmin ------------------------------------------------------------------------------


def test_agents_state_quarantine_and_release(server: Hale) -> None:
    admin = hale.SyncAdmin(server.http_url, ADMIN)
    incarnation = hello(server, "a1", "r")
    checkpoint(server, "a1", incarnation, {"x": 1})
    checkpoint(server, "a1", incarnation, {"y": 2})

    state = admin.state("a1")
    held = server.state("a1")
    assert (state.agent, state.incarnation, state.version, state.current_version) == ("a1", incarnation, 2, 2)
    assert state.state == held["state"] == {"x": 1, "y": 2}
    assert state.history == held["history"] and state.recovery_points == []
    older = admin.state("a1", version=1)
    assert (older.version, older.current_version, older.state) == (1, 2, {"x": 1})

    listed = admin.agents()
    assert [one.agent for one in listed] == [one["agent"] for one in server.ok("GET", "/v1/agents")]
    a1 = summary(admin, "a1")
    assert a1 is not None
    assert (a1.role, a1.incarnation, a1.version, a1.attached, a1.breaker) == ("r", incarnation, 2, False, "closed")
    assert a1.managed is None and not a1.quarantined and a1.raw == server.agent_summary("a1")

    admin.quarantine("a1", "it looked odd")
    a1 = summary(admin, "a1")
    assert a1 is not None and a1.quarantine is not None
    assert (a1.quarantine.reason, a1.quarantine.by) == ("it looked odd", "the operator")
    assert (server.agent_summary("a1") or {})["quarantine"]["reason"] == "it looked odd"
    admin.release("a1")
    a1 = summary(admin, "a1")
    assert a1 is not None and not a1.quarantined and "quarantine" not in (server.agent_summary("a1") or {})

    with pytest.raises(hale.ServerError) as unknown:
        admin.state("nobody")
    assert unknown.value.code == "unknown_agent"
    with pytest.raises(hale.ServerError) as invalid:
        admin.quarantine("no/such name", "x")
    assert invalid.value.code in ("invalid_name", "not_found"), invalid.value


def test_tokens_issue_revoke_and_wrong_tokens(server: Hale) -> None:
    admin = hale.SyncAdmin(server.http_url, ADMIN)
    hello(server, "a2")
    pair = admin.issue_tokens("a2")
    assert pair.agent == "a2" and pair.refresh_token.startswith("hale_rt_")
    assert pair.access_expires_at_ms > time.time() * 1000 and pair.refresh_expires_at_ms > pair.access_expires_at_ms

    # The agent's own token reads its state, and nothing it may not.
    own = hale.SyncAdmin(server.http_url, pair.access_token)
    assert own.state("a2").agent == "a2"
    with pytest.raises(hale.AuthError) as forbidden:
        own.agents()
    assert forbidden.value.code == hale.Code.FORBIDDEN

    admin.revoke_tokens("a2", reason="it leaked")
    with pytest.raises(hale.AuthError) as revoked:
        own.state("a2")
    assert revoked.value.code == hale.Code.TOKEN_REVOKED
    logged = admin.events(agent="a2", kind="tokens_revoked")
    assert len(logged) == 1 and "it leaked" in json.dumps(logged[0].event), logged

    with pytest.raises(hale.AuthError) as wrong:
        hale.SyncAdmin(server.http_url, "not-a-token").agents()
    assert wrong.value.code == hale.Code.TOKEN_INVALID and wrong.value.known
    with pytest.raises(hale.AuthError) as anonymous:
        hale.SyncAdmin(server.http_url).status()
    assert anonymous.value.code == hale.Code.UNAUTHENTICATED


def test_submit_tasks_cancel_and_status(server: Hale) -> None:
    admin = hale.SyncAdmin(server.http_url, ADMIN)
    deadline = int(time.time() * 1000) + 3_600_000
    first = admin.submit(
        "writer",
        {"topic": "tides"},
        priority="high",
        max_attempts=2,
        deadline_ms=deadline,
        retry_backoff_ms=500,
        fallback=[{"role": "small-writer", "level": "good_enough"}],
        budget={"tokens": 5000, "wall_ms": 600_000},
    )
    assert first.new
    task = admin.task(first.task)
    held = server.task(first.task)
    assert (task.task, task.role, task.priority, task.status) == (first.task, "writer", "high", "pending")
    assert task.payload == held["payload"] == {"topic": "tides"}
    assert (task.max_attempts, task.attempts, task.steps) == (2, 0, [])
    assert task.budget == {"tokens": 5000, "wall_ms": 600_000} == held["budget"]
    assert task.fallback == [{"role": "small-writer", "level": "good_enough"}]
    assert task.raw == held

    shadowed = admin.submit("writer", None, shadow={"count": 2, "quorum": 2})
    assert admin.task(shadowed.task).shadow == {"count": 2, "quorum": 2}

    # An idempotency key names the first task; without one, a random key keeps resends apart.
    keyed = admin.submit("writer", {"n": 1}, idempotency_key="order-7")
    again = admin.submit("writer", {"n": 2}, idempotency_key="order-7")
    assert keyed.new and not again.new and again.task == keyed.task
    assert admin.task(keyed.task).payload == {"n": 1}
    plain = [admin.submit("editor", {"same": True}) for _ in range(2)]
    assert plain[0].task != plain[1].task and all(one.new for one in plain)

    listed = admin.tasks()
    ids = [one.task for one in listed]
    assert ids == [one["task"] for one in server.ok("GET", "/v1/tasks")] == sorted(ids, reverse=True)
    assert {first.task, shadowed.task, keyed.task, plain[0].task, plain[1].task} <= set(ids)
    assert [one.task for one in admin.tasks(role="editor")] == [plain[1].task, plain[0].task]
    assert [one.task for one in admin.tasks(limit=1)] == [max(ids)]

    status = admin.status()
    held_status = server.ok("GET", "/v1/status")
    assert status.mode == held_status["mode"] and status.queued == held_status["queued"] > 0
    assert status.tasks_by_status == held_status["tasks_by_status"]
    assert {role.role for role in status.per_role} >= {"writer", "editor"}

    admin.cancel(first.task)
    assert admin.task(first.task).status == "cancelled" == server.task(first.task)["status"]
    assert first.task in [one.task for one in admin.tasks(status="cancelled")]
    assert admin.status().tasks_by_status.get("cancelled") == 1
    with pytest.raises(hale.ServerError) as ended:
        admin.cancel(first.task)
    assert ended.value.code == "task_ended"
    with pytest.raises(hale.ServerError) as unknown:
        admin.task(999_999)
    assert unknown.value.code == "unknown_task"
    with pytest.raises(hale.ServerError) as bad:
        admin.submit("writer", priority="urgent")
    assert bad.value.code == "bad_request"


def test_events_follow_and_backup(server: Hale, tmp_path: Path) -> None:
    admin = hale.SyncAdmin(server.addr, ADMIN)  # a bare host:port
    incarnation = hello(server, "logged")
    for n in range(1, 4):
        checkpoint(server, "logged", incarnation, {"n": n})

    everything = admin.events()
    assert [event.seq for event in everything] == sorted(event.seq for event in everything)
    assert [event.seq for event in everything] == [event["seq"] for event in server.ok("GET", "/v1/events")]
    mine = admin.events(agent="logged")
    assert [event.kind for event in mine] == ["agent_registered", "incarnation_started"] + ["checkpointed"] * 3
    checkpoints = admin.events(agent="logged", kind=["checkpointed", "rolled_back"])
    assert [event.event["version"] for event in checkpoints] == [1, 2, 3]
    page = admin.events(agent="logged", after=checkpoints[0].seq, limit=1)
    assert [event.seq for event in page] == [checkpoints[1].seq]
    assert admin.events(since_ms=mine[-1].at_ms + 3_600_000) == []

    # Following from a point in the past replays the log, then goes on live.
    events = admin.follow_events(agent="logged", after=mine[1].seq)
    try:
        replayed = [next(events) for _ in range(3)]
        assert [event.seq for event in replayed] == [event.seq for event in checkpoints]
        checkpoint(server, "logged", incarnation, {"n": 4})
        live = next(events)
        assert (live.kind, live.agent, live.event["version"]) == ("checkpointed", "logged", 4)
        assert live.seq == admin.events(agent="logged")[-1].seq
    finally:
        events.close()

    seen: List[Tuple[int, int]] = []
    target = tmp_path / "backup.db"
    done = admin.backup(str(target), lambda pages, total: seen.append((pages, total)))
    last_seq = admin.events()[-1].seq
    assert done.path == str(target) and target.stat().st_size == done.bytes > 0
    assert done.last_seq == done.records == last_seq, done
    assert seen and seen[-1][0] == seen[-1][1] == done.pages, seen
    with sqlite3.connect(target) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with pytest.raises(hale.ServerError) as exists:
        admin.backup(str(target))
    assert exists.value.code == "backup_exists"
    with pytest.raises(hale.ServerError) as relative:
        admin.backup("relative.db")
    assert relative.value.code == "bad_request"


def test_cluster_calls_on_a_single_node_and_unmanaged_agents(server: Hale) -> None:
    admin = hale.SyncAdmin(server.http_url, ADMIN)
    calls: List[Callable[[], object]] = [
        admin.cluster,
        admin.nodes,
        admin.cluster_init,
        admin.cluster_leave,
        lambda: admin.cluster_leave(2),
        lambda: admin.cluster_join("127.0.0.1:1"),
    ]
    for call in calls:
        with pytest.raises(hale.ServerError) as single:
            call()
        assert single.value.code == "not_clustered", single.value
    hello(server, "by-hand")
    for managed_only in (admin.restart, admin.stop):
        with pytest.raises(hale.ServerError) as unmanaged:
            managed_only("by-hand")
        assert unmanaged.value.code == "not_managed"


def test_addresses_from_env_and_unreachable_nodes(server: Hale) -> None:
    for url in (server.http_url, server.ws_url, server.addr, [server.ws_url], f" {server.http_url}/ ,{server.http_url}"):
        admin = hale.SyncAdmin(url, ADMIN)
        assert admin.urls == [server.http_url] and admin.url == server.http_url
        assert admin.status().mode == "optimal"
    several = hale.SyncAdmin(f"{server.addr},127.0.0.1:9", ADMIN)
    assert several.urls == [server.http_url, "http://127.0.0.1:9"]
    assert several.status().mode == "optimal" and several.url == server.http_url
    # A node that cannot be reached is passed over for the next, which is then kept.
    passed_over = hale.SyncAdmin(["127.0.0.1:9", server.ws_url], ADMIN)
    assert passed_over.url == "http://127.0.0.1:9"
    assert passed_over.agents() == several.agents() and passed_over.url == server.http_url

    from_env = hale.SyncAdmin.from_env({"HALE_URL": server.ws_url, "HALE_TOKEN": ADMIN})
    assert from_env.urls == [server.http_url] and from_env.token == ADMIN
    assert from_env.status().mode == "optimal"
    default = hale.SyncAdmin.from_env({})
    assert default.urls == ["http://127.0.0.1:7700"] and default.token is None and default.ca_file is None
    assert hale.Admin.from_env({"HALE_URL": server.addr}).urls == [server.http_url]

    with pytest.raises(hale.ConnectError):
        hale.SyncAdmin(f"https://{server.addr}", ADMIN)  # TLS needs a CA file
    with pytest.raises(hale.ConnectError):
        hale.SyncAdmin(" , ")

    started = time.monotonic()
    with pytest.raises(hale.ConnectError) as unreachable:
        hale.SyncAdmin("127.0.0.1:9", ADMIN).agents()
    assert unreachable.value.code == hale.Code.CONNECT and unreachable.value.retryable
    assert time.monotonic() - started < 2, "one address unreachable fails at once"


# ---- Admin (asyncio) ------------------------------------------------------------------------


@run
async def test_async_revoke_ends_a_session_and_events_are_followed(server: Hale) -> None:
    admin = hale.Admin(server.ws_url, ADMIN)
    pair = await admin.issue_tokens("bob")
    agent = await hale.Agent.connect(server.ws_url, "bob", "r", token=pair.access_token)
    assert await agent.checkpoint({"mine": True}) == 1
    assert (await admin.state("bob")).state == {"mine": True}
    before = (await admin.events())[-1].seq

    events = admin.follow_events(agent="bob", kind="tokens_revoked,quarantined", after=before)
    first = asyncio.ensure_future(events.__anext__())
    await admin.revoke_tokens("bob")
    reason = await asyncio.wait_for(agent.ended(), 20)
    assert "revoked" in reason, reason
    revoked = await asyncio.wait_for(first, 20)
    assert (revoked.kind, revoked.agent) == ("tokens_revoked", "bob") and revoked.seq > before
    await admin.quarantine("bob", "after the leak")
    quarantined = await asyncio.wait_for(events.__anext__(), 20)
    assert (quarantined.kind, quarantined.agent) == ("quarantined", "bob")
    await events.aclose()
    summaries = {one.agent: one for one in await admin.agents()}
    assert summaries["bob"].quarantine is not None and summaries["bob"].quarantine.reason == "after the leak"
    await admin.release("bob")
    assert not {one.agent: one for one in await admin.agents()}["bob"].quarantined

    # Cancelling a follower that waits closes its connection and ends its thread.
    def followers() -> List[threading.Thread]:
        return [thread for thread in threading.enumerate() if thread.name.startswith("hale-events")]

    quiet = admin.follow_events(kind="node_lost")
    waiting: "asyncio.Future[EventInfo]" = asyncio.ensure_future(quiet.__anext__())
    await eventually("the follower's thread runs", 10, lambda: bool(followers()))
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await eventually("the follower's thread ended", 10, lambda: not followers(), followers)


@run
async def test_async_tasks_status_backup_and_errors(server: Hale, tmp_path: Path) -> None:
    admin = hale.Admin([server.http_url], ADMIN)
    submitted = await admin.submit("reviewer", {"doc": 1}, priority="critical", max_attempts=4)
    task = await admin.task(submitted.task)
    assert (task.role, task.priority, task.max_attempts, task.payload) == ("reviewer", "critical", 4, {"doc": 1})
    assert [one.task for one in await admin.tasks(role="reviewer")] == [submitted.task]
    assert (await admin.status()).queued == 1
    await admin.cancel(submitted.task)
    assert server.task(submitted.task)["status"] == "cancelled"

    loop_thread = threading.get_ident()
    called_on: List[int] = []
    done = await admin.backup(str(tmp_path / "async.db"), lambda pages, total: called_on.append(threading.get_ident()))
    assert done.records == (await admin.events())[-1].seq and (tmp_path / "async.db").exists()
    assert called_on and set(called_on) == {loop_thread}, "progress is reported on the event loop"

    for call in (admin.cluster(), admin.nodes()):
        with pytest.raises(hale.ServerError) as single:
            await call
        assert single.value.code == "not_clustered"
    with pytest.raises(hale.AuthError) as wrong:
        await hale.Admin(server.http_url, "nope").agents()
    assert wrong.value.code == hale.Code.TOKEN_INVALID
    with pytest.raises(hale.ConnectError):
        await hale.Admin("127.0.0.1:9", ADMIN).status()


@run
async def test_async_restart_and_stop_a_managed_agent_under_hale_up(tmp_path: Path) -> None:
    config = tmp_path / "hale.toml"
    pythonpath = str(REPO / "clients" / "python")
    config.write_text(
        "[[agent]]\n"
        'name = "writer-1"\n'
        'role = "writer"\n'
        f"command = {json.dumps(sys.executable)}\n"
        f"args = [{json.dumps(str(EXAMPLE))}, \"--beat\", \"0.3\"]\n"
        f"env = {{ PYTHONPATH = {json.dumps(pythonpath)} }}\n"
        'restart = "on-failure"\n'
    )
    server = Hale(tmp_path / "data", free_address(), up=config)
    admin = hale.Admin(server.http_url, ADMIN)
    try:

        def running(incarnation: int) -> Optional[AgentSummary]:
            """writer-1's summary once run ``incarnation`` runs and heartbeats."""
            one = summary(admin.sync, "writer-1")
            ok = one is not None and one.incarnation == incarnation and one.health == "alive"
            return one if ok and one is not None and one.managed is not None and one.managed.status == "running" else None

        first = await eventually("writer-1 runs and heartbeats", 30, lambda: running(1))
        assert first.managed is not None and first.managed.pid is not None

        # Work submitted through the admin is done by the managed agent.
        submitted = await admin.submit("writer", {"topic": "tides"}, budget={"tokens": 5000})
        await eventually("the task completed", 30, lambda: admin.sync.task(submitted.task).status == "completed")
        task = await admin.task(submitted.task)
        assert task.agent == "writer-1" and [step.name for step in task.steps] == ["outline", "draft", "review"]
        assert all(step.llm is not None and step.llm.model == "fake-model-1" for step in task.steps)
        assert task.result == server.task(submitted.task)["result"]

        incarnation = await admin.restart("writer-1")
        assert incarnation == 2
        second = await eventually("the restarted run heartbeats", 30, lambda: running(2))
        assert second.managed is not None and second.managed.restarts == 1 and second.managed.pid != first.managed.pid
        assert second.last_down is not None and (second.last_down.incarnation, second.last_down.detector) == (1, "operator")

        def stopped_summary() -> Optional[AgentSummary]:
            one = summary(admin.sync, "writer-1")
            return one if one is not None and one.managed is not None and one.managed.status == "stopped" else None

        await admin.stop("writer-1")
        stopped = await eventually("writer-1 stopped", 30, stopped_summary)
        assert stopped.down is not None and stopped.down.cause == "stopped on purpose"
        assert (server.agent_summary("writer-1") or {})["managed"]["status"] == "stopped"

        assert await admin.restart("writer-1") == 3
        await eventually("a restart revives the stopped agent", 30, lambda: running(3))
        assert (await admin.state("writer-1")).incarnation == 3
    finally:
        assert server.stop() == 0


# ---- a cluster ------------------------------------------------------------------------------


@run
async def test_a_two_node_cluster_formed_and_led_through_the_admin(tmp_path: Path) -> None:
    """cluster_init and cluster_join form a cluster; requests given the follower first
    follow the leader; cluster_leave removes the follower."""
    secret = tmp_path / "cluster.secret"
    secret.write_text("py-admin-cluster-secret-8e2a41")
    nodes: List[Hale] = []
    try:
        for node_id in (1, 2):
            config = tmp_path / f"node{node_id}.toml"
            config.write_text(
                "[cluster]\n"
                f"node_id = {node_id}\n"
                f'secret_file = "{secret}"\n'
                "heartbeat_ms = 100\n"
                "election_min_ms = 1000\n"
                "election_max_ms = 2000\n"
            )
            nodes.append(Hale(tmp_path / f"data{node_id}", free_address(), config=config))
        first, second = nodes
        assert await hale.Admin(first.http_url, ADMIN).cluster_init() == 0
        await hale.Admin(second.http_url, ADMIN).cluster_join(first.addr)

        # The follower first: reads and writes go on to the leader, which is kept.
        admin = hale.Admin([second.http_url, first.http_url], ADMIN)
        submitted = await admin.submit("r", {"through": "the leader"})
        assert admin.url == first.http_url
        assert first.task(submitted.task)["payload"] == {"through": "the leader"}
        status, refused = second.http("GET", f"/v1/tasks/{submitted.task}")
        assert status == 503 and refused["error"]["code"] == "not_leader", refused

        view = await admin.cluster()
        assert (view.node_id, view.role, view.leader) == (1, "leader", 1)
        assert sorted((member.node_id, member.voter) for member in view.members) == [(1, True), (2, True)]
        def both_nodes() -> Optional[List[NodeSummary]]:
            listed = admin.sync.nodes()
            return listed if len(listed) == 2 else None

        listed = await eventually("both nodes are in the log", 30, both_nodes)
        assert sorted((node.node_id, node.raft, node.status) for node in listed) == [(1, "leader", "up"), (2, "voter", "up")]

        assert await admin.cluster_leave(2) == [1]
        assert [member.node_id for member in (await admin.cluster()).members] == [1]
    finally:
        for node in nodes:
            node.stop()
