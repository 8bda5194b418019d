"""Where a proxy's added latency sits: the two legs of a request at concurrency 1.

Starts the fake upstream, relayd and the lean reference proxy (``bench/bare_proxy.py``)
as ``bench/relay_bench.py`` does, each proxy with ``bench/legprobe`` on its
``PYTHONPATH``: a ``sitecustomize`` that notes when each TCP connection's ``doRead`` and
``doWrite`` start. Then ``--requests`` sequential non-streaming requests per proxy,
interleaved, and from each proxy's notes:

- the request leg: a client connection's read to the next upstream send (``doWrite``
  on the upstream connection), i.e. auth, routing, the request's parse and copy;
- the answer leg: an upstream read to the next client send, i.e. the answer's parse,
  header policy, body, and whatever else runs before the reactor's next poll (twisted
  sends what a handler wrote at that poll, not when it is written).

p50 and p90 of each leg, beside the client-seen p50. The probe costs each proxy the
same small amount per read and write; compare the proxies, not the absolute figures.
Everything listens on 127.0.0.1 ephemeral ports; the processes are stopped by PID.

Usage: ``.venv/bin/python bench/leg_timing.py [--requests N]``
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relay_bench import (  # the bench directory is on sys.path, not a package
    RELAY_KEY,
    BenchError,
    Service,
    env_with_path,
    make_target,
    start_bare,
    start_relay,
    start_upstream,
)

from relayd.testing.loadgen import Tally, percentile, sequential_interleaved

PROBE = Path(__file__).resolve().with_name("legprobe")


def legs(notes: list[tuple[float, str, bool]]) -> tuple[list[float], list[float]]:
    """Request and answer legs, in ms, from one proxy's notes (in time order)."""
    request: list[float] = []
    answer: list[float] = []
    client_read: float | None = None
    upstream_read: float | None = None
    for at, kind, upstream in notes:
        if kind == "read" and not upstream and client_read is None:
            client_read = at
        elif kind == "write" and upstream and client_read is not None:
            request.append((at - client_read) * 1000.0)
            client_read = None
        elif kind == "read" and upstream and upstream_read is None:
            upstream_read = at
        elif kind == "write" and not upstream and upstream_read is not None:
            answer.append((at - upstream_read) * 1000.0)
            upstream_read = None
    return request, answer


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--duration-cap", type=float, default=300.0)
    args = parser.parse_args(argv)
    if not 10 <= args.requests <= 100_000:
        parser.error("--requests must be 10..100000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="relay-legs-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    deadline = time.monotonic() + args.duration_cap
    upstream, relay, bare = (Service(n, work) for n in ("upstream", "relayd", "lean-proxy"))
    notes = {name: work / f"{name}.notes" for name in ("relayd", "lean-proxy")}

    try:
        start_upstream(upstream, work, deadline)
        probed = {n: env_with_path(PROBE, LEG_TIMING_OUT=str(out)) for n, out in notes.items()}
        start_relay(relay, work, upstream.port, deadline, env=probed["relayd"])
        start_bare(bare, upstream.port, deadline, env=probed["lean-proxy"])
        targets = [make_target("relayd", relay.port, RELAY_KEY, True),
                   make_target("lean-proxy", bare.port, "unused", False)]
        tally = Tally("legs")
        seen = asyncio.run(asyncio.wait_for(
            sequential_interleaved(targets, args.requests, False, tally),
            deadline - time.monotonic(),
        ))
    except (BenchError, TimeoutError) as exc:
        print(f"leg_timing: {exc or 'duration cap reached'}", file=sys.stderr)
        return 2
    finally:
        for service in (relay, bare, upstream):
            service.terminate()
        for service in (relay, bare, upstream):
            service.reap()  # the probe writes its notes as the process exits
    print(f"{args.requests} sequential non-streaming requests per proxy, interleaved; ms.\n")
    print("| | client-seen p50 | request leg p50 | p90 | answer leg p50 | p90 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in ("relayd", "lean-proxy"):
        with notes[name].open("rb") as f:
            request, answer = legs(pickle.load(f))
        print(f"| {name} | {statistics.median(seen[name]):.3f} "
              f"| {percentile(request, 50):.3f} | {percentile(request, 90):.3f} "
              f"| {percentile(answer, 50):.3f} | {percentile(answer, 90):.3f} |")
    print(f"\nrequests that failed: {tally.failures}")
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
