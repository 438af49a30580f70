#!/usr/bin/env python3
"""Messages between two agents, each acked, durable before acknowledged: hale side by side
with Redis Streams (the tool people reach for to pass work between Python processes).

Both are driven from Python with the same pattern, one process, asyncio:
- a sender keeps WINDOW sends in flight (each answered once durable);
- a receiver takes each message as it arrives and acks it (acks pipelined, each answered
  once durable);
- measured: from the first send until the last ack is acknowledged; messages/s and the
  send-to-receive latency (p50/p99).

hale: `hale serve` (release build), the Python client in clients/python (send / next_message
/ ack). Redis: redis-server with appendonly yes, appendfsync always (every write fsync'd
before the reply: the setting that matches hale's guarantee), XADD / XREADGROUP / XACK via
redis-py's asyncio client. Both servers run on this machine, on loopback, in a temp dir.

Needs: `cargo build --release`, redis-server (Debian package), `pip install redis`, and
`pip install -e clients/python`. Usage: python3 scripts/messages-compare.py [--messages N]
"""

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HALE = os.path.join(ROOT, "target", "release", "hale")
TOKEN = "compare-admin-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(samples, fraction):
    ordered = sorted(samples)
    return ordered[round((len(ordered) - 1) * fraction)]


def summary(name, total, seconds, latencies_ms):
    return {
        "system": name,
        "messages": total,
        "seconds": round(seconds, 3),
        "delivered_acked_per_s": round(total / seconds),
        "send_to_receive_p50_ms": round(percentile(latencies_ms, 0.5), 2),
        "send_to_receive_p99_ms": round(percentile(latencies_ms, 0.99), 2),
    }


async def wait_port(port, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


async def run_hale(total, window):
    import hale

    data = tempfile.mkdtemp(prefix="hale-compare-")
    port = free_port()
    env = dict(os.environ, HALE_ADMIN_TOKEN=TOKEN, RUST_LOG="warn")
    server = subprocess.Popen(
        [HALE, "serve", "--data", data, "--listen", f"127.0.0.1:{port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_port(port)
        url = f"ws://127.0.0.1:{port}"
        sender = await hale.Agent.connect(url, "sender", "bench", token=TOKEN)
        receiver = await hale.Agent.connect(url, "receiver", "bench", token=TOKEN)
        started = time.monotonic()
        latencies = []

        async def receive():
            acks = []
            while len(latencies) < total:
                message = await receiver.next_message(timeout=30)
                assert message is not None, "no message for 30 s"
                latencies.append((time.monotonic() - started) * 1000 - message.body["t"])
                acks.append(asyncio.ensure_future(receiver.ack(message)))
            await asyncio.gather(*acks)

        counter = iter(range(total))

        async def send():
            for n in counter:
                body = {"n": n, "t": (time.monotonic() - started) * 1000}
                await sender.send(body, to_agent="receiver", conversation="bench")

        receiving = asyncio.ensure_future(receive())
        await asyncio.gather(*(send() for _ in range(window)))
        await receiving
        seconds = time.monotonic() - started
        await sender.close()
        await receiver.close()
        return summary("hale (Python client)", total, seconds, latencies)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(data, ignore_errors=True)


async def run_redis(total, window):
    import redis.asyncio as aioredis

    data = tempfile.mkdtemp(prefix="redis-compare-")
    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", data,
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_port(port)
        producer = aioredis.Redis(port=port, max_connections=window)
        consumer = aioredis.Redis(port=port, connection_pool=aioredis.BlockingConnectionPool(port=port, max_connections=window))
        await producer.xgroup_create("mailbox", "receiver", id="0", mkstream=True)
        started = time.monotonic()
        latencies = []

        async def receive():
            acks = []
            while len(latencies) < total:
                batches = await consumer.xreadgroup("receiver", "r1", {"mailbox": ">"}, count=256, block=30000)
                assert batches, "no message for 30 s"
                for _, entries in batches:
                    for _, fields in entries:
                        latencies.append((time.monotonic() - started) * 1000 - float(fields[b"t"]))
                    # One XACK for the batch read (the idiomatic way; hale acks one by one).
                    ids = [entry_id for entry_id, _ in entries]
                    acks.append(asyncio.ensure_future(consumer.xack("mailbox", "receiver", *ids)))
            await asyncio.gather(*acks)

        counter = iter(range(total))

        async def send():
            for n in counter:
                await producer.xadd("mailbox", {"n": n, "t": (time.monotonic() - started) * 1000})

        receiving = asyncio.ensure_future(receive())
        await asyncio.gather(*(send() for _ in range(window)))
        await receiving
        seconds = time.monotonic() - started
        pending = await consumer.xpending("mailbox", "receiver")
        assert pending["pending"] == 0, pending
        await producer.aclose()
        await consumer.aclose()
        return summary("Redis Streams (redis-py, appendfsync always)", total, seconds, latencies)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(data, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not os.path.exists(HALE):
        sys.exit("build hale first: cargo build --release")
    results = []
    for run in range(args.runs):
        for runner in (run_redis, run_hale):
            result = asyncio.run(runner(args.messages, args.window))
            result["run"] = run + 1
            results.append(result)
            print(json.dumps(result))
    for system in sorted({r["system"] for r in results}):
        rates = [r["delivered_acked_per_s"] for r in results if r["system"] == system]
        print(f"{system}: median {statistics.median(rates):.0f} messages/s over {len(rates)} runs ({min(rates)}-{max(rates)})")


if __name__ == "__main__":
    main()
