"""Testing an agent with pytest against a real hale: ``hale serve`` on a free port, the
agent started by hand with tokens of its own, a task submitted, its result checked.

    HALE_BIN=target/debug/hale python3 -m pytest examples/python/guide/test_quickstart.py
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

import hale

HALE = os.environ.get("HALE_BIN") or shutil.which("hale") or "hale"
ADMIN_TOKEN = "a-test-admin-token"
AGENT = Path(__file__).parent / "quickstart.py"


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[hale.SyncAdmin]:
    server = subprocess.Popen(
        [HALE, "serve", "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0"],
        env=dict(os.environ, HALE_ADMIN_TOKEN=ADMIN_TOKEN),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    address = server.stdout.readline().split()[-1]  # "hale listening on 127.0.0.1:PORT"
    yield hale.SyncAdmin(f"http://{address}", token=ADMIN_TOKEN)
    server.terminate()
    server.wait(30)


def test_the_agent_researches_a_topic(admin: hale.SyncAdmin) -> None:
    tokens = admin.issue_tokens("researcher-test")  # what `hale token issue` prints
    agent = subprocess.Popen(
        [sys.executable, str(AGENT)],
        env=dict(
            os.environ,
            HALE_URL=admin.url.replace("http://", "ws://"),
            HALE_AGENT="researcher-test",
            HALE_ROLE="research",
            HALE_TOKEN=tokens.access_token,
            HALE_REFRESH_TOKEN=tokens.refresh_token,
        ),
    )
    try:
        task = admin.submit("research", {"topic": "tides"}, budget={"tokens": 1_000}).task
        deadline = time.monotonic() + 30
        while (done := admin.task(task)).status not in ("completed", "failed"):
            assert time.monotonic() < deadline, f"task {task} is still {done.status}"
            time.sleep(0.1)
        assert done.status == "completed" and "tides" in done.result["summary"]
        assert [step.name for step in done.steps] == ["search", "summarize"]
        assert done.spent["tokens"] == 28  # the model call behind summarize: 8 in, 20 out
    finally:
        agent.send_signal(signal.SIGTERM)  # as hale stops an agent
        assert agent.wait(30) == 0
    assert admin.state("researcher-test").state == {"done": 1, "stopped": True}
