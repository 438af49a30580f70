"""The Python client survives hale: SIGKILL hale while agents checkpoint flat out and start
it again on the same address; cut the network under 20 clients. The agents come back by
themselves, keep their run, and every acknowledged checkpoint is there exactly once."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import List, Tuple

import hale
from support import ADMIN, Hale, Proxy, eventually, free_address, run

AGENTS = 8


@run
async def test_agents_reconnect_after_hale_is_sigkilled_and_no_checkpoint_is_lost_or_doubled(tmp_path: Path) -> None:
    listen = free_address()
    server = Hale(tmp_path / "data", listen)
    policy = hale.Reconnect(base=0.02, cap=0.5)
    agents = [
        await hale.Agent.connect(server.ws_url, f"steady-{i}", "r", token=ADMIN, reconnect=policy) for i in range(AGENTS)
    ]
    sessions = [agent.session_id for agent in agents]
    running = True

    async def work(agent: hale.Agent) -> List[Tuple[int, int]]:
        acked: List[Tuple[int, int]] = []
        n = 0
        while running:
            n += 1
            version = await agent.checkpoint({f"c{n}": n})
            acked.append((n, version))
        return acked

    workers = [asyncio.ensure_future(work(agent)) for agent in agents]

    def counts() -> List[int]:
        """Each agent's checkpoints applied (one key each)."""
        return [len(agent.state) for agent in agents]

    try:
        await eventually("every agent past 2 checkpoints", 30, lambda: all(count > 2 for count in counts()), counts)
        server.kill()
        before = counts()
        # The outage: long enough for the clients' first retries to fail and back off.
        await asyncio.sleep(0.3)
        server = Hale(tmp_path / "data", listen)
        # They come back and go on after the restart, then stop: three more checkpoints
        # each (at most one was still in flight to the old hale).
        await eventually(
            "every agent reconnected and three checkpoints on",
            30,
            lambda: all(agent.reconnects >= 1 and count >= old + 3 for agent, count, old in zip(agents, counts(), before)),
            lambda: (counts(), before, [agent.reconnects for agent in agents]),
        )
        running = False
        results = await asyncio.gather(*workers)
    finally:
        running = False
    for index, (agent, acked) in enumerate(zip(agents, results)):
        name = f"steady-{index}"
        assert agent.incarnation == 1 and agent.session_id == sessions[index], f"{name} kept its run"
        assert agent.reconnects >= 1, f"{name} never reconnected"
        # Versions are 1, 2, 3… in the order of the checkpoints, none skipped or doubled.
        assert [version for _, version in acked] == list(range(1, len(acked) + 1)), name
        state = server.state(name)
        assert state["version"] == len(acked), f"{name}: applied once each"
        assert state["state"] == {f"c{n}": n for n, _ in acked}, f"{name}: lost or extra checkpoints"
        assert len(acked) > before[index] > 2, f"{name} barely worked: {before[index]} then {len(acked)}"
        await agent.close()
    server.stop()


@run
async def test_a_network_cut_is_ridden_out_with_jittered_backoff_and_buffered_writes_flushed_in_order(
    server: Hale,
) -> None:
    clients = 20
    proxy = Proxy(server.addr)
    url = await proxy.start()
    policy = hale.Reconnect(base=0.05, cap=0.4)
    agents = []
    for i in range(clients):
        agent = await hale.Agent.connect(url, f"cut-{i}", "r", token=ADMIN, reconnect=policy)
        await agent.checkpoint({"before": True})
        agents.append(agent)
    proxy.sever()
    severed_at = time.monotonic()

    # Written while the network is down: pipelined, they wait in each client's queue.
    async def burst(agent: hale.Agent) -> List[int]:
        return list(await asyncio.gather(*(agent.checkpoint({f"w{n}": n}) for n in range(1, 6))))

    writes = [asyncio.ensure_future(burst(agent)) for agent in agents]
    # Every client sees the cut and retries (the proxy counts the attempts).
    await eventually(
        "every client cut off and retrying",
        30,
        lambda: all(not agent.connected and agent.backoffs for agent in agents)
        and len([at for at in proxy.attempts if at > severed_at]) >= clients,
        lambda: ([agent.connected for agent in agents], len([at for at in proxy.attempts if at > severed_at])),
    )
    assert not any(write.done() for write in writes), "writes were answered during the cut"
    assert all(not agent.connected for agent in agents)
    # Each client retried on its own schedule: the first retries after the cut are spread.
    firsts = sorted((at - severed_at) * 1000 for at in proxy.attempts if at > severed_at)
    assert len(firsts) >= clients, f"every client retried during the cut: {len(firsts)} attempts"
    first_per_client = [agent.backoffs[0] * 1000 for agent in agents]
    spread = max(first_per_client) - min(first_per_client)
    assert spread >= 20, f"the first waits of {clients} clients are within {spread:.0f} ms: no jitter? {first_per_client}"
    assert all(0 <= wait <= 50 for wait in first_per_client), first_per_client
    assert statistics.pstdev(first_per_client) > 5
    first_attempts = firsts[:clients]
    assert first_attempts[-1] - first_attempts[0] >= 20, f"first retries came together: {first_attempts}"
    proxy.restore()
    results = await asyncio.wait_for(asyncio.gather(*writes), 15)
    for i, versions in enumerate(results):
        # Flushed in order: w1..w5 made versions 2..6.
        assert versions == [2, 3, 4, 5, 6], f"cut-{i}: {versions}"
        state = server.state(f"cut-{i}")
        assert state["version"] == 6, f"cut-{i}: each write applied once"
        assert state["state"] == {"before": True, "w1": 1, "w2": 2, "w3": 3, "w4": 4, "w5": 5}
        assert agents[i].incarnation == 1 and agents[i].reconnects >= 1
    print(f"first reconnect waits after the cut (ms): {sorted(round(w) for w in first_per_client)}")
    for agent in agents:
        await agent.close()
    proxy.close()
