#!/usr/bin/env python3
"""Restart latency side by side: hale vs supervisord, on the same trivial program.

Both supervise `sh -c 'date +%s%N >> STARTS; exec sleep 1000'` with restart always and
no backoff. Each trial SIGKILLs the running process and measures the time until the new
one has written its start time, i.e. kill -> new process running its first line. This is
the part both tools do (hale additionally restores state, which the `hale bench restart`
figure includes and this one does not).

Usage: python3 scripts/restart-compare.py [--trials 30] [--hale target/release/hale] [--memory-mb N]
(--memory-mb gives hale's agent a kernel memory limit, so it runs in a cgroup of its own.)
Needs supervisord (`pip install supervisor`) for its half; skips it if missing.
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time


def percentile(values, p):
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def starts(path):
    try:
        with open(path) as f:
            return [int(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def pid_of_sleeper(marker):
    """The pid of the `sleep 1000` whose environment carries `marker`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read() != b"sleep\x001000\x00":
                    continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() in f.read().split(b"\x00"):
                    return int(entry)
        except OSError:
            continue
    return None


def trials(count, starts_file, marker):
    latencies = []
    for _ in range(count):
        deadline = time.time() + 10
        pid = None
        while pid is None and time.time() < deadline:
            pid = pid_of_sleeper(marker)
            time.sleep(0.01)
        if pid is None:
            raise RuntimeError("no supervised process found")
        time.sleep(0.2)  # let the supervisor settle
        before = len(starts(starts_file))
        killed_ns = time.time_ns()
        os.kill(pid, signal.SIGKILL)
        while len(starts(starts_file)) <= before:
            if time.time_ns() - killed_ns > 10e9:
                raise RuntimeError("not restarted within 10 s")
            time.sleep(0.0005)
        latencies.append((starts(starts_file)[-1] - killed_ns) / 1e6)
    return latencies


def report(name, latencies):
    print(
        f"{name:12} trials {len(latencies):3}  p50 {statistics.median(latencies):7.2f} ms  "
        f"p99 {percentile(latencies, 99):7.2f} ms  max {max(latencies):7.2f} ms"
    )


def program(starts_file):
    return f"date +%s%N >> {starts_file}; exec sleep 1000"


def run_hale(hale, count, work, memory_mb=None):
    starts_file = os.path.join(work, "hale-starts")
    config = os.path.join(work, "hale.toml")
    with open(config, "w") as f:
        f.write(
            "[supervision.backoff]\nbase_ms = 0\nmax_ms = 0\n"
            "[supervision.intensity]\nrestarts_max = 100000\nwindow_ms = 1\n"
            f'[[agent]]\nname = "sleeper"\ncommand = "sh"\nargs = ["-c", "{program(starts_file)}"]\n'
            f'restart = "always"\nenv = {{ COMPARE = "hale" }}\n'
            + (f"[agent.resources]\nmemory_mb = {memory_mb}\n" if memory_mb else "")
        )
    server = subprocess.Popen(
        [hale, "up", "-c", config, "--data", os.path.join(work, "hale-data"), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        server.stdout.readline()
        return trials(count, starts_file, "COMPARE=hale")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def run_supervisord(count, work):
    starts_file = os.path.join(work, "supervisord-starts")
    config = os.path.join(work, "supervisord.conf")
    with open(config, "w") as f:
        f.write(
            f"[supervisord]\nnodaemon=true\nlogfile={work}/supervisord.log\npidfile={work}/supervisord.pid\n"
            # supervisord expands %(name)s in its config: a literal % is written %%.
            f"[program:sleeper]\ncommand=sh -c '{program(starts_file).replace('%', '%%')}'\nautorestart=true\nstartsecs=0\n"
            "startretries=100000\nenvironment=COMPARE=supervisord\n"
        )
    server = subprocess.Popen(
        ["supervisord", "-c", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        return trials(count, starts_file, "COMPARE=supervisord")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--hale", default="target/release/hale")
    parser.add_argument("--memory-mb", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        report("hale", run_hale(args.hale, args.trials, work, args.memory_mb))
        if shutil.which("supervisord"):
            report("supervisord", run_supervisord(args.trials, work))
        else:
            print("supervisord not found (pip install supervisor); skipped")


if __name__ == "__main__":
    main()
