"""A burst of streams opened at once: time to first byte through relayd vs the upstream.

Starts the fake upstream (answering each stream after ``--latency`` seconds, as a model
that takes time to start) and relayd with its default settings, then for each burst size
opens that many streaming ``POST /v1/messages`` at once, each on its own connection,
first straight to the fake upstream, then through relayd. Prints, per burst, how many
completed with their final event, time to the first body byte (p50, p99, max) and the
wall time, and relayd's RSS. Bounded: the burst sizes are given, each request has a
timeout, the processes are stopped by PID at the end.

Usage: ``.venv/bin/python bench/burst_bench.py [--latency 1.5] [SIZE ...]``
(default sizes 500 1000 2000 4000; needs an open-file limit above 4 x the largest).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from relayd.testing.loadgen import (
    build_request,
    check,
    memory_kib,
    message_body,
    percentile,
    send_once,
)
from relayd.testing.processes import FakeUpstreamProcess, RelaydProcess

RELAY_KEY = "sk-relay-burst-bench"
UPSTREAM_KEY = "sk-fake-upstream"


def relay_config(upstream: FakeUpstreamProcess) -> dict[str, object]:
    return {
        "listen": [{"address": "127.0.0.1:0"}],
        "clients": [{"name": "bench", "key_sha256": hashlib.sha256(RELAY_KEY.encode())
                     .hexdigest()}],
        "providers": [{"name": "anthropic", "type": "anthropic",
                       "backends": [{"name": "a", "url": upstream.url,
                                     "api_key": UPSTREAM_KEY}]}],
        "routes": [{"api": "anthropic", "provider": "anthropic"}],
    }


async def burst(port: int, key: str, size: int, via_relay: bool) -> str:
    data = build_request(port, key, message_body(stream=True))
    started = time.perf_counter()
    results = await asyncio.gather(
        *(send_once(port, data, 300) for _ in range(size)), return_exceptions=True
    )
    wall = time.perf_counter() - started
    done = [r for r in results
            if not isinstance(r, BaseException) and check(r, True, via_relay) is None]
    ttfb = [(r.first_body - r.sent) * 1000 for r in done]
    return (f"{len(done)}/{size} | {percentile(ttfb, 50):.0f} | {percentile(ttfb, 99):.0f} | "
            f"{max(ttfb, default=float('nan')):.0f} | {wall:.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[500, 1000, 2000, 4000])
    parser.add_argument("--latency", type=float, default=1.5,
                        help="seconds the fake upstream takes to start each answer")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="relayd-burst-") as tmp:
        work = Path(tmp)
        upstream = FakeUpstreamProcess(work, "upstream").start()
        relay: RelaydProcess | None = None
        try:
            upstream.configure(latency=args.latency)
            relay = RelaydProcess(work / "relayd", relay_config(upstream)).start(1)
            assert relay.process is not None
            port = int(relay.url().rsplit(":", 1)[1])
            print(f"upstream latency {args.latency:g} s; first body byte in ms\n")
            print("| streams at once | target | complete | p50 | p99 | max | wall s |")
            print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
            for size in args.sizes:
                direct = asyncio.run(burst(upstream.port, UPSTREAM_KEY, size, False))
                print(f"| {size} | direct to upstream | {direct} |", flush=True)
                relayed = asyncio.run(burst(port, RELAY_KEY, size, True))
                print(f"| {size} | through relayd | {relayed} |", flush=True)
            memory = memory_kib(relay.process.pid)
            print(f"\nrelayd RSS {memory['VmRSS'] / 1024:.1f} MiB, "
                  f"peak {memory['VmHWM'] / 1024:.1f} MiB")
        finally:
            if relay is not None:
                relay.stop()
            upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
