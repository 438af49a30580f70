"""State, runs and liveness against the real hale."""

from __future__ import annotations

import asyncio

import pytest

import hale
from support import ADMIN, Hale, eventually, run


@run
async def test_connect_checkpoint_recovery_point_rollback_and_resume(server: Hale) -> None:
    agent = await hale_connect(server, "writer-1", labels={"zone": "eu"})
    welcome = agent.welcome
    assert (welcome.incarnation, welcome.resumed, welcome.version, welcome.state) == (1, False, 0, {})
    assert agent.session_id == "writer-1#1" or welcome.session is not None

    assert await agent.checkpoint({"plan": "outline", "files": {"a.rs": 1}}) == 1
    point = await agent.recovery_point("planned")
    assert (point.name, point.version) == ("planned", 1)
    assert await agent.checkpoint({"plan": None, "files": {"b.rs": 2}}) == 2
    assert agent.state == {"files": {"a.rs": 1, "b.rs": 2}}

    rolled = await agent.rollback("planned")
    assert (rolled.version, rolled.target_version) == (3, 1)
    assert rolled.state == {"plan": "outline", "files": {"a.rs": 1}}
    rolled = await agent.rollback(2)
    assert (rolled.version, rolled.target_version, rolled.state) == (4, 2, {"files": {"a.rs": 1, "b.rs": 2}})
    assert agent.state == rolled.state and agent.version == 4

    with pytest.raises(hale.HaleError) as refused:
        await agent.rollback("no-such-point")
    assert refused.value.code == "unknown_recovery_point"
    # The session is still usable after a refusal.
    assert await agent.checkpoint({"after": True}) == 5
    session = agent.session_id
    await agent.close()
    assert "closed by the agent" in await agent.ended()
    with pytest.raises(hale.SessionClosed):
        await agent.checkpoint({"late": 1})

    # The same run resumes: same incarnation and state, the recovery point is there.
    again = await hale_connect(server, "writer-1", incarnation=1, labels={"zone": "eu"})
    assert (again.welcome.incarnation, again.welcome.resumed, again.welcome.version) == (1, True, 5)
    assert again.welcome.state == {"files": {"a.rs": 1, "b.rs": 2}, "after": True}
    assert [p.name for p in again.welcome.recovery_points] == ["planned"]
    assert again.session_id == session
    assert server.state("writer-1")["version"] == 5
    await again.close()


@run
async def test_expected_version_conflicts_and_a_new_run_fences_the_old(server: Hale) -> None:
    first = await hale_connect(server, "cas")
    assert await first.checkpoint({"n": 1}, expected_version=0) == 1
    with pytest.raises(hale.VersionConflict) as conflict:
        await first.checkpoint({"n": 2}, expected_version=0)
    assert conflict.value.code == hale.Code.VERSION_CONFLICT == "version_conflict"
    assert server.state("cas")["state"] == {"n": 1}, "a refused checkpoint wrote nothing"
    assert await first.checkpoint({"n": 2}, expected_version=1) == 2

    # A hello without an incarnation starts a new run, which fences the old one.
    second = await hale_connect(server, "cas")
    assert second.incarnation == 2 and second.welcome.version == 2
    reason = await asyncio.wait_for(first.ended(), 10)
    assert reason.startswith("fenced"), reason
    with pytest.raises(hale.Fenced) as fenced:
        await first.checkpoint({"zombie": True})
    assert fenced.value.code == "fenced"
    # Resuming the fenced run is refused too.
    with pytest.raises(hale.StaleIncarnation):
        await hale_connect(server, "cas", incarnation=1)
    assert "zombie" not in server.state("cas")["state"]
    await second.close()


@run
async def test_heartbeats_carry_progress_and_close_checkpoints_then_ends_cleanly(server: Hale) -> None:
    agent = await hale_connect(server, "tidy")
    step = {"n": 0}
    beats = agent.start_heartbeats(0.1, lambda: hale.Progress(fraction=0.5, message=f"step {step['n']}"))
    step["n"] = 7

    def progress_seen() -> bool:
        summary = server.agent_summary("tidy")
        return bool(summary and summary.get("attached") and (summary.get("progress") or {}).get("message") == "step 7")

    await eventually("the heartbeat task's progress is seen", 10, progress_seen)
    await agent.report_error("search tool timed out")
    await agent.close({"stopped_at": 7})
    assert await agent.ended() == "closed by the agent"
    await asyncio.wait_for(beats, 5)
    assert server.state("tidy")["state"] == {"stopped_at": 7}
    await eventually("the session is gone", 10, lambda: not (server.agent_summary("tidy") or {}).get("attached"))


@run
async def test_a_critical_violation_quarantines_and_the_session_refuses_what_reaches_others(server: Hale) -> None:
    agent = await hale_connect(server, "rogue")
    other = await hale_connect(server, "checker")
    await other.report_violation("cited a source that does not exist", about="rogue", critical=True)
    summary = server.agent_summary("rogue")
    assert summary is not None and summary["quarantine"]["by"] == "agent checker", summary
    # The session stays open: its state still lands, what would reach others does not.
    assert await agent.checkpoint({"draft": "kept"}) >= 1
    for attempt in (
        agent.submit("r", {"n": 1}),
        agent.send({"hi": 1}, to_agent="checker"),
        agent.report_violation("revenge", about="checker", critical=True),
    ):
        try:
            await attempt
        except hale.Quarantined as error:
            assert error.code == hale.Code.QUARANTINED and "hale release rogue" in error.message, error
        else:
            raise AssertionError("a quarantined agent was not refused")
    checker = server.agent_summary("checker")
    assert checker is not None and checker.get("quarantine") is None, checker
    await agent.close()
    await other.close()


@run
async def test_challenges_are_exposed_to_the_application_and_answered_by_its_heartbeat(server: Hale) -> None:
    # An agent that beats itself (no heartbeats from the client's thread).
    agent = await hale_connect(server, "sleepy", heartbeat=None)
    # Regular beats, then silence: the detector suspects the run and challenges it.
    for _ in range(5):
        await agent.heartbeat({"message": "working"})
        await asyncio.sleep(0.1)
    await asyncio.wait_for(agent.challenged(), 10)
    assert agent.challenge_pending and agent.challenges == 1
    await agent.heartbeat({"message": "still here"})
    assert not agent.challenge_pending
    summary = server.agent_summary("sleepy")
    assert summary is not None and summary.get("health") == "alive", summary
    await agent.close()


async def hale_connect(server: Hale, name: str, **options: object) -> hale.Agent:
    return await hale.Agent.connect(server.ws_url, name, "r", token=ADMIN, **options)  # type: ignore[arg-type]
