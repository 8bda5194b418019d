"""relayd with workers: CPU per request and throughput, 1 process against 2 workers.

One run starts the fake upstream and, in turn, relayd as one process (``workers: 1``),
as a daemon with 2 workers, and as 2 workers with a client under limits (every
admission a round trip to the daemon's memory store). For each it measures:

1. a batch of non-streaming ``POST /v1/messages`` on ``--concurrency`` keep-alive
   connections: req/s, latency p50/p99, and relayd's CPU per request, summed over the
   daemon and every worker (``/proc/PID/stat`` of the process tree);
2. connection balance: ``--connections`` requests each on a new connection (16 at a
   time), then bursts of ``--burst`` connections opened at once, and how many of them
   each worker accepted (``relayd_client_connections_accepted_total{worker}``).

The setups take turns for ``--rounds`` rounds (a fresh relayd each time) and the table
shows each figure's median over the rounds, as this machine is noisy. The load
generator, the fake upstream and relayd share its CPUs: the table says how many there
were. With ``--split-cpus``, relayd (the daemon and every worker) is pinned to the last
CPU and the load generator and the fake upstream to the others, so that relayd's CPU per
request is measured apart from theirs (2 workers then share one CPU: this measures what
the worker design costs per request, not how it scales). Every phase is bounded in
count; processes are stopped by PID.

Usage: ``.venv/bin/python bench/workers_bench.py [--requests N] [--concurrency C]
[--connections N] [--rounds R] [--split-cpus] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx2

from relayd.testing.loadgen import (
    Client,
    Tally,
    Target,
    build_request,
    concurrent_batch,
    cpu_seconds,
    message_body,
    percentile,
)
from relayd.testing.processes import FakeUpstreamProcess, RelaydProcess, wait_for

RELAY_KEY = "sk-relay-bench-workers-5d2c"
UPSTREAM_KEY = "sk-fake-upstream"
WARMUP = 600


@dataclass
class Figures:
    setup: str
    processes: int
    requests: int
    ok: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    relay_cpu_ms_per_req: float
    upstream_cpu_ms_per_req: float
    connections: int
    accepted: dict[str, float]
    largest_share: float  # the busiest worker's share of new connections
    daemon_cpu_ms_per_req: float  # of relay_cpu_ms_per_req, the daemon's part (N > 1)
    burst_shares: list[float]  # the busiest worker's share in each of 5 bursts


def relay_config(upstream: str, workers: int, limits: bool) -> dict[str, Any]:
    client: dict[str, Any] = {"name": "bench",
                              "key_sha256": hashlib.sha256(RELAY_KEY.encode()).hexdigest()}
    if limits:
        client["limits"] = {"requests_per_minute": 10**9}
    return {
        "listen": [{"address": "127.0.0.1:0"}],
        "admin": {"address": "127.0.0.1:0"},
        "workers": workers,
        "clients": [client],
        "providers": [{"name": "anthropic", "type": "anthropic", "backends": [
            {"name": "a", "url": upstream, "api_key": UPSTREAM_KEY}]}],
        "routes": [{"api": "anthropic", "provider": "anthropic"}],
    }


def tree(pid: int) -> list[int]:
    """``pid`` and its children (the daemon's workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [pid, *(int(p) for p in handle.read().split())]
    except OSError:
        return [pid]


def pin(pid: int, cpus: set[int]) -> None:
    """Keep every thread of ``pid`` on ``cpus`` (threads it starts later inherit it)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


def split_cpus() -> tuple[set[int], set[int]]:
    """(relayd's CPU, the load's CPUs): the last CPU for relayd, the others for the load."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--split-cpus needs 2 CPUs at least")
    return {cpus[-1]}, set(cpus[:-1])


def tree_cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


async def timed_batch(
    target: Target, total: int, concurrency: int, tally: Tally, rate: float = 0.0
) -> list[float]:
    """``total`` requests on ``concurrency`` keep-alive connections, as fast as they go
    or paced at ``rate`` requests/s in all; latencies in ms."""
    latencies: list[float] = []
    await concurrent_batch(target, total, concurrency, False, tally, rate=rate,
                           latencies=latencies)
    return latencies


async def new_connections(target: Target, total: int, at_once: int, tally: Tally) -> int:
    """``total`` requests, each on its own new connection, ``at_once`` in parallel."""
    remaining, ok = total, 0

    async def run() -> None:
        nonlocal remaining, ok
        while remaining > 0 and tally.failures < 50:
            remaining -= 1
            client = Client(target, tally)
            try:
                if await client.send(target.plain, False) is not None:
                    ok += 1
            finally:
                client.close()

    await asyncio.gather(*(run() for _ in range(at_once)))
    return ok


def accepted(admin: str) -> dict[str, float]:
    text = httpx2.get(admin + "/metrics", timeout=10).text
    found = re.findall(
        r'^relayd_client_connections_accepted_total(?:\{worker="(\d+)"\})? (\S+)$', text, re.M
    )
    return {worker or "0": float(value) for worker, value in found}


def measure(
    setup: str, workdir: Path, upstream: FakeUpstreamProcess, workers: int, limits: bool,
    args: argparse.Namespace,
) -> Figures:
    relay = RelaydProcess(workdir / setup.replace(" ", "-").replace(",", ""),
                          relay_config(upstream.url, workers, limits),
                          logger="relayd.logs.journal_observer")
    relay.start()
    try:
        if workers > 1 or os.environ.get("RELAYD_FORCE_DAEMON"):
            wait_for(lambda: "relayd serving with" in relay.log_text(), 30, "the workers")
        admin = relay.admin_url()
        port = int(relay.url("http").rsplit(":", 1)[1])
        body = message_body(False)
        target = Target("relayd", port, build_request(port, RELAY_KEY, body),
                        build_request(port, RELAY_KEY, body), via_relay=True)
        tally = Tally(setup)
        asyncio.run(timed_batch(target, WARMUP, args.concurrency, tally))
        assert relay.process is not None
        pids = tree(relay.process.pid)
        if args.cpu_split is not None:
            for pid in pids:
                pin(pid, args.cpu_split[0])
        assert upstream.process is not None
        cpu0, up0 = tree_cpu(pids), cpu_seconds(upstream.process.pid)
        daemon0 = cpu_seconds(pids[0])
        start = time.perf_counter()
        latencies = asyncio.run(
            timed_batch(target, args.requests, args.concurrency, tally, args.rate)
        )
        seconds = time.perf_counter() - start
        cpu, up = tree_cpu(pids) - cpu0, cpu_seconds(upstream.process.pid) - up0
        daemon = cpu_seconds(pids[0]) - daemon0 if len(pids) > 1 else 0.0
        before = accepted(admin)
        asyncio.run(new_connections(target, args.connections, 16, tally))
        after = accepted(admin)
        bursts: list[float] = []
        for _ in range(5):
            start_burst = accepted(admin)
            asyncio.run(new_connections(target, args.burst, args.burst, tally))
            end_burst = accepted(admin)
            counts = [end_burst[w] - start_burst.get(w, 0.0) for w in end_burst]
            bursts.append(max(counts) / max(sum(counts), 1.0))
        if tally.failures:
            raise SystemExit(f"{setup}: {tally.failures} failures: {tally.reasons}")
        took = {w: after[w] - before.get(w, 0.0) for w in after}
        ok = len(latencies)
        return Figures(
            setup=setup, processes=len(pids), requests=args.requests, ok=ok,
            req_per_s=ok / seconds, p50_ms=percentile(latencies, 50),
            p99_ms=percentile(latencies, 99), relay_cpu_ms_per_req=cpu * 1000.0 / ok,
            upstream_cpu_ms_per_req=up * 1000.0 / ok, connections=args.connections,
            accepted=took, largest_share=max(took.values()) / max(sum(took.values()), 1.0),
            daemon_cpu_ms_per_req=daemon * 1000.0 / ok, burst_shares=bursts,
        )
    finally:
        relay.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="pace the CPU batch at this many requests/s (0: flat out)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--split-cpus", action="store_true",
                        help="relayd on the last CPU, the load generator and upstream on the rest")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    cpus = len(os.sched_getaffinity(0))
    args.cpu_split = split_cpus() if args.split_cpus else None
    if args.cpu_split is not None:
        pin(os.getpid(), args.cpu_split[1])
    setups = [("1 process", 1, False), ("2 workers", 2, False),
              ("2 workers, limited client", 2, True)]
    rounds: dict[str, list[Figures]] = {name: [] for name, _, _ in setups}
    with tempfile.TemporaryDirectory(prefix="relayd-workers-bench-") as tmp:
        workdir = Path(tmp)
        upstream = FakeUpstreamProcess(workdir, "upstream").start()
        try:
            if args.cpu_split is not None:
                assert upstream.process is not None
                pin(upstream.process.pid, args.cpu_split[1])
            for round_number in range(args.rounds):
                for name, workers, limits in setups:
                    rounds[name].append(measure(
                        name, workdir / f"round-{round_number}", upstream, workers, limits, args
                    ))
        finally:
            upstream.stop()
    paced = f" at {args.rate:g} req/s" if args.rate else ""
    where = (f"relayd pinned to 1 of {cpus} CPUs, the load generator and the fake upstream "
             f"to the other {cpus - 1}" if args.split_cpus else
             f"{cpus} CPUs shared by the load generator, the fake upstream and relayd")
    print(f"\n{where}; per "
          f"setup and round {args.requests} requests on {args.concurrency} keep-alive "
          f"connections{paced}, then {args.connections} each on a new connection (16 at a "
          f"time), then 5 bursts of {args.burst} connections at once; medians of "
          f"{args.rounds} rounds.\n")
    print("| setup | processes | req/s | p50 ms | p99 ms | relay CPU ms/req | of which daemon | "
          "new connections per worker (all rounds) | busiest worker's share | "
          "bursts: busiest worker's share, median / worst |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, _, _ in setups:
        runs = rounds[name]

        def median(field: str, runs: list[Figures] = runs) -> float:
            return statistics.median(getattr(f, field) for f in runs)

        took: dict[str, float] = {}
        for run in runs:
            for worker, count in run.accepted.items():
                took[worker] = took.get(worker, 0.0) + count
        shares = " / ".join(f"{took[w]:.0f}" for w in sorted(took))
        share = max(took.values()) / max(sum(took.values()), 1.0)
        print(f"| {name} | {runs[0].processes} | {median('req_per_s'):.0f} | "
              f"{median('p50_ms'):.2f} | {median('p99_ms'):.2f} | "
              f"{median('relay_cpu_ms_per_req'):.3f} | {median('daemon_cpu_ms_per_req'):.3f} | "
              f"{shares} | {share:.0%} | "
              f"{statistics.median(b for f in runs for b in f.burst_shares):.0%} / "
              f"{max(b for f in runs for b in f.burst_shares):.0%} |")
    results = [f for runs in rounds.values() for f in runs]
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(f) for f in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
