"""Starting the real hale binary for the tests, and talking to its HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple, TypeVar

REPO = Path(__file__).resolve().parents[3]
HALE_BIN = os.environ.get("HALE_BIN") or str(REPO / "target" / "debug" / "hale")
ADMIN = "py-test-admin-token-3c9e1d"

T = TypeVar("T")


def free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


class Hale:
    """A running ``hale serve`` (or ``hale up``)."""

    def __init__(
        self,
        data: Path,
        listen: str = "127.0.0.1:0",
        up: Optional[Path] = None,
        env: Optional[Dict[str, str]] = None,
        config: Optional[Path] = None,
    ) -> None:
        if not Path(HALE_BIN).exists():
            raise RuntimeError(f"no hale binary at {HALE_BIN}: run `cargo build -p hale` or set HALE_BIN")
        self.data = data
        args = [HALE_BIN]
        args += ["up", "-c", str(up)] if up is not None else ["serve"]
        if config is not None:
            args += ["-c", str(config)]
        args += ["--data", str(data), "--listen", listen]
        environment = dict(os.environ, HALE_ADMIN_TOKEN=ADMIN, HALE_LOG="info")
        environment.update(env or {})
        environment.pop("HALE_URL", None)
        environment.pop("HALE_TOKEN", None)
        self.stderr_path = data.parent / f"{data.name}-hale-{time.monotonic_ns()}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL, env=environment)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("hale listening on "):
            self.proc.wait(10)
            raise RuntimeError(f"hale did not start: {line!r}\n{self.stderr()}")
        self.addr = line.strip()[len("hale listening on ") :]
        self.lines: List[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace"))

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    @property
    def ws_url(self) -> str:
        return f"ws://{self.addr}"

    @property
    def http_url(self) -> str:
        return f"http://{self.addr}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(10)
        return self.proc.returncode

    def http(self, method: str, path: str, body: Any = None, token: Optional[str] = ADMIN) -> Tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.http_url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.http(method, path, body)
        assert 200 <= status < 300, f"{method} {path}: {status} {answer}"
        return answer

    def state(self, agent: str) -> Dict[str, Any]:
        return self.ok("GET", f"/v1/agents/{agent}/state")  # type: ignore[no-any-return]

    def task(self, task: int) -> Dict[str, Any]:
        return self.ok("GET", f"/v1/tasks/{task}")  # type: ignore[no-any-return]

    def agent_summary(self, agent: str) -> Optional[Dict[str, Any]]:
        for summary in self.ok("GET", "/v1/agents"):
            if summary["agent"] == agent:
                return summary  # type: ignore[no-any-return]
        return None

    def issue_tokens(self, agent: str) -> Dict[str, Any]:
        return self.ok("POST", f"/v1/agents/{agent}/tokens")  # type: ignore[no-any-return]

    def submit(self, role: str, payload: Any = None, **extra: Any) -> int:
        body = {"role": role, "payload": payload, **extra}
        return int(self.ok("POST", "/v1/tasks", body)["task"])


async def eventually(
    what: str, seconds: float, probe: Callable[[], Optional[T]], seen: Optional[Callable[[], Any]] = None
) -> T:
    """Polls ``probe`` every 50 ms until it returns something other than None/False, for at
    most ``seconds``; a timeout says what it waited for and, with ``seen``, what it last saw.
    Tests wait for the condition they assert this way, never for a fixed time: CI runs on a
    busy machine."""
    deadline = time.monotonic() + seconds
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        last = f"; last seen: {seen()!r}" if seen is not None else ""
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for: {what}{last}"
        await asyncio.sleep(0.05)


def run(coroutine: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Runs an async test in a fresh event loop, with a time limit of a minute."""
    return run_within(60)(coroutine)


def run_within(seconds: float) -> Callable[[Callable[..., Awaitable[None]]], Callable[..., None]]:
    """Runs an async test in a fresh event loop, with a time limit of ``seconds``."""

    def decorate(coroutine: Callable[..., Awaitable[None]]) -> Callable[..., None]:
        @functools.wraps(coroutine)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            async def limited() -> None:
                await asyncio.wait_for(coroutine(*args, **kwargs), seconds)

            asyncio.run(limited())

        return wrapper

    return decorate


def up_python(work: Path, agents: Dict[str, Tuple[str, str]], supervision: str = "") -> Hale:
    """``hale up`` running Python agents: ``agents`` maps each name to the source of its
    script and extra hale.toml lines for it. The scripts find this client on PYTHONPATH."""
    import json as _json
    import sys as _sys

    work.mkdir(parents=True, exist_ok=True)
    client = str(REPO / "clients" / "python")
    text = f"[supervision]\n{supervision}\n"
    for name, (source, extra) in agents.items():
        script = work / f"{name}.py"
        script.write_text(source)
        text += (
            "\n[[agent]]\n"
            f'name = "{name}"\n'
            f"command = {_json.dumps(_sys.executable)}\n"
            f"args = [{_json.dumps(str(script))}]\n"
            f"env = {{ PYTHONPATH = {_json.dumps(client)} }}\n"
            f"{extra}\n"
        )
    config = work / "hale.toml"
    config.write_text(text)
    return Hale(work / "data", free_address(), up=config)


class Proxy:
    """A TCP proxy in front of hale that the test can cut: open connections are dropped
    and new ones refused until it is restored. It records when connections were tried."""

    def __init__(self, target: str) -> None:
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.cut = False
        self.attempts: List[float] = []
        self._open: List[asyncio.StreamWriter] = []
        self.server: Optional[asyncio.AbstractServer] = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        sock = self.server.sockets[0]
        return "ws://127.0.0.1:%d" % sock.getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.attempts.append(time.monotonic())
        if self.cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.transport.abort()
            return
        self._open += [writer, up_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while True:
                    data = await source.read(65536)
                    if not data:
                        break
                    sink.write(data)
                    await sink.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def sever(self) -> None:
        self.cut = True
        for writer in self._open:
            writer.transport.abort()
        self._open.clear()

    def restore(self) -> None:
        self.cut = False

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class Cluster:
    """Three ``hale serve`` nodes on loopback formed into a cluster (init on node 1, the
    others join it), with Raft timeouts (1-2 s elections) that a busy test machine does not trip."""

    SECRET = "py-test-cluster-secret-5d1f0a7b"

    def __init__(self, work: Path, nodes: int = 3, heartbeat_ms: int = 100, election_ms: Tuple[int, int] = (1000, 2000)) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        secret = work / "cluster.secret"
        secret.write_text(self.SECRET)
        self.nodes: List[Hale] = []
        try:
            for node_id in range(1, nodes + 1):
                config = work / f"node{node_id}.toml"
                config.write_text(
                    "[cluster]\n"
                    f"node_id = {node_id}\n"
                    f'secret_file = "{secret}"\n'
                    f"heartbeat_ms = {heartbeat_ms}\n"
                    f"election_min_ms = {election_ms[0]}\n"
                    f"election_max_ms = {election_ms[1]}\n"
                )
                self.nodes.append(Hale(work / f"data{node_id}", free_address(), config=config))
            self.nodes[0].ok("POST", "/v1/cluster/init")
            for node in self.nodes[1:]:
                node.ok("POST", "/v1/cluster/join", {"address": self.nodes[0].addr})
        except BaseException:
            self.stop()
            raise

    def status(self, node: Hale) -> Optional[Dict[str, Any]]:
        """``GET /v1/cluster`` on ``node``, or None if it does not answer."""
        if node.proc.poll() is not None:
            return None
        try:
            status, answer = node.http("GET", "/v1/cluster")
        except OSError:
            return None
        return answer if status == 200 and isinstance(answer, dict) else None

    def leader(self, among: Optional[List[Hale]] = None) -> Optional[Hale]:
        """The node that says it leads and that every other running node (of ``among``)
        follows; None while they do not agree (an election)."""
        live = [
            (index + 1, node)
            for index, node in enumerate(self.nodes)
            if node.proc.poll() is None and (among is None or node in among)
        ]
        statuses = [self.status(node) for _, node in live]
        if not statuses or any(status is None for status in statuses):
            return None
        leaders = {status.get("leader") for status in statuses if status is not None}
        if len(leaders) != 1:
            return None
        named = leaders.pop()
        for (node_id, node), status in zip(live, statuses):
            if node_id == named and status is not None and status.get("role") == "leader":
                return node
        return None

    def followers(self, leader: Hale) -> List[Hale]:
        return [node for node in self.nodes if node is not leader and node.proc.poll() is None]

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                with contextlib.suppress(OSError):
                    node.proc.send_signal(signal.SIGCONT)
            node.stop()
