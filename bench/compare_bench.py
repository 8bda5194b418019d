"""Compare relayd at several commits, and the lean reference proxy, in one interleaved run.

On a shared virtual machine the CPU a process gets per request drifts by 10 % and more
within minutes, so two bench runs one after the other cannot tell a 3 % change from the
drift. Here every commit's relayd runs at once, beside the lean Twisted proxy
(``bench/bare_proxy.py``) and one fake upstream, and the measurements take turns:

1. CPU per request: ``--rounds`` rounds; in each, one batch of ``--batch`` non-streaming
   requests (concurrency ``--concurrency``) per proxy, in a shuffled order, each proxy's
   CPU time (``/proc/PID/stat``) read around its own batch. Per round, each relayd's
   figure is divided by the reference's of the same round; the report gives the median
   of those ratios (and of the raw figures).
   With ``--streams S``, each round also gives each proxy (in the same shuffled order)
   a batch of ``S`` streaming requests, and the CPU per stream event is each proxy's
   (stream CPU - plain CPU per request) / events per stream of that round, compared with
   the reference's the same way. That is a difference of two batches, as noisy as
   both: ``--stream-chunks K`` makes the fake upstream's answers K text chunks long
   (default 5, i.e. 10 SSE events a stream), so the events weigh more than the rest.
2. Added latency: ``--requests`` sequential non-streaming requests per target at
   concurrency 1, interleaved across the fake upstream directly and every proxy; p50 and
   p99 of each, and what each adds over the direct p50.

Each commit is checked out with ``git worktree add --detach`` into a temporary directory
(removed afterwards) and its relayd runs from there (``PYTHONPATH``); ``.`` is the
working checkout as it is. Everything listens on 127.0.0.1 ephemeral ports, the run is
bounded by counts and ``--duration-cap``, and the processes are stopped by PID.

Usage: ``.venv/bin/python bench/compare_bench.py [--rounds R] [--batch M] [--streams S]
[--requests N] REV [REV ...]`` e.g. ``bench/compare_bench.py HEAD~3 HEAD .``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relay_bench import (  # the bench directory is on sys.path, not a package
    RELAY_KEY,
    REPO,
    UPSTREAM_KEY,
    BenchError,
    Service,
    env_with_path,
    events_per_stream,
    make_target,
    start_bare,
    start_relay,
    start_upstream,
)

from relayd.testing.loadgen import (
    Tally,
    Target,
    concurrent_batch,
    cpu_seconds,
    percentile,
    sequential_interleaved,
)

REFERENCE = "lean-proxy"


def checkout(rev: str, into: Path) -> Path:
    """The tree relayd runs from for ``rev``: the working checkout for ``.``."""
    if rev == ".":
        return REPO
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet",
                    str(into), rev], check=True)
    return into


def start_tree_relay(name: str, tree: Path, workdir: Path, upstream_port: int,
                     deadline: float) -> Service:
    """relayd from ``tree``: first on the child's ``PYTHONPATH``, ahead of the editable
    install (a ``PYTHONPATH`` of the caller's comes after it)."""
    workdir.mkdir()
    service = Service(name, workdir)
    start_relay(service, workdir, upstream_port, deadline, env=env_with_path(tree))
    return service


async def measure(
    proxies: dict[str, tuple[Service, Target]], direct: Target, args: argparse.Namespace,
) -> dict[str, object]:
    tally = Tally("compare")
    for _, target in proxies.values():  # warm-up: code paths and upstream pools
        await concurrent_batch(target, args.batch // 2, args.concurrency, False, tally)
    events = 0
    if args.streams:
        events = await events_per_stream(direct)
        for _, target in proxies.values():
            await concurrent_batch(target, args.streams // 2, args.concurrency, True, tally)
    cpu: dict[str, list[float]] = {name: [] for name in proxies}
    per_event: dict[str, list[float]] = {name: [] for name in proxies}
    for _ in range(args.rounds):
        order = list(proxies)
        random.shuffle(order)
        for name in order:
            service, target = proxies[name]
            plain = await _cpu_per_request(service, target, args.batch, False, args, tally)
            cpu[name].append(plain)
            if events:
                stream = await _cpu_per_request(service, target, args.streams, True, args,
                                                tally)
                per_event[name].append((stream - plain) * 1000.0 / events)
    targets = [direct] + [target for _, target in proxies.values()]
    latency = await sequential_interleaved(targets, args.requests, False, tally)
    return {"cpu_ms_per_request": cpu, "cpu_us_per_stream_event": per_event,
            "events_per_stream": events, "latency_ms": latency, "failures": tally.failures}


async def _cpu_per_request(service: Service, target: Target, count: int, stream: bool,
                           args: argparse.Namespace, tally: Tally) -> float:
    """The proxy's CPU ms per request over one batch."""
    before = cpu_seconds(service.pid)
    ok = await concurrent_batch(target, count, args.concurrency, stream, tally)
    return (cpu_seconds(service.pid) - before) * 1000.0 / max(ok, 1)


def report(revs: dict[str, str], figures: dict[str, object], args: argparse.Namespace) -> str:
    cpu: dict[str, list[float]] = figures["cpu_ms_per_request"]  # type: ignore[assignment]
    latency: dict[str, list[float]] = figures["latency_ms"]  # type: ignore[assignment]
    reference = cpu[REFERENCE]
    direct_p50 = statistics.median(latency["direct"])
    lines = [
        f"{args.rounds} rounds of {args.batch} non-streaming requests per proxy at "
        f"concurrency {args.concurrency}, shuffled per round; then {args.requests} "
        "sequential requests per target, interleaved.",
        "",
        "| | CPU ms/req, median | / reference, median of rounds | latency p50 ms "
        "| adds at p50 | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in cpu:
        label = _label(name, revs)
        ratio = _median_ratio(cpu[name], reference)
        p50 = statistics.median(latency[name])
        lines.append(
            f"| {label} | {statistics.median(cpu[name]):.3f} | {ratio:.3f} | {p50:.3f} "
            f"| {p50 - direct_p50:+.3f} | {percentile(latency[name], 99):.3f} |"
        )
    lines.append(f"| direct to the fake upstream | - | - | {direct_p50:.3f} | - "
                 f"| {percentile(latency['direct'], 99):.3f} |")
    lines.append("")
    per_event: dict[str, list[float]] = figures["cpu_us_per_stream_event"]  # type: ignore[assignment]
    if args.streams:
        lines += [
            f"CPU per stream event: each round also {args.streams} streams per proxy "
            f"({figures['events_per_stream']} SSE events each); (stream - plain CPU per "
            "request) / events, per round.",
            "",
            "| | µs per stream event, median | / reference, median of rounds |",
            "| --- | ---: | ---: |",
        ]
        reference_events = per_event[REFERENCE]
        for name in per_event:
            lines.append(f"| {_label(name, revs)} | {statistics.median(per_event[name]):.1f} "
                         f"| {_median_ratio(per_event[name], reference_events):.3f} |")
        lines.append("")
    lines.append(f"requests that failed: {figures['failures']}")
    return "\n".join(lines)


def _label(name: str, revs: dict[str, str]) -> str:
    return f"relayd `{revs[name]}`" if name in revs else "the lean reference proxy"


def _median_ratio(values: list[float], reference: list[float]) -> float:
    """The median of the per-round ratios (a round whose reference figure is not
    positive, possible for a difference of two batches, is left out)."""
    return statistics.median(a / b for a, b in zip(values, reference, strict=True) if b > 0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revs", nargs="+", metavar="REV",
                        help="commits to compare (. for the working checkout)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--streams", type=int, default=0,
                        help="streaming requests per proxy per round (0: no stream phase)")
    parser.add_argument("--stream-chunks", type=int, default=5,
                        help="text chunks per answer of the fake upstream (default 5)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--duration-cap", type=float, default=900.0)
    parser.add_argument("--json", metavar="OUT", help="write the raw figures here")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 100 or not 100 <= args.batch <= 100_000:
        parser.error("--rounds must be 1..100 and --batch 100..100000")
    if args.streams and not 100 <= args.streams <= 100_000:
        parser.error("--streams must be 0 or 100..100000")
    if not 1 <= args.stream_chunks <= 1000:
        parser.error("--stream-chunks must be 1..1000")
    if not 1 <= args.concurrency <= 256 or not 1 <= args.requests <= 100_000:
        parser.error("--concurrency must be 1..256 and --requests 1..100000")
    if len(set(args.revs)) != len(args.revs):
        parser.error("each REV once")
    return args


def _stop(signum: int, frame: object) -> None:
    raise BenchError(f"stopped by signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.duration_cap
    # Whatever ends the run, the finally below stops every process and removes the
    # worktrees: a SIGTERM, a hang-up, or a phase that outlives the cap (SIGALRM).
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(signum, _stop)
    signal.alarm(math.ceil(args.duration_cap) + 60)
    work = Path(tempfile.mkdtemp(prefix="relay-compare-"))
    services: list[Service] = []
    trees: list[Path] = []
    try:
        revs: dict[str, str] = {}
        proxies: dict[str, tuple[Service, Target]] = {}
        upstream = Service("upstream", work)
        services.append(upstream)
        start_upstream(upstream, work, deadline, {"chunks": args.stream_chunks})
        for index, rev in enumerate(args.revs):
            name = f"relayd-{index}"
            if rev != ".":
                trees.append(work / f"tree-{index}")  # removed at the end, even half made
            tree = checkout(rev, work / f"tree-{index}")
            label = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                                   capture_output=True, text=True, check=True).stdout.strip()
            if rev == ".":
                changed = subprocess.run(
                    ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                    capture_output=True, text=True, check=True,
                ).stdout.strip()
                label += " + working changes" if changed else " (working checkout)"
            revs[name] = label
            service = start_tree_relay(name, tree, work / name, upstream.port, deadline)
            services.append(service)
            proxies[name] = (service, make_target(name, service.port, RELAY_KEY, True))
        bare = Service(REFERENCE, work)
        services.append(bare)
        start_bare(bare, upstream.port, deadline)
        proxies[REFERENCE] = (bare, make_target(REFERENCE, bare.port, "unused", False))
        direct = make_target("direct", upstream.port, UPSTREAM_KEY, False)
        left = deadline - time.monotonic()
        figures = asyncio.run(asyncio.wait_for(measure(proxies, direct, args), left))
    except (BenchError, TimeoutError, KeyboardInterrupt) as exc:
        print(f"compare_bench: {exc or 'duration cap reached'}", file=sys.stderr)
        return 2
    finally:
        signal.alarm(0)
        for service in services:
            service.terminate()
        for service in services:
            service.reap()
        for tree in trees:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           check=False)
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], check=False)
    print(report(revs, figures, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"revs": revs, **figures}, indent=1))
    return 1 if figures["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
