"""hale.langgraph.HaleSaver with the real LangGraph and the real hale: the checkpointer
contract (LangGraph's own conformance suite, with both kinds of agent), round trips
read back by a later run, pruning to ``keep``, threads kept apart, a refused put, real
graphs, and a graph run by ``hale up`` that is SIGKILLed mid-run and resumes from its last
checkpoint without running its finished nodes again."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import operator
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Dict, List, Optional, TypedDict, Union

import pytest

if sys.version_info < (3, 10):  # pragma: no cover - LangGraph needs 3.10
    pytest.skip("LangGraph needs Python 3.10 or later", allow_module_level=True)

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import Checkpoint, empty_checkpoint
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.types import ERROR
from langgraph.graph import END, START, StateGraph

import hale
import hale.sync
from hale.langgraph import HaleSaver
from support import ADMIN, Hale, eventually, run, run_within, up_python


def connect(server: Hale, name: str) -> hale.sync.Agent:
    return hale.sync.Agent.connect(server.ws_url, name, "graph", token=ADMIN)


def config(thread: str, checkpoint_id: Optional[str] = None, namespace: str = "") -> RunnableConfig:
    configurable: Dict[str, Any] = {"thread_id": thread, "checkpoint_ns": namespace}
    if checkpoint_id is not None:
        configurable["checkpoint_id"] = checkpoint_id
    return {"configurable": configurable}


def checkpoint(saver: HaleSaver, values: Dict[str, Any], previous: Optional[Checkpoint] = None) -> Checkpoint:
    """The next checkpoint after ``previous``, with ``values`` changed (new versions)."""
    made = empty_checkpoint()
    if previous is not None:
        made["channel_values"] = dict(previous["channel_values"])
        made["channel_versions"] = dict(previous["channel_versions"])
    for channel, value in values.items():
        made["channel_values"][channel] = value
        current = made["channel_versions"].get(channel)
        made["channel_versions"][channel] = saver.get_next_version(None if current is None else str(current), None)
    return made


def put(
    saver: HaleSaver, thread: str, values: Dict[str, Any], previous: Optional[Checkpoint] = None, step: int = 0
) -> Checkpoint:
    made = checkpoint(saver, values, previous)
    new_versions = {channel: made["channel_versions"][channel] for channel in values}
    saver.put(
        config(thread, previous["id"] if previous is not None else None),
        made,
        {"source": "loop", "step": step, "parents": {}},
        new_versions,
    )
    return made


def stored(server: Hale, agent: str) -> Dict[str, Any]:
    """The saver's member of the agent's state, as hale holds it."""
    state = server.state(agent)["state"]
    assert isinstance(state, dict)
    found = state.get("langgraph", {})
    assert isinstance(found, dict)
    return found


def test_import_hale_does_not_import_langgraph() -> None:
    probe = "import sys, hale, hale.sync; print(sorted(m for m in sys.modules if m.split('.')[0] in ('langgraph', 'langchain_core')))"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert found.stdout.strip() == "[]", found.stdout + found.stderr


# ---- the contract -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
@run_within(120)
async def test_langgraphs_conformance_suite_passes_with_either_kind_of_agent(server: Hale, kind: str) -> None:
    opened: List[Union[hale.Agent, hale.sync.Agent]] = []

    @checkpointer_test(name=f"HaleSaver ({kind} agent)")
    async def saver() -> AsyncIterator[HaleSaver]:
        name = f"conformance-{kind}-{len(opened)}"
        agent: Union[hale.Agent, hale.sync.Agent]
        if kind == "async":
            agent = await hale.Agent.connect(server.ws_url, name, "graph", token=ADMIN)
        else:
            agent = await asyncio.to_thread(connect, server, name)
        opened.append(agent)
        yield HaleSaver(agent)

    try:
        report = await validate(saver)
    finally:
        for agent in opened:
            if isinstance(agent, hale.Agent):
                await agent.close()
            else:
                await asyncio.to_thread(agent.close)
    failures = {name: result.failures for name, result in report.results.items() if result.failures}
    assert report.passed_all(), failures
    # Every capability was found and run, the optional ones (prune, copy_thread,
    # delete_for_runs) too.
    assert all(result.detected and result.passed for result in report.results.values()), report.to_dict()
    assert len(report.results) == 8, report.to_dict()


def test_put_get_list_and_writes_round_trip_and_a_later_run_reads_them_back(server: Hale) -> None:
    agent = connect(server, "rounds")
    saver = HaleSaver(agent)
    when = datetime.datetime(2026, 12, 8, 9, 30, tzinfo=datetime.timezone.utc)
    first = put(saver, "t", {"messages": ["hi"], "blob": b"\x00\xff", "when": when}, step=-1)
    second = put(saver, "t", {"messages": ["hi", "there"]}, first, step=0)
    # Writes of two tasks against the second; the same task's writes again are stored once,
    # its error replaces the one before.
    saver.put_writes(config("t", second["id"]), [("messages", ["x"]), ("extra", {1, 2})], "task-b", "~a")
    saver.put_writes(config("t", second["id"]), [("messages", ["y"])], "task-a", "~a")
    saver.put_writes(config("t", second["id"]), [("messages", ["changed"])], "task-b", "~a")
    saver.put_writes(config("t", second["id"]), [(ERROR, "first try")], "task-c")
    saver.put_writes(config("t", second["id"]), [(ERROR, "second try")], "task-c")

    def check(reader: HaleSaver) -> None:
        latest = reader.get_tuple(config("t"))
        assert latest is not None
        assert latest.checkpoint["id"] == second["id"]
        assert latest.checkpoint["channel_values"] == {"messages": ["hi", "there"], "blob": b"\x00\xff", "when": when}
        assert latest.checkpoint["channel_versions"] == second["channel_versions"]
        assert latest.metadata["step"] == 0 and latest.metadata["source"] == "loop"
        assert latest.config == config("t", second["id"])
        assert latest.parent_config == config("t", first["id"])
        # LangGraph's order: task path, task id, index.
        assert latest.pending_writes == [
            ("task-c", ERROR, "second try"),
            ("task-a", "messages", ["y"]),
            ("task-b", "messages", ["x"]),
            ("task-b", "extra", {1, 2}),
        ]
        older = reader.get_tuple(config("t", first["id"]))
        assert older is not None and older.parent_config is None and older.pending_writes == []
        assert older.checkpoint["channel_values"] == {"messages": ["hi"], "blob": b"\x00\xff", "when": when}
        assert [found.checkpoint["id"] for found in reader.list(config("t"))] == [second["id"], first["id"]]
        assert [found.checkpoint["id"] for found in reader.list(config("t"), filter={"step": -1})] == [first["id"]]
        assert [found.checkpoint["id"] for found in reader.list(config("t"), before=config("t", second["id"]))] == [
            first["id"]
        ]
        assert len([*reader.list(None, limit=1)]) == 1
        assert reader.get_tuple(config("nobody")) is None
        assert reader.get_tuple(config("t", "no-such-checkpoint")) is None

    check(saver)
    # In hale: JSON, the serializer's bytes as base64, the unchanged "blob" stored once.
    space = stored(server, "rounds")["t"][""]
    assert sorted(space["checkpoints"]) == sorted([first["id"], second["id"]])
    assert {channel: len(versions) for channel, versions in space["blobs"].items()} == {"messages": 2, "blob": 1, "when": 1}
    kind, data = space["blobs"]["blob"][str(first["channel_versions"]["blob"])]
    assert saver.serde.loads_typed((kind, base64.b64decode(data))) == b"\x00\xff"
    agent.close()

    # A later run of the agent (a new incarnation) reads what hale kept.
    later = connect(server, "rounds")
    try:
        check(HaleSaver(later))
    finally:
        later.close()


def test_only_the_newest_n_checkpoints_their_writes_and_values_are_kept(server: Hale) -> None:
    agent = connect(server, "pruner")
    saver = HaleSaver(agent, keep=3)
    made: List[Checkpoint] = []
    previous: Optional[Checkpoint] = None
    for step in range(7):
        # "count" changes every step; "title" only at steps 0 and 4.
        values: Dict[str, Any] = {"count": step}
        if step in (0, 4):
            values["title"] = f"title {step}"
        previous = put(saver, "t", values, previous, step)
        made.append(previous)
        saver.put_writes(config("t", previous["id"]), [("count", step + 100)], f"task-{step}")
    try:
        kept = [one["id"] for one in made[-3:]]
        assert [found.checkpoint["id"] for found in saver.list(config("t"))] == kept[::-1]
        assert saver.get_tuple(config("t", made[0]["id"])) is None
        oldest = saver.get_tuple(config("t", kept[0]))
        assert oldest is not None
        # Its parent was pruned; the config still names it, as LangGraph's savers do.
        assert oldest.parent_config == config("t", made[3]["id"])
        assert oldest.checkpoint["channel_values"] == {"count": 4, "title": "title 4"}
        assert oldest.pending_writes == [("task-4", "count", 104)]

        space = stored(server, "pruner")["t"][""]
        assert sorted(space["checkpoints"]) == kept
        assert sorted(space["writes"]) == kept
        # The values the kept checkpoints use, and no others.
        assert sorted(space["blobs"]["count"]) == sorted(str(one["channel_versions"]["count"]) for one in made[-3:])
        assert sorted(space["blobs"]["title"]) == [str(made[4]["channel_versions"]["title"])]

        # prune keeps the newest only; a later put keeps pruning to 3.
        saver.prune(["t"])
        assert [found.checkpoint["id"] for found in saver.list(config("t"))] == [kept[-1]]
        assert sorted(stored(server, "pruner")["t"][""]["writes"]) == [kept[-1]]
    finally:
        agent.close()

    with pytest.raises(ValueError):
        HaleSaver(agent, keep=0)


def test_two_threads_are_kept_apart(server: Hale) -> None:
    agent = connect(server, "threads")
    saver = HaleSaver(agent, keep=2)
    try:
        a: Optional[Checkpoint] = None
        for step in range(3):
            a = put(saver, "a", {"v": f"a{step}"}, a, step)
        assert a is not None
        b = put(saver, "b", {"v": "b0"})
        saver.put_writes(config("b", b["id"]), [("v", "pending")], "task")
        a = put(saver, "a", {"v": "a3"}, a, 3)
        # A subgraph's checkpoints have a namespace of their own, pruned on their own.
        child = checkpoint(saver, {"v": "child"})
        saver.put(config("a", namespace="child:1"), child, {"step": 0}, child["channel_versions"])

        assert [found.checkpoint["channel_values"]["v"] for found in saver.list(config("a", namespace=""))] == [
            "a3",
            "a2",
        ]
        assert [found.checkpoint["channel_values"]["v"] for found in saver.list(config("a", namespace="child:1"))] == [
            "child"
        ]
        assert [found.checkpoint["channel_values"]["v"] for found in saver.list(config("b"))] == ["b0"]
        only_b = saver.get_tuple(config("b"))
        assert only_b is not None and only_b.pending_writes == [("task", "v", "pending")]
        # Without a namespace: every namespace of the thread.
        assert len([*saver.list({"configurable": {"thread_id": "a"}})]) == 3

        saver.delete_thread("a")
        assert saver.get_tuple(config("a")) is None and [*saver.list(config("a"))] == []
        assert [found.checkpoint["channel_values"]["v"] for found in saver.list(None)] == ["b0"]
        assert sorted(stored(server, "threads")) == ["b"]
    finally:
        agent.close()


def test_a_refused_put_stores_nothing_and_the_saver_goes_on(server: Hale) -> None:
    agent = connect(server, "refused")
    saver = HaleSaver(agent)
    try:
        first = put(saver, "t", {"v": 1})
        agent.checkpoint({"mine": "the application's own member"})
        huge = os.urandom(300 * 1024)  # 400 KiB as base64: over hale's 256 KiB patch limit
        with pytest.raises(hale.HaleError) as refused:
            put(saver, "t", {"v": huge}, first, 1)
        assert refused.value.code == "patch_too_large"
        assert [found.checkpoint["id"] for found in saver.list(config("t"))] == [first["id"]]
        second = put(saver, "t", {"v": 2}, first, 1)
        assert [found.checkpoint["channel_values"]["v"] for found in saver.list(config("t"))] == [2, 1]
        state = server.state("refused")["state"]
        assert state["mine"] == "the application's own member"
        assert sorted(state["langgraph"]["t"][""]["checkpoints"]) == sorted([first["id"], second["id"]])
    finally:
        agent.close()
    with pytest.raises(TypeError):
        HaleSaver(object())  # type: ignore[arg-type]  # the point: not an agent


# ---- real graphs --------------------------------------------------------------------


class Essay(TypedDict, total=False):
    topic: str
    notes: Annotated[List[str], operator.add]
    outline: str
    facts: str
    draft: str


def essay_graph() -> StateGraph[Essay]:
    def research(state: Essay) -> Essay:
        return {"notes": ["read about " + state["topic"]]}

    def outline(state: Essay) -> Essay:
        return {"outline": "what " + state["topic"] + " are", "notes": ["outlined"]}

    def fact_check(state: Essay) -> Essay:
        return {"facts": "checked", "notes": ["facts hold"]}

    def write(state: Essay) -> Essay:
        return {"draft": f"{state['outline']} ({state['facts']}; {len(state['notes'])} notes)"}

    builder = StateGraph(Essay)
    builder.add_node("research", research)
    builder.add_node("outline", outline)
    builder.add_node("fact_check", fact_check)
    builder.add_node("write", write)
    builder.add_edge(START, "research")
    builder.add_edge("research", "outline")
    builder.add_edge("research", "fact_check")
    builder.add_edge(["outline", "fact_check"], "write")
    builder.add_edge("write", END)
    return builder


def history(graph: Any, thread: str) -> List[Any]:
    return [(snapshot.values, snapshot.next, snapshot.metadata["step"]) for snapshot in graph.get_state_history(config(thread))]


@run
async def test_a_graph_runs_alike_on_hale_and_in_memory_with_an_asyncio_agent(server: Hale) -> None:
    agent = await hale.Agent.connect(server.ws_url, "grapher", "graph", token=ADMIN)
    try:
        on_hale = essay_graph().compile(checkpointer=HaleSaver(agent))
        in_memory = essay_graph().compile(checkpointer=InMemorySaver())
        # ainvoke uses the a… methods; invoke, in a worker thread, the blocking ones with the
        # asyncio agent.
        done = await on_hale.ainvoke({"topic": "tides"}, config("async"))
        done_sync = await asyncio.to_thread(lambda: on_hale.invoke({"topic": "tides"}, config("sync")))
        expected = in_memory.invoke({"topic": "tides"}, config("memory"))
        assert done == done_sync == expected
        assert expected["draft"] == "what tides are (checked; 3 notes)"
        assert history(on_hale, "async") == history(on_hale, "sync") == history(in_memory, "memory")
        # A second input on the same thread carries on from its state.
        again = await on_hale.ainvoke({"topic": "waves"}, config("async"))
        assert again["notes"][:3] == done["notes"] and again["draft"] == "what waves are (checked; 6 notes)"
        snapshot = await on_hale.aget_state(config("async"))
        assert snapshot.next == () and snapshot.values == again
    finally:
        await agent.close()


# ---- SIGKILLed mid-run under hale up --------------------------------------------------


def graph_agent(log: Path, result: Path, kind: str) -> str:
    """An agent that runs the essay graph on thread "report": ``fact_check`` blocks in the
    first run (the test SIGKILLs the process there, once ``outline``'s writes are in
    hale); the next run resumes the graph. Every node run is noted in ``log``, the
    outcome written to ``result``. ``durability="sync"``: each step's checkpoint is saved
    before the next step starts (LangGraph's default, "async", saves it while the next
    step runs, so a kill may lose it and the step runs again)."""
    if kind == "sync":
        main = """
            agent = hale.sync.Agent.from_env()
            graph = build().compile(checkpointer=HaleSaver(agent, keep=5))
            snapshot = graph.get_state(CONFIG)
            if snapshot.next:
                note("resumed before " + ",".join(sorted(snapshot.next)) + " in run " + RUN)
                final = graph.invoke(None, CONFIG, durability="sync")
            else:
                final = graph.invoke({"topic": "tides"}, CONFIG, durability="sync")
            finish(final, graph.get_state(CONFIG).next)
            agent.close()
        """
        blocking = "time.sleep(600)  # the test SIGKILLs the process here"
        define = "def"
    else:
        main = """
            async def main():
                agent = await hale.Agent.from_env()
                graph = build().compile(checkpointer=HaleSaver(agent, keep=5))
                snapshot = await graph.aget_state(CONFIG)
                if snapshot.next:
                    note("resumed before " + ",".join(sorted(snapshot.next)) + " in run " + RUN)
                    final = await graph.ainvoke(None, CONFIG, durability="sync")
                else:
                    final = await graph.ainvoke({"topic": "tides"}, CONFIG, durability="sync")
                finish(final, (await graph.aget_state(CONFIG)).next)
                await agent.close()

            asyncio.run(main())
        """
        blocking = "await asyncio.sleep(600)  # the test SIGKILLs the process here"
        define = "async def"
    return textwrap.dedent(
        f"""
        import asyncio, json, operator, os, threading, time
        from typing import Annotated, List, TypedDict
        import hale, hale.sync
        from hale.langgraph import HaleSaver
        from langgraph.graph import END, START, StateGraph

        LOG, RESULT = {str(log)!r}, {str(result)!r}
        RUN = os.environ["HALE_INCARNATION"]
        CONFIG = {{"configurable": {{"thread_id": "report"}}}}
        lock = threading.Lock()

        def note(line):
            with lock, open(LOG, "a") as out:
                out.write(line + "\\n")

        def finish(final, next_nodes):
            with open(RESULT + ".part", "w") as out:
                json.dump({{"final": final, "next": list(next_nodes), "run": RUN}}, out)
            os.rename(RESULT + ".part", RESULT)

        class Essay(TypedDict, total=False):
            topic: str
            notes: Annotated[List[str], operator.add]
            outline: str
            facts: str
            draft: str

        {define} research(state):
            note("research ran in run " + RUN)
            return {{"notes": ["read about " + state["topic"]]}}

        {define} outline(state):
            note("outline ran in run " + RUN)
            return {{"outline": "what " + state["topic"] + " are", "notes": ["outlined"]}}

        {define} fact_check(state):
            note("fact_check ran in run " + RUN)
            if RUN == "1":
                note("fact_check waits in pid " + str(os.getpid()))
                {blocking}
            return {{"facts": "checked", "notes": ["facts hold"]}}

        {define} write(state):
            note("write ran in run " + RUN)
            return {{"draft": state["outline"] + " (" + state["facts"] + "; " + str(len(state["notes"])) + " notes)"}}

        def build():
            builder = StateGraph(Essay)
            for node in (research, outline, fact_check, write):
                builder.add_node(node.__name__, node)
            builder.add_edge(START, "research")
            builder.add_edge("research", "outline")
            builder.add_edge("research", "fact_check")
            builder.add_edge(["outline", "fact_check"], "write")
            builder.add_edge("write", END)
            return builder
        """
    ) + textwrap.dedent(main)


@run_within(120)
async def test_a_graph_sigkilled_mid_run_resumes_from_its_last_checkpoint_under_hale_up(tmp_path: Path) -> None:
    kinds = {"graph-sync": "sync", "graph-async": "async"}
    logs = {name: tmp_path / f"{name}.log" for name in kinds}
    results = {name: tmp_path / f"{name}.json" for name in kinds}
    server = up_python(
        tmp_path,
        {name: (graph_agent(logs[name], results[name], kind), 'restart = "on-failure"') for name, kind in kinds.items()},
    )

    def lines(name: str) -> List[str]:
        return logs[name].read_text().splitlines() if logs[name].exists() else []

    def outline_saved(name: str) -> bool:
        """Whether the write ``outline`` made is durable in hale: a pending write of the
        checkpoint ``fact_check`` runs from."""
        state = server.state(name)["state"]
        spaces = state.get("langgraph", {}).get("report", {}).get("", {})
        for writes in spaces.get("writes", {}).values():
            if any(write["channel"] == "outline" for write in writes.values()):
                return True
        return False

    # What the graph makes when nothing cuts it short (LangGraph applies the writes of
    # outline and fact_check in the order of their tasks' paths, whichever finished first).
    uncut = essay_graph().compile(checkpointer=InMemorySaver()).invoke({"topic": "tides"}, config("uncut"))
    assert uncut["draft"] == "what tides are (checked; 3 notes)", uncut
    waiting: Dict[str, str] = {}
    try:
        for name in kinds:
            waiting[name] = await eventually(
                f"{name}'s first run is inside fact_check",
                60,
                lambda: next((line for line in lines(name) if "fact_check waits" in line), None),
                seen=lambda: lines(name),
            )
            await eventually(f"{name}'s outline write is in hale", 30, lambda: outline_saved(name))
            assert "outline ran in run 1" in lines(name), lines(name)
            os.kill(int(waiting[name].rsplit(" ", 1)[1]), signal.SIGKILL)

        for name in kinds:
            await eventually(
                f"{name} finished the graph on its next run", 60, lambda: results[name].exists(), seen=lambda: lines(name)
            )
            outcome = json.loads(results[name].read_text())
            assert outcome["run"] == "2" and outcome["next"] == [], outcome
            assert outcome["final"] == uncut, outcome
            seen = lines(name)
            # Run 1: research, then outline and fact_check side by side; killed in fact_check.
            assert seen[0] == "research ran in run 1", seen
            assert sorted(seen[1:4]) == sorted(["outline ran in run 1", "fact_check ran in run 1", waiting[name]]), seen
            # Run 2: resumed before fact_check; research and outline (whose write was saved)
            # did not run again.
            assert seen[4:] == ["resumed before fact_check in run 2", "fact_check ran in run 2", "write ran in run 2"], seen
            summary = server.agent_summary(name)
            assert summary is not None and summary["incarnation"] == 2, summary
    finally:
        server.stop()
