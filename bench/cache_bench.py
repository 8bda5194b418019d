"""The response cache's cost: relay CPU per cache hit against per relayed request, and
how fast stored streams are replayed. One run, one relayd, one fake upstream.

    .venv/bin/python bench/cache_bench.py [--requests N] [--concurrency C]

The relay serves one Anthropic route with ``cache: {ttl: 3600, sampled: true}`` (the
bench body samples). Phases, each ``N`` requests over ``C`` keep-alive connections:
relayed (``Cache-Control: no-store``: looked up by nobody, relayed as without the
cache), hits (the same request, stored by a first call), streamed relayed and streamed
hits. relayd's CPU is read from /proc before and after each phase. Figures go to
docs/performance.md ("The response cache").
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from relayd.testing.loadgen import (
    Tally,
    Target,
    build_request,
    concurrent_batch,
    cpu_seconds,
    message_body,
)
from relayd.testing.processes import FakeUpstreamProcess, RelaydProcess

KEY = "sk-relay-cache-bench"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="relayd-cache-bench-") as tmp:
        work = Path(tmp)
        upstream = FakeUpstreamProcess(work, "upstream").start()
        config = {
            "listen": [{"address": "127.0.0.1:0"}],
            "clients": [{"name": "bench", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
            "providers": [{"name": "anthropic", "type": "anthropic", "backends": [
                {"name": "fake", "url": upstream.url, "api_key": "sk-fake-upstream"}]}],
            "routes": [{"api": "anthropic", "provider": "anthropic",
                        "cache": {"ttl": 3600, "sampled": True}}],
        }
        relay = RelaydProcess(work / "relay", config, logger="relayd.logs.journal_observer")
        relay.start(1)
        try:
            results = asyncio.run(run(relay, args.requests, args.concurrency))
        finally:
            relay.stop()
            upstream.stop()
    print(json.dumps(results, indent=2))
    phases: dict[str, dict[str, float]] = results["phases"]
    return 0 if all(phase["failures"] == 0 for phase in phases.values()) else 1


async def run(relay: RelaydProcess, requests: int, concurrency: int) -> dict[str, Any]:
    port = int(relay.url().rsplit(":", 1)[1])
    assert relay.process is not None
    pid = relay.process.pid
    plain, stream = message_body(False), message_body(True)
    no_store = {"Cache-Control": "no-store"}
    relayed = Target("relayed", port, build_request(port, KEY, plain, headers=no_store),
                     build_request(port, KEY, stream, headers=no_store), True)
    cached = Target("cached", port, build_request(port, KEY, plain),
                    build_request(port, KEY, stream), True)
    tally = Tally("warmup")
    await concurrent_batch(relayed, 500, concurrency, False, tally)
    await concurrent_batch(cached, 1, 1, False, tally)  # stores the JSON answer
    await concurrent_batch(cached, 1, 1, True, tally)  # stores the stream
    phases: dict[str, dict[str, float]] = {}
    for name, target, streamed in (
        ("relayed", relayed, False), ("hit", cached, False),
        ("relayed_stream", relayed, True), ("hit_stream", cached, True),
    ):
        tally = Tally(name)
        before, started = cpu_seconds(pid), time.perf_counter()
        ok = await concurrent_batch(target, requests, concurrency, streamed, tally)
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - before
        phases[name] = {
            "requests": ok,
            "failures": tally.failures,
            "per_second": round(ok / elapsed, 1),
            "relay_cpu_ms_per_request": round(cpu * 1000 / max(ok, 1), 4),
        }
    return {"requests": requests, "concurrency": concurrency, "phases": phases,
            "python": sys.version.split()[0]}


if __name__ == "__main__":
    raise SystemExit(main())
