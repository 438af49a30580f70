#!/usr/bin/env python3
"""A Jepsen-style test of a 3-node hale cluster: concurrent clients, a seeded nemesis, a checker.

    python3 scripts/jepsen.py HALE_BINARY [--duration SECONDS] [--seed N] [--clients N]
                              [--history FILE] [--workdir DIR]
    python3 scripts/jepsen.py --self-test             # the checker must catch hand-made bad histories
    python3 scripts/jepsen.py --check-only HISTORY    # check a kept history again

Three `hale serve` nodes run on loopback. Each advertises the address of a fault-injecting
TCP proxy that this script runs (asyncio, in a thread) in front of the node's real
listener; nodes reach each other only through those proxies. The proxy tells a node's
connection from a client's by the `x-hale-node` header of the first request head, and the
nemesis uses it to cut a node off from the others (clients still reach every node).

Clients (threads, one logical agent `agent-K` each, plus a task worker `worker-K`) work
through the proxies with the admin token, follow `not_leader` to the leader, and record
every operation in a JSON-lines history (invoke, then ok / fail / info; info = outcome
unknown): checkpoints with expected_version, a new incarnation now and then followed by
one write with the old one (must be refused), reads from a random node without following
the leader (a deposed leader must not answer old state), and tasks (submit with an
idempotency key, lease, step, complete, and a completion by a fenced lease holder). The nemesis, driven by random.Random(seed), SIGKILLs the leader or a follower
and restarts it, SIGSTOPs a node past the election timeout, and cuts a node off through
the proxy, each at least once, with gaps for the cluster to recover.

Afterwards the script heals everything, waits for a leader, reads the final state and the
committed log, and checks: every acknowledged checkpoint is in the log with its value;
each agent's versions form one linear history (never two states at one version, versions
strictly increasing, reads never go back); a definitely refused write never took effect;
no task completed twice; every acknowledged completion, step and submit is there (each
idempotency key exactly once); no write of a fenced incarnation was accepted. The
committed log comes from GET /v1/events when the node serves it, else from the nodes'
Raft logs (their `raft_log` tables, read-only, harvested while the run goes on, and
checked to agree with each other); it is kept beside the history as HISTORY.committed.jsonl
(the history's extension replaced), with the final state in the history's last `log` entry.

Exit status: 0 when the checker passes, 1 when it finds a violation (the seed, the
property and the offending entries are printed, and the history is kept), 2 when the
harness itself could not run (the cluster never formed, bad arguments), 130 when
interrupted. Every child process is killed on the way out (and by PR_SET_PDEATHSIG,
through setpriv when it is installed, should this script itself be killed). Liveness
problems (a follower still behind after healing) are printed but do not fail the run.
"""

import argparse
import asyncio
import base64
import collections
import http.client
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

TOKEN = "jepsen-admin-token-0123456789abcdef"
SECRET = "jepsen-cluster-secret-0123456789abcdef"
LEADER_RE = re.compile(r"the leader is ([^\s);]+)")
REQUEST_TIMEOUT = 2.0  # a client request's timeout; past it the outcome is unknown (info)
HEARTBEAT_EVERY = 0.2
MAX_ATTEMPTS = 1000  # a task's attempts: fencing may take many leases away
# The proxy's answer to a client whose node is down: the request reached no node.
_DOWN_BODY = b'{"error":{"code":"jepsen_proxy_upstream_down","message":"the node is down","retryable":true}}'
UPSTREAM_DOWN = (
    b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\nconnection: close\r\n"
    + b"content-length: " + str(len(_DOWN_BODY)).encode() + b"\r\n\r\n" + _DOWN_BODY
)


class HarnessError(Exception):
    """The harness could not do its part (not a finding about hale)."""


def log(message):
    print(f"[jepsen {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- history


class History:
    """The history: JSON lines, written and flushed as they come, kept in memory too."""

    def __init__(self, path=None):
        self.path = path
        self.file = open(path, "w") if path else None
        self.lock = threading.Lock()
        self.entries = []
        self.t0 = time.monotonic()
        self.next_op = 0

    def now(self):
        return round(time.monotonic() - self.t0, 4)

    def add(self, **entry):
        with self.lock:
            entry = {"i": len(self.entries), "time": self.now(), **entry}
            self.entries.append(entry)
            if self.file:
                self.file.write(json.dumps(entry, sort_keys=True) + "\n")
                self.file.flush()
            return entry

    def invoke(self, process, f, value, node=None):
        with self.lock:
            self.next_op += 1
            op = self.next_op
        return self.add(process=process, type="invoke", f=f, op=op, value=value, node=node)

    def complete(self, invoked, type_, value, node=None):
        return self.add(process=invoked["process"], type=type_, f=invoked["f"], op=invoked["op"], value=value, node=node)

    def close(self):
        if self.file:
            self.file.close()
            self.file = None


# --------------------------------------------------------------------------- HTTP


class Answer:
    """What one client call came to: `kind` is ok, fail (definitely not done) or info."""

    def __init__(self, kind, node, status=None, body=None, code=None, error=None, uncertain=False):
        self.kind, self.node, self.status, self.body, self.code, self.error = kind, node, status, body, code, error
        self.uncertain = uncertain

    def summary(self):
        out = {}
        if self.code:
            out["code"] = self.code
        if self.error:
            out["error"] = self.error
        if self.uncertain and self.kind != "ok":
            out["uncertain"] = True
        return out


class Http:
    """Keep-alive HTTP/1.1 connections, one per address, for one thread."""

    def __init__(self):
        self.conns = {}

    def drop(self, addr):
        conn = self.conns.pop(addr, None)
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def close(self):
        for addr in list(self.conns):
            self.drop(addr)

    def request(self, addr, method, path, body=None, timeout=REQUEST_TIMEOUT):
        """(status, parsed JSON or None). Raises OSError / HTTPException on any transport error."""
        conn = self.conns.get(addr)
        if conn is not None and conn.sock is not None:
            # The peer closed an idle connection (a node or the proxy went away): open anew,
            # rather than send into a dead socket and lose track of the request.
            try:
                readable, _, _ = select.select([conn.sock], [], [], 0)
            except (OSError, ValueError):
                readable = [conn.sock]
            if readable:
                self.drop(addr)
                conn = None
        if conn is None:
            host, port = addr.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
            self.conns[addr] = conn
        try:
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            else:
                conn.timeout = timeout
            data = None if body is None else json.dumps(body).encode()
            headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            status = response.status
        except BaseException:
            self.drop(addr)
            raise
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = {"raw": raw[:200].decode("utf-8", "replace")}
        return status, parsed


def error_code(body):
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("code"), body["error"].get("message", "")
    return None, ""


class LeaderHint:
    """Where clients think the leader is; any client that learns better updates it."""

    def __init__(self, addrs):
        self.addrs = list(addrs)
        self.lock = threading.Lock()
        self.addr = addrs[0]
        self.suspect = {}  # addr -> until (monotonic): found down or unresponsive lately

    def get(self):
        with self.lock:
            return self.addr

    def set(self, addr):
        if addr in self.addrs:
            with self.lock:
                self.addr = addr

    def distrust(self, addr, seconds=1.0):
        with self.lock:
            self.suspect[addr] = time.monotonic() + seconds

    def trusted(self, addr):
        with self.lock:
            return self.suspect.get(addr, 0) < time.monotonic()

    def after(self, addr):
        """The next node after addr, passing over suspects when another will do."""
        i = self.addrs.index(addr) if addr in self.addrs else -1
        ring = [self.addrs[(i + j) % len(self.addrs)] for j in range(1, len(self.addrs) + 1)]
        for candidate in ring:
            if candidate != addr and self.trusted(candidate):
                return candidate
        return ring[0]


def call(http_, hint, method, path, body=None, timeout=REQUEST_TIMEOUT, attempts=30, deadline_s=5.0, stop=None):
    """One logical request, following not_leader. A transport error or timeout ends it as
    info at once (the request may or may not have been carried out). not_leader may come
    from a leader that lost its place with the request in flight (docs/errors.md), so after
    one, a later definite refusal is reported as info too."""
    target = hint.get()
    uncertain = False
    deadline = time.monotonic() + deadline_s
    code = None
    for attempt in range(attempts):
        if attempt and time.monotonic() > deadline:
            break
        try:
            status, doc = http_.request(target, method, path, body, timeout=timeout)
        except (OSError, http.client.HTTPException) as error:
            # Move on to another node for the next request: this one may be down or cut off.
            hint.distrust(target)
            if hint.get() == target:
                hint.set(hint.after(target))
            return Answer("info", target, error=type(error).__name__, uncertain=True)
        if status == 200:
            hint.set(target)
            return Answer("ok", target, status, doc, uncertain=uncertain)
        code, message = error_code(doc)
        if status == 502 and code == "jepsen_proxy_upstream_down":
            # The proxy could not reach the node: the request went nowhere. Try another.
            hint.distrust(target)
            target = hint.after(target)
            if stop is not None and stop.wait(0.05):
                break
            continue
        if status == 503 and code == "not_leader":
            uncertain = True
            named = LEADER_RE.search(message or "")
            if named and named.group(1) != target and named.group(1) in hint.addrs and hint.trusted(named.group(1)):
                target = named.group(1)
            else:
                target = hint.after(target)
                if stop is not None and stop.wait(0.1):
                    break
                elif stop is None:
                    time.sleep(0.1)
            continue
        if status >= 500:
            # log_unavailable, shutting_down, internal: nothing says what happened.
            return Answer("info", target, status, doc, code=code or str(status), uncertain=True)
        return Answer("info" if uncertain else "fail", target, status, doc, code=code or str(status), uncertain=uncertain)
    return Answer("info", target, code=code or "no_leader", error="gave up following the leader", uncertain=True)


# --------------------------------------------------------------------------- the proxy


class Proxy:
    """A TCP proxy in front of each node, on an asyncio loop in its own thread. It reads
    the first request head of each connection: with `x-hale-node: N` the connection is
    node N's, else a client's (always forwarded). `isolate(n)` drops and refuses every
    connection between n and another node, in both directions, until `heal()`."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.cut = set()
        self.conns = set()
        self.upstream = {}
        self.servers = {}
        self.counts = collections.Counter()
        self.thread = threading.Thread(target=self._run, name="proxy", daemon=True)
        self.thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _do(self, coroutine, timeout=10):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def listen(self, node_id, upstream_port):
        """Starts the proxy of node `node_id`; returns its port."""

        async def go():
            self.upstream[node_id] = upstream_port
            server = await asyncio.start_server(
                lambda r, w: self._handle(node_id, r, w), "127.0.0.1", 0, limit=256 * 1024
            )
            self.servers[node_id] = server
            return server.sockets[0].getsockname()[1]

        return self._do(go())

    def _blocked(self, src, dst):
        return src != dst and (src in self.cut or dst in self.cut)

    @staticmethod
    def _abort(*writers):
        for writer in writers:
            try:
                writer.transport.abort()
            except Exception:
                pass

    async def _handle(self, dst, reader, writer):
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        except Exception:
            self._abort(writer)
            return
        src = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"x-hale-node":
                try:
                    src = int(value.strip())
                except ValueError:
                    src = -1
        if src is not None and self._blocked(src, dst):
            self.counts["refused"] += 1
            self._abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.upstream[dst], limit=256 * 1024), 2
            )
        except Exception:
            self.counts["upstream_down"] += 1
            if src is None:
                # A client's request never reached the node: say so, so the client knows
                # it was not carried out (a node's request is simply cut).
                try:
                    writer.write(UPSTREAM_DOWN)
                    await asyncio.wait_for(writer.drain(), 1)
                except Exception:
                    pass
            self._abort(writer)
            return
        conn = (src, dst, writer, up_writer)
        self.conns.add(conn)
        self.counts["node" if src is not None else "client"] += 1
        try:
            up_writer.write(head)
            pumps = [
                asyncio.ensure_future(self._pump(reader, up_writer)),
                asyncio.ensure_future(self._pump(up_reader, writer)),
            ]
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pending:
                pump.cancel()
        except Exception:
            pass
        finally:
            self.conns.discard(conn)
            self._abort(writer, up_writer)

    @staticmethod
    async def _pump(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                writer.write(data)
                await writer.drain()
        except Exception:
            return

    def isolate(self, node_id):
        async def go():
            self.cut.add(node_id)
            dropped = 0
            for conn in list(self.conns):
                src, dst, writer, up_writer = conn
                if src is not None and self._blocked(src, dst):
                    self._abort(writer, up_writer)
                    self.conns.discard(conn)
                    dropped += 1
            return dropped

        return self._do(go())

    def heal(self):
        async def go():
            self.cut.clear()

        self._do(go())

    def stop(self):
        async def go():
            for server in self.servers.values():
                server.close()
            for _, _, writer, up_writer in list(self.conns):
                self._abort(writer, up_writer)

        try:
            self._do(go(), timeout=5)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# --------------------------------------------------------------------------- the cluster


def ephemeral_range():
    try:
        low, high = open("/proc/sys/net/ipv4/ip_local_port_range").read().split()
        return int(low), int(high)
    except Exception:
        return 32768, 60999


def free_port(taken):
    """A port below the ephemeral range, so that no outgoing connection (the proxy's, a
    node's) takes it while its node is down and it can be listened on again."""
    low, _ = ephemeral_range()
    chooser = random.SystemRandom()
    for _ in range(200):
        port = chooser.randrange(max(1025, low - 12000), low - 1)
        if port in taken:
            continue
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
            taken.add(port)
            return port
        except OSError:
            continue
        finally:
            sock.close()
    raise HarnessError("no free port below the ephemeral range")


class Node:
    def __init__(self, node_id, workdir, real_port, proxy_port):
        self.id = node_id
        self.real_port = real_port
        self.proxy_port = proxy_port
        self.addr = f"127.0.0.1:{proxy_port}"  # advertised: through the proxy
        self.real = f"127.0.0.1:{real_port}"
        self.data = os.path.join(workdir, f"n{node_id}-data")
        self.config = os.path.join(workdir, f"n{node_id}.toml")
        self.log_path = os.path.join(workdir, f"n{node_id}.log")
        self.proc = None
        self.paused = False
        self.starts = 0

    def up(self):
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    def __init__(self, binary, workdir, history, proxy):
        self.binary = os.path.abspath(binary)
        self.workdir = workdir
        self.history = history
        self.proxy = proxy
        self.http = Http()  # main thread only
        secret = os.path.join(workdir, "cluster.secret")
        with open(secret, "w") as f:
            f.write(SECRET + "\n")
        os.chmod(secret, 0o600)
        taken = set()
        self.nodes = []
        for node_id in (1, 2, 3):
            real = free_port(taken)
            proxy_port = proxy.listen(node_id, real)
            node = Node(node_id, workdir, real, proxy_port)
            with open(node.config, "w") as f:
                f.write(f'[cluster]\nnode_id = {node_id}\nsecret_file = "{secret}"\nadvertise = "{node.addr}"\n')
            self.nodes.append(node)
        self.by_addr = {node.addr: node for node in self.nodes}
        self.pdeathsig = shutil.which("setpriv")

    def addrs(self):
        return [node.addr for node in self.nodes]

    def start(self, node, deadline_s=30):
        """Starts (or restarts) a node on its data directory and port; waits for /healthz.
        Always called from the main thread (PR_SET_PDEATHSIG follows the thread)."""
        command = [self.binary, "serve", "-c", node.config, "--data", node.data, "--listen", node.real]
        if self.pdeathsig:
            command = [self.pdeathsig, "--pdeathsig", "KILL", "--"] + command
        env = dict(os.environ, HALE_ADMIN_TOKEN=TOKEN, HALE_LOG=os.environ.get("HALE_LOG", "warn"))
        deadline = time.monotonic() + deadline_s
        for _ in range(5):
            with open(node.log_path, "ab") as out:
                out.write(f"--- start {node.starts + 1} at {time.strftime('%H:%M:%S')}\n".encode())
                out.flush()
                node.proc = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, start_new_session=True
                )
            node.starts += 1
            node.paused = False
            while time.monotonic() < deadline and node.proc.poll() is None:
                try:
                    status, _ = self.http.request(node.real, "GET", "/healthz", timeout=0.5)
                    if status == 200:
                        return
                except Exception:
                    pass
                time.sleep(0.05)
            if node.proc.poll() is None:
                break
            # It exited (the port, or the log still locked by its predecessor): again.
            time.sleep(0.5)
            if time.monotonic() > deadline:
                break
        raise HarnessError(f"node {node.id} did not come up within {deadline_s} s; see {node.log_path}")

    def kill(self, node):
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        node.paused = False

    def pause(self, node):
        if node.up():
            node.proc.send_signal(signal.SIGSTOP)
            node.paused = True

    def resume(self, node):
        if node.proc is not None and node.paused:
            try:
                node.proc.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
        node.paused = False

    def stop_all(self, graceful=False, first=None):
        """SIGTERM (graceful) or SIGKILL every node; returns {node id: seconds to exit}.
        `first` is stopped (and waited for) before the others: a leader stopping waits
        for its proposed entries to commit, which it cannot once its followers are gone."""
        took = {}
        if first is not None and graceful:
            took.update(self._stop([first], graceful))
        took.update(self._stop(self.nodes, graceful))
        return took

    def _stop(self, nodes, graceful):
        took = {}
        begun = time.monotonic()
        for node in nodes:
            if node.proc is None or node.proc.poll() is not None:
                continue
            try:
                if node.paused:
                    node.proc.send_signal(signal.SIGCONT)
                    node.paused = False
                node.proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            except ProcessLookupError:
                pass
        for node in nodes:
            if node.proc is None:
                continue
            was_running = node.proc.returncode is None
            try:
                node.proc.wait(15 if graceful else 5)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                try:
                    node.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            if was_running:
                took[node.id] = round(time.monotonic() - begun, 2)
        return took

    def admin(self, node, method, path, body=None, timeout=5.0):
        try:
            return self.http.request(node.addr, method, path, body, timeout=timeout)
        except (OSError, http.client.HTTPException) as error:
            return None, {"transport": type(error).__name__}

    def status(self, node, timeout=0.5):
        """GET /v1/cluster straight at the node's listener (a monitor, not part of the test)."""
        if not node.up() or node.paused:
            return None
        try:
            status, doc = self.http.request(node.real, "GET", "/v1/cluster", timeout=timeout)
        except (OSError, http.client.HTTPException):
            return None
        return doc if status == 200 else None

    def leader(self, deadline_s=3.0):
        """The node that leads at the highest term any node reports, or None."""
        deadline = time.monotonic() + deadline_s
        while True:
            best = None
            for node in self.nodes:
                doc = self.status(node)
                if doc and doc.get("role") == "leader":
                    if best is None or doc.get("term", 0) > best[0]:
                        best = (doc.get("term", 0), node)
            if best is not None or time.monotonic() > deadline:
                return best[1] if best else None
            time.sleep(0.1)

    def form(self, deadline_s=90):
        first = self.nodes[0]
        deadline = time.monotonic() + deadline_s
        while True:
            status, doc = self.admin(first, "POST", "/v1/cluster/init")
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise HarnessError(f"POST /v1/cluster/init on node 1 answered {status} {doc}")
            time.sleep(0.2)
        for node in self.nodes[1:]:
            while True:
                status, doc = self.admin(node, "POST", "/v1/cluster/join", {"address": first.addr}, timeout=65)
                if status == 200:
                    break
                if time.monotonic() > deadline:
                    raise HarnessError(f"POST /v1/cluster/join on node {node.id} answered {status} {doc}")
                time.sleep(0.3)
        # Formed when the leader sees three voters that have caught up.
        while True:
            leader = self.leader(deadline_s=1)
            doc = self.status(leader) if leader else None
            members = (doc or {}).get("members", [])
            if len(members) == 3 and all(m.get("voter") and m.get("lag", 1) == 0 for m in members):
                return leader
            if time.monotonic() > deadline:
                raise HarnessError(f"the cluster did not settle with three voters: {doc}")
            time.sleep(0.1)


# --------------------------------------------------------------------------- the committed log


def decode_entry(payload):
    """A Raft entry's payload (JSON) -> the hale records it carries, as dicts shaped like
    GET /v1/events answers them: {seq, at_ms, kind, event}."""
    doc = json.loads(payload)
    body = doc.get("payload")
    out = []
    if isinstance(body, dict) and "Normal" in body:
        for record in body["Normal"].get("records", []):
            item = {"seq": record.get("seq"), "at_ms": record.get("at_ms")}
            try:
                event = json.loads(base64.b64decode(record["body"]))
                (kind, fields), = event.items()
                item.update(kind=kind, event=fields)
            except Exception as error:  # sealed (encrypted) or unreadable
                item.update(kind="damaged", event=None, summary=str(error))
            out.append(item)
    return out


class Harvester:
    """Copies committed Raft entries out of every node's `hale.db` (read-only) while the
    run goes on, because openraft purges old entries after a snapshot. Entries at or
    below a node's persisted `committed` index are committed; two nodes must agree on
    every such entry."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.entries = {}  # index -> (term, leader, payload bytes, node id)
        self.upto = {node.id: -1 for node in cluster.nodes}
        self.divergent = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="harvester", daemon=True)
        self.errors = collections.Counter()

    def start(self):
        self.thread.start()

    def _run(self):
        for _ in range(100_000):
            if self.stop_event.wait(0.25):
                return
            self.harvest()

    def harvest(self):
        for node in self.cluster.nodes:
            try:
                self._harvest_node(node)
            except Exception as error:
                self.errors[f"node {node.id}: {type(error).__name__}: {error}"[:160]] += 1

    def _harvest_node(self, node):
        path = os.path.join(node.data, "hale.db")
        if not os.path.exists(path):
            return
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "raft_log" not in tables:
                return
            meta = dict(conn.execute("SELECT key, value FROM raft_meta").fetchall())
            committed = meta.get("committed")
            if committed is None:
                return
            committed = json.loads(committed)
            top = committed.get("index") if isinstance(committed, dict) else None
            if top is None:
                return
            start = self.upto[node.id]
            rows = conn.execute(
                "SELECT log_index, term, leader, payload FROM raft_log WHERE log_index > ? AND log_index <= ? "
                "ORDER BY log_index",
                (start, top),
            ).fetchall()
        finally:
            conn.close()
        with self.lock:
            for index, term, leader, payload in rows:
                payload = bytes(payload)
                known = self.entries.get(index)
                if known is None:
                    self.entries[index] = (term, leader, payload, node.id)
                elif (known[0], known[2]) != (term, payload):
                    self.divergent.append({"index": index, "nodes": [known[3], node.id], "terms": [known[0], term]})
            self.upto[node.id] = max(start, top)

    def stop(self):
        self.stop_event.set()
        self.thread.join(10)

    def events(self):
        """The committed hale records in log order, and any gap in the Raft indices."""
        with self.lock:
            indices = sorted(self.entries)
            gaps = []
            for a, b in zip(indices, indices[1:]):
                if b != a + 1:
                    gaps.append((a + 1, b - 1))
            out = []
            terms = []
            for index in indices:
                term, leader, payload, _ = self.entries[index]
                terms.append(term)
                for item in decode_entry(payload):
                    item.update(index=index, term=term)
                    out.append(item)
            return out, gaps, sorted(set(terms))


# --------------------------------------------------------------------------- clients


class Worker:
    """A task worker agent; its heartbeats come from a thread of their own."""

    def __init__(self, name, role):
        self.name = name
        self.role = role
        self.lock = threading.Lock()
        self.incarnation = None
        self.fenced = False
        self.beats = 0
        self.misanswered = 0
        self.beat_errors = collections.Counter()


class Client:
    """Agent `agent-K` (checkpoints) and worker `worker-K` (tasks), one thread."""

    def __init__(self, k, seed, history, hint, stop, counters, clients):
        self.k = k
        self.clients = clients
        self.process = k
        self.rng = random.Random(seed)
        self.history = history
        self.hint = hint
        self.stop = stop
        self.http = Http()
        self.counters = counters
        self.agent = f"agent-{k}"
        self.incarnation = None
        self.version = None  # the version this client last knows; None: read before writing
        self.need_read = False
        self.n = 0
        self.worker = Worker(f"worker-{k}", f"jepsen-role-{k}")
        self.pending_submit = None  # (key, payload) resubmitted until acknowledged
        self.open_tasks = set()
        self.done_tasks = set()
        self.thread = threading.Thread(target=self.run, name=f"client-{k}", daemon=True)
        self.hb_thread = threading.Thread(target=self.heartbeats, name=f"heartbeat-{k}", daemon=True)

    # -- plumbing

    def op(self, f, value, method, path, body, ok_value=None, timeout=REQUEST_TIMEOUT):
        invoked = self.history.invoke(self.process, f, value, node=self.hint.get())
        answer = call(self.http, self.hint, method, path, body, timeout=timeout, stop=self.stop)
        result = ok_value(answer.body) if (answer.kind == "ok" and ok_value) else {}
        self.history.complete(invoked, answer.kind, {**result, **answer.summary()}, node=answer.node)
        self.counters[(f, answer.kind)] += 1
        return answer

    def run(self):
        for _ in range(10_000_000):
            if self.stop.is_set():
                break
            try:
                self.step()
            except Exception as error:  # the harness's own bug: say so, carry on
                self.history.add(process=self.process, type="error", f="client", value={"error": repr(error)})
                self.stop.wait(0.2)
        self.http.close()

    def step(self):
        if self.incarnation is None:
            return self.hello()
        if self.need_read or self.version is None:
            return self.read()
        roll = self.rng.random()
        if roll < 0.03:
            return self.fence_probe()
        if roll < 0.08:
            return self.read_any()
        if roll < 0.70:
            return self.checkpoint()
        return self.task_step()

    # -- checkpoints

    def hello(self):
        answer = self.op(
            "hello",
            {"agent": self.agent},
            "POST",
            f"/v1/agents/{self.agent}/hello",
            {"role": "jepsen-writer"},
            ok_value=lambda b: {"agent": self.agent, "incarnation": b["incarnation"], "version": b["version"]},
        )
        if answer.kind == "ok":
            self.incarnation = answer.body["incarnation"]
            self.version = answer.body["version"]
            self.need_read = False
            return True
        if answer.kind == "info":
            self.need_read = True  # a new incarnation may have started: read it back
        self.stop.wait(0.05)
        return False

    def read(self):
        answer = self.op(
            "read",
            {"agent": self.agent},
            "GET",
            f"/v1/agents/{self.agent}/state",
            None,
            ok_value=lambda b: {
                "agent": self.agent,
                "version": b["version"],
                "incarnation": b["incarnation"],
                "state": b["state"],
            },
        )
        if answer.kind == "ok":
            self.version = answer.body["version"]
            self.incarnation = answer.body["incarnation"]
            self.need_read = False
        elif answer.code == "unknown_agent":
            self.incarnation = None
        else:
            self.stop.wait(0.05)

    def read_any(self):
        """Reads some agent's state from a node picked at random, without following the
        leader: only a node that believes it leads answers, and what it answers must not be
        older than a write acknowledged before the read began (a deposed leader that has
        not heard of its successor yet would show exactly that)."""
        agent = f"agent-{self.rng.randint(1, self.clients)}"
        node = self.rng.choice(self.hint.addrs)
        invoked = self.history.invoke(self.process, "read-any", {"agent": agent}, node=node)
        try:
            status, doc = self.http.request(node, "GET", f"/v1/agents/{agent}/state", timeout=3.0)
        except (OSError, http.client.HTTPException) as error:
            self.history.complete(invoked, "info", {"error": type(error).__name__}, node=node)
            self.counters[("read-any", "info")] += 1
            return
        if status == 200:
            value = {"agent": agent, "version": doc["version"], "incarnation": doc["incarnation"], "state": doc["state"]}
            self.history.complete(invoked, "ok", value, node=node)
            self.counters[("read-any", "ok")] += 1
        else:
            code, _ = error_code(doc)
            self.history.complete(invoked, "fail", {"code": code or str(status)}, node=node)
            self.counters[("read-any", "fail")] += 1

    def checkpoint(self, incarnation=None, f="checkpoint"):
        self.n += 1
        patch = {"k": self.k, "op": self.n}
        value = {
            "agent": self.agent,
            "incarnation": incarnation or self.incarnation,
            "expected_version": self.version,
            "patch": patch,
        }
        body = {"incarnation": value["incarnation"], "patch": patch, "expected_version": self.version}
        answer = self.op(
            f,
            value,
            "POST",
            f"/v1/agents/{self.agent}/checkpoint",
            body,
            ok_value=lambda b: {"version": b["version"]},
        )
        if f != "checkpoint":
            return answer
        if answer.kind == "ok":
            self.version = answer.body["version"]
        elif answer.kind == "info" or answer.code == "version_conflict":
            self.need_read = True
        elif answer.code in ("stale_incarnation", "incarnation_down", "unknown_incarnation"):
            self.incarnation = None
        return answer

    def fence_probe(self):
        """hello again (a new incarnation), then one write with the old one: must be refused."""
        old = self.incarnation
        if not self.hello():
            return
        if self.incarnation == old:
            return
        self.checkpoint(incarnation=old, f="stale-write")

    # -- tasks

    def task_step(self):
        worker = self.worker
        with worker.lock:
            fenced, incarnation = worker.fenced, worker.incarnation
        if incarnation is None or fenced:
            return self.worker_hello()
        if self.pending_submit is not None:
            return self.submit(*self.pending_submit)
        if len(self.open_tasks) < 2 and self.rng.random() < 0.5:
            self.n += 1
            key = f"jepsen-{self.k}-{self.n}"
            return self.submit(key, {"k": self.k, "n": self.n})
        return self.work(incarnation)

    def worker_hello(self):
        worker = self.worker
        answer = self.op(
            "hello",
            {"agent": worker.name},
            "POST",
            f"/v1/agents/{worker.name}/hello",
            {"role": worker.role},
            ok_value=lambda b: {"agent": worker.name, "incarnation": b["incarnation"], "version": b["version"]},
        )
        if answer.kind == "ok":
            with worker.lock:
                worker.incarnation = answer.body["incarnation"]
                worker.fenced = False
        else:
            self.stop.wait(0.05)

    def submit(self, key, payload):
        self.pending_submit = (key, payload)
        body = {"role": self.worker.role, "payload": payload, "idempotency_key": key, "max_attempts": MAX_ATTEMPTS}
        answer = self.op(
            "submit",
            {"key": key, "payload": payload},
            "POST",
            "/v1/tasks",
            body,
            ok_value=lambda b: {"task": b["task"], "new": b["new"]},
        )
        if answer.kind == "ok":
            self.pending_submit = None
            if answer.body["task"] not in self.done_tasks:
                self.open_tasks.add(answer.body["task"])
        elif answer.kind == "fail":
            self.pending_submit = None
        else:
            self.stop.wait(0.05)  # re-submitted with the same key next time

    def work(self, incarnation):
        worker = self.worker
        answer = self.op(
            "lease",
            {"agent": worker.name, "incarnation": incarnation},
            "GET",
            f"/v1/agents/{worker.name}/tasks",
            None,
            ok_value=lambda b: {"tasks": [t["task"] for t in b]},
        )
        if answer.kind != "ok":
            self.stop.wait(0.05)
            return
        held = [t for t in answer.body if t.get("incarnation") in (None, incarnation)]
        if not held:
            self.stop.wait(0.02)
            return
        task = held[0]
        tid = task["task"]
        done = {s["name"] for s in task.get("steps", []) if s.get("state", "done") == "done"}
        if self.rng.random() < 0.04:
            return self.lease_probe(tid, incarnation)
        if "s1" not in done:
            result = {"k": self.k, "task": tid, "inc": incarnation, "step": "s1"}
            answer = self.op(
                "step",
                {"task": tid, "agent": worker.name, "incarnation": incarnation, "name": "s1", "result": result},
                "POST",
                f"/v1/tasks/{tid}/steps",
                {"agent": worker.name, "incarnation": incarnation, "name": "s1", "result": result},
            )
        else:
            result = {"k": self.k, "task": tid, "inc": incarnation, "done": True}
            answer = self.op(
                "complete",
                {"task": tid, "agent": worker.name, "incarnation": incarnation, "result": result},
                "POST",
                f"/v1/tasks/{tid}/complete",
                {"agent": worker.name, "incarnation": incarnation, "result": result},
            )
            if answer.kind == "ok":
                self.open_tasks.discard(tid)
                self.done_tasks.add(tid)
        if answer.code in ("stale_incarnation", "incarnation_down"):
            with worker.lock:
                if worker.incarnation == incarnation:
                    worker.fenced = True

    def lease_probe(self, tid, old):
        """The worker starts a new run, then its old run tries to complete the task it held:
        the lease went with the old incarnation, so this must be refused."""
        self.worker_hello()
        with self.worker.lock:
            if self.worker.incarnation in (None, old):
                return
        result = {"k": self.k, "task": tid, "inc": old, "stale": True}
        self.op(
            "stale-complete",
            {"task": tid, "agent": self.worker.name, "incarnation": old, "result": result},
            "POST",
            f"/v1/tasks/{tid}/complete",
            {"agent": self.worker.name, "incarnation": old, "result": result},
        )

    def heartbeats(self):
        """The worker's pulse: every HEARTBEAT_EVERY s to the leader (not logged by hale,
        so not in the history, except when it finds the worker fenced)."""
        http_ = Http()
        worker = self.worker
        for _ in range(10_000_000):
            if self.stop.wait(HEARTBEAT_EVERY):
                break
            with worker.lock:
                incarnation, fenced = worker.incarnation, worker.fenced
            if incarnation is None or fenced:
                continue
            answer = call(
                http_,
                self.hint,
                "POST",
                f"/v1/agents/{worker.name}/heartbeat",
                {"incarnation": incarnation, "progress": {"message": "jepsen worker"}},
                timeout=0.5,
                attempts=3,
                deadline_s=1.0,
                stop=self.stop,
            )
            if answer.kind == "ok":
                worker.beats += 1
                continue
            worker.beat_errors[answer.code or answer.error] += 1
            if answer.code in ("stale_incarnation", "incarnation_down", "unknown_incarnation", "unknown_agent"):
                # A follower answers heartbeats from its own stale state instead of
                # not_leader (see the report), so ask the leader before believing it.
                fenced = self.confirm_fenced(http_, incarnation)
                if fenced is None:
                    continue
                if not fenced:
                    worker.misanswered += 1
                    self.history.add(process=f"heartbeat-{self.k}", type="info", f="heartbeat-misanswered",
                                     value={"agent": worker.name, "incarnation": incarnation, "code": answer.code},
                                     node=answer.node)
                    self.hint.distrust(answer.node, 0.5)
                    if self.hint.get() == answer.node:
                        self.hint.set(self.hint.after(answer.node))
                    continue
                with worker.lock:
                    if worker.incarnation == incarnation and not worker.fenced:
                        worker.fenced = True
                        self.history.add(
                            process=f"heartbeat-{self.k}",
                            type="info",
                            f="fenced",
                            value={"agent": worker.name, "incarnation": incarnation, "code": answer.code},
                            node=answer.node,
                        )
        http_.close()

    def confirm_fenced(self, http_, incarnation):
        """Whether the leader has fenced this incarnation (a newer one, or it is down);
        None if the leader could not be asked."""
        answer = call(http_, self.hint, "GET", "/v1/agents", timeout=1.0, deadline_s=2.0, stop=self.stop)
        if answer.kind != "ok" or not isinstance(answer.body, list):
            return None
        for row in answer.body:
            if row.get("agent") == self.worker.name:
                down = (row.get("down") or {}).get("incarnation")
                return row.get("incarnation") != incarnation or down == incarnation
        return True


class Monitor:
    """Polls GET /v1/cluster on every node and records each new (term, leader) it sees.
    Runs in a thread; reaches the nodes' real listeners with its own connections."""

    def __init__(self, cluster, history, stop):
        self.cluster = cluster
        self.history = history
        self.stop = stop
        self.seen = set()
        self.http = Http()
        self.thread = threading.Thread(target=self.run, name="monitor", daemon=True)

    def run(self):
        for _ in range(10_000_000):
            if self.stop.wait(0.2):
                break
            for node in self.cluster.nodes:
                if not node.up() or node.paused:
                    continue
                try:
                    status, doc = self.http.request(node.real, "GET", "/v1/cluster", timeout=0.3)
                except (OSError, http.client.HTTPException):
                    continue
                if status != 200 or doc.get("role") != "leader":
                    continue
                key = (doc.get("term"), doc.get("leader"))
                if key not in self.seen:
                    self.seen.add(key)
                    self.history.add(process="monitor", type="info", f="leader", value={"term": key[0], "leader": key[1]})
        self.http.close()


# --------------------------------------------------------------------------- the nemesis

FAULTS = ("kill-leader", "kill-follower", "pause", "partition")


def schedule(rng, duration):
    """[(start offset s, fault, length s)]: every kind once in a seeded order, then more
    at random while the run lasts, with gaps so the cluster recovers in between. A short
    run compresses lengths and gaps (down to floors that still outlast an election)."""
    warmup = min(3.0, max(1.0, duration * 0.08))
    budget = duration - warmup - 1.0
    base = {"kill-leader": (2.0, 4.0), "kill-follower": (2.0, 4.0), "pause": (1.8, 2.6), "partition": (3.0, 5.0)}
    floor = {"kill-leader": 1.0, "kill-follower": 1.0, "pause": 1.5, "partition": 2.0}
    gap_range, gap_floor = (2.0, 4.0), 1.0
    first = list(FAULTS)
    rng.shuffle(first)
    lengths = [rng.uniform(*base[f]) for f in first]
    gaps = [rng.uniform(*gap_range) for _ in first]
    needed = sum(lengths) + sum(gaps)
    scale = min(1.0, budget / needed) if needed > 0 else 1.0
    plan, t = [], warmup
    for fault, length, gap in zip(first, lengths, gaps):
        length = max(floor[fault], length * scale)
        plan.append((round(t, 3), fault, round(length, 3)))
        t += length + max(gap_floor, gap * scale)
    for _ in range(1000):
        fault = rng.choice(FAULTS)
        length = rng.uniform(*base[fault])
        gap = rng.uniform(*gap_range)
        if t + length > warmup + budget:
            break
        plan.append((round(t, 3), fault, round(length, 3)))
        t += length + gap
    return plan


class Nemesis:
    """Runs the schedule in the main thread (it starts processes: see Cluster.start)."""

    def __init__(self, cluster, proxy, history, rng):
        self.cluster = cluster
        self.proxy = proxy
        self.history = history
        self.rng = rng
        self.done = collections.Counter()

    def record(self, type_, fault, **value):
        self.history.add(process="nemesis", type=type_, f=fault, value=value)

    def sleep_until(self, t0, offset):
        for _ in range(100_000):
            left = t0 + offset - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))

    def pick(self, want_leader):
        leader = self.cluster.leader(deadline_s=3.0)
        up = [n for n in self.cluster.nodes if n.up() and not n.paused]
        if want_leader:
            if leader is not None:
                return leader, True
            return (self.rng.choice(up), False) if up else (None, False)
        others = [n for n in up if n is not leader]
        return (self.rng.choice(others), False) if others else (None, False)

    def run_fault(self, fault, length, first_round=False):
        cluster = self.cluster
        if fault in ("kill-leader", "kill-follower"):
            node, is_leader = self.pick(fault == "kill-leader")
            if node is None:
                return self.record("info", fault, skipped="no node to pick")
            self.record("invoke", fault, node=node.id, leader=is_leader, down_s=length)
            cluster.kill(node)
            time.sleep(length)
            cluster.start(node)
            self.record("ok", fault, node=node.id, restarted=True)
        elif fault == "pause":
            node, is_leader = self.pick(first_round or self.rng.random() < 0.5)
            if node is None:
                return self.record("info", fault, skipped="no node to pick")
            self.record("invoke", fault, node=node.id, leader=is_leader, stopped_s=length)
            cluster.pause(node)
            time.sleep(length)
            cluster.resume(node)
            self.record("ok", fault, node=node.id, resumed=True)
        elif fault == "partition":
            node, is_leader = self.pick(first_round or self.rng.random() < 0.5)
            if node is None:
                return self.record("info", fault, skipped="no node to pick")
            self.record("invoke", fault, node=node.id, leader=is_leader, cut_s=length)
            dropped = self.proxy.isolate(node.id)
            time.sleep(length)
            self.proxy.heal()
            self.record("ok", fault, node=node.id, healed=True, dropped_connections=dropped)
        self.done[fault] += 1

    def run(self, plan, t0):
        for n, (offset, fault, length) in enumerate(plan):
            self.sleep_until(t0, offset)
            self.run_fault(fault, length, first_round=n < len(FAULTS))

    def heal_all(self):
        self.proxy.heal()
        for node in self.cluster.nodes:
            if node.paused:
                self.cluster.resume(node)
        for node in self.cluster.nodes:
            if not node.up():
                self.cluster.start(node)
        self.record("ok", "heal-all")


# --------------------------------------------------------------------------- the checker


def pair_ops(entries):
    """invoke/completion pairs by op id: [{f, process, args, type, res, invoke, done}]."""
    ops, order = {}, []
    for e in entries:
        if "op" not in e:
            continue
        if e["type"] == "invoke":
            ops[e["op"]] = {"f": e["f"], "process": e["process"], "args": e.get("value") or {}, "invoke": e,
                            "done": None, "type": "info", "res": {}}
            order.append(e["op"])
        elif e["op"] in ops:
            op = ops[e["op"]]
            op["done"], op["type"], op["res"] = e, e["type"], e.get("value") or {}
    return [ops[i] for i in order]


def check(entries, events, final=None, harvest=None):
    """Returns (violations, stats). `entries`: the history; `events`: the committed log in
    order ({seq, kind, event}); `final`: {agent: GET /v1/agents/{agent}/state} read from the
    leader at the end; `harvest`: {"divergent": [...], "gaps": [...]} from the Raft logs."""
    violations = []

    def violate(prop, message, *evidence):
        violations.append({"property": prop, "message": message, "evidence": [x for x in evidence if x is not None]})

    ops = pair_ops(entries)
    harvest = harvest or {}
    for d in harvest.get("divergent", []):
        violate("committed-log-diverges", f"two nodes hold different committed entries at Raft index {d['index']}", d)
    for gap in harvest.get("gaps", []):
        violate("committed-log-incomplete",
                f"Raft entries {gap[0]}..{gap[1]} were purged before the harness read them; the check is incomplete",
                {"gap": list(gap)})

    # --- the log, folded
    ckpts = collections.defaultdict(list)  # agent -> [(version, incarnation, patch, event)]
    by_version = collections.defaultdict(list)  # (agent, version) -> [event]
    started = collections.defaultdict(set)  # agent -> incarnations started
    newest = {}  # agent -> newest incarnation started so far (log order)
    submitted = collections.defaultdict(list)  # key -> [event]
    completed = collections.defaultdict(list)  # task -> [event]
    steps = collections.defaultdict(list)  # (task, name) -> [event]
    last_seq = None
    for ev in events:
        seq, kind, body = ev.get("seq"), ev.get("kind"), ev.get("event") or {}
        if seq is not None and last_seq is not None and seq <= last_seq:
            violate("log-seq-not-increasing", f"log sequence {seq} follows {last_seq}", ev)
        if seq is not None:
            last_seq = seq
        if kind == "incarnation_started":
            agent, inc = body.get("agent"), body.get("incarnation")
            started[agent].add(inc)
            if agent in newest and inc <= newest[agent]:
                violate("incarnations-not-increasing", f"{agent}: incarnation {inc} started after {newest[agent]}", ev)
            newest[agent] = max(inc, newest.get(agent, 0))
        elif kind == "checkpointed":
            agent, inc, version = body.get("agent"), body.get("incarnation"), body.get("version")
            if agent in newest and inc < newest[agent]:
                violate("fenced-write-accepted",
                        f"{agent}: a checkpoint of incarnation {inc} was committed after incarnation {newest[agent]} started",
                        ev)
            ckpts[agent].append((version, inc, body.get("patch"), ev))
            by_version[(agent, version)].append(ev)
        elif kind == "rolled_back":
            agent = body.get("agent")
            ckpts[agent].append((body.get("version"), body.get("incarnation"), body.get("state"), ev))
            by_version[(agent, body.get("version"))].append(ev)
        elif kind == "task_submitted":
            key = (body.get("spec") or {}).get("idempotency_key")
            if key is not None:
                submitted[key].append(ev)
        elif kind == "task_completed":
            completed[body.get("task")].append(ev)
        elif kind == "step_committed":
            steps[(body.get("task"), body.get("name"))].append(ev)

    for agent, history in ckpts.items():
        previous = 0
        for version, _, _, ev in history:
            if version is None or version <= previous:
                violate("versions-not-linear", f"{agent}: version {version} committed after version {previous}", ev)
            elif version != previous + 1:
                violate("versions-not-linear", f"{agent}: version {version} follows {previous}: a version is missing", ev)
            previous = version if version is not None else previous
    for (agent, version), evs in by_version.items():
        if len(evs) > 1:
            violate("two-states-one-version", f"{agent}: {len(evs)} checkpoints committed at version {version}", *evs)
    for key, evs in submitted.items():
        if len(evs) > 1:
            violate("idempotency-key-duplicated", f"idempotency key {key!r} submitted {len(evs)} times", *evs)
    for task, evs in completed.items():
        if len(evs) > 1:
            violate("task-completed-twice", f"task {task} completed {len(evs)} times", *evs)

    # --- the history against the log
    acked = {}  # (agent, version) -> (patch, op)
    values_in_log = {}
    for agent, history in ckpts.items():
        for version, inc, patch, ev in history:
            values_in_log[(agent, json.dumps(patch, sort_keys=True))] = ev
    for op in ops:
        f, args, res, type_ = op["f"], op["args"], op["res"], op["type"]
        done = op["done"]
        if f == "checkpoint" and type_ == "ok":
            agent, version, patch = args.get("agent"), res.get("version"), args.get("patch")
            other = acked.get((agent, version))
            if other and other[0] != patch:
                violate("two-states-one-version",
                        f"{agent}: two acknowledged checkpoints at version {version} with different values",
                        other[1]["invoke"], other[1]["done"], op["invoke"], done)
            acked[(agent, version)] = (patch, op)
            logged = by_version.get((agent, version))
            if not logged:
                violate("acked-write-lost", f"{agent}: acknowledged checkpoint version {version} {patch} is not in the log",
                        op["invoke"], done)
            elif all(ev["event"].get("patch") != patch for ev in logged):
                violate("two-states-one-version",
                        f"{agent}: acknowledged {patch} at version {version}, the log has another state there",
                        op["invoke"], done, *logged)
        elif f in ("checkpoint", "stale-write") and type_ == "fail":
            key = (args.get("agent"), json.dumps(args.get("patch"), sort_keys=True))
            if key in values_in_log:
                violate("failed-write-applied",
                        f"{args.get('agent')}: a checkpoint refused with {res.get('code')} is in the log",
                        op["invoke"], done, values_in_log[key])
        if f in ("stale-write", "stale-complete"):
            if type_ == "ok":
                violate("fenced-write-accepted",
                        f"{args.get('agent')}: a write of incarnation {args.get('incarnation')} was acknowledged "
                        f"after a newer incarnation started", op["invoke"], done)
        elif f == "hello" and type_ == "ok":
            agent, inc = res.get("agent") or args.get("agent"), res.get("incarnation")
            if inc not in started.get(agent, set()):
                violate("acked-write-lost", f"{agent}: acknowledged incarnation {inc} never started in the log",
                        op["invoke"], done)
        elif f == "submit" and type_ == "ok":
            key = args.get("key")
            evs = submitted.get(key, [])
            if len(evs) != 1:
                violate("acked-submit", f"acknowledged submit {key!r} is in the log {len(evs)} times, not once",
                        op["invoke"], done, *evs)
            elif evs[0]["event"].get("task") != res.get("task"):
                violate("acked-submit", f"submit {key!r} was answered task {res.get('task')}, the log made task "
                        f"{evs[0]['event'].get('task')}", op["invoke"], done, evs[0])
        elif f == "complete" and type_ == "ok":
            task, result = args.get("task"), args.get("result")
            evs = completed.get(task, [])
            if not evs:
                violate("acked-completion-lost", f"acknowledged completion of task {task} is not in the log",
                        op["invoke"], done)
            elif all(ev["event"].get("result") != result for ev in evs):
                violate("acked-completion-lost", f"task {task} was completed with another result than the acknowledged one",
                        op["invoke"], done, *evs)
        if f in ("complete", "stale-complete") and type_ == "fail":
            task, result = args.get("task"), args.get("result")
            for ev in completed.get(task, []):
                if ev["event"].get("result") == result:
                    violate("failed-write-applied", f"a completion of task {task} refused with {res.get('code')} "
                            f"is in the log", op["invoke"], done, ev)
        elif f == "step" and type_ == "ok":
            task, name, result = args.get("task"), args.get("name"), args.get("result")
            evs = steps.get((task, name), [])
            if not any(ev["event"].get("result") == result for ev in evs):
                violate("acked-write-lost", f"acknowledged step {name} of task {task} ({result}) is not in the log",
                        op["invoke"], done, *evs)

    # Reads: what a read saw at version V is what the log holds at V, and a read never
    # goes back behind a write of the same agent (its only writer) acknowledged before it.
    acks_by_agent = collections.defaultdict(list)
    for op in ops:
        if op["f"] == "checkpoint" and op["type"] == "ok":
            acks_by_agent[op["args"].get("agent")].append((op["done"]["i"], op["res"].get("version"), op))
    for op in ops:
        if op["f"] not in ("read", "read-any", "hello") or op["type"] != "ok":
            continue
        agent, version = op["res"].get("agent") or op["args"].get("agent"), op["res"].get("version")
        if version is None:
            continue
        if op["f"] in ("read", "read-any") and version > 0:
            state = op["res"].get("state") or {}
            logged = by_version.get((agent, version), [])
            if not logged:
                violate("read-not-in-log", f"{agent}: a read saw version {version}, which the log never committed",
                        op["invoke"], op["done"])
            elif "op" in state and all((ev["event"].get("patch") or {}).get("op") != state.get("op") for ev in logged):
                violate("two-states-one-version", f"{agent}: a read saw another state at version {version} than the log",
                        op["invoke"], op["done"], *logged)
        for t, acked_version, ack in acks_by_agent.get(agent, []):
            if t < op["invoke"]["i"] and acked_version is not None and version < acked_version:
                violate("stale-read", f"{agent}: a {op['f']} invoked after version {acked_version} was acknowledged "
                        f"saw version {version}", ack["done"], op["invoke"], op["done"])
                break

    # The final state read from the leader is the end of the log.
    for agent, state in (final or {}).items():
        history = ckpts.get(agent, [])
        last = history[-1] if history else (0, None, None, None)
        if state.get("version") != last[0]:
            violate("final-state-mismatch", f"{agent}: the leader says version {state.get('version')}, the log ends at "
                    f"{last[0]}", {"final": state}, last[3])
        elif history and "op" in (state.get("state") or {}) and (last[2] or {}).get("op") != state["state"]["op"]:
            violate("final-state-mismatch", f"{agent}: the leader's state at version {last[0]} is not the last patch",
                    {"final": state}, last[3])

    latency = collections.defaultdict(list)
    for op in ops:
        if op["type"] == "ok" and op["done"] is not None:
            latency[op["f"]].append(op["done"]["time"] - op["invoke"]["time"])
    stats = {
        "latency": {f: sorted(v) for f, v in latency.items()},
        "ops": collections.Counter(f"{op['f']}:{op['type']}" for op in ops),
        "checkpoints_in_log": sum(len(h) for h in ckpts.values()),
        "tasks_completed_in_log": len(completed),
        "submits_in_log": sum(len(v) for v in submitted.values()),
    }
    return violations, stats


# --------------------------------------------------------------------------- self-test


def self_test():
    """Feeds the checker hand-made histories: a clean one must pass, each broken one must
    be caught with the property it breaks."""

    def ev(seq, kind, **fields):
        return {"seq": seq, "kind": kind, "event": fields}

    def build():
        h = History()
        log_ = []
        seq = [0]

        def logged(kind, **fields):
            seq[0] += 1
            log_.append(ev(seq[0], kind, **fields))

        def op(process, f, args, type_, res):
            inv = h.invoke(process, f, args)
            h.complete(inv, type_, res)

        a = "agent-1"
        op(1, "hello", {"agent": a}, "ok", {"agent": a, "incarnation": 1, "version": 0})
        logged("incarnation_started", agent=a, incarnation=1)
        for v in (1, 2, 3):
            op(1, "checkpoint", {"agent": a, "incarnation": 1, "expected_version": v - 1, "patch": {"k": 1, "op": v}},
               "ok", {"version": v})
            logged("checkpointed", agent=a, incarnation=1, version=v, patch={"k": 1, "op": v})
        op(1, "checkpoint", {"agent": a, "incarnation": 1, "expected_version": 1, "patch": {"k": 1, "op": 9}},
           "fail", {"code": "version_conflict"})
        op(1, "read", {"agent": a}, "ok", {"agent": a, "version": 3, "incarnation": 1, "state": {"k": 1, "op": 3}})
        op(1, "hello", {"agent": a}, "ok", {"agent": a, "incarnation": 2, "version": 3})
        logged("incarnation_started", agent=a, incarnation=2)
        op(1, "stale-write", {"agent": a, "incarnation": 1, "expected_version": 3, "patch": {"k": 1, "op": 10}},
           "fail", {"code": "stale_incarnation"})
        op(2, "submit", {"key": "jepsen-2-1", "payload": {"k": 2, "n": 1}}, "ok", {"task": 1, "new": True})
        logged("task_submitted", task=1, spec={"role": "r", "idempotency_key": "jepsen-2-1"})
        op(2, "step", {"task": 1, "agent": "worker-2", "incarnation": 1, "name": "s1", "result": {"s": 1}}, "ok", {})
        logged("step_committed", task=1, attempt=1, name="s1", result={"s": 1})
        op(2, "complete", {"task": 1, "agent": "worker-2", "incarnation": 1, "result": {"done": 1}}, "ok", {})
        logged("task_completed", task=1, result={"done": 1})
        return h, log_

    final_ok = {"agent-1": {"version": 3, "state": {"k": 1, "op": 3}}}
    h, log_ = build()
    violations, _ = check(h.entries, log_, final_ok)
    assert not violations, f"a clean history was flagged: {violations}"
    results = []

    def expect(name, prop, mutate, final=final_ok):
        h, log_ = build()
        mutate(h, log_)
        violations, _ = check(h.entries, log_, final)
        found = {v["property"] for v in violations}
        ok = prop in found
        results.append((name, prop, ok, sorted(found)))
        assert ok, f"self-test {name!r}: expected {prop}, the checker found {sorted(found)}"

    def add(h, process, f, args, type_, res):
        inv = h.invoke(process, f, args)
        h.complete(inv, type_, res)

    expect("lost ack", "acked-write-lost",
           lambda h, l: add(h, 1, "checkpoint", {"agent": "agent-1", "incarnation": 2, "expected_version": 3,
                                                 "patch": {"k": 1, "op": 11}}, "ok", {"version": 4}))
    expect("two acked states at one version", "two-states-one-version",
           lambda h, l: add(h, 1, "checkpoint", {"agent": "agent-1", "incarnation": 1, "expected_version": 1,
                                                 "patch": {"k": 1, "op": 12}}, "ok", {"version": 2}))

    def two_in_log(h, l):
        l.insert(3, ev(100, "checkpointed", agent="agent-1", incarnation=1, version=2, patch={"k": 1, "op": 13}))
        for i, e in enumerate(l):
            e["seq"] = i + 1

    expect("two logged states at one version", "two-states-one-version", two_in_log)
    expect("double completion", "task-completed-twice",
           lambda h, l: l.append(ev(99, "task_completed", task=1, result={"done": 2})))
    expect("fenced write acknowledged", "fenced-write-accepted",
           lambda h, l: add(h, 1, "stale-write", {"agent": "agent-1", "incarnation": 1, "expected_version": 3,
                                                  "patch": {"k": 1, "op": 14}}, "ok", {"version": 4}))
    expect("fenced write in the log", "fenced-write-accepted",
           lambda h, l: l.append(ev(99, "checkpointed", agent="agent-1", incarnation=1, version=4,
                                    patch={"k": 1, "op": 15})),
           final={"agent-1": {"version": 4, "state": {"k": 1, "op": 15}}})
    expect("fenced lease holder completed", "fenced-write-accepted",
           lambda h, l: add(h, 2, "stale-complete", {"task": 1, "agent": "worker-2", "incarnation": 1,
                                                     "result": {"stale": 1}}, "ok", {}))
    expect("acked completion lost", "acked-completion-lost",
           lambda h, l: l.remove(next(e for e in l if e["kind"] == "task_completed")))
    expect("acked submit lost", "acked-submit",
           lambda h, l: l.remove(next(e for e in l if e["kind"] == "task_submitted")))
    expect("idempotency key twice", "idempotency-key-duplicated",
           lambda h, l: l.append(ev(99, "task_submitted", task=2, spec={"role": "r", "idempotency_key": "jepsen-2-1"})))
    expect("refused write applied", "failed-write-applied",
           lambda h, l: l.append(ev(99, "checkpointed", agent="agent-1", incarnation=2, version=4,
                                    patch={"k": 1, "op": 9})),
           final={"agent-1": {"version": 4, "state": {"k": 1, "op": 9}}})
    expect("stale read", "stale-read",
           lambda h, l: add(h, 1, "read", {"agent": "agent-1"}, "ok",
                            {"agent": "agent-1", "version": 2, "incarnation": 1, "state": {"k": 1, "op": 2}}))
    expect("version gap", "versions-not-linear",
           lambda h, l: l.remove(next(e for e in l if e["kind"] == "checkpointed" and e["event"]["version"] == 2)))
    expect("final state behind", "final-state-mismatch", lambda h, l: None,
           final={"agent-1": {"version": 2, "state": {"k": 1, "op": 2}}})
    return results


def _self_test_divergence():
    violations, _ = check([], [], None, {"divergent": [{"index": 9, "nodes": [1, 2], "terms": [2, 3]}]})
    return any(v["property"] == "committed-log-diverges" for v in violations)


# --------------------------------------------------------------------------- the run


def longest_gap(entries, until):
    """The longest stretch of the run with no write acknowledged, and where it began."""
    writes = ("checkpoint", "hello", "submit", "step", "complete")
    times = [e["time"] for e in entries if e.get("type") == "ok" and e.get("f") in writes and "op" in e]
    times = [t for t in times if t <= until + 1] + [until]
    best, at, last = 0.0, 0.0, 0.0
    for t in times:
        if t - last > best:
            best, at = t - last, last
        last = max(last, t)
    return best, at


def check_only(history_path):
    """Runs the checker again on a kept history and its committed log."""
    entries = [json.loads(line) for line in open(history_path)]
    logged = [e for e in entries if e.get("process") == "harness" and e.get("f") == "log"]
    if not logged:
        print(f"{history_path} has no committed log (the run did not get that far)")
        return 2
    value = logged[-1]["value"]
    events = [json.loads(line) for line in open(value["file"])]
    violations, _ = check(entries, events, value.get("final"), value.get("harvest"))
    for v in violations[:25]:
        print(f"\n  [{v['property']}] {v['message']}")
        for item in v["evidence"][:8]:
            print("      " + json.dumps(item, sort_keys=True)[:600])
    print(f"\nVERDICT: {'FAIL' if violations else 'PASS'} ({len(violations)} violations; {len(events)} committed events)")
    return 1 if violations else 0


def percentile(sorted_values, q):
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, max(0, int(round(q * len(sorted_values) + 0.5)) - 1))]


def read_events_api(cluster, leader):
    """GET /v1/events, paged; (events, None) or (None, why it cannot be used)."""
    out, after = [], 0
    for _ in range(10_000):
        status, doc = cluster.admin(leader, "GET", f"/v1/events?after={after}&limit=10000", timeout=30)
        if status != 200 or not isinstance(doc, list):
            code, message = error_code(doc)
            return None, f"{status} {code}: {message}"
        if not doc:
            return out, None
        out.extend(doc)
        after = doc[-1]["seq"]
    return out, None


def final_leader(cluster, hint, deadline_s=60):
    """Waits until a leader takes a write (a checkpoint of the sentinel agent); returns it."""
    http_ = Http()
    deadline = time.monotonic() + deadline_s
    try:
        while time.monotonic() < deadline:
            answer = call(http_, hint, "POST", "/v1/agents/jepsen-final/hello", {"role": "jepsen-final"})
            if answer.kind == "ok":
                inc = answer.body["incarnation"]
                answer = call(http_, hint, "POST", "/v1/agents/jepsen-final/checkpoint",
                              {"incarnation": inc, "patch": {"final": True}})
                if answer.kind == "ok":
                    return cluster.by_addr.get(answer.node), answer.body["version"]
            time.sleep(0.2)
    finally:
        http_.close()
    return None, None


def run(args):
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    rng = random.Random(seed)
    auto_workdir = args.workdir is None
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="hale-jepsen-"))
    os.makedirs(workdir, exist_ok=True)
    history_path = os.path.abspath(args.history or os.path.join(workdir, "history.jsonl"))
    os.makedirs(os.path.dirname(history_path), exist_ok=True)
    stale = [d for d in (f"n{i}-data" for i in (1, 2, 3)) if os.path.exists(os.path.join(workdir, d))]
    if stale:
        log(f"harness error: {workdir} already holds node data ({', '.join(stale)}); give a new or empty --workdir")
        return 2
    log(f"seed {seed}  duration {args.duration} s  clients {args.clients}")
    log(f"workdir {workdir}")
    log(f"history {history_path}")
    history = History(history_path)
    history.add(process="harness", type="meta", f="start",
                value={"seed": seed, "duration": args.duration, "clients": args.clients, "binary": args.binary,
                       "wall": time.time()})
    proxy = Proxy()
    cluster = None
    stop = threading.Event()
    harvester = None
    wall0 = time.monotonic()
    verdict = 2
    try:
        cluster = Cluster(args.binary, workdir, history, proxy)
        for node in cluster.nodes:
            cluster.start(node)
        leader = cluster.form()
        log(f"cluster formed: nodes {[n.addr for n in cluster.nodes]} (proxies), leader node {leader.id}")
        history.add(process="harness", type="info", f="formed",
                    value={"leader": leader.id, "nodes": {n.id: {"advertise": n.addr, "listen": n.real} for n in cluster.nodes}})
        harvester = Harvester(cluster)
        harvester.start()
        hint = LeaderHint(cluster.addrs())
        hint.set(leader.addr)
        counters = collections.Counter()
        clients = [Client(k, rng.getrandbits(64), history, hint, stop, counters, args.clients)
                   for k in range(1, args.clients + 1)]
        monitor = Monitor(cluster, history, stop)
        plan = schedule(rng, args.duration)
        history.add(process="nemesis", type="info", f="schedule", value={"plan": plan})
        log("nemesis schedule: " + ", ".join(f"{f}@{t:.1f}s/{l:.1f}s" for t, f, l in plan))
        t0 = time.monotonic()
        monitor.thread.start()
        for client in clients:
            client.thread.start()
            client.hb_thread.start()
        nemesis = Nemesis(cluster, proxy, history, rng)
        nemesis.run(plan, t0)
        # Let the clients run to the end of the duration (the nemesis may have run past it).
        for _ in range(100_000):
            if time.monotonic() - t0 >= args.duration:
                break
            time.sleep(0.05)
        stop.set()
        run_s = time.monotonic() - t0
        for client in clients:
            client.thread.join(REQUEST_TIMEOUT * 8 + 5)
            client.hb_thread.join(5)
        monitor.thread.join(5)
        stuck = [c.k for c in clients if c.thread.is_alive()]
        if stuck:
            log(f"warning: clients {stuck} did not stop in time")
        log(f"clients stopped after {run_s:.1f} s; healing")
        nemesis.heal_all()
        leader, sentinel_version = final_leader(cluster, hint)
        if leader is None:
            raise HarnessError("no leader took a write within 60 s of healing: the cluster did not recover")
        history.add(process="harness", type="info", f="final-leader", value={"node": leader.id})
        log(f"node {leader.id} leads and takes writes")
        # Let the followers catch up, then read the final state from the leader.
        lagging = None
        for _ in range(100):
            doc = cluster.status(leader, timeout=1.0) or {}
            members = doc.get("members", [])
            lagging = {m.get("node_id"): m.get("lag") for m in members if m.get("lag") != 0}
            if len(members) == 3 and not lagging:
                break
            time.sleep(0.1)
        if lagging:
            log(f"warning: followers still behind the leader 10 s after healing: {lagging} (node: entries)")
        http_ = Http()
        final = {}
        for client in clients:
            answer = call(http_, hint, "GET", f"/v1/agents/{client.agent}/state")
            if answer.kind == "ok":
                final[client.agent] = {k: answer.body.get(k) for k in ("version", "incarnation", "state")}
            elif answer.code != "unknown_agent":
                log(f"warning: final read of {client.agent}: {answer.kind} {answer.summary()}")
        http_.close()
        log("final state read")
        api_events, api_problem = read_events_api(cluster, leader)
        # Stop the nodes gracefully, so their committed index is on disk, and harvest the rest.
        harvester.stop()
        shutdown = cluster.stop_all(graceful=True, first=leader)
        harvester.harvest()
        raft_events, gaps, terms = harvester.events()
        log(f"nodes stopped; {len(raft_events)} committed records harvested from the Raft logs")
        if harvester.errors:
            log(f"harvest errors: {dict(harvester.errors)}")
        if api_events is not None:
            source, events = "GET /v1/events", api_events
        else:
            source, events = "the nodes' raft_log (GET /v1/events: " + api_problem + ")", raft_events
        committed_path = os.path.splitext(history_path)[0] + ".committed.jsonl"
        with open(committed_path, "w") as out:
            for event in events:
                out.write(json.dumps(event, sort_keys=True) + "\n")
        if not any(e.get("kind") == "checkpointed" and (e.get("event") or {}).get("agent") == "jepsen-final"
                   and (e.get("event") or {}).get("version") == sentinel_version for e in events):
            gaps = gaps + [("end", "the final sentinel checkpoint")]
        harvest = {"divergent": harvester.divergent, "gaps": gaps}
        history.add(process="harness", type="info", f="log",
                    value={"source": source, "events": len(events), "raft_terms": terms, "file": committed_path,
                           "final": final, "harvest": harvest})
        violations, stats = check(history.entries, events, final, harvest)
        log("checked")
        # --- the summary
        wall = time.monotonic() - wall0
        ok_ops = sum(v for (f, kind), v in counters.items() if kind == "ok")
        all_ops = sum(counters.values())
        print()
        print(f"seed:            {seed}")
        print(f"history:         {history_path}")
        print(f"wall time:       {wall:.1f} s (clients ran {run_s:.1f} s)")
        print(f"committed log:   {len(events)} events from {source}; kept in {committed_path}")
        print(f"ops:             {all_ops} ({all_ops / run_s:.1f}/s), ok {ok_ops} ({ok_ops / run_s:.1f}/s)")
        by_f = collections.defaultdict(dict)
        for (f, kind), v in sorted(counters.items()):
            by_f[f][kind] = v
        for f, kinds in sorted(by_f.items()):
            lat = stats["latency"].get(f) or []
            figures = (f"   ok latency p50 {percentile(lat, 0.5) * 1000:.1f} ms, p99 {percentile(lat, 0.99) * 1000:.1f} ms, "
                       f"max {lat[-1] * 1000:.0f} ms") if lat else ""
            print(f"  {f:<14} " + "  ".join(f"{k} {v}" for k, v in sorted(kinds.items())) + figures)
        beats = sum(c.worker.beats for c in clients)
        fenced = sum(1 for e in history.entries if e.get("f") == "fenced")
        misanswered = sum(c.worker.misanswered for c in clients)
        print(f"heartbeats:      {beats} ok; workers fenced {fenced} times; {misanswered} heartbeat refusals "
              f"the leader contradicted (a follower answering from its own state)")
        print("faults:          " + ", ".join(f"{f} {nemesis.done[f]}" for f in FAULTS))
        print(f"leader changes:  {max(0, len(monitor.seen) - 1)} seen by the monitor ({sorted(monitor.seen)}); "
              f"committed entries in Raft terms {terms}")
        print(f"proxy:           {dict(proxy.counts)}")
        gap, gap_at = longest_gap(history.entries, run_s)
        print(f"availability:    longest time without an acknowledged write: {gap:.2f} s (from t={gap_at:.1f} s)")
        print(f"shutdown:        SIGTERM to exit, s (leader node {leader.id} first): {shutdown}")
        print(f"log checked:     {stats['checkpoints_in_log']} checkpoints, {stats['submits_in_log']} submits, "
              f"{stats['tasks_completed_in_log']} completions")
        if lagging:
            print(f"LIVENESS:        followers still behind 10 s after healing (node: entries behind): {lagging}")
        notes = collections.Counter()
        for node in cluster.nodes:
            try:
                with open(node.log_path, errors="replace") as f:
                    for line in f:
                        for needle in ("Payload Too Large", "panicked", "ERROR hale"):
                            if needle in line:
                                notes[(node.id, needle)] += 1
            except OSError:
                pass
        for (node_id, needle), count in sorted(notes.items()):
            print(f"node log:        n{node_id}.log has {count} lines with {needle!r}")
        missing = [f for f in FAULTS if nemesis.done[f] == 0]
        if missing:
            print(f"note: faults not done: {missing}")
        if violations:
            print(f"\nVERDICT: FAIL — {len(violations)} violation(s); seed {seed}; history kept at {history_path}")
            for v in violations[:25]:
                print(f"\n  [{v['property']}] {v['message']}")
                for item in v["evidence"][:8]:
                    print("      " + json.dumps(item, sort_keys=True)[:600])
            if len(violations) > 25:
                print(f"\n  … and {len(violations) - 25} more")
            verdict = 1
        else:
            print(f"\nVERDICT: PASS (seed {seed})")
            verdict = 0
    except HarnessError as error:
        log(f"harness error: {error} (seed {seed}; history {history_path})")
        verdict = 2
    except KeyboardInterrupt:
        log(f"interrupted (seed {seed}; history {history_path})")
        verdict = 130
    finally:
        stop.set()
        if harvester is not None:
            harvester.stop_event.set()
        if cluster is not None:
            cluster.stop_all(graceful=False)
        proxy.stop()
        history.close()
    if verdict == 0 and auto_workdir:
        # Keep the history; drop the nodes' data.
        for node in cluster.nodes:
            shutil.rmtree(node.data, ignore_errors=True)
    return verdict


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", nargs="?", help="the hale binary")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of client work (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="seed of every random choice (default: random, printed)")
    parser.add_argument("--clients", type=int, default=6, help="concurrent clients, at least 5 (default 6)")
    parser.add_argument("--history", default=None, help="the history file (default: history.jsonl in the workdir)")
    parser.add_argument("--workdir", default=None, help="where the nodes keep their data (default: a temp dir)")
    parser.add_argument("--self-test", action="store_true", help="check that the checker catches bad histories")
    parser.add_argument("--check-only", metavar="HISTORY", help="run the checker again on a kept history")
    args = parser.parse_args()
    if args.check_only:
        return check_only(args.check_only)
    if args.self_test:
        results = self_test()
        for name, prop, ok, _ in results:
            print(f"self-test: {name:<36} -> {prop:<28} {'caught' if ok else 'MISSED'}")
        ok = _self_test_divergence()
        print(f"self-test: {'committed logs diverge':<36} -> {'committed-log-diverges':<28} "
              f"{'caught' if ok else 'MISSED'}")
        if not ok:
            return 1
        print("self-test: the checker passes a clean history and catches every broken one")
        return 0
    if not args.binary:
        parser.error("HALE_BINARY is required (or --self-test)")
    if args.clients < 5:
        parser.error("--clients must be at least 5")
    if args.duration <= 0:
        parser.error("--duration must be positive")
    if not os.access(args.binary, os.X_OK):
        parser.error(f"{args.binary} is not an executable")

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
