"""The Python client follows the leader of a three-node hale cluster: given every node's
address (followers first), it finds the leader, and when the leader is SIGKILLed (or
stopped and deposed) the session resumes the same run on the new one, with every
checkpoint applied exactly once."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

import hale
from hale._transport import Credentials
from support import ADMIN, Cluster, Hale, eventually, run

CHECKPOINTS = 40
#: The leader goes after this many checkpoints are answered.
FAIL_AFTER = 10


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path / "cluster", heartbeat_ms=100, election_ms=(1000, 2000))
    yield cluster
    cluster.stop()


async def leader_of(cluster: Cluster, among: Optional[List[Hale]] = None) -> Hale:
    return await eventually("the nodes agree on a leader", 30, lambda: cluster.leader(among))


async def checkpoint_through(agent: hale.Agent, fail: "asyncio.Event") -> List[int]:
    """Checkpoints 1..CHECKPOINTS one after another, setting ``fail`` once FAIL_AFTER are
    answered (the next is then on its way while the test takes the leader down)."""
    versions: List[int] = []
    for n in range(1, CHECKPOINTS + 1):
        versions.append(await agent.checkpoint({f"c{n}": n}))
        if n == FAIL_AFTER:
            fail.set()
    return versions


def assert_every_checkpoint_once(versions: List[int], node: Hale, name: str, incarnation: int) -> None:
    assert versions == list(range(1, CHECKPOINTS + 1)), "each checkpoint answered, none lost or doubled"
    state = node.state(name)
    assert state["incarnation"] == incarnation
    assert state["version"] == CHECKPOINTS, "applied once each"
    assert state["state"] == {f"c{n}": n for n in range(1, CHECKPOINTS + 1)}


@run
async def test_an_agent_given_every_node_follows_the_leader_through_a_sigkill(cluster: Cluster) -> None:
    leader = await leader_of(cluster)
    followers = cluster.followers(leader)
    # A run to resume, started over HTTP on the leader.
    incarnation = int(leader.ok("POST", "/v1/agents/steady/hello", {"role": "r"})["incarnation"])
    addresses = [node.ws_url for node in followers] + [leader.ws_url]
    agent = await hale.Agent.connect(
        addresses,
        "steady",
        "r",
        token=ADMIN,
        incarnation=incarnation,
        reconnect=hale.Reconnect(base=0.05, cap=0.5),
    )
    # Its hello met a follower, which named the leader; the run resumed there.
    assert agent.url == followers[0].ws_url, "the first address that accepted a connection"
    assert agent.urls == addresses
    assert agent.connected_to == leader.ws_url
    assert agent.redirects == 1
    assert agent.incarnation == incarnation and agent.version == 0
    session = agent.session_id

    fail = asyncio.Event()
    work = asyncio.ensure_future(checkpoint_through(agent, fail))
    await asyncio.wait({work, asyncio.ensure_future(fail.wait())}, return_when=asyncio.FIRST_COMPLETED)
    assert not work.done(), "the checkpoints went on"
    leader.kill()
    versions = await asyncio.wait_for(work, 45)

    new_leader = await leader_of(cluster, followers)
    assert agent.incarnation == incarnation and agent.session_id == session, "the same run"
    assert agent.reconnects >= 1 and agent.connected_to == new_leader.ws_url
    assert_every_checkpoint_once(versions, new_leader, "steady", incarnation)
    await agent.close()


@run
async def test_a_deposed_leader_closes_the_session_and_the_agent_resumes_on_the_new_leader(cluster: Cluster) -> None:
    leader = await leader_of(cluster)
    followers = cluster.followers(leader)
    # A new run, from a comma-separated string of http:// addresses, followers first:
    # the first hello is refused by a follower and sent again, as it is, to the leader.
    given = ",".join(node.http_url for node in followers + [leader])
    agent = await hale.Agent.connect(given, "deposed", "r", token=ADMIN, reconnect=hale.Reconnect(base=0.05, cap=0.5))
    assert agent.connected_to == leader.ws_url and agent.redirects == 1
    assert agent.url == followers[0].ws_url
    incarnation = agent.incarnation
    assert leader.state("deposed")["incarnation"] == incarnation, "one run started, on the leader"

    fail = asyncio.Event()
    work = asyncio.ensure_future(checkpoint_through(agent, fail))
    await asyncio.wait({work, asyncio.ensure_future(fail.wait())}, return_when=asyncio.FIRST_COMPLETED)
    # The leader freezes; the others elect one of them. Woken, the old leader finds a
    # newer term, tells the session it no longer leads (naming the new leader) and closes
    # it with 4004: the session resumes the run on the new leader.
    leader.proc.send_signal(signal.SIGSTOP)
    try:
        new_leader = await leader_of(cluster, followers)
    finally:
        leader.proc.send_signal(signal.SIGCONT)
    versions = await asyncio.wait_for(work, 45)
    assert agent.incarnation == incarnation
    assert agent.connected_to == new_leader.ws_url
    assert agent.redirects >= 2, "followed once at the start, then again when deposed"
    assert_every_checkpoint_once(versions, new_leader, "deposed", incarnation)
    # The old leader follows the new one now (and answers reads not_leader too).
    await eventually("the old leader follows", 30, lambda: cluster.leader() is new_leader, lambda: cluster.status(leader))
    status, answer = leader.http("GET", "/v1/agents/deposed/state")
    assert status == 503 and answer["error"]["leader"] == new_leader.addr, answer
    await agent.close()


@run
async def test_without_reconnect_not_leader_reaches_the_caller_and_http_calls_follow_the_leader(cluster: Cluster) -> None:
    leader = await leader_of(cluster)
    followers = cluster.followers(leader)
    with pytest.raises(hale.NotLeader) as raised:
        await hale.Agent.connect(followers[0].ws_url, "plain", "r", token=ADMIN)
    assert raised.value.code == hale.Code.NOT_LEADER and raised.value.leader == leader.addr
    assert raised.value.retryable

    # HALE_URL with every node, followers first: from_env reconnects by default, so it
    # follows the leader.
    env = {
        "HALE_URL": ",".join(node.ws_url for node in followers + [leader]),
        "HALE_AGENT": "from-env",
        "HALE_TOKEN": ADMIN,
    }
    agent = await hale.Agent.from_env("r", env=env)
    assert agent.connected_to == leader.ws_url and agent.redirects == 1
    assert await agent.checkpoint({"a": 1}) == 1
    await agent.close()

    # A token refresh (an HTTP write) sent to a follower goes on to the leader.
    tokens = leader.issue_tokens("refreshed")
    credentials = Credentials(str(tokens["access_token"]), str(tokens["refresh_token"]))
    assert await credentials.refresh(followers[0].ws_url, "refreshed", None, force=True)
    assert credentials.refreshes == 1 and credentials.refresh_token != tokens["refresh_token"]
    agent = await hale.Agent.connect(leader.ws_url, "refreshed", "r", token=credentials.access)
    assert await agent.checkpoint({"b": 2}) == 1
    await agent.close()

    # A session without a policy on a leader that is deposed ends, saying who leads now.
    agent = await hale.Agent.connect(leader.ws_url, "plain", "r", token=ADMIN)
    assert await agent.checkpoint({"c": 3}) == 1
    leader.proc.send_signal(signal.SIGSTOP)
    try:
        new_leader = await leader_of(cluster, followers)
    finally:
        leader.proc.send_signal(signal.SIGCONT)
    reason = await asyncio.wait_for(agent.ended(), 30)
    assert "does not lead" in reason and new_leader.addr in reason, reason
    with pytest.raises(hale.SessionClosed) as closed:
        await agent.checkpoint({"c": 4})
    assert closed.value.code == hale.Code.NOT_LEADER and closed.value.leader == new_leader.addr
