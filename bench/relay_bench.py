"""relayd benchmark: added latency, relay CPU per request, streaming, RSS.

One run starts the fake upstream (``python -m relayd.testing.fakeprovider``), relayd
(``twistd -n relayd``) and the leanest Twisted pass-through proxy (``bench/bare_proxy.py``,
the reference point of the CPU budget) as subprocesses on 127.0.0.1 ephemeral ports,
warms them up, then measures with a small asyncio load generator that speaks raw
HTTP/1.1 over keep-alive sockets (request bytes built once, responses parsed by
Content-Length or chunked framing):

1. added latency: sequential (concurrency 1) non-streaming ``POST /v1/messages``,
   interleaved between the fake upstream directly and the same upstream through relayd,
   one persistent connection per target; p50/p99 of each and the difference;
2. proxy CPU per request: the proxy's utime+stime (``/proc/PID/stat``) around a fixed
   batch of non-streaming requests on ``--concurrency`` keep-alive connections, divided
   by the batch size, with the batch's req/s; for relayd, for the bare proxy, and straight
   to the fake upstream (the upstream's own CPU per request, for context);
3. streaming: sequential interleaved ``"stream": true`` requests for time to the first
   body byte (relay vs direct), then a concurrent streaming batch for CPU per stream;
4. idle connections: a plain batch through each proxy again while ``--idle-connections``
   client connections sit open and idle (as SDK clients keep theirs), which shows any
   per-request cost that grows with the connections a process holds.

It prints markdown tables (for docs/performance.md) and, with ``--json``, writes the raw
figures. Every phase is bounded in count and by ``--duration-cap``; the subprocesses are
stopped by PID. The exit status is 1 when any request failed, 2 when the run was aborted.

Usage: ``.venv/bin/python bench/relay_bench.py [--requests N] [--concurrency C]
[--duration-cap S] [--json OUT]`` (``make bench`` runs it with the defaults).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import hashlib
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from relayd.http.connections import FD_RESERVE
from relayd.oslimits import raise_open_file_limit
from relayd.testing.loadgen import (
    Tally,
    Target,
    build_request,
    concurrent_batch,
    cpu_seconds,
    memory_kib,
    message_body,
    percentile,
    send_once,
    sequential_interleaved,
)

REPO = Path(__file__).resolve().parent.parent
RELAY_KEY = "sk-relay-bench-7f3a9c2e5b1d4f60"
UPSTREAM_KEY = "sk-fake-upstream"
FAKE_UPSTREAM_MODULE = "relayd.testing.fakeprovider"
# Streams: the fake's default 5 text chunks (9 SSE events), each event its own write
# 1 ms apart, so the relay sees a stream in several reads as it would in production.
FAKE_UPSTREAM_KNOBS = {"chunk_delay": 0.001}
CPU_BUDGET_MS = 0.35  # relay CPU per non-streaming request, plain HTTP
STARTUP_TIMEOUT = 30.0
_RELAY_LISTENING = re.compile(rb"relayd listening on http://127\.0\.0\.1:(\d+)")
_BARE_LISTENING = re.compile(rb"bare-proxy listening on http://127\.0\.0\.1:(\d+)")


class BenchError(Exception):
    """The bench could not run (a process did not start, the duration cap was hit)."""


# ---------------------------------------------------------------------- process handling


class Service:
    """One subprocess of the bench, logging to a file, started once and stopped by PID."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, argv: list[str], probe: Callable[[], str], deadline: float,
              env: dict[str, str] | None = None) -> None:
        """Run ``argv`` (in ``env``, else this process's) and wait (bounded) until
        ``probe`` returns the listening port."""
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=REPO, env=env,
            )
        limit = min(deadline, time.monotonic() + STARTUP_TIMEOUT)
        while time.monotonic() < limit:
            value = probe()
            if value:
                self.port = int(value)
                return
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with status {self.process.returncode}:\n"
                    f"{_tail(self.log)}"
                )
            time.sleep(0.05)
        raise BenchError(f"{self.name} did not start listening in time:\n{_tail(self.log)}")

    def log_match(self, pattern: re.Pattern[bytes]) -> Callable[[], str]:
        def probe() -> str:
            found = pattern.search(self.log.read_bytes())
            return found.group(1).decode() if found else ""

        return probe

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)

    def reap(self) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


class Processes:
    """The fake upstream, relayd and the bare reference proxy."""

    def __init__(self, workdir: Path, baseline: bool) -> None:
        self.workdir = workdir
        self.upstream = Service("upstream", workdir)
        self.relay = Service("relayd", workdir)
        self.bare = Service("bare-proxy", workdir) if baseline else None

    def all(self) -> list[Service]:
        return [s for s in (self.relay, self.bare, self.upstream) if s is not None]

    def start(self, deadline: float) -> None:
        start_upstream(self.upstream, self.workdir, deadline)
        start_relay(self.relay, self.workdir, self.upstream.port, deadline)
        if self.bare is not None:
            start_bare(self.bare, self.upstream.port, deadline)

    def stop(self) -> None:
        for service in self.all():
            service.terminate()
        for service in self.all():
            service.reap()


def start_upstream(service: Service, workdir: Path, deadline: float,
                   knobs: dict[str, Any] | None = None) -> None:
    """The fake upstream, with the bench's knobs (updated by ``knobs``), on an ephemeral
    port."""
    port_file = workdir / "upstream.port"

    def upstream_port() -> str:
        return port_file.read_text().strip() if port_file.exists() else ""

    service.start(
        [
            sys.executable, "-m", FAKE_UPSTREAM_MODULE,
            "--listen", "127.0.0.1:0",
            "--port-file", str(port_file),
            "--config", json.dumps({**FAKE_UPSTREAM_KNOBS, **(knobs or {})}),
        ],
        upstream_port,
        deadline,
    )


def start_relay(service: Service, workdir: Path, upstream_port: int, deadline: float,
                env: dict[str, str] | None = None) -> None:
    """relayd on :func:`relay_config` (written into ``workdir``), as the systemd unit
    runs it: the journal observer on stdout."""
    config = workdir / "relayd.yaml"
    config.write_text(relay_config(upstream_port))
    twistd = str(Path(sys.executable).with_name("twistd"))
    service.start(
        [twistd, "-n", "--pidfile=", "--logger=relayd.logs.journal_observer", "relayd",
         "-c", str(config)],
        service.log_match(_RELAY_LISTENING),
        deadline,
        env,
    )


def start_bare(service: Service, upstream_port: int, deadline: float,
               env: dict[str, str] | None = None) -> None:
    """The lean reference proxy in front of the fake upstream."""
    service.start(
        [
            sys.executable, str(Path(__file__).with_name("bare_proxy.py")),
            "--upstream", f"http://127.0.0.1:{upstream_port}",
            "--api-key", UPSTREAM_KEY,
        ],
        service.log_match(_BARE_LISTENING),
        deadline,
        env=env,
    )


def env_with_path(first: Path, **extra: str) -> dict[str, str]:
    """This process's environment with ``first`` at the head of ``PYTHONPATH`` (a
    ``PYTHONPATH`` of the caller's after it) and ``extra`` set: for a child that must
    import from ``first`` ahead of the editable install."""
    path = os.pathsep.join(p for p in (str(first), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


async def events_per_stream(direct: Target) -> int:
    """SSE events in one stream of the fake upstream, counted on a direct stream."""
    probe = await send_once(direct.port, direct.stream, 30)
    return probe.body.count(b"\n\n")


def relay_config(upstream_port: int) -> str:
    key_sha256 = hashlib.sha256(RELAY_KEY.encode()).hexdigest()
    url = f"http://127.0.0.1:{upstream_port}"
    return (
        'listen: [{address: "127.0.0.1:0"}]\n'
        f'clients: [{{name: bench, key_sha256: "{key_sha256}"}}]\n'
        "providers:\n"
        "  - name: anthropic\n"
        "    type: anthropic\n"
        f'    backends: [{{name: a, url: "{url}", api_key: "{UPSTREAM_KEY}"}}]\n'
        "  - name: openai\n"
        "    type: openai\n"
        f'    backends: [{{name: o, url: "{url}", api_key: "{UPSTREAM_KEY}"}}]\n'
        "routes:\n"
        "  - {api: anthropic, provider: anthropic}\n"
        "  - {api: openai, provider: openai}\n"
    )


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_bytes()[-size:].decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def relay_log_summary(path: Path) -> dict[str, int]:
    """Access lines by outcome and error lines, from relayd's log."""
    summary = {"access_ok": 0, "access_not_ok": 0, "errors": 0}
    with path.open("rb") as handle:
        for line in handle:
            if b"[relayd.access#" in line:
                if b" outcome=ok " in line:
                    summary["access_ok"] += 1
                else:
                    summary["access_not_ok"] += 1
            elif b"#error]" in line or b"#critical]" in line or b"Traceback" in line:
                summary["errors"] += 1
    return summary


# ------------------------------------------------------------------------------ figures


def distribution(samples: Sequence[float]) -> dict[str, float]:
    return {
        "count": len(samples),
        "p50_ms": percentile(samples, 50),
        "p90_ms": percentile(samples, 90),
        "p99_ms": percentile(samples, 99),
        "max_ms": max(samples) if samples else math.nan,
        "mean_ms": sum(samples) / len(samples) if samples else math.nan,
    }


@dataclass
class BatchFigures:
    """One concurrent batch against one target; CPU figures are per successful request."""

    target: str
    requests: int
    ok: int
    concurrency: int
    seconds: float
    req_per_s: float
    proxy_cpu_ms_per_req: float | None  # relayd or the bare proxy; None when direct
    upstream_cpu_ms_per_req: float
    loadgen_cpu_ms_per_req: float


async def measured_batch(
    target: Target, total: int, concurrency: int, stream: bool, tally: Tally,
    proxy_pid: int | None, upstream_pid: int,
) -> BatchFigures:
    proxy_before = cpu_seconds(proxy_pid) if proxy_pid is not None else 0.0
    upstream_before = cpu_seconds(upstream_pid)
    own_before = time.process_time()
    started = time.perf_counter()
    ok = await concurrent_batch(target, total, concurrency, stream, tally)
    seconds = time.perf_counter() - started
    own = time.process_time() - own_before
    upstream = cpu_seconds(upstream_pid) - upstream_before
    proxy = cpu_seconds(proxy_pid) - proxy_before if proxy_pid is not None else None
    per = 1000.0 / ok if ok else math.nan
    return BatchFigures(
        target=target.name,
        requests=total,
        ok=ok,
        concurrency=concurrency,
        seconds=seconds,
        req_per_s=ok / seconds if seconds > 0 else math.nan,
        proxy_cpu_ms_per_req=proxy * per if proxy is not None else None,
        upstream_cpu_ms_per_req=upstream * per,
        loadgen_cpu_ms_per_req=own * per,
    )


# ---------------------------------------------------------------------------------- run


@dataclass
class Settings:
    requests: int
    batch: int
    stream_requests: int
    stream_batch: int
    concurrency: int
    warmup: int
    duration_cap: float
    baseline: bool
    idle_connections: int = 2000


def make_target(name: str, port: int, key: str, via_relay: bool) -> Target:
    return Target(
        name,
        port,
        build_request(port, key, message_body(False)),
        build_request(port, key, message_body(True)),
        via_relay,
    )


async def run_phases(
    settings: Settings, procs: Processes, deadline: float, results: dict[str, Any],
    tallies: list[Tally],
) -> None:
    relay_pid, upstream_pid = procs.relay.pid, procs.upstream.pid
    direct = make_target("direct", procs.upstream.port, UPSTREAM_KEY, False)
    relay = make_target("relay", procs.relay.port, RELAY_KEY, True)
    bare = (
        make_target("bare-proxy", procs.bare.port, "unused", False)
        if procs.bare is not None
        else None
    )
    results["request_bytes"] = {"plain": len(relay.plain), "stream": len(relay.stream)}
    results["request_body_bytes"] = {
        "plain": len(message_body(False)),
        "stream": len(message_body(True)),
    }
    c = settings.concurrency

    async def phase(name: str, coro: Any) -> Any:
        left = deadline - time.monotonic()
        if left <= 0:
            coro.close()
            raise BenchError(f"duration cap reached before phase {name!r}")
        _progress(f"{name} ...")
        # The load generator's own cyclic GC stays out of the measured phases.
        gc.collect()
        gc.disable()
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(coro, timeout=left)
        except TimeoutError:
            raise BenchError(f"duration cap reached during phase {name!r}") from None
        finally:
            gc.enable()
        _progress(f"{name}: {time.monotonic() - started:.1f} s")
        return result

    def tally(name: str) -> Tally:
        t = Tally(name)
        tallies.append(t)
        return t

    # Warm-up: code paths, and every proxy's upstream pool filled to `c` connections.
    w = settings.warmup
    warm = tally("warm-up")
    await phase("warm-up", _warmup([direct, relay], w, c, warm))
    if bare is not None:
        await phase("warm-up bare proxy", concurrent_batch(bare, w, c, False, warm))

    sequential = [direct, relay] + ([bare] if bare is not None else [])
    # Events per stream, counted once on a direct stream.
    results["events_per_stream"] = await events_per_stream(direct)

    # 1. Added latency: plain requests at concurrency 1, direct, relayed and through the
    # reference proxy, interleaved.
    relay_cpu = cpu_seconds(relay_pid)
    lat = await phase(
        "latency (concurrency 1, plain)",
        sequential_interleaved(sequential, settings.requests, False, tally("latency")),
    )
    relay_cpu = cpu_seconds(relay_pid) - relay_cpu
    results["latency"] = {name: distribution(s) for name, s in lat.items()}
    results["latency"]["relay_cpu_ms_per_req"] = _per_request(relay_cpu, len(lat["relay"]))

    # 2. CPU per request and throughput: concurrent plain batches.
    batches: dict[str, Any] = {}
    runs: list[tuple[Target, int | None]] = [(direct, None), (relay, relay_pid)]
    if bare is not None and procs.bare is not None:
        runs.append((bare, procs.bare.pid))
    for target, pid in runs:
        figures = await phase(
            f"batch {target.name} (concurrency {c}, plain)",
            measured_batch(target, settings.batch, c, False, tally(f"batch-{target.name}"),
                           pid, upstream_pid),
        )
        batches[target.name] = asdict(figures)
    results["batch"] = batches

    # 3. Streaming: time to first body byte at concurrency 1, then CPU per stream.
    relay_cpu = cpu_seconds(relay_pid)
    ttfb = await phase(
        "streaming time to first byte (concurrency 1)",
        sequential_interleaved(sequential, settings.stream_requests, True,
                               tally("stream-ttfb")),
    )
    relay_cpu = cpu_seconds(relay_pid) - relay_cpu
    results["stream_ttfb"] = {name: distribution(s) for name, s in ttfb.items()}
    results["stream_ttfb"]["relay_cpu_ms_per_req"] = _per_request(relay_cpu, len(ttfb["relay"]))
    stream_batches: dict[str, Any] = {}
    for target, pid in runs:
        figures = await phase(
            f"batch {target.name} (concurrency {c}, streaming)",
            measured_batch(target, settings.stream_batch, c, True,
                           tally(f"stream-batch-{target.name}"), pid, upstream_pid),
        )
        stream_batches[target.name] = asdict(figures)
    results["stream_batch"] = stream_batches
    results["relay_memory_kib"] = memory_kib(relay_pid)

    # 4. CPU per request while many keep-alive client connections sit idle (SDK clients
    # keep theirs open): per-connection costs on the request path show here.
    idle = min(settings.idle_connections, idle_connections_that_fit(c))
    if idle < settings.idle_connections:
        _progress(f"idle connections: {idle}, not {settings.idle_connections}: the open "
                  "file limit allows no more")
    results["idle_connections"] = idle
    if idle:
        idle_batches: dict[str, Any] = {}
        for target, pid in runs[1:]:
            held: list[asyncio.StreamWriter] = []
            try:
                await phase(f"open {idle} idle connections to {target.name}",
                            open_idle_connections(target, idle, held))
                figures = await phase(
                    f"batch {target.name} (concurrency {c}, plain, {idle} idle connections)",
                    measured_batch(target, settings.batch // 2, c, False,
                                   tally(f"idle-batch-{target.name}"), pid, upstream_pid),
                )
            finally:
                for writer in held:
                    writer.close()
            idle_batches[target.name] = asdict(figures)
        results["idle_batch"] = idle_batches


async def open_idle_connections(
    target: Target, count: int, held: list[asyncio.StreamWriter]
) -> None:
    """Open ``count`` TCP connections to ``target`` that send nothing (into ``held``, so
    the caller closes them however this ends); done once the target answered a request
    made after them (one listening socket accepts in order: all are accepted)."""
    for _ in range(count):
        _, writer = await asyncio.open_connection("127.0.0.1", target.port)
        held.append(writer)
    await send_once(target.port, target.plain, 30)


def idle_connections_that_fit(concurrency: int) -> int:
    """How many idle connections this process, the reference proxy (which inherits the
    limit) and relayd's automatic connection bound (half the limit left after a reserve)
    all allow, with room for the batch's own connections."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(min(soft, (soft - FD_RESERVE) // 2) - 4 * concurrency - 64, 0)


def _per_request(seconds: float, count: int) -> float:
    return seconds * 1000.0 / count if count else math.nan


async def _warmup(targets: list[Target], count: int, c: int, tally: Tally) -> None:
    await sequential_interleaved(targets, count, False, tally)
    await sequential_interleaved(targets, max(count // 4, 1), True, tally)
    for target in targets:
        await concurrent_batch(target, count, c, False, tally)
        await concurrent_batch(target, max(count // 2, c), c, True, tally)


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import twisted

        twisted_version = twisted.__version__
    except ImportError:
        twisted_version = "?"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted_version,
    }


def git_commit() -> str:
    """``git rev-parse --short HEAD``, with ``+dirty`` when tracked files are modified."""
    git = shutil.which("git")
    if git is None:
        return "unknown"
    try:
        commit = subprocess.run(
            [git, "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [git, "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


# ------------------------------------------------------------------------------ report


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _diff(relay: float, direct: float) -> str:
    return "-" if math.isnan(relay) or math.isnan(direct) else f"{relay - direct:+.3f}"


def render_report(results: dict[str, Any]) -> str:
    """The markdown pasted into docs/performance.md."""
    lat, ttfb = results["latency"], results["stream_ttfb"]
    plain, stream = results["batch"], results["stream_batch"]
    mem = results["relay_memory_kib"]
    s, m = results["settings"], results["machine"]
    c = s["concurrency"]
    lines = [
        f"relayd benchmark: {results['date']}, commit {results['commit']}, "
        f"{m['cpus']} CPUs ({m['cpu_model'] or 'unknown model'}), "
        f"Python {m['python']}, Twisted {m['twisted']}",
        "",
        "| latency at concurrency 1, ms | direct to upstream | through relayd | relay adds "
        "| through the lean proxy | lean proxy adds |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, table, key in (
        (f"non-streaming p50 (n={s['requests']})", lat, "p50_ms"),
        (f"non-streaming p99 (n={s['requests']})", lat, "p99_ms"),
        (f"streaming, first body byte p50 (n={s['stream_requests']})", ttfb, "p50_ms"),
        (f"streaming, first body byte p99 (n={s['stream_requests']})", ttfb, "p99_ms"),
    ):
        d, r = table["direct"][key], table["relay"][key]
        b = table["bare-proxy"][key] if "bare-proxy" in table else math.nan
        lines.append(
            f"| {label} | {_ms(d)} | {_ms(r)} | {_diff(r, d)} | {_ms(b)} | {_diff(b, d)} |"
        )
    lines += [
        "",
        f"| concurrency {c} | requests | req/s | proxy CPU ms/req | upstream CPU ms/req "
        "| load generator CPU ms/req |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows: list[tuple[str, dict[str, Any]]] = [
        ("non-streaming, direct to upstream", plain["direct"]),
        ("non-streaming, through relayd", plain["relay"]),
    ]
    if "bare-proxy" in plain:
        rows.append(("non-streaming, through the lean Twisted proxy", plain["bare-proxy"]))
    rows += [
        ("streaming, direct to upstream", stream["direct"]),
        ("streaming, through relayd", stream["relay"]),
    ]
    if "bare-proxy" in stream:
        rows.append(("streaming, through the lean Twisted proxy", stream["bare-proxy"]))
    idle = results.get("idle_batch") or {}
    for name, label in (("relay", "relayd"), ("bare-proxy", "the lean Twisted proxy")):
        if name in idle:
            rows.append((f"non-streaming, through {label}, {results['idle_connections']} "
                         "idle client connections open", idle[name]))
    for label, fig in rows:
        proxy = _ms(fig["proxy_cpu_ms_per_req"])
        if fig["target"] == "relay":
            proxy = f"**{proxy}**"
        lines.append(
            f"| {label} | {fig['requests']} | {fig['req_per_s']:.0f} | {proxy} "
            f"| {_ms(fig['upstream_cpu_ms_per_req'])} | {_ms(fig['loadgen_cpu_ms_per_req'])} |"
        )
    relay_cpu = plain["relay"]["proxy_cpu_ms_per_req"]
    verdict = "within" if relay_cpu <= CPU_BUDGET_MS else "over"
    if math.isnan(relay_cpu):
        verdict = "not measured against"
    lines += [
        "",
        f"- relayd CPU per non-streaming request: {_ms(relay_cpu)} ms at concurrency {c}, "
        f"{verdict} the {CPU_BUDGET_MS} ms budget",
    ]
    if "bare-proxy" in plain:
        bare_cpu = plain["bare-proxy"]["proxy_cpu_ms_per_req"]
        if bare_cpu and not math.isnan(bare_cpu):
            lines[-1] += f" ({relay_cpu / bare_cpu:.2f} x the bare proxy's {_ms(bare_cpu)} ms)"
    lines[-1] += (
        f"; at concurrency 1: {_ms(lat['relay_cpu_ms_per_req'])} ms per non-streaming "
        f"request, {_ms(ttfb['relay_cpu_ms_per_req'])} ms per stream."
    )
    events = results.get("events_per_stream") or 0
    if events:
        per_event = []
        for name, label in (("relay", "relayd"), ("bare-proxy", "the lean proxy")):
            if name in stream and name in plain:
                extra = stream[name]["proxy_cpu_ms_per_req"] - plain[name]["proxy_cpu_ms_per_req"]
                per_event.append(f"{label} {extra / events * 1000:.0f} µs")
        lines.append(
            f"- CPU per stream event at concurrency {c} ((stream - plain request) / "
            f"{events} events): " + ", ".join(per_event) + "."
        )
    log = results.get("relay_log") or {}
    lines += [
        f"- relayd RSS after the run: {mem.get('VmRSS', 0) / 1024:.1f} MiB "
        f"(peak {mem.get('VmHWM', 0) / 1024:.1f} MiB).",
        f"- requests that failed: {results['failed_requests']}; relayd access log: "
        f"{log.get('access_ok', 0)} lines with outcome=ok, {log.get('access_not_ok', 0)} "
        f"other, {log.get('errors', 0)} error lines.",
    ]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    """NaN (no samples) as null, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# -------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark relayd against the fake upstream (127.0.0.1 only)."
    )
    parser.add_argument("--requests", type=int, default=2000, metavar="N",
                        help="sequential non-streaming requests per target for the latency "
                             "figures (default %(default)s); the other sizes derive from it")
    parser.add_argument("--batch", type=int, default=None, metavar="M",
                        help="non-streaming requests per target in the concurrent CPU "
                             "batch (default 5 x N)")
    parser.add_argument("--stream-requests", type=int, default=None, metavar="S",
                        help="sequential streaming requests per target for time to first "
                             "byte (default N / 4)")
    parser.add_argument("--stream-batch", type=int, default=None, metavar="B",
                        help="streaming requests per target in the concurrent CPU batch "
                             "(default N)")
    parser.add_argument("--concurrency", type=int, default=16, metavar="C",
                        help="keep-alive connections of the batches (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=None, metavar="W",
                        help="warm-up requests per target (default N / 4)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the lean Twisted reference proxy")
    parser.add_argument("--duration-cap", type=float, default=300.0, metavar="S",
                        help="hard limit on the whole run, in seconds (default %(default)s)")
    parser.add_argument("--idle-connections", type=int, default=2000, metavar="K",
                        help="idle client connections held open during a last plain batch "
                        "through each proxy (0: skip it; default 2000)")
    parser.add_argument("--json", metavar="OUT", help="write the raw figures here")
    parser.add_argument("--keep-logs", metavar="DIR",
                        help="copy the subprocesses' logs here after the run")
    args = parser.parse_args(argv)
    for name in ("requests", "batch", "stream_requests", "stream_batch", "warmup"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= 1_000_000:
            parser.error(f"--{name.replace('_', '-')} must be between 1 and 1000000")
    if not 0 <= args.idle_connections <= 10_000:
        parser.error("--idle-connections must be between 0 and 10000")
    if not 1 <= args.concurrency <= 256:
        parser.error("--concurrency must be between 1 and 256")
    if not 0 < args.duration_cap <= 3600:
        parser.error("--duration-cap must be in (0, 3600] seconds")
    return args


def _alarm(signum: int, frame: Any) -> None:
    raise BenchError("hard duration cap: the run did not stop in time")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.requests
    settings = Settings(
        requests=n,
        batch=args.batch or 5 * n,
        stream_requests=args.stream_requests or max(n // 4, 1),
        stream_batch=args.stream_batch or n,
        concurrency=args.concurrency,
        warmup=args.warmup or max(n // 4, 1),
        duration_cap=args.duration_cap,
        baseline=args.baseline,
        idle_connections=args.idle_connections,
    )
    deadline = time.monotonic() + settings.duration_cap
    # The idle-connections phase holds thousands of sockets here and in the reference
    # proxy, which inherits the limit (relayd raises its own as it starts).
    raise_open_file_limit()
    # Last resort if a phase ignores the deadline: SIGALRM a little after it.
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(math.ceil(settings.duration_cap) + 30)
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": machine_info(),
        "settings": asdict(settings),
        "fake_upstream_knobs": FAKE_UPSTREAM_KNOBS,
        "cpu_budget_ms": CPU_BUDGET_MS,
    }
    tallies: list[Tally] = []
    error: str | None = None
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    procs = Processes(workdir, settings.baseline)
    log_summary: dict[str, int] = {}
    try:
        try:
            _progress(f"starting the fake upstream and relayd in {workdir}")
            procs.start(deadline)
            _progress(
                ", ".join(f"{s.name} on :{s.port} (pid {s.pid})" for s in procs.all())
            )
            asyncio.run(run_phases(settings, procs, deadline, results, tallies))
        except BenchError as exc:
            error = str(exc)
        except KeyboardInterrupt:
            error = "interrupted"
        finally:
            procs.stop()
            if args.keep_logs:
                keep = Path(args.keep_logs)
                keep.mkdir(parents=True, exist_ok=True)
                for service in procs.all():
                    if service.log.exists():
                        shutil.copy(service.log, keep / service.log.name)
            if procs.relay.log.exists():
                log_summary = relay_log_summary(procs.relay.log)
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        signal.alarm(0)

    failures = sum(t.failures for t in tallies)
    results["failed_requests"] = failures
    results["failures"] = {
        t.phase: {"failures": t.failures, "reconnects": t.reconnects, "first": t.reasons}
        for t in tallies
    }
    results["relay_log"] = log_summary
    if error is None:
        print(render_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    for t in tallies:
        if t.failures or t.reconnects:
            print(f"{t.phase}: {t.failures} failed, {t.reconnects} reconnects; "
                  f"first: {t.reasons}", file=sys.stderr)
    if log_summary.get("access_not_ok") or log_summary.get("errors"):
        print(f"relayd log: {log_summary}", file=sys.stderr)
    if error is not None:
        print(f"bench aborted: {error}", file=sys.stderr)
        return 2
    if failures:
        print(f"FAILED: {failures} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
