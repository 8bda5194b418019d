"""Session affinity's cost: relay CPU per request with a pinned session against the same
request on a route without affinity. One run, one relayd (memory store), one fake
upstream behind two backends.

    .venv/bin/python bench/affinity_bench.py [--requests N] [--concurrency C] [--rounds R]

The relay has two Anthropic routes over the same provider (two backends, weight 1:1):
``affinity: {key: none}`` for model ``claude-bench-off`` and the default
``affinity: {key: session}`` for ``claude-bench-on``. Both requests carry the same
``X-Claude-Code-Session-Id`` (one session, so every ``on`` request after the first reads
its pin and is sent to its pinned backend and key; the ``off`` route ignores it). Phases of
``N`` requests over ``C`` keep-alive connections alternate off, on, off, on, ...
(``R`` rounds) so that drift on a noisy machine hits both alike; relayd's CPU is read from
/proc around each phase. Figures go to docs/performance.md ("Session affinity").
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import tempfile
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

KEY = "sk-relay-affinity-bench"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="relayd-affinity-bench-") as tmp:
        work = Path(tmp)
        upstream = FakeUpstreamProcess(work, "upstream").start()
        backends = [
            {"name": name, "url": upstream.url, "api_key": f"sk-fake-{name}"}
            for name in ("a", "b")
        ]
        config = {
            "listen": [{"address": "127.0.0.1:0"}],
            "clients": [{"name": "bench", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
            "providers": [{"name": "anthropic", "type": "anthropic", "backends": backends,
                           "health": {"enabled": False}}],
            "routes": [
                {"api": "anthropic", "models": ["claude-bench-off"], "provider": "anthropic",
                 "affinity": {"key": "none"}},
                {"api": "anthropic", "models": ["claude-bench-on"], "provider": "anthropic"},
            ],
        }
        relay = RelaydProcess(work / "relay", config, logger="relayd.logs.journal_observer")
        relay.start(1)
        try:
            results = asyncio.run(run(relay, args.requests, args.concurrency, args.rounds))
        finally:
            relay.stop()
            upstream.stop()
    print(json.dumps(results, indent=2))
    return 0 if results["failures"] == 0 else 1


def _body(model: str) -> bytes:
    payload = json.loads(message_body(False))
    payload["model"] = model
    return json.dumps(payload).encode()


async def run(relay: RelaydProcess, requests: int, concurrency: int, rounds: int) -> dict[str, Any]:
    port = int(relay.url().rsplit(":", 1)[1])
    assert relay.process is not None
    pid = relay.process.pid
    off_body, on_body = _body("claude-bench-off"), _body("claude-bench-on")
    # The same header on both: what differs is only whether the route reads it.
    session = {"X-Claude-Code-Session-Id": "0b6f1c2e-bench-session"}
    off = Target("off", port, build_request(port, KEY, off_body, headers=session), b"", True)
    on = Target("on", port, build_request(port, KEY, on_body, headers=session), b"", True)
    tally = Tally("warmup")
    await concurrent_batch(off, 500, concurrency, False, tally)
    await concurrent_batch(on, 500, concurrency, False, tally)
    per_request: dict[str, list[float]] = {"off": [], "on": []}
    failures = tally.failures
    for _ in range(rounds):
        for name, target in (("off", off), ("on", on)):
            tally = Tally(name)
            before = cpu_seconds(pid)
            ok = await concurrent_batch(target, requests, concurrency, False, tally)
            cpu = cpu_seconds(pid) - before
            failures += tally.failures
            per_request[name].append(cpu * 1000 / max(ok, 1))
    off_ms, on_ms = (statistics.median(per_request[k]) for k in ("off", "on"))
    return {
        "requests_per_phase": requests, "concurrency": concurrency, "rounds": rounds,
        "relay_cpu_ms_per_request": {k: [round(v, 4) for v in vs]
                                     for k, vs in per_request.items()},
        "median_off_ms": round(off_ms, 4), "median_on_ms": round(on_ms, 4),
        "on_over_off": round(on_ms / off_ms, 3), "failures": failures,
        "python": sys.version.split()[0],
    }


if __name__ == "__main__":
    raise SystemExit(main())
