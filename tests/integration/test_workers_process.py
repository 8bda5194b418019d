"""``workers: 2``: one daemon, two worker processes sharing its sockets (relayd.workers).

Real processes throughout: ``twistd -n relayd`` (the daemon, which spawns the workers),
fake upstreams, the official SDKs and httpx2 as clients, on 127.0.0.1.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
from support import CLIENT_KEY, sha
from test_reload_drain import (
    _INVALID,
    ANTHROPIC_HEADERS,
    MESSAGE,
    Load,
    RelaydFactory,
    Streams,
    UpstreamFactory,
    admin_get,
    assert_shut_down_cleanly,
    backend,
    gauge,
    metric_samples,
    notification,
    readyz_draining,
    refuses_connections,
    relay_config,
    reload,
    reload_counts,
    tls,
)

from relayd.testing.certs import TestCertificates as CertificateFiles
from relayd.testing.processes import RelaydProcess, wait_for

_SERVING = re.compile(r"\[relayd\.workers#info\] worker (\d+) \(pid (\d+)\) serving")


def serving_pids(relay: RelaydProcess) -> dict[int, int]:
    """The pid of each worker index, as the daemon last announced it."""
    return {int(i): int(pid) for i, pid in _SERVING.findall(relay.log_text())}


def start_workers(
    relayd_factory: RelaydFactory, config: dict[str, Any], n: int = 2, **options: Any
) -> RelaydProcess:
    relay = relayd_factory(config, **options)
    wait_for(lambda: "relayd serving with" in relay.log_text(), 30, "the workers to serve",
             relay.log_path)
    assert len(serving_pids(relay)) == n
    return relay


def accepted(relay: RelaydProcess) -> dict[str, float]:
    samples = metric_samples(relay, "relayd_client_connections_accepted_total")
    return {labels["worker"]: value for labels, value in samples}


def requests_total(relay: RelaydProcess) -> float:
    return sum(value for _, value in metric_samples(relay, "relayd_requests_total"))


def post_each_on_a_new_connection(url: str, count: int, threads: int) -> Counter[int]:
    """``count`` Anthropic messages from ``threads`` threads, each on its own connection."""
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def run(n: int) -> None:
        for _ in range(n):
            response = httpx2.post(url + "/v1/messages", json=MESSAGE,
                                   headers=ANTHROPIC_HEADERS, timeout=30)
            with lock:
                statuses[response.status_code] += 1

    running = [threading.Thread(target=run, args=(count // threads,)) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join(120)
    assert not any(t.is_alive() for t in running)
    return statuses


def test_two_workers_serve_one_port_with_one_view(
    tmp_path: Path, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    up = upstream_factory("up1")
    config = relay_config([{"address": "127.0.0.1:0"}], [backend("a1", up)],
                          [backend("o1", up)], workers=2)
    relay = start_workers(relayd_factory, config)
    url = relay.url("http")
    assert relay.log_text().count("relayd listening on") == 1  # bound once, by the daemon

    statuses = post_each_on_a_new_connection(url, 240, threads=6)
    assert statuses == {200: 240}
    sdk = anthropic.Anthropic(api_key=CLIENT_KEY, base_url=url, max_retries=0)
    assert sdk.messages.create(**MESSAGE).content[0].text
    chat = openai.OpenAI(api_key=CLIENT_KEY, base_url=url + "/v1", max_retries=0)
    completion = chat.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}]
    )
    assert completion.choices[0].message.content

    # Both workers took connections; the totals are the sum of what was sent.
    shares = accepted(relay)
    assert set(shares) == {"0", "1"}
    assert min(shares.values()) >= 0.1 * sum(shares.values()), shares
    assert requests_total(relay) == 242
    assert gauge(relay, "relayd_requests_in_flight") == 0
    workers = {labels["state"]: value
               for labels, value in metric_samples(relay, "relayd_workers")}
    assert workers == {"starting": 0, "serving": 2, "stopping": 0}
    # Health is each worker's own, labelled; usage comes from the daemon's one store.
    healthy = metric_samples(relay, "relayd_backend_healthy")
    assert sorted((s["backend"], s["worker"]) for s, _ in healthy) == [
        ("a1", "0"), ("a1", "1"), ("o1", "0"), ("o1", "1")]
    backends = admin_get(relay, "/admin/backends").json()["backends"]
    assert sorted((b["worker"], b["name"]) for b in backends) == [
        (0, "a1"), (0, "o1"), (1, "a1"), (1, "o1")]
    usage = admin_get(relay, "/admin/usage").json()
    assert usage["clients"]["team-a"]["requests"] == 242
    assert usage["store"]["held_by"] == "daemon"
    assert admin_get(relay, "/readyz").json() == {"status": "ready"}
    cache = admin_get(relay, "/admin/cache").json()  # summed over the workers
    assert cache["memory"]["entries"] == 0 and cache["stores"] == 0
    purged = httpx2.post(relay.admin_url() + "/admin/cache/purge", timeout=10)
    assert purged.status_code == 200 and purged.json()["purged"]["memory"] == 0

    # A burst of connections opened at once is shared out (the connection board): no
    # worker takes more than 1.5 times its fair share.
    before = accepted(relay)
    port = int(url.rsplit(":", 1)[1])
    burst = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(40)]
    try:
        wait_for(lambda: sum(accepted(relay).values()) - sum(before.values()) >= 40, 30,
                 "the burst to be accepted")
        took = [value - before[worker] for worker, value in accepted(relay).items()]
        assert max(took) <= 0.75 * 40, took
    finally:
        for sock in burst:
            sock.close()

    exposition = admin_get(relay, "/metrics").text
    assert exposition.count("# TYPE relayd_requests_total counter") == 1
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is missing: sh scripts/system-deps.sh"
    checked = subprocess.run([promtool, "check", "metrics"], input=exposition.encode(),
                             capture_output=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_limits_are_exact_across_workers(
    upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    up = upstream_factory("up1")
    config = relay_config([{"address": "127.0.0.1:0"}], [backend("a1", up)], workers=2)
    config["clients"] = [{"name": "team-a", "key_sha256": sha(CLIENT_KEY),
                          "limits": {"requests_per_minute": 60}}]
    relay = start_workers(relayd_factory, config)

    statuses = post_each_on_a_new_connection(relay.url("http"), 200, threads=8)
    assert statuses == {200: 60, 429: 140}
    assert min(accepted(relay).values()) > 0  # both workers admitted through the one store
    rejections = metric_samples(relay, "relayd_limit_rejections_total")
    assert rejections == [({"client": "team-a", "limit": "requests_per_minute"}, 140.0)]


def test_a_killed_worker_loses_only_its_requests_and_comes_back(
    certs: CertificateFiles, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory,
    ca_context: Any,
) -> None:
    up = upstream_factory("up1")
    listen: list[dict[str, Any]] = [{"address": "127.0.0.1:0"},
                                    {"address": "127.0.0.1:0", "tls": tls(certs)}]
    config = relay_config(listen, [backend("a1", up)], [backend("o1", up)], workers=2)
    relay = start_workers(relayd_factory, config)
    before = serving_pids(relay)
    load = Load(relay.url("http"), relay.url("https"), ca_context)
    load.start()
    try:
        wait_for(lambda: load.streaming > 0 or load.failures, 30, "a stream in flight")
        done = load.total()
        relay_pid = relay.process.pid if relay.process else None
        subprocess.run(["kill", "-KILL", str(before[0])], check=True)
        wait_for(lambda: serving_pids(relay)[0] != before[0], 30, "worker 0 to come back",
                 relay.log_path)
        wait_for(lambda: load.total() >= done + 20, 60, "the load to go on")
    finally:
        load.finish()
    # At most what was in flight on the killed worker: one request per load thread.
    assert len(load.failures) <= len(load.threads), load.failures
    assert relay.process is not None and relay.process.pid == relay_pid
    assert relay.process.poll() is None
    after = serving_pids(relay)
    assert after[1] == before[1] and after[0] != before[0]
    assert f"worker 0 (pid {before[0]}) died (signal 9); starting it again" in relay.log_text()
    restarts = metric_samples(relay, "relayd_worker_restarts_total")
    assert restarts == [({"worker": "0"}, 1.0)]
    assert post_each_on_a_new_connection(relay.url("http"), 40, threads=4) == {200: 40}
    assert set(accepted(relay)) == {"0", "1"}


def test_sighup_under_load_drops_nothing(
    certs: CertificateFiles, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory,
    ca_context: Any,
) -> None:
    up1, up2 = upstream_factory("up1"), upstream_factory("up2")
    listen: list[dict[str, Any]] = [{"address": "127.0.0.1:0"},
                                    {"address": "127.0.0.1:0", "tls": tls(certs)}]

    def make(weight: int, **extra: Any) -> dict[str, Any]:
        return relay_config(listen, [backend("a1", up1, weight=weight), backend("a2", up2)],
                            [backend("o1", up1)], workers=2, **extra)

    relay = start_workers(relayd_factory, make(1))
    pids = serving_pids(relay)
    # Ephemeral listeners keep their sockets across reloads (same keys).
    load = Load(relay.url("http"), relay.url("https"), ca_context)
    load.start()
    try:
        wait_for(lambda: load.total() >= 8 or load.failures, 30, "the load to get going")
        for i in range(6):
            wait_for(lambda: load.streaming > 0 or load.failures, 30, "a stream in flight")
            if i == 3:
                invalid = make(1)
                invalid["providers"][0]["backends"][0]["weight"] = 0
                reload(relay, invalid, expect=_INVALID)
                continue
            reload(relay, make(1 + i % 2 * 2))
        streamed = load.streams_completed
        wait_for(lambda: load.streams_completed > streamed + 2 or load.failures, 30,
                 "streams after the last reload")
    finally:
        load.finish()
    assert load.failures == [], load.failures[:10]
    assert reload_counts(relay) == {"ok": 5, "invalid": 1, "refused": 0}
    assert serving_pids(relay) == pids  # nothing restarted
    log = relay.log_text()
    # Validated once by the daemon, applied by each worker.
    assert log.count("[relayd.workers#info] configuration reloaded:") == 5
    assert log.count("reload rejected: providers[0].backends[0].weight") == 1
    assert log.count("worker=0] configuration applied:") == 5
    assert log.count("worker=1] configuration applied:") == 5
    weights = {(b["worker"], b["name"]): b["weight"]
               for b in admin_get(relay, "/admin/backends").json()["backends"]}
    assert weights[(0, "a1")] == weights[(1, "a1")] == 3  # the last reload (i = 5)


def test_reload_changes_workers_and_listeners(
    tmp_path: Path, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    up = upstream_factory("up1")
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(20)
        config = relay_config([{"address": "127.0.0.1:0"}], [backend("a1", up)], workers=2)
        relay = start_workers(relayd_factory, config, env={"NOTIFY_SOCKET": str(notify)})
        ready = notification(sock)  # one READY=1, from the daemon, once both serve
        assert ready["READY"] == "1" and ready["STATUS"] == "serving with 2 workers"

        three = {**config, "workers": 3,
                 "listen": [{"address": "127.0.0.1:0"}, {"address": "127.0.0.1:0"}]}
        reload(relay, three)
        assert notification(sock)["RELOADING"] == "1"
        assert notification(sock)["READY"] == "1"
        wait_for(lambda: 2 in serving_pids(relay), 30, "worker 2 to serve", relay.log_path)
        urls = re.findall(r"relayd listening on (http://\S+)", relay.log_text())
        assert len(urls) == 2
        added = urls[1]
        assert post_each_on_a_new_connection(added, 30, threads=3) == {200: 30}
        assert accepted(relay).keys() == {"0", "1", "2"}

        one = {**config, "workers": 1}
        reload(relay, one)
        wait_for(lambda: relay.log_text().count("exited (exit code 0)") == 2, 30,
                 "workers 1 and 2 to drain and exit", relay.log_path)
        assert refuses_connections(added)
        assert post_each_on_a_new_connection(relay.url("http"), 10, threads=2) == {200: 10}
        workers = {labels["state"]: value
                   for labels, value in metric_samples(relay, "relayd_workers")}
        assert workers["serving"] == 1
        assert reload_counts(relay) == {"ok": 2, "invalid": 0, "refused": 0}

        relay.signal(signal.SIGTERM)
        while (message := notification(sock)).get("STOPPING") != "1":
            # Only the second reload's RELOADING=1 and READY=1: a worker never notifies.
            assert {"READY", "RELOADING"} & message.keys(), message
        assert relay.process is not None
        assert_shut_down_cleanly(relay, relay.process.wait(30))


def test_sigterm_drains_streams_on_every_worker(
    upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    up = upstream_factory("up1")
    config = relay_config([{"address": "127.0.0.1:0"}], [backend("a1", up)], workers=2)
    relay = start_workers(relayd_factory, config)
    url = relay.url("http")
    streams = Streams(url, 40, chunk_delay=0.25, chunks=10).start()  # ~3.5 s each
    wait_for(lambda: streams.started == 40 or streams.results, 30, "40 streams to start",
             relay.log_path)
    wait_for(lambda: gauge(relay, "relayd_streams_open") == 40, 10, "relayd_streams_open 40")
    assert min(accepted(relay).values()) > 0, accepted(relay)

    relay.signal(signal.SIGTERM)
    assert relay.process is not None
    wait_for(lambda: readyz_draining(relay), 10, "/readyz to say draining", relay.log_path)
    wait_for(lambda: refuses_connections(url), 10, "the relay to stop accepting")
    exit_code = relay.process.wait(30)
    streams.join(10)
    for types, error in streams.results:
        assert error is None, repr(error)
        assert types[-1] == "message_stop" and types.count("content_block_delta") == 10, types
    log = relay.log_text()
    drained = [int(n) for n in re.findall(
        r"worker=\d\] draining (\d+) in-flight requests \(up to 30s\)", log)]
    assert len(drained) == 2 and sum(drained) == 40, drained
    assert "shutdown timeout" not in log
    assert log.count("outcome=ok") == 40
    assert log.count("exited (exit code 0)") == 2
    assert_shut_down_cleanly(relay, exit_code)
