"""Reloads under load, listeners added and removed, the shutdown drain, sd_notify and admin.

Every test runs real processes (``twistd -n relayd`` and fake upstreams) on 127.0.0.1.
A reload is triggered the way an operator does it: rewrite the file relayd was started
with, then SIGHUP; each reload is waited for in the log before the next one is sent.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import yaml
from support import CLIENT_KEY, UPSTREAM_KEYS, sha

from relayd.testing import exposition
from relayd.testing.certs import TestCertificates as CertificateFiles
from relayd.testing.certs import make_certificates
from relayd.testing.processes import FakeUpstreamProcess, RelaydProcess, wait_for

KEYS = {**UPSTREAM_KEYS, "a3": "sk-upstream-a3"}
ANTHROPIC_HEADERS = {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"}
MESSAGE: dict[str, Any] = {
    "model": "claude-test-1", "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]
}

_ACCESS = re.compile(r"access request_id=(\S+) .*? backend=(\S+)")
_RELOADED = "configuration reloaded:"
_INVALID = "still running the previous one"  # the summary line of an invalid file
_REFUSED = "reload refused:"
_NOT_APPLIED = "still running the previous configuration"  # refused (or failed) reloads

UpstreamFactory = Callable[[str], FakeUpstreamProcess]
RelaydFactory = Callable[..., RelaydProcess]


# -- configuration --------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (all bound at once, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tls(certs: CertificateFiles) -> dict[str, str]:
    return {"certificate": str(certs.chain), "private_key": str(certs.key)}


def backend(name: str, upstream: FakeUpstreamProcess, **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": upstream.url, "api_key": KEYS[name], **extra}


def relay_config(
    listen: list[dict[str, Any]],
    anthropic_backends: list[dict[str, Any]],
    openai_backends: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One client, an admin listener on an ephemeral port, anthropic (and openai)."""
    providers = [{"name": "anthropic", "type": "anthropic", "backends": anthropic_backends}]
    routes = [{"api": "anthropic", "provider": "anthropic"}]
    if openai_backends is not None:
        providers.append({"name": "openai", "type": "openai", "backends": openai_backends})
        routes.append({"api": "openai", "provider": "openai"})
    return {
        "listen": listen,
        "admin": {"address": "127.0.0.1:0"},
        "clients": [{"name": "team-a", "key_sha256": sha(CLIENT_KEY)}],
        "providers": providers,
        "routes": routes,
        # The fake upstream's per-request knobs travel as x-fake-* headers.
        "forward_headers": ["x-fake-*"],
        **extra,
    }


# -- driving a running relayd ---------------------------------------------------------------


def reload_outcomes(log: str) -> int:
    """How many reloads have finished, whatever their result."""
    return log.count(_RELOADED) + log.count(_INVALID) + log.count(_NOT_APPLIED)


def reload(relay: RelaydProcess, config: dict[str, Any], expect: str = _RELOADED) -> None:
    """Rewrite relayd's file, SIGHUP, and wait until the reload has been logged."""
    log = relay.log_text()
    done, seen = reload_outcomes(log), log.count(expect)
    staged = relay.config_path.with_suffix(".staged")
    staged.write_text(yaml.safe_dump(config))
    os.replace(staged, relay.config_path)  # relayd never reads a half-written file
    relay.signal(signal.SIGHUP)
    wait_for(lambda: reload_outcomes(relay.log_text()) > done, 20,
             f"reload #{done + 1} to finish", relay.log_path)
    log = relay.log_text()
    assert reload_outcomes(log) == done + 1
    assert log.count(expect) == seen + 1, log[-3000:]


def admin_get(relay: RelaydProcess, path: str, token: str | None = None) -> httpx2.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx2.get(relay.admin_url() + path, headers=headers, timeout=10)


def anthropic_weights(relay: RelaydProcess) -> dict[str, int]:
    response = admin_get(relay, "/admin/backends")
    assert response.status_code == 200
    return {b["name"]: b["weight"] for b in response.json()["backends"]
            if b["provider"] == "anthropic"}


def metric_samples(relay: RelaydProcess, name: str) -> list[tuple[dict[str, str], float]]:
    """Samples named ``name`` in /metrics, parsed by prometheus_client's own parser."""
    response = admin_get(relay, "/metrics")
    assert response.status_code == 200
    return exposition.metric_samples(response.text, name)


def reload_counts(relay: RelaydProcess) -> dict[str, float]:
    samples = metric_samples(relay, "relayd_config_reloads_total")
    return {labels["result"]: value for labels, value in samples}


def gauge(relay: RelaydProcess, name: str) -> float:
    samples = metric_samples(relay, name)
    assert len(samples) == 1, samples
    return samples[0][1]


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


def answers(url: str) -> bool:
    """Whether a relay listener at ``url`` serves a request (an authenticated model list)."""
    response = httpx2.get(url + "/v1/models", headers=ANTHROPIC_HEADERS, timeout=10)
    return response.status_code == 200 and bool(response.json()["data"])


def refuses_connections(url: str) -> bool:
    try:
        socket.create_connection(host_port(url), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def leaf_der(certs: CertificateFiles) -> bytes:
    """DER of the server certificate (the first block of the chain file)."""
    pem = certs.chain.read_text()
    end = "-----END CERTIFICATE-----"
    return ssl.PEM_cert_to_DER_cert(pem[: pem.index(end) + len(end)])


def anthropic_stream_events(
    client: httpx2.Client, base: str, chunk_delay: float, chunks: int
) -> list[str]:
    """Event types of one raw Anthropic stream; raises if the stream breaks off."""
    headers = {**ANTHROPIC_HEADERS, "x-fake-chunk-delay": str(chunk_delay),
               "x-fake-chunks": str(chunks)}
    with client.stream("POST", base + "/v1/messages", json={**MESSAGE, "stream": True},
                       headers=headers) as response:
        assert response.status_code == 200, response.read()
        return [line[7:] for line in response.iter_lines() if line.startswith("event: ")]


# -- the load generator ---------------------------------------------------------------------


@dataclass
class Load:
    """Threads sending a mix of JSON requests and ~1 s streams, over TLS and plain HTTP."""

    plain: str
    tls: str
    verify: ssl.SSLContext
    max_iterations: int = 5000
    pause: float = 0.01  # between two requests of one thread, so the threads share the CPU
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    completed: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    streaming: int = 0  # streams that have started and not ended, right now
    streams_completed: int = 0
    threads: list[threading.Thread] = field(default_factory=list)

    STREAM_HEADERS = {"x-fake-chunk-delay": "0.1", "x-fake-chunks": "6"}  # ~1 s

    def start(self) -> None:
        workers: list[tuple[str, Callable[[], Callable[[], None]]]] = [
            ("anthropic-json-tls", self._anthropic_json),
            ("anthropic-stream-tls", self._anthropic_stream),
            ("raw-stream-plain", self._raw_stream),
            ("openai-plain", self._openai),
        ]
        for name, setup in workers:
            thread = threading.Thread(target=self._run, args=(name, setup), daemon=True)
            self.threads.append(thread)
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self.threads), "a load thread did not finish"

    def total(self) -> int:
        with self.lock:
            return sum(self.completed.values())

    def _run(self, name: str, setup: Callable[[], Callable[[], None]]) -> None:
        try:
            step = setup()
        except Exception as exc:
            self.failures.append(f"{name} setup: {exc!r}")
            return
        for _ in range(self.max_iterations):
            if self.stop.wait(self.pause):
                return
            try:
                step()
            except Exception as exc:
                with self.lock:
                    self.failures.append(f"{name}: {exc!r}")
            else:
                with self.lock:
                    self.completed[name] += 1

    def _streaming(self, delta: int) -> None:
        with self.lock:
            self.streaming += delta

    def _stream_completed(self) -> None:
        with self.lock:
            self.streams_completed += 1

    def _http(self) -> httpx2.Client:
        return httpx2.Client(verify=self.verify, timeout=30)

    def _anthropic_client(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(api_key=CLIENT_KEY, base_url=self.tls,
                                   http_client=self._http(), max_retries=0)

    def _anthropic_json(self) -> Callable[[], None]:
        client = self._anthropic_client()

        def step() -> None:
            message = client.messages.create(**MESSAGE)
            assert message.content[0].text, message

        return step

    def _anthropic_stream(self) -> Callable[[], None]:
        client = self._anthropic_client()

        def step() -> None:
            types: list[str] = []
            with client.messages.stream(**MESSAGE, extra_headers=self.STREAM_HEADERS) as stream:
                try:
                    for event in stream:
                        if not types:
                            self._streaming(1)
                        types.append(event.type)
                finally:
                    if types:
                        self._streaming(-1)
                final = stream.get_final_message()
            assert types[-1] == "message_stop" and "error" not in types, types
            assert final.usage.output_tokens == 6
            self._stream_completed()

        return step

    def _raw_stream(self) -> Callable[[], None]:
        client = httpx2.Client(timeout=30)

        def step() -> None:
            self._streaming(1)
            try:
                types = anthropic_stream_events(client, self.plain, 0.1, 6)
            finally:
                self._streaming(-1)
            assert types[-1] == "message_stop" and "error" not in types, types
            assert types.count("content_block_delta") == 6, types
            self._stream_completed()

        return step

    def _openai(self) -> Callable[[], None]:
        client = openai.OpenAI(api_key=CLIENT_KEY, base_url=self.plain + "/v1",
                               http_client=self._http(), max_retries=0)
        turn = 0

        def step() -> None:
            nonlocal turn
            turn += 1
            messages: Any = [{"role": "user", "content": "Hi"}]
            if turn % 2:
                completion = client.chat.completions.create(model="gpt-4o", messages=messages)
                assert completion.choices[0].message.content
                return
            stream = client.chat.completions.create(
                model="gpt-4o", messages=messages, stream=True,
                stream_options={"include_usage": True}, extra_headers=self.STREAM_HEADERS,
            )
            self._streaming(1)
            try:
                chunks = list(stream)
            finally:
                self._streaming(-1)
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
            assert reasons[-1] == "stop", reasons
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
            self._stream_completed()

        return step


# -- 1. reload under load -------------------------------------------------------------------


def smooth_wrr(weights: dict[str, int], n: int) -> list[str]:
    """The first ``n`` picks of smooth weighted round-robin (nginx's; ties to the first)."""
    current = dict.fromkeys(weights, 0)
    picks = []
    for _ in range(n):
        for name, weight in weights.items():
            current[name] += weight
        best = max(current, key=lambda name: current[name])  # max keeps the first of ties
        current[best] -= sum(weights.values())
        picks.append(best)
    return picks


def test_reload_under_load(
    certs: CertificateFiles,
    tmp_path: Path,
    upstream_factory: UpstreamFactory,
    relayd_factory: RelaydFactory,
) -> None:
    up1, up2 = upstream_factory("up1"), upstream_factory("up2")
    certs2 = make_certificates(tmp_path / "certs2")
    plain_port, tls_port = free_ports(2)

    def make(certificates: CertificateFiles, backends: list[dict[str, Any]]) -> dict[str, Any]:
        listen: list[dict[str, Any]] = [
            {"address": f"127.0.0.1:{plain_port}"},
            {"address": f"127.0.0.1:{tls_port}", "tls": tls(certificates)},
        ]
        return relay_config(listen, backends, [backend("o1", up1)])

    config_a = make(certs, [backend("a1", up1, weight=3), backend("a2", up2, weight=1)])
    config_b = make(certs2, [backend("a1", up1, weight=1), backend("a2", up2, weight=3),
                             backend("a3", up2, weight=2)])
    invalid = make(certs2, [backend("a1", up1, weight=1), backend("a2", up2, weight=0)])
    weights_a, weights_b = {"a1": 3, "a2": 1}, {"a1": 1, "a2": 3, "a3": 2}

    relay = relayd_factory(config_a)
    plain, tls_url = relay.url("http"), relay.url("https")
    assert anthropic_weights(relay) == weights_a
    both_cas = ssl.create_default_context(cafile=str(certs.ca))
    both_cas.load_verify_locations(cafile=str(certs2.ca))
    load = Load(plain, tls_url, both_cas)
    load.start()
    old_connection: http.client.HTTPSConnection | None = None
    old_socket: Any = None
    try:
        wait_for(lambda: load.total() >= 8 or load.failures, 30, "the load to get going")
        for i in range(20):
            # Every reload lands while a stream is in the middle of its events, and after
            # another stream has completed since the previous reload.
            streamed = load.streams_completed
            wait_for(lambda: load.streams_completed > streamed  # noqa: B023
                     or load.failures, 30, "another stream to complete")
            wait_for(lambda: load.streaming > 0 or load.failures, 30, "a stream in flight")
            if i == 10:
                reload(relay, invalid, expect=_INVALID)
                log = relay.log_text()
                assert ("reload rejected: providers[0].backends[1].weight: "
                        "must be a positive integer, got 0") in log
                assert f"invalid configuration {relay.config_path} (1 errors)" in log
                # Ignored: the relay serves, with the weights of the last valid file (B).
                assert answers(plain)
                assert anthropic_weights(relay) == weights_b
                continue
            if i == 19:
                # A keep-alive connection opened on certificate set 1, used across the reload.
                old_connection = http.client.HTTPSConnection(
                    "127.0.0.1", tls_port, timeout=10,
                    context=ssl.create_default_context(cafile=str(certs.ca)),
                )
                old_connection.connect()
                assert old_connection.sock.getpeercert(binary_form=True) == leaf_der(certs)
                old_socket = old_connection.sock
                assert _post_message(old_connection) == 200
            reload(relay, config_a if i % 2 == 0 else config_b)
        streamed = load.streams_completed
        wait_for(lambda: load.streams_completed > streamed + 2 or load.failures, 30,
                 "streams after the last reload")
        load.finish()
        assert load.failures == [], load.failures[:10]
        assert min(load.completed.values()) >= 5, load.completed  # every worker took part
    finally:
        load.finish()
    up1.reset()
    up2.reset()

    # The final state is B: weights 1:3 plus a3 ...
    assert anthropic_weights(relay) == weights_b
    # ... and a fresh batch of sequential requests is split exactly by smooth WRR.
    batch = 2 * sum(weights_b.values())
    with httpx2.Client(base_url=plain, timeout=30) as client:
        ids = []
        for _ in range(batch):
            response = client.post("/v1/messages", json=MESSAGE, headers=ANTHROPIC_HEADERS)
            assert response.status_code == 200, response.text
            ids.append(response.headers["x-relayd-request-id"])

    def served_by() -> list[str] | None:
        found = dict(_ACCESS.findall(relay.log_text()))
        return [found[i] for i in ids] if all(i in found for i in ids) else None

    order = wait_for(served_by, 10, "the access log of the batch", relay.log_path)
    # The load ran on after the last reload, so the batch starts somewhere in the cycle.
    cycle = sum(weights_b.values())
    picks = smooth_wrr(weights_b, batch + cycle)
    assert order in [picks[k:k + batch] for k in range(cycle)], order
    recorded = up1.requests() + up2.requests()
    keys = Counter(r["headers"]["x-api-key"][0] for r in recorded)
    assert keys == {KEYS[name]: 2 * weight for name, weight in weights_b.items()}

    # New handshakes get certificate set 2; the connection from before still works.
    host, port = host_port(tls_url)
    fresh = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((host, port)))
    assert fresh == leaf_der(certs2)
    with socket.create_connection((host, port), timeout=10) as raw:
        with ssl.create_default_context(cafile=str(certs2.ca)).wrap_socket(
            raw, server_hostname="127.0.0.1"
        ) as verified:
            assert verified.getpeercert(binary_form=True) == leaf_der(certs2)
    assert old_connection is not None
    assert _post_message(old_connection) == 200
    assert old_connection.sock is old_socket
    assert old_connection.sock.getpeercert(binary_form=True) == leaf_der(certs)
    old_connection.close()

    assert reload_counts(relay) == {"ok": 19, "invalid": 1, "refused": 0}


def _post_message(connection: http.client.HTTPSConnection) -> int:
    body = json.dumps(MESSAGE).encode()
    connection.request("POST", "/v1/messages", body=body,
                       headers={**ANTHROPIC_HEADERS, "content-type": "application/json"})
    response = connection.getresponse()
    payload = json.loads(response.read())
    assert payload["content"][0]["text"], payload
    return response.status


# -- 2. and 3. listeners changed by a reload ------------------------------------------------


def test_reload_adds_and_removes_a_listener(
    upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    up = upstream_factory("up1")
    base_port, extra_port = free_ports(2)
    base = [{"address": f"127.0.0.1:{base_port}"}]
    extra_url = f"http://127.0.0.1:{extra_port}"
    relay = relayd_factory(relay_config(base, [backend("a1", up)]))
    assert refuses_connections(extra_url)

    reload(relay, relay_config([*base, {"address": f"127.0.0.1:{extra_port}"}],
                               [backend("a1", up)]))
    assert f"relayd listening on {extra_url}" in relay.log_text()
    assert answers(extra_url)
    assert answers(relay.url("http"))

    reload(relay, relay_config(base, [backend("a1", up)]))
    assert f"closing listener 127.0.0.1:{extra_port}" in relay.log_text()
    wait_for(lambda: refuses_connections(extra_url), 10, "the removed listener to close",
             relay.log_path)
    assert answers(relay.url("http"))
    assert reload_counts(relay) == {"ok": 2, "invalid": 0, "refused": 0}


def test_reload_refuses_switching_a_listener_to_tls(
    certs: CertificateFiles, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    up = upstream_factory("up1")
    (port,) = free_ports(1)
    relay = relayd_factory(
        relay_config([{"address": f"127.0.0.1:{port}"}], [backend("a1", up, weight=2)])
    )
    switched = relay_config([{"address": f"127.0.0.1:{port}", "tls": tls(certs)}],
                            [backend("a1", up, weight=5)])
    reload(relay, switched, expect=_REFUSED)
    assert (f"reload refused: listener 127.0.0.1:{port} would switch between plain HTTP "
            "and TLS; that needs a restart") in relay.log_text()
    # The old listener still speaks plain HTTP, and nothing of the refused file applies.
    assert answers(relay.url("http"))
    assert anthropic_weights(relay) == {"a1": 2}
    assert reload_counts(relay) == {"ok": 0, "invalid": 0, "refused": 1}


def test_reload_keeps_ephemeral_listeners_as_they_are(
    certs: CertificateFiles, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    up = upstream_factory("up1")
    config = relay_config(
        [{"address": "127.0.0.1:0"}, {"address": "127.0.0.1:0", "tls": tls(certs)}],
        [backend("a1", up)],
    )
    relay = relayd_factory(config)
    reload(relay, config)
    assert relay.log_text().count("relayd listening on") == 2, relay.log_text()[-2000:]


# -- 4. the shutdown drain ------------------------------------------------------------------


@dataclass
class Streams:
    """``count`` concurrent Anthropic streams on one asyncio httpx2 client, in a thread."""

    url: str
    count: int
    chunk_delay: float
    chunks: int
    started: int = 0  # streams that have received their first event
    results: list[tuple[list[str], BaseException | None]] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> Streams:
        self.thread = threading.Thread(target=asyncio.run, args=(self._all(),), daemon=True)
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the streams did not end"
        assert len(self.results) == self.count

    async def _all(self) -> None:
        limits = httpx2.Limits(max_connections=self.count + 10)
        async with httpx2.AsyncClient(timeout=60, limits=limits) as client:
            await asyncio.gather(*(self._one(client) for _ in range(self.count)))

    async def _one(self, client: httpx2.AsyncClient) -> None:
        headers = {**ANTHROPIC_HEADERS, "x-fake-chunk-delay": str(self.chunk_delay),
                   "x-fake-chunks": str(self.chunks)}
        types: list[str] = []
        error: BaseException | None = None
        try:
            async with client.stream("POST", self.url + "/v1/messages", headers=headers,
                                     json={**MESSAGE, "stream": True}) as response:
                if response.status_code != 200:
                    raise AssertionError(f"status {response.status_code}")
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        if not types:
                            self.started += 1
                        types.append(line[7:])
        except Exception as exc:
            error = exc
        self.results.append((types, error))


def assert_shut_down_cleanly(relay: RelaydProcess, exit_code: int) -> None:
    """The process stopped by itself through twistd's normal shutdown, with status 0."""
    log = relay.log_text()
    assert "Main loop terminated." in log and "Server Shut Down." in log, log[-2000:]
    assert exit_code == 0, exit_code


def readyz_draining(relay: RelaydProcess) -> bool:
    response = admin_get(relay, "/readyz")
    return response.status_code == 503 and response.json() == {"status": "draining"}


def test_sigterm_drains_open_streams(
    upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    up = upstream_factory("up1")
    relay = relayd_factory(relay_config([{"address": "127.0.0.1:0"}], [backend("a1", up)]))
    url = relay.url("http")
    relay.admin_url()
    streams = Streams(url, 50, chunk_delay=0.25, chunks=10).start()  # 14 events, ~3.5 s
    wait_for(lambda: streams.started == 50 or streams.results, 30, "50 streams to start",
             relay.log_path)
    wait_for(lambda: gauge(relay, "relayd_streams_open") == 50, 10, "relayd_streams_open 50")

    relay.signal(signal.SIGTERM)
    assert relay.process is not None
    wait_for(lambda: readyz_draining(relay), 10, "/readyz to say draining", relay.log_path)
    wait_for(lambda: refuses_connections(url), 10, "the relay to stop accepting")
    assert relay.process.poll() is None  # refusing new connections while still draining
    exit_code = relay.process.wait(30)
    streams.join(10)

    for types, error in streams.results:
        assert error is None, repr(error)
        assert types[-1] == "message_stop" and "error" not in types, types
        assert types.count("content_block_delta") == 10, types
    log = relay.log_text()
    assert "draining 50 in-flight requests (up to 30s)" in log
    assert "shutdown timeout" not in log
    assert log.count("outcome=ok") == 50
    assert_shut_down_cleanly(relay, exit_code)


def test_sigterm_aborts_streams_left_after_shutdown_timeout(
    upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    up = upstream_factory("up1")
    relay = relayd_factory(
        relay_config([{"address": "127.0.0.1:0"}], [backend("a1", up)], shutdown_timeout=1)
    )
    streams = Streams(relay.url("http"), 5, chunk_delay=1.0, chunks=16).start()  # ~20 s
    wait_for(lambda: streams.started == 5 or streams.results, 30, "5 streams to start",
             relay.log_path)
    wait_for(lambda: gauge(relay, "relayd_streams_open") == 5, 10, "relayd_streams_open 5")

    relay.signal(signal.SIGTERM)
    assert relay.process is not None
    exit_code = relay.process.wait(15)  # well before the streams would have ended
    streams.join(10)

    for types, error in streams.results:
        assert isinstance(error, httpx2.TransportError), repr(error)  # cut, not ended
        assert types and "message_stop" not in types, types
    log = relay.log_text()
    assert "draining 5 in-flight requests (up to 1s)" in log
    assert "shutdown timeout: aborting 5 unfinished requests" in log
    assert log.count("outcome=aborted") == 5
    assert_shut_down_cleanly(relay, exit_code)


# -- 5. sd_notify ---------------------------------------------------------------------------


def notification(sock: socket.socket) -> dict[str, str]:
    """The next sd_notify datagram as a dict of its ``KEY=VALUE`` lines."""
    lines = sock.recv(4096).decode().splitlines()
    return dict(line.split("=", 1) for line in lines)


def test_sd_notify_ready_reloading_stopping(
    tmp_path: Path, relayd_factory: RelaydFactory
) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)  # every recv below is bounded
        relay = relayd_factory({"listen": [{"address": "127.0.0.1:0"}]},
                               env={"NOTIFY_SOCKET": str(path)})
        assert notification(sock)["READY"] == "1"

        relay.signal(signal.SIGHUP)
        reloading = notification(sock)
        assert reloading["RELOADING"] == "1"
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert notification(sock)["READY"] == "1"
        assert relay.log_text().count(_RELOADED) == 1

        relay.signal(signal.SIGTERM)
        assert notification(sock)["STOPPING"] == "1"
        assert relay.process is not None
        assert_shut_down_cleanly(relay, relay.process.wait(15))


# -- 6. the admin listener ------------------------------------------------------------------


def test_admin_health_token_and_metrics(
    tmp_path: Path, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    up = upstream_factory("up1")
    token = "admin-" + os.urandom(8).hex()
    token_file = tmp_path / "admin-token"
    token_file.write_text(token + "\n")
    config = relay_config([{"address": "127.0.0.1:0"}], [backend("a1", up)])
    config["admin"]["token_file"] = str(token_file)
    relay = relayd_factory(config)

    healthz = admin_get(relay, "/healthz")
    assert (healthz.status_code, healthz.json()) == (200, {"status": "ok"})
    readyz = admin_get(relay, "/readyz")
    assert (readyz.status_code, readyz.json()) == (200, {"status": "ready"})

    denied = admin_get(relay, "/admin/backends")
    assert denied.status_code == 401
    assert denied.headers["www-authenticate"] == "Bearer"
    assert set(denied.json()) == {"error"}  # a body to look in
    assert token not in denied.text
    assert admin_get(relay, "/admin/backends", token="not-" + token).status_code == 401
    allowed = admin_get(relay, "/admin/backends", token=token)
    assert allowed.status_code == 200
    assert [(b["name"], b["healthy"], b["breaker"]["state"], b["in_flight"])
            for b in allowed.json()["backends"]] == [("a1", True, "closed", 0)]

    with httpx2.Client(base_url=relay.url("http"), timeout=30) as client:
        for _ in range(3):
            response = client.post("/v1/messages", json=MESSAGE, headers=ANTHROPIC_HEADERS)
            assert response.status_code == 200
    samples = metric_samples(relay, "relayd_requests_total")  # /metrics needs no token
    assert samples == [({"client": "team-a", "api": "anthropic", "provider": "anthropic",
                         "backend": "a1", "model": "claude-test-1", "status": "200"}, 3.0)]
    assert gauge(relay, "relayd_requests_in_flight") == 0


def test_readyz_fails_when_a_routed_provider_has_no_usable_backend(
    upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory
) -> None:
    up1, up2 = upstream_factory("up1"), upstream_factory("up2")
    relay = relayd_factory(relay_config(
        [{"address": "127.0.0.1:0"}], [backend("a1", up1)], [backend("o1", up2)],
        health={"interval": 0.2, "timeout": 0.2, "unhealthy_after": 1},
        breaker={"window": 2, "failures": 2, "cooldown": 60, "max_cooldown": 60},
    ))
    assert admin_get(relay, "/readyz").status_code == 200

    up2.stop()  # openai's only backend goes down
    with httpx2.Client(base_url=relay.url("http"), timeout=30) as client:
        for _ in range(5):
            response = client.post(
                "/v1/chat/completions", headers={"authorization": f"Bearer {CLIENT_KEY}"},
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
            )
            assert response.status_code in (502, 503), response.text
            if admin_get(relay, "/readyz").status_code == 503:
                break
        readyz = admin_get(relay, "/readyz")
        assert readyz.status_code == 503
        assert readyz.json() == {"status": "not ready",
                                 "problems": ["provider 'openai' has no usable backend"]}
        states = {b["name"]: b["breaker"]["state"]
                  for b in admin_get(relay, "/admin/backends").json()["backends"]}
        assert states == {"a1": "closed", "o1": "open"}
        # The other provider still serves.
        response = client.post("/v1/messages", json=MESSAGE, headers=ANTHROPIC_HEADERS)
        assert response.status_code == 200
