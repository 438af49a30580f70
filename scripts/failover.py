#!/usr/bin/env python3
"""Failover by hand (until `hale bench failover` exists, issue 12): 3 `hale serve` nodes on loopback (default Raft timeouts unless
--fast), the leader SIGKILLed, time until a checkpoint is acknowledged by the new
leader. Prints each trial and the median/p99/max in ms."""
import json, os, signal, socket, statistics, subprocess, sys, tempfile, time, urllib.request, urllib.error

# Usage: python3 scripts/failover.py target/release/hale [TRIALS] [--fast]
HALE = sys.argv[1]
TRIALS = int(sys.argv[2]) if len(sys.argv) > 2 else 10
FAST = "--fast" in sys.argv
TOKEN = "failover-admin-token-0123"

def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close(); return f"127.0.0.1:{port}"

def call(addr, method, path, body=None, timeout=2):
    req = urllib.request.Request(f"http://{addr}{path}", method=method, data=None if body is None else json.dumps(body).encode())
    req.add_header("Authorization", f"Bearer {TOKEN}"); req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r: return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e: return e.code, None
    except OSError: return None, None

def trial(work):
    addrs = [free() for _ in range(3)]
    secret = os.path.join(work, "secret"); open(secret, "w").write("failover-secret-0123456789abc")
    procs = []
    for i, addr in enumerate(addrs, 1):
        cfg = os.path.join(work, f"n{i}.toml")
        timing = "heartbeat_ms = 50\nelection_min_ms = 150\nelection_max_ms = 300\n" if FAST else ""
        open(cfg, "w").write(f"[cluster]\nnode_id = {i}\nsecret_file = \"{secret}\"\n{timing}")
        env = dict(os.environ, HALE_ADMIN_TOKEN=TOKEN, HALE_LOG="warn")
        p = subprocess.Popen([HALE, "serve", "-c", cfg, "--data", os.path.join(work, f"d{i}"), "--listen", addr], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        p.stdout.readline(); procs.append(p)
    assert call(addrs[0], "POST", "/v1/cluster/init")[0] == 200
    for a in addrs[1:]:
        assert call(a, "POST", "/v1/cluster/join", {"address": addrs[0]}, timeout=30)[0] == 200
    # wait for the leader to take writes
    while call(addrs[0], "POST", "/v1/agents/w/hello", {"role": "w"})[0] != 200: time.sleep(0.05)
    for n in range(5): assert call(addrs[0], "POST", "/v1/agents/w/checkpoint", {"incarnation": 1, "patch": {"n": n}})[0] == 200
    procs[0].send_signal(signal.SIGKILL); procs[0].wait()
    killed = time.monotonic()
    lost = None
    while True:
        for a in addrs[1:]:
            code, body = call(a, "POST", "/v1/agents/w/checkpoint", {"incarnation": 1, "patch": {"n": 99}}, timeout=1)
            if code == 200:
                elapsed = (time.monotonic() - killed) * 1000
                lost = 0 if body and body.get("version") == 6 else 1
                for p in procs[1:]: p.send_signal(signal.SIGTERM); p.wait()
                return elapsed, lost
        time.sleep(0.005)

times = []; lost = 0
for t in range(TRIALS):
    with tempfile.TemporaryDirectory() as work:
        ms, l = trial(work); times.append(ms); lost += l
        print(f"trial {t+1}: {ms:.0f} ms", flush=True)
times.sort()
p99 = times[min(len(times)-1, int(round(0.99*len(times)+0.5))-1)]
print(json.dumps({"scenario": "failover" + ("-tuned" if FAST else "-default"), "trials": TRIALS, "p50_ms": round(statistics.median(times)), "p99_ms": round(p99), "max_ms": round(max(times)), "lost": lost}))
