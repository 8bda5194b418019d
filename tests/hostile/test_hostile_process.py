"""The hostile-input suite: a real relayd on 127.0.0.1 (plain and TLS with HTTP/2) and a
deliberately broken fake upstream, attacked the way the adversarial campaign did, with
smaller counts. Each test states the finding it guards; all are bounded in time and
count, and assert on statuses, counts, logs and RSS bounds, never on timings.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import ContinuationFrame, HeadersFrame

from relayd.testing.certs import TestCertificates, make_certificates
from relayd.testing.loadgen import memory_kib
from relayd.testing.processes import FakeUpstreamProcess, RelaydProcess

KEY = "sk-relay-hostile"
MIB = 1024


@dataclass
class Stack:
    upstream: FakeUpstreamProcess
    relay: RelaydProcess
    certs: TestCertificates

    @property
    def pid(self) -> int:
        assert self.relay.process is not None
        return self.relay.process.pid

    def rss_mib(self) -> float:
        return memory_kib(self.pid)["VmRSS"] / MIB

    def port(self, scheme: str = "http") -> int:
        return int(self.relay.url(scheme).rsplit(":", 1)[1])

    def call(self, path: str, body: bytes | None, headers: dict[str, str] | None = None,
             method: str = "POST") -> tuple[int, bytes]:
        request = urllib.request.Request(self.relay.url() + path, data=body, method=method)
        request.add_header("content-type", "application/json")
        request.add_header("anthropic-version", "2023-06-01")
        request.add_header("x-api-key", KEY)
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def message(self, **extra: Any) -> tuple[int, bytes]:
        body = {"model": "claude-x", "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}], **extra}
        return self.call("/v1/messages", json.dumps(body).encode())

    def admin(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.relay.admin_url() + path, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def bad_log_lines(self) -> list[str]:
        return [line for line in self.relay.log_text().splitlines()
                if "#critical]" in line or "Traceback" in line or "Unhandled error" in line]

    def breakers(self) -> set[str]:
        backends = json.loads(self.admin("/admin/backends")[1])["backends"]
        return {b["breaker"]["state"] for b in backends}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("hostile")
    certs = make_certificates(work / "certs")
    upstream = FakeUpstreamProcess(work, "upstream").start()
    relay: RelaydProcess | None = None
    config = {
        "listen": [
            {"address": "127.0.0.1:0"},
            {"address": "127.0.0.1:0",
             "tls": {"certificate": str(certs.chain), "private_key": str(certs.key)}},
        ],
        "admin": {"address": "127.0.0.1:0"},
        "clients": [{"name": "c", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
        "providers": [
            {"name": "anthropic", "type": "anthropic",
             "backends": [{"name": "a", "url": upstream.url, "api_key": "sk-up"}]},
            {"name": "openai", "type": "openai",
             "backends": [{"name": "o", "url": upstream.url, "api_key": "sk-up"}]},
        ],
        "routes": [
            {"api": "anthropic", "models": ["gpt-*"], "provider": "openai"},  # translated
            {"api": "anthropic", "provider": "anthropic"},
            {"api": "openai", "provider": "openai"},
        ],
        "forward_headers": ["x-fake-*"],
        "connections": {"max": 200, "head_timeout": 2},
        "half_close": "answer",
    }
    try:
        relay = RelaydProcess(work / "relayd", config).start(2)
        yield Stack(upstream, relay, certs)
    finally:
        if relay is not None:
            relay.stop()
        upstream.stop()


# -- slow clients -----------------------------------------------------------------------------


def test_slowloris_cannot_stop_ordinary_requests(stack: Stack) -> None:
    """The campaign: 1,100 connections each trickling a partial request line answered 0 of
    20 ordinary requests and logged nothing. With the bound (200 here) the oldest idle
    trickler makes room for each new client, and every trickler gets a 408 at the head
    deadline (2 s here)."""
    port = stack.port()

    async def slowloris() -> list[bytes]:
        async def one() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/mess")
            answer = asyncio.ensure_future(reader.read(4096))
            try:
                for _ in range(10):  # a byte every 0.5 s: 5 s unless cut
                    await asyncio.sleep(0.5)
                    if answer.done():
                        break
                    writer.write(b"a")
                    await writer.drain()
            except ConnectionError:
                pass
            try:
                received = await asyncio.wait_for(answer, 5)
            except (TimeoutError, ConnectionError):
                received = b""
            writer.close()
            return received

        return list(await asyncio.gather(*(one() for _ in range(300))))

    async def ordinary() -> list[int]:
        await asyncio.sleep(0.5)
        loop = asyncio.get_running_loop()
        return [await loop.run_in_executor(None, lambda: stack.message()[0]) for _ in range(20)]

    async def both() -> tuple[list[bytes], list[int]]:
        trickled, statuses = await asyncio.gather(slowloris(), ordinary())
        return trickled, statuses

    trickled, statuses = asyncio.run(both())
    assert statuses == [200] * 20
    timed_out = sum(1 for r in trickled if r.startswith(b"HTTP/1.1 408"))
    assert timed_out > 0 and all(r == b"" or r.startswith(b"HTTP/1.1 408") for r in trickled)
    metrics = stack.admin("/metrics")[1].decode()
    assert 'relayd_client_connections_closed_total{reason="evicted"}' in metrics
    assert 'relayd_client_connections_closed_total{reason="head_timeout"}' in metrics
    log = stack.relay.log_text()
    assert 0 < log.count("the bound (connections.max)") <= 2  # logged, at most every 10 s


def test_a_half_closing_client_is_answered(stack: Stack) -> None:
    """The campaign: a client that half-closes after its request got no answer."""
    body = json.dumps({"model": "claude-x", "max_tokens": 5, "messages": []}).encode()
    with socket.create_connection(("127.0.0.1", stack.port()), timeout=30) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: " + KEY.encode() +
                     b"\r\nanthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n" % len(body) + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK") and b'"type":"message"' in answer


# -- HTTP/2 -----------------------------------------------------------------------------------


def h2_socket(stack: Stack) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(stack.certs.ca))
    context.set_alpn_protocols(["h2"])
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", stack.port("https")),
                                                        timeout=30),
                               server_hostname="127.0.0.1")
    assert sock.selected_alpn_protocol() == "h2"
    return sock


def test_a_continuation_flood_is_cut_off_without_buffering(stack: Stack) -> None:
    """The campaign: HEADERS without END_HEADERS then 12,000 x 16 KB CONTINUATION frames on
    4 connections grew RSS from 61 MB to 863 MB, for good."""
    before = stack.rss_mib()
    block = ContinuationFrame(1)
    block.data = b"\x00" * 16000
    frame = block.serialize()
    sent = []
    for _ in range(4):
        sock = h2_socket(stack)
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        connection.initiate_connection()
        sock.sendall(connection.data_to_send())
        headers = HeadersFrame(1)
        headers.data = b"\x82\x84\x86"  # :method GET, :path /, :scheme http (indexed)
        count = 0
        try:
            sock.sendall(headers.serialize())
            for count in range(12_000):  # noqa: B007
                sock.sendall(frame)
        except (ssl.SSLError, OSError):
            pass
        sent.append(count)
        sock.close()
    assert stack.message()[0] == 200  # served after the flood (so past it, too)
    assert max(sent) < 12_000 - 1, "the relay read all of it"
    assert stack.rss_mib() - before < 64
    assert not stack.bad_log_lines()


def test_stream_resets_are_clients_gone_and_a_flood_gets_goaway(stack: Stack) -> None:
    """The campaign: 4,000 HEADERS+RST_STREAM gave 1,050 critical lines, and 19,000 resets
    with a valid key opened the breaker."""
    sock = h2_socket(stack)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    sock.sendall(connection.data_to_send())
    headers = [(":method", "GET"), (":path", "/v1/models/claude-x"), (":scheme", "https"),
               (":authority", "127.0.0.1"), ("x-api-key", KEY),
               ("anthropic-version", "2023-06-01")]
    sent = 0
    goaway = None
    try:
        for _ in range(5000):
            stream = connection.get_next_available_stream_id()
            connection.send_headers(stream, headers, end_stream=True)
            connection.reset_stream(stream)
            sock.sendall(connection.data_to_send())
            sent += 1
        sock.settimeout(5)
        while goaway is None:
            data = sock.recv(65536)
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    goaway = event.error_code
    except (ssl.SSLError, OSError):
        pass
    sock.close()
    assert goaway is not None  # the connection was told off past the reset budget
    assert stack.message()[0] == 200
    assert stack.breakers() == {"closed"}
    assert not stack.bad_log_lines()
    assert "status=499 outcome=client_gone" in stack.relay.log_text()


# -- hostile upstreams and bodies -------------------------------------------------------------


def test_a_gzip_bomb_from_the_upstream_is_a_502_without_inflating_it(stack: Stack) -> None:
    """The campaign: 1 MB of gzip inflating to 1 GiB rose RSS by 2 GB and stalled every
    request for 4.4 s (4 MB: MemoryError and a critical traceback)."""
    before = stack.rss_mib()
    status, body = stack.call(
        "/v1/messages",
        json.dumps({"model": "gpt-4o", "max_tokens": 8,
                    "messages": [{"role": "user", "content": "hi"}]}).encode(),
        {"x-fake-gzip-bomb-mib": "512"},
    )
    assert status == 502 and b"larger than" in body
    assert stack.rss_mib() - before < 160  # at most the 64 MiB cap, decoded, in pieces
    assert not stack.bad_log_lines()


def test_a_flood_of_upstream_headers_is_a_502(stack: Stack) -> None:
    status, body = stack.call(
        "/v1/messages",
        json.dumps({"model": "claude-x", "max_tokens": 8, "messages": []}).encode(),
        {"x-fake-flood-headers": "20000"},
    )
    assert status == 502 and b"larger than" in body  # 20,000 headers: past 256 KiB


def test_a_lone_surrogate_model_name_leaves_metrics_scrapable(stack: Stack) -> None:
    """The campaign: {"model": "gpt-\\udfff"} made every later scrape a 500."""
    status, _ = stack.call("/v1/chat/completions", b'{"model": "gpt-\\udfff", "messages": []}',
                           {"authorization": f"Bearer {KEY}"})
    assert status in (200, 500)  # relayed (the fake upstream itself chokes on the name)
    scraped, text = stack.admin("/metrics")
    assert scraped == 200 and b'model="other"' in text


def test_deep_json_and_climbing_model_ids_are_400s(stack: Stack) -> None:
    status, body = stack.call("/v1/messages", b'{"model":"x","messages":' + b"[" * 5000 + b"]}")
    assert status == 400 and json.loads(body)["request_id"]
    status, _ = stack.call("/v1/models/..%2F..%2Fadmin", None, method="GET")
    assert status == 400
    assert not stack.bad_log_lines()


# -- what held up in the campaign: kept so ------------------------------------------------------


def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
        return answer


@pytest.mark.parametrize(
    "head",
    [
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin/backends HTTP/1.1\r\n\r\n",
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n"
        b"\r\n{}{}",
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GARBAGE\r\n\r\n",
    ],
)
def test_smuggling_shapes_and_malformed_http_are_400s(stack: Stack, head: bytes) -> None:
    answer = raw_exchange(stack.port(), head)
    assert answer.startswith(b"HTTP/1.1 400")
    assert answer.count(b"HTTP/1.1") == 1  # nothing smuggled behind it


def test_an_oversized_body_is_a_413_without_buffering_it(stack: Stack) -> None:
    before = stack.rss_mib()
    size = 64 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", stack.port()), timeout=60) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: " + KEY.encode() +
                     b"\r\ncontent-length: %d\r\n\r\n" % size)
        chunk = b"x" * (1024 * 1024)
        try:
            for _ in range(64):
                sock.sendall(chunk)
        except OSError:
            pass
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413")
    assert stack.rss_mib() - before < 32


def test_admin_paths_are_not_on_the_relay_listener_and_old_tls_is_refused(stack: Stack) -> None:
    status, _ = stack.call("/admin/backends", None, method="GET")
    assert status == 404
    status, _ = stack.call("/metrics", None, method="GET")
    assert status == 404
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", stack.port("https")), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="127.0.0.1")
