"""A real ``twistd -n relayd`` between the official SDKs and the fake upstream."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import h2.config
import h2.connection
import h2.events
import httpx2
import openai
import pytest
from support import CLIENT_KEY, LIMITED_KEY, UPSTREAM_KEYS, backend, relay_config

from relayd.testing.certs import TestCertificates
from relayd.testing.processes import FakeUpstreamProcess, ProcessGroup, RelaydProcess, wait_for


@dataclass
class Setup:
    relay: RelaydProcess
    anthropic_up: FakeUpstreamProcess
    anthropic_up2: FakeUpstreamProcess
    openai_up: FakeUpstreamProcess
    ca: ssl.SSLContext
    certs: TestCertificates


@pytest.fixture
def setup(
    certs: TestCertificates,
    ca_context: ssl.SSLContext,
    upstream_factory: Callable[[str], FakeUpstreamProcess],
    relayd_factory: Callable[..., RelaydProcess],
) -> Iterator[Setup]:
    a1, a2, o1 = upstream_factory("a1"), upstream_factory("a2"), upstream_factory("o1")
    config = relay_config(
        certs,
        [backend("a1", a1, weight=3), backend("a2", a2, weight=1)],
        [backend("o1", o1)],
    )
    yield Setup(relayd_factory(config), a1, a2, o1, ca_context, certs)


def anthropic_client(setup: Setup, key: str = CLIENT_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key=key,
        base_url=setup.relay.url("https"),
        http_client=httpx2.Client(verify=setup.ca),
        max_retries=0,
    )


def openai_client(setup: Setup, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=key,
        base_url=setup.relay.url("https") + "/v1",
        http_client=httpx2.Client(verify=setup.ca),
        max_retries=0,
    )


def all_headers(recorded: list[dict[str, Any]]) -> str:
    return json.dumps([r["headers"] for r in recorded])


def test_anthropic_sdk_over_tls_injects_upstream_key(setup: Setup) -> None:
    client = anthropic_client(setup)
    message = client.messages.create(
        model="claude-test-1", max_tokens=64,
        messages=[{"role": "user", "content": "Hello"}],
    )
    assert message.content[0].type == "text" and message.content[0].text
    recorded = setup.anthropic_up.requests() + setup.anthropic_up2.requests()
    assert len(recorded) == 1
    assert recorded[0]["headers"]["x-api-key"] in (
        [UPSTREAM_KEYS["a1"]], [UPSTREAM_KEYS["a2"]]
    )
    assert "authorization" not in recorded[0]["headers"]
    assert CLIENT_KEY not in all_headers(recorded)
    assert json.loads(recorded[0]["body"])["model"] == "claude-test-1"


def test_anthropic_sdk_stream_arrives_before_upstream_finishes(setup: Setup) -> None:
    """The first text event reaches the SDK while the upstream is still generating."""
    setup.anthropic_up.configure(chunk_delay=0.2, chunks=8)
    setup.anthropic_up2.configure(chunk_delay=0.2, chunks=8)
    client = anthropic_client(setup)
    seen_unfinished = None
    with client.messages.stream(
        model="claude-test-1", max_tokens=64,
        messages=[{"role": "user", "content": "Stream please"}],
    ) as stream:
        pieces = []
        for text in stream.text_stream:
            if seen_unfinished is None:
                recorded = setup.anthropic_up.requests() + setup.anthropic_up2.requests()
                seen_unfinished = not recorded[0]["finished"]
            pieces.append(text)
        final = stream.get_final_message()
    assert seen_unfinished is True
    assert len(pieces) == 8
    assert final.usage.output_tokens > 0
    assert "".join(pieces) == final.content[0].text  # type: ignore[union-attr]


def test_openai_sdk_chat_and_stream_with_usage(setup: Setup) -> None:
    client = openai_client(setup)
    completion = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}]
    )
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    stream = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    recorded = setup.openai_up.requests()
    assert [r["headers"]["authorization"] for r in recorded] == [
        [f"Bearer {UPSTREAM_KEYS['o1']}"]
    ] * 2
    assert CLIENT_KEY not in all_headers(recorded)


def test_openai_sdk_embeddings_and_models(setup: Setup) -> None:
    client = openai_client(setup)
    embedding = client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(embedding.data[0].embedding) > 0
    listed = [m.id for m in client.models.list()]
    assert listed  # the fake upstream's models, as routed for this client
    limited = [m.id for m in openai_client(setup, LIMITED_KEY).models.list()]
    assert limited == []  # team-b may only use claude-* models, none of which route to openai


def test_weights_are_honoured_across_processes(setup: Setup) -> None:
    client = anthropic_client(setup)
    for _ in range(8):
        client.messages.create(
            model="claude-test-1", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    assert len(setup.anthropic_up.requests()) == 6
    assert len(setup.anthropic_up2.requests()) == 2


def test_journal_logger_batches_access_lines(
    certs: TestCertificates,
    upstream_factory: Callable[[str], FakeUpstreamProcess],
    relayd_factory: Callable[..., RelaydProcess],
) -> None:
    """Under the unit's ``--logger`` (twistd makes it after the service), access lines are
    batched and handed to the journal observer directly: one line per request, no
    duplicates, every other event still written."""
    a1 = upstream_factory("a1")
    config = relay_config(certs, [backend("a1", a1)], [backend("o1", upstream_factory("o1"))])
    relay = relayd_factory(config, logger="relayd.logs.journal_observer")
    wait_for(lambda: "access lines are written in batches" in relay.log_text(), 10,
             "the journal observer to batch access lines", relay.log_path)
    client = anthropic.Anthropic(api_key=CLIENT_KEY, base_url=relay.url("http"), max_retries=0)
    for _ in range(12):
        client.messages.create(
            model="claude-test-1", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )

    def access_lines() -> list[str] | None:
        lines = [line for line in relay.log_text().splitlines() if "access request_id=" in line]
        return lines if len(lines) >= 12 else None

    lines = wait_for(access_lines, 10, "12 access lines", relay.log_path)
    assert len(lines) == 12
    assert all(line.startswith("[relayd.access#info] access request_id=") for line in lines)
    assert len({line.split()[2] for line in lines}) == 12  # one line per request id
    assert all(" status=200 " in line for line in lines)
    assert "[relayd.service#info] relayd listening on http://" in relay.log_text()


def test_client_disconnect_cancels_upstream(setup: Setup) -> None:
    """Closing the client connection mid-stream closes the upstream request at once."""
    setup.openai_up.configure(chunk_delay=0.5, chunks=40)
    body = json.dumps({"model": "gpt-4o", "stream": True,
                       "messages": [{"role": "user", "content": "long"}]}).encode()
    host, port = _host_port(setup.relay.url("http"))
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    received = b""
    while b"data: " not in received:
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()

    def cancelled() -> bool:
        recorded = setup.openai_up.requests()
        return bool(recorded) and recorded[0]["client_disconnected"]

    wait_for(cancelled, 10, "the upstream to see the disconnect")
    recorded = setup.openai_up.requests()[0]
    assert recorded["events_sent"] < 40
    assert not recorded["finished"]
    wait_for(lambda: "outcome=client_gone" in setup.relay.log_text(), 10, "the access log")


def test_upstream_dropping_mid_stream_gives_explicit_error(setup: Setup) -> None:
    setup.anthropic_up.configure(drop_after=3)
    setup.anthropic_up2.configure(drop_after=3)
    client = anthropic_client(setup)
    with pytest.raises(anthropic.APIError) as info:
        with client.messages.stream(
            model="claude-test-1", max_tokens=64,
            messages=[{"role": "user", "content": "x"}],
        ) as stream:
            for _ in stream:
                pass
    assert "broke off" in str(info.value)
    # OpenAI callers get an error chunk, which the SDK raises.
    setup.openai_up.configure(drop_after=2)
    chunks = openai_client(setup).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True
    )
    with pytest.raises(openai.APIError):
        list(chunks)


def test_bad_input_gets_shaped_errors_and_relay_keeps_serving(setup: Setup) -> None:
    url = setup.relay.url("http")
    anthropic_headers = {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01",
                         "content-type": "application/json"}
    with httpx2.Client(base_url=url, timeout=30) as http:
        cases: list[tuple[str, str, Any, dict[str, Any], int, str]] = [
            ("POST", "/v1/messages", b"{oops", anthropic_headers, 400, "invalid_request_error"),
            ("POST", "/v1/messages", b'{"max_tokens": 1}', anthropic_headers, 400,
             "invalid_request_error"),
            ("POST", "/v1/messages", b"x" * (11 * 1024 * 1024), anthropic_headers, 413,
             "request_too_large"),
            ("GET", "/v1/nowhere", None, anthropic_headers, 404, "not_found_error"),
            ("DELETE", "/v1/messages", None, anthropic_headers, 405, "invalid_request_error"),
            ("POST", "/v1/messages", b'{"model": "claude-x"}',
             {"authorization": "Basic Zm9vOmJhcg==", "anthropic-version": "2023-06-01"}, 401,
             "authentication_error"),
            ("POST", "/v1/messages", b'{"model": "claude-x"}',
             {"x-api-key": b"\xff\xfe-not-a-key", "anthropic-version": "2023-06-01"}, 401,
             "authentication_error"),
        ]
        for method, path, content, headers, status, error_type in cases:
            response = http.request(method, path, content=content, headers=headers)
            assert response.status_code == status, (path, response.text)
            assert response.json()["error"]["type"] == error_type
            assert response.json()["request_id"] == response.headers["x-relayd-request-id"]
        response = http.post(
            "/v1/chat/completions", content=b"[]",
            headers={"authorization": f"Bearer {CLIENT_KEY}"},
        )
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
    # A header line that is not HTTP at all: twisted.web answers 400 and drops the connection.
    host, port = _host_port(url)
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /v1/messages HTTP/1.1\r\nthis is not a header\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 400")
    # The relay still serves.
    message = anthropic_client(setup).messages.create(
        model="claude-test-1", max_tokens=8, messages=[{"role": "user", "content": "x"}]
    )
    assert message.content


def test_unreachable_backend_gives_502_in_shape(
    certs: TestCertificates,
    ca_context: ssl.SSLContext,
    upstream_factory: Callable[[str], FakeUpstreamProcess],
    relayd_factory: Callable[..., RelaydProcess],
) -> None:
    o1 = upstream_factory("o1")
    dead = FakeUpstreamProcess(o1.workdir, "dead")
    dead.port = _free_port()
    config = relay_config(certs, [backend("a1", dead)], [backend("o1", o1)])
    relay = relayd_factory(config)
    with httpx2.Client(base_url=relay.url("http"), timeout=30) as http:
        response = http.post(
            "/v1/messages",
            json={"model": "claude-x", "max_tokens": 1, "messages": []},
            headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"},
        )
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "api_error"
    assert "could not connect" in response.json()["error"]["message"]


def test_http2_is_served_over_tls(setup: Setup) -> None:
    """ALPN offers h2; a request over HTTP/2 is relayed like any other."""
    host, port = _host_port(setup.relay.url("https"))
    context = ssl.create_default_context(cafile=str(setup.certs.ca))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection((host, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "h2"
            connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            connection.initiate_connection()
            body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user",
                                                                 "content": "h2"}]}).encode()
            connection.send_headers(1, [
                (":method", "POST"), (":path", "/v1/chat/completions"),
                (":scheme", "https"), (":authority", "localhost"),
                ("authorization", f"Bearer {CLIENT_KEY}"),
                ("content-type", "application/json"), ("content-length", str(len(body))),
            ])
            connection.send_data(1, body, end_stream=True)
            tls.sendall(connection.data_to_send())
            status, data, ended = None, b"", False
            deadline = time.monotonic() + 10
            while not ended and time.monotonic() < deadline:
                for event in connection.receive_data(tls.recv(65536)):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = dict(event.headers)[b":status"]
                    elif isinstance(event, h2.events.DataReceived):
                        data += event.data
                        connection.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, h2.events.StreamEnded):
                        ended = True
                tls.sendall(connection.data_to_send())
    assert status == b"200"
    assert json.loads(data)["choices"][0]["message"]["content"]
    assert len(setup.openai_up.requests()) == 1


def test_tls_refuses_old_protocol_versions(setup: Setup) -> None:
    host, port = _host_port(setup.relay.url("https"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with socket.create_connection((host, port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="localhost")


def test_startup_errors_are_clear(
    certs: TestCertificates, relayd_factory: Callable[..., RelaydProcess], tmp_path: Any
) -> None:
    mismatched = {
        "listen": [{"address": "127.0.0.1:0",
                    "tls": {"certificate": str(certs.chain), "private_key": str(certs.other_key)}}]
    }
    with pytest.raises(RuntimeError, match="does not match certificate"):
        relayd_factory(mismatched, name="mismatch")
    bad = {"listen": [{"address": "127.0.0.1:0"}], "providers": [
        {"name": "p", "type": "anthropic", "backends": [
            {"name": "b", "url": "http://127.0.0.1:1", "api_key": "k", "weight": 0}]}]}
    with pytest.raises(RuntimeError, match=r"providers\[0\]\.backends\[0\]\.weight"):
        relayd_factory(bad, name="badconfig")


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_https_backend_is_verified(certs: TestCertificates, processes: ProcessGroup) -> None:
    """An https:// backend: the relay verifies its certificate (here against the test CA,
    via OpenSSL's SSL_CERT_FILE), and refuses it when the CA is not trusted."""
    secure = processes.upstream("secure", tls=(str(certs.chain), str(certs.key)))
    plain = processes.upstream("o1")
    backend_config = {"name": "a1", "url": f"https://localhost:{secure.port}",
                      "api_key": UPSTREAM_KEYS["a1"]}
    config = relay_config(certs, [backend_config], [backend("o1", plain)],
                          health={"enabled": False})
    relay = processes.relay(config, env={"SSL_CERT_FILE": str(certs.ca)})
    with httpx2.Client(base_url=relay.url("http"), timeout=30) as http:
        for _ in range(3):
            response = http.post(
                "/v1/messages",
                json={"model": "claude-x", "max_tokens": 4, "messages": []},
                headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"},
            )
            assert response.status_code == 200, response.text
    assert len(secure.requests()) == 3
    # Without the CA the same backend is refused: verification is on.
    untrusting = processes.relay(config, name="untrusting", env={"SSL_CERT_FILE": "/dev/null"})
    with httpx2.Client(base_url=untrusting.url("http"), timeout=30) as http:
        response = http.post(
            "/v1/messages",
            json={"model": "claude-x", "max_tokens": 4, "messages": []},
            headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"},
        )
    assert response.status_code == 502
    assert len(secure.requests()) == 3
