"""The guide (docs/python-guide.md) cannot drift from code that runs: every Python or TOML
block in it is the text of a file under examples/python/guide/ (and so is every block of
the client's README marked as one), and each of those files runs here against the real
hale and does what the guide says.

After changing an example, ``python3 clients/python/tests/test_guide.py --update`` copies
it into the blocks that show it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, TypeVar

import pytest

import hale
from support import ADMIN, HALE_BIN, REPO, Hale, free_address

T = TypeVar("T")

GUIDE = REPO / "docs" / "python-guide.md"
README = REPO / "clients" / "python" / "README.md"
EXAMPLES = REPO / "examples" / "python" / "guide"
CLIENT = REPO / "clients" / "python"

# A block taken from a file is written in the Markdown as
#   <!-- from examples/python/guide/NAME -->
#   ```python
#   ...the file's text...
#   ```
MARKED = re.compile(r"<!-- from (?P<path>\S+) -->\n```(?P<lang>\w+)\n(?P<text>.*?)^```$", re.S | re.M)
BLOCK = re.compile(r"^```(?P<lang>\w*)\n(?P<text>.*?)^```$", re.S | re.M)

# Which test runs each example (every file under examples/python/guide/ must be in here).
RUN_BY = {
    "fake_llm.py": "the quickstart tests (every example's model calls go through it)",
    "quickstart.py": "test_the_quickstart_agents_run_under_hale_up_with_the_guides_hale_toml",
    "quickstart_sync.py": "test_the_quickstart_agents_run_under_hale_up_with_the_guides_hale_toml",
    "hale.toml": "test_the_quickstart_agents_run_under_hale_up_with_the_guides_hale_toml",
    "steps.py": "test_the_steps_example_survives_a_sigkill_inside_a_step",
    "long_calls.py": "test_long_calls_that_say_so_are_not_stalls_and_a_silent_one_is",
    "errors.py": "test_the_errors_example_run_by_hand_against_hale_serve",
    "planner.py": "test_an_orchestrator_submits_subtasks_once_and_a_script_waits_for_them",
    "submit_and_wait.py": "test_an_orchestrator_submits_subtasks_once_and_a_script_waits_for_them",
    "test_quickstart.py": "test_the_guides_pytest_example_passes",
}


# ---- the documents are the files ------------------------------------------------------


def marked_blocks(document: Path) -> List[Tuple[str, str, str]]:
    return [(m["path"], m["lang"], m["text"]) for m in MARKED.finditer(document.read_text())]


@pytest.mark.parametrize("document", [GUIDE, README], ids=["python-guide.md", "README.md"])
def test_every_code_block_taken_from_a_file_is_that_files_text(document: Path) -> None:
    blocks = marked_blocks(document)
    assert blocks, f"{document} takes no block from a file"
    for path, lang, text in blocks:
        source = REPO / path
        assert source.is_file(), f"{document.name} shows {path}, which does not exist"
        assert lang == {".py": "python", ".toml": "toml"}[source.suffix], (path, lang)
        assert text == source.read_text(), f"{document.name}: the block from {path} is not the file's text now"


def test_every_python_and_toml_block_of_the_guide_is_taken_from_an_example_that_runs() -> None:
    document = GUIDE
    text = document.read_text()
    marked = {m.start("lang") for m in MARKED.finditer(text)}
    loose = [
        m["text"][:80]
        for m in BLOCK.finditer(text)
        if m["lang"] in ("python", "toml", "py") and m.start("lang") not in marked
    ]
    assert not loose, f"{document.name} has code that no test runs (take it from a file under examples/):\n{loose}"


def update(document: Path) -> None:
    """Copies each file into the blocks of ``document`` that show it."""
    text = MARKED.sub(lambda m: m[0].replace(m["text"], (REPO / m["path"]).read_text()), document.read_text())
    document.write_text(text)



def test_every_example_is_in_the_guide_and_run_by_a_test() -> None:
    files = sorted(path.name for path in EXAMPLES.iterdir() if path.suffix in (".py", ".toml"))
    assert files == sorted(RUN_BY), "examples/python/guide/ and RUN_BY differ"
    shown = {Path(path).name for path, _, _ in marked_blocks(GUIDE)}
    assert set(files) <= shown, f"not shown in the guide: {sorted(set(files) - shown)}"
    tests = {name for name in globals() if name.startswith("test_")}
    for example, runner in RUN_BY.items():
        assert runner in tests or runner.startswith("the quickstart tests"), (example, runner)


# ---- running the examples --------------------------------------------------------------


def until(what: str, seconds: float, check: Callable[[], Optional[T]], seen: Optional[Callable[[], Any]] = None) -> T:
    """Waits until ``check()`` gives something other than None or False, for at most
    ``seconds``; the timeout says what it waited for and, with ``seen``, what it last saw."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            last = f"; last seen: {seen()!r}" if seen is not None else ""
            raise AssertionError(f"timed out after {seconds} s waiting for: {what}{last}")
        time.sleep(0.05)


def up_examples(work: Path, agents: Dict[str, Tuple[str, str]], supervision: str = "") -> Hale:
    """``hale up`` running examples of the guide: each agent's name maps to the example's
    file name and more hale.toml lines for it. Each works in its own directory under the
    data directory, so what an example writes stays in the test's."""
    work.mkdir(parents=True, exist_ok=True)
    text = f"[supervision]\n{supervision}\n"
    for name, (script, extra) in agents.items():
        text += (
            "\n[[agent]]\n"
            f'name = "{name}"\n'
            f"command = {json.dumps(sys.executable)}\n"
            f"args = [{json.dumps(str(EXAMPLES / script))}]\n"
            f"env = {{ PYTHONPATH = {json.dumps(str(CLIENT))} }}\n"
            f"{extra}\n"
        )
    config = work / "hale.toml"
    config.write_text(text)
    return Hale(work / "data", free_address(), up=config)


def alive(server: Hale, *agents: str) -> None:
    for agent in agents:
        until(f"{agent} heartbeats", 30, lambda: (server.agent_summary(agent) or {}).get("health") == "alive")


def finished(server: Hale, task: int, seconds: float = 30) -> Dict[str, Any]:
    def ended() -> Optional[Dict[str, Any]]:
        found = server.task(task)
        return found if found["status"] in ("completed", "failed", "cancelled") else None

    return until(f"task {task} ended", seconds, ended, lambda: server.task(task))


def cli(server: Hale, *args: str) -> str:
    """The ``hale`` command as the guide shows it, told where this test's hale is."""
    done = subprocess.run(
        [HALE_BIN, *args, "--server", server.http_url, "--token", ADMIN], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def python3_on_path(tmp_path: Path) -> Iterator[Dict[str, str]]:
    """A PATH whose ``python3`` is this interpreter with the client importable, so the
    guide's hale.toml (``command = "python3"``) runs as it is."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text(f'#!/bin/sh\nPYTHONPATH={json.dumps(str(CLIENT))} exec {json.dumps(sys.executable)} "$@"\n')
    python3.chmod(0o755)
    yield {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def test_the_quickstart_agents_run_under_hale_up_with_the_guides_hale_toml(
    tmp_path: Path, python3_on_path: Dict[str, str]
) -> None:
    check = subprocess.run([HALE_BIN, "check", "-c", str(EXAMPLES / "hale.toml")], capture_output=True, text=True)
    assert check.returncode == 0 and "ok (2 agents" in check.stdout, check.stdout + check.stderr
    server = Hale(tmp_path / "data", free_address(), up=EXAMPLES / "hale.toml", env=python3_on_path)
    try:
        alive(server, "researcher", "researcher-sync")
        tasks = {}
        for role in ("research", "research-sync"):
            printed = cli(server, "submit", role, "--payload", '{"topic": "tides"}')
            tasks[role] = int(printed.split()[-1])  # "task N"
        for role, task in tasks.items():
            done = finished(server, task)
            assert done["status"] == "completed" and done["attempts"] == 1, done
            assert done["result"]["summary"].endswith("Summarize: tides: a page / tides: another page"), done
            search, summarize = done["steps"]
            assert (search["name"], search["result"]) == ("search", ["tides: a page", "tides: another page"])
            assert summarize["name"] == "summarize" and summarize["llm"]["model"] == "fake-llm-1"
            # The model call's tokens were spent with the step: 8 words in, 20 out.
            assert done["spent"]["tokens"] == 28 == summarize["llm"]["tokens_in"] + summarize["llm"]["tokens_out"]
            assert "completed" in cli(server, "task", str(task)).splitlines()[0]
        for agent in ("researcher", "researcher-sync"):
            until(f"{agent} checkpointed", 10, lambda: server.state(agent)["state"] == {"done": 1})
    finally:
        assert server.stop() == 0
    # SIGTERM reached both: each checkpointed {"stopped": True} and closed its session.
    again = Hale(tmp_path / "data", free_address())
    try:
        for agent in ("researcher", "researcher-sync"):
            assert again.state(agent)["state"] == {"done": 1, "stopped": True}, agent
    finally:
        again.stop()


def test_the_steps_example_survives_a_sigkill_inside_a_step(tmp_path: Path) -> None:
    server = up_examples(tmp_path, {"writer": ("steps.py", 'role = "writer"\nrestart = "always"')})
    try:
        alive(server, "writer")
        task = server.submit("writer", {"topic": "tides", "crash": True}, budget={"tokens": 5_000})
        done = finished(server, task, 60)
    finally:
        server.stop()
    assert done["status"] == "completed" and done["attempts"] == 2, done
    # Every step the first run committed was kept; publish, begun by it, was finished by the second.
    assert [(step["name"], step["state"], step["attempt"]) for step in done["steps"]] == [
        ("pick-angle", "done", 1),
        ("fetch", "done", 1),
        ("fetch#2", "done", 1),
        ("draft", "done", 1),
        ("publish", "done", 2),
    ], done["steps"]
    key = f"hale-{task}-publish"
    # The post went out once: the second run found it by its idempotency key and kept it.
    outbox = (tmp_path / "data" / "agents" / "writer" / "outbox.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in outbox] == [key], outbox
    assert done["result"] == json.loads(outbox[0]), done["result"]
    angle = done["steps"][0]["result"]
    assert angle in ("history", "physics") and f"({angle})" in done["steps"][3]["result"]["text"]
    # fetch ran in the first run only: the second got both results back without running them.
    log = (tmp_path / "data" / "logs" / "writer.log").read_text()
    assert [line for line in log.splitlines() if line.startswith("fetching")] == [
        "fetching https://en.example/tides",
        "fetching https://news.example/tides",
    ], log
    draft = done["steps"][3]["llm"]
    assert (draft["model"], draft["temperature"]) == ("fake-llm-1", 0.7)
    assert done["spent"]["tokens"] == draft["tokens_in"] + draft["tokens_out"] and done["reserved"]["tokens"] == 0


def test_long_calls_that_say_so_are_not_stalls_and_a_silent_one_is(tmp_path: Path) -> None:
    # A stall detector of 3 s rather than ten minutes, and work of 6 s: twice what it allows.
    agents = {f"slow-{n}": ("long_calls.py", 'role = "slow"\nstall = { quiet_ms = 3000 }') for n in range(1, 5)}
    server = up_examples(tmp_path, agents, supervision="stop_grace_ms = 500")
    try:
        alive(server, *agents)
        ways = ("step-timeout", "long-call", "progress")
        tasks = {how: server.submit("slow", {"topic": "tides", "seconds": 6, "how": how}) for how in ways}
        silent = server.submit("slow", {"seconds": 30, "how": "nothing"}, max_attempts=1)
        for how, task in tasks.items():
            done = finished(server, task, 60)
            assert done["status"] == "completed" and done["attempts"] == 1, (how, done)
        lost = finished(server, silent, 60)
        assert lost["status"] == "failed", lost
        holder = lost["agent"]
        summaries = {agent: server.agent_summary(agent) or {} for agent in agents}
    finally:
        server.stop()
    # The agents that said how long their work takes were never taken down...
    downs: Dict[str, Dict[str, Any]] = {
        agent: summary["last_down"] for agent, summary in summaries.items() if summary.get("last_down")
    }
    # ...and the one that held its task in silence was declared stalled and restarted.
    assert list(downs) == [holder], downs
    assert downs[holder]["detector"] == "stall", downs
    assert "no sign of work for 3000 ms while holding a task" in downs[holder]["cause"], downs


def test_the_errors_example_run_by_hand_against_hale_serve(server: Hale) -> None:
    tokens = server.issue_tokens("writer-dev")
    env = dict(os.environ, HALE_URL=server.ws_url, HALE_AGENT="writer-dev", PYTHONPATH=str(CLIENT))
    env.update(HALE_TOKEN=tokens["access_token"], HALE_REFRESH_TOKEN=tokens["refresh_token"])
    env.pop("HALE_INCARNATION", None)
    agent = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "errors.py")], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        ok = server.submit("writer-dev", {"topic": "ok"})
        poor = server.submit("writer-dev", {"topic": "poor"}, budget={"tokens": 100})
        bug = server.submit("writer-dev", {"topic": "bug", "tags": ["a", "b"]})
        slow = server.submit("writer-dev", {"topic": "slow", "seconds": 3})
        assert finished(server, ok)["status"] == "completed"
        failed = finished(server, poor)
        assert failed["status"] == "failed" and failed["reason"].startswith("over budget: the reservation would"), failed
        failed = finished(server, bug)
        assert failed["status"] == "failed", failed
        assert failed["reason"].startswith("bug: commit_step.result.tags is not JSON: a set"), failed
        until("the slow task is running", 20, lambda: server.task(slow)["status"] == "running")
        server.ok("POST", f"/v1/tasks/{slow}/cancel")  # while its step sleeps
        assert finished(server, slow)["status"] == "cancelled"
        # The agent works on one task at a time: once the next is done, it has let go of
        # the cancelled one (its commit was refused with lease_lost).
        after = server.submit("writer-dev", {"topic": "after"})
        assert finished(server, after)["status"] == "completed"
    finally:
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=60)
    assert agent.returncode == 0, stderr
    assert f"task {slow} is no longer this run's" in stderr, stderr
    assert server.state("writer-dev")["state"] == {"stopped": True}


def test_an_orchestrator_submits_subtasks_once_and_a_script_waits_for_them(tmp_path: Path) -> None:
    agents = {
        "planner": ("planner.py", 'role = "planner"'),
        "researcher-1": ("quickstart.py", 'role = "research"'),
        "researcher-2": ("quickstart.py", 'role = "research"'),
    }
    server = up_examples(tmp_path, agents)
    env = dict(os.environ, HALE_URL=server.http_url, HALE_TOKEN=ADMIN, PYTHONPATH=str(CLIENT))
    script = [sys.executable, str(EXAMPLES / "submit_and_wait.py"), "tides", "volcanoes"]
    try:
        alive(server, *agents)
        first = subprocess.run(script, env=env, capture_output=True, text=True, timeout=90)
        assert first.returncode == 0, first.stderr
        again = subprocess.run(script, env=env, capture_output=True, text=True, timeout=90)
        assert again.returncode == 0, again.stderr
        every = server.ok("GET", "/v1/tasks")
    finally:
        server.stop()
    lines = first.stdout.splitlines()
    assert re.fullmatch(r"plan (\d+) \(new\): completed", lines[0]), lines
    plan = int(lines[0].split()[1])
    subtasks = [int(line.split()[1]) for line in lines[1:]]
    assert len(subtasks) == 2 and all(line.split()[2] == "completed:" for line in lines[1:]), lines
    assert "tides" in lines[1] and "volcanoes" in lines[2], lines
    # The second run named the same plan by its key: nothing was submitted twice.
    assert again.stdout.splitlines()[0] == f"plan {plan} (submitted before): completed", again.stdout
    assert again.stdout.splitlines()[1:] == lines[1:]
    assert sorted(task["task"] for task in every) == sorted([plan, *subtasks]), every
    planned = next(task for task in every if task["task"] == plan)
    assert [step["name"] for step in planned["steps"]] == ["fan-out"] and planned["steps"][0]["result"] == subtasks


def test_the_guides_pytest_example_passes(tmp_path: Path) -> None:
    env = dict(os.environ, HALE_BIN=HALE_BIN, PYTHONPATH=str(CLIENT))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(EXAMPLES / "test_quickstart.py"), "-q", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    for document in (GUIDE, README):
        update(document)
