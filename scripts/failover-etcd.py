#!/usr/bin/env python3
"""etcd's failover, measured the way scripts/failover.py measures hale's: 3 `etcd` members on
loopback (static initial cluster, fresh data dirs), a few puts, the leader SIGKILLed, time
until a put is acknowledged by a surviving member; then every acknowledged put is read back.
Prints each trial and one JSON line in failover.py's shape.

Usage: python3 scripts/failover-etcd.py [--trials 20] [--heartbeat-ms 100] [--election-ms 1000]
                                        [--pre-vote] [--etcd etcd]
etcd (3.4) refuses an election timeout under 5 heartbeats: hale's default range (election
200-400 ms) is matched with --heartbeat-ms 40 --election-ms 200 (etcd draws each timeout
from [1x, 2x) of --election-timeout, in whole heartbeat ticks).

Client: etcd's HTTP/JSON gateway (/v3/kv/put, /v3/kv/range, /v3/maintenance/status) over
http.client, not etcdctl, whose process start costs tens of ms (printed once at start).
During the outage no put to a survivor fails fast (measured on 3.4.23: every one either
hangs until the client's timeout or is acknowledged once a new leader commits), so a loop of
one put at a time would add up to its timeout to the figure. Instead the timed loop starts a
new put on each survivor every POLL_MS (each with its own PUT_TIMEOUT) and takes the time
when the first 200 comes back. Resolution: POLL_MS."""
import argparse, base64, http.client, json, os, shutil, signal, socket, statistics, subprocess
import sys, tempfile, threading, time

POLL_MS = 10          # a new put on each survivor this often while waiting
PUT_TIMEOUT = 0.5     # each put's own timeout in the timed loop (s); acked puts take <= ~200 ms here
MAX_INFLIGHT = 80     # per survivor (> PUT_TIMEOUT/POLL_MS, so launching never stalls)

ap = argparse.ArgumentParser()
ap.add_argument("--trials", type=int, default=20)
ap.add_argument("--heartbeat-ms", type=int, default=100)
ap.add_argument("--election-ms", type=int, default=1000)
ap.add_argument("--pre-vote", action="store_true", help="etcd --pre-vote=true (3.4's default is false)")
ap.add_argument("--etcd", default=shutil.which("etcd") or "etcd")
ap.add_argument("--etcdctl", default=shutil.which("etcdctl") or "etcdctl")
args = ap.parse_args()

ALL_PROCS = []  # every etcd we started, killed at exit whatever happens


def kill_all():
    for p in ALL_PROCS:
        if p.poll() is None:
            p.kill()
    for p in ALL_PROCS:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def on_signal(sig, _frame):
    kill_all()
    sys.exit(128 + sig)


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close(); return port


def b64(s):
    return base64.b64encode(s.encode()).decode()


def call(addr, path, body, timeout=2.0):
    """POST JSON to the gateway; (status, json) or (None, None) on a socket error/timeout."""
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse(); data = r.read()
        try:
            return r.status, json.loads(data or b"null")
        except ValueError:
            return r.status, None
    except OSError:
        return None, None
    finally:
        conn.close()


def put(addr, key, value, timeout=2.0):
    code, body = call(addr, "/v3/kv/put", {"key": b64(key), "value": b64(value)}, timeout)
    return code == 200 and isinstance(body, dict) and "header" in body


def get(addr, key):
    code, body = call(addr, "/v3/kv/range", {"key": b64(key)}, timeout=5)  # linearizable read
    if code != 200 or not isinstance(body, dict):
        return "error"
    kvs = body.get("kvs") or []
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else None


def status(addr):
    code, body = call(addr, "/v3/maintenance/status", {}, timeout=1)
    if code != 200 or not isinstance(body, dict):
        return None
    return body["header"]["member_id"], body.get("leader")


def wait_for(cond, deadline_s, what):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise RuntimeError(f"timed out after {deadline_s}s waiting for {what}")


def start_cluster(work, token):
    members = []
    for i in range(1, 4):
        members.append({"name": f"n{i}", "client": f"127.0.0.1:{free_port()}", "peer": f"127.0.0.1:{free_port()}"})
    initial = ",".join(f"{m['name']}=http://{m['peer']}" for m in members)
    for m in members:
        cmd = [args.etcd, "--name", m["name"], "--data-dir", os.path.join(work, m["name"]),
               "--listen-client-urls", f"http://{m['client']}", "--advertise-client-urls", f"http://{m['client']}",
               "--listen-peer-urls", f"http://{m['peer']}", "--initial-advertise-peer-urls", f"http://{m['peer']}",
               "--initial-cluster", initial, "--initial-cluster-state", "new", "--initial-cluster-token", token,
               "--heartbeat-interval", str(args.heartbeat_ms), "--election-timeout", str(args.election_ms),
               "--logger", "zap", "--log-level", "error", "--log-outputs", "stderr"]
        if args.pre_vote:
            cmd.append("--pre-vote=true")
        log = open(os.path.join(work, m["name"] + ".log"), "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        ALL_PROCS.append(p); m["proc"] = p
    return members


def find_leader(members, work):
    """The member every node agrees is the leader, once all three answer."""
    for m in members:
        if m["proc"].poll() is not None:
            raise RuntimeError(f"etcd {m['name']} exited: " + open(os.path.join(work, m["name"] + ".log")).read()[-2000:])
    sts = [status(m["client"]) for m in members]
    if any(s is None for s in sts):
        return None
    leaders = {s[1] for s in sts}
    if len(leaders) != 1:
        return None
    lead = leaders.pop()
    for m, s in zip(members, sts):
        m["id"] = s[0]
    return next((m for m in members if m["id"] == lead), None)


def timed_puts(survivors, killed_at, deadline_s):
    """Start a put on each survivor every POLL_MS until one is acknowledged; returns
    (ms to first ack, [acked keys], attempts). Waits for the puts in flight (bounded by
    PUT_TIMEOUT) so that every acknowledged key is known before the read-back."""
    lock = threading.Lock(); first = threading.Event()
    acked = []; inflight = {m["name"]: 0 for m in survivors}; threads = []; seq = 0

    def one(m, key):
        ok = put(m["client"], key, key, timeout=PUT_TIMEOUT)
        now = time.monotonic()
        with lock:
            inflight[m["name"]] -= 1
            if ok:
                acked.append((now, key))
        if ok:
            first.set()

    end = killed_at + deadline_s
    while not first.is_set() and time.monotonic() < end:
        for m in survivors:
            with lock:
                if inflight[m["name"]] >= MAX_INFLIGHT:
                    continue
                inflight[m["name"]] += 1
            seq += 1
            t = threading.Thread(target=one, args=(m, f"post/{m['name']}/{seq}"), daemon=True)
            t.start(); threads.append(t)
        first.wait(POLL_MS / 1000)
    for t in threads:
        t.join(timeout=PUT_TIMEOUT + 1)
    if not acked:
        raise RuntimeError(f"no put acknowledged within {deadline_s}s of the kill")
    t0 = min(a[0] for a in acked)
    return (t0 - killed_at) * 1000, [a[1] for a in acked], seq


def trial(work, n):
    members = start_cluster(work, f"failover-{os.getpid()}-{n}")
    try:
        leader = wait_for(lambda: find_leader(members, work), 30, "a leader all three members agree on")
        pre = [f"pre/{i}" for i in range(5)]
        for k in pre:
            if not put(leader["client"], k, k):
                raise RuntimeError(f"put {k} to the leader failed")
        leader["proc"].send_signal(signal.SIGKILL); leader["proc"].wait()
        killed = time.monotonic()
        survivors = [m for m in members if m is not leader]
        ms, post, attempts = timed_puts(survivors, killed, deadline_s=30 + 4 * args.election_ms / 1000)
        lost = sum(1 for k in pre + post if get(survivors[0]["client"], k) != k)
        return ms, lost, len(post), attempts
    finally:
        for m in members:
            if m["proc"].poll() is None:
                m["proc"].send_signal(signal.SIGTERM)
        for m in members:
            try:
                m["proc"].wait(timeout=10)
            except subprocess.TimeoutExpired:
                m["proc"].kill(); m["proc"].wait()


def etcdctl_cost(work):
    """How long one `etcdctl put` takes against a 1-member cluster vs a gateway put (why the
    timed loop does not spawn etcdctl)."""
    c, p = free_port(), free_port()
    proc = subprocess.Popen([args.etcd, "--name", "x", "--data-dir", os.path.join(work, "x"),
                             "--listen-client-urls", f"http://127.0.0.1:{c}", "--advertise-client-urls", f"http://127.0.0.1:{c}",
                             "--listen-peer-urls", f"http://127.0.0.1:{p}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
                             "--initial-cluster", f"x=http://127.0.0.1:{p}", "--logger", "zap", "--log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ALL_PROCS.append(proc)
    try:
        addr = f"127.0.0.1:{c}"
        wait_for(lambda: put(addr, "warm", "x", timeout=1), 30, "a single etcd member")
        ctl, gw = [], []
        for i in range(10):
            t = time.monotonic()
            subprocess.run([args.etcdctl, "--endpoints", addr, "put", f"c{i}", "x"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=True, timeout=10, env=dict(os.environ, ETCDCTL_API="3"))
            ctl.append((time.monotonic() - t) * 1000)
            t = time.monotonic(); assert put(addr, f"g{i}", "x"); gw.append((time.monotonic() - t) * 1000)
        return statistics.median(ctl), statistics.median(gw)
    finally:
        proc.kill(); proc.wait()


def main():
    ver = subprocess.run([args.etcd, "--version"], capture_output=True, text=True, timeout=10).stdout.split("\n")[0]
    with tempfile.TemporaryDirectory() as work:
        ctl, gw = etcdctl_cost(work)
    print(f"{ver}; heartbeat {args.heartbeat_ms} ms, election {args.election_ms} ms, pre-vote {args.pre_vote}; "
          f"one put: etcdctl process {ctl:.0f} ms, HTTP gateway {gw:.1f} ms (median of 10)", flush=True)
    times = []; lost = 0
    for t in range(args.trials):
        with tempfile.TemporaryDirectory() as work:
            ms, l, acked, attempts = trial(work, t)
        times.append(ms); lost += l
        print(f"trial {t+1}: {ms:.0f} ms (puts started {attempts}, acked {acked}, lost {l})", flush=True)
    times.sort()
    p99 = times[min(len(times) - 1, int(round(0.99 * len(times) + 0.5)) - 1)]
    default = (args.heartbeat_ms, args.election_ms) == (100, 1000)
    scenario = "etcd-failover-" + ("default" if default else f"{args.heartbeat_ms}-{args.election_ms}") + ("-prevote" if args.pre_vote else "")
    print(json.dumps({"scenario": scenario, "trials": args.trials, "p50_ms": round(statistics.median(times)),
                      "p99_ms": round(p99), "max_ms": round(max(times)), "lost": lost}))


if __name__ == "__main__":
    try:
        main()
    finally:
        kill_all()
