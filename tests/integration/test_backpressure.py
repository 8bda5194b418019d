"""Backpressure over real loopback sockets: a client that stops reading pauses the upstream.

The relay, a flooding upstream and a client all run in this process on the reactor
(pytest-twisted), on 127.0.0.1 ephemeral ports. If the relay kept reading the upstream
while its client is stalled, the upstream's producer would never be paused; with
backpressure, the stall travels back through the relay to the upstream.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from relayd.config import parse_config
from relayd.http.site import RelaySite
from relayd.runtime import RelayRuntime

reactor: Any = _reactor
KEY = "sk-backpressure"
EVENT = b"data: " + json.dumps({"choices": [{"delta": {"content": "x" * 4000}}]}).encode()
EVENT += b"\n\n"
LIMIT = 64 * 1024 * 1024  # the flood gives up (and the test fails) after this much


@implementer(IPushProducer)
class Flood:
    """Writes SSE events as fast as the connection takes them, until paused."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.produced = 0
        self.paused = False
        self.was_paused: Deferred[int] = Deferred()
        self.resumed: Deferred[int] = Deferred()
        self.stopped = False

    def pump(self) -> None:
        if self.paused or self.stopped:
            return
        for _ in range(16):
            self.request.write(EVENT)
            self.produced += len(EVENT)
            if self.paused:
                return
        if self.produced >= LIMIT:
            if not self.was_paused.called:
                self.was_paused.errback(AssertionError(f"never paused after {LIMIT} bytes"))
            self.stopped = True
            self.request.unregisterProducer()
            self.request.write(b"data: [DONE]\n\n")
            self.request.finish()
            return
        reactor.callLater(0, self.pump)

    def pauseProducing(self) -> None:
        self.paused = True
        if not self.was_paused.called:
            self.was_paused.callback(self.produced)

    def resumeProducing(self) -> None:
        self.paused = False
        if self.was_paused.called and not self.resumed.called:
            self.resumed.callback(self.produced)
        reactor.callLater(0, self.pump)

    def stopProducing(self) -> None:
        self.stopped = True


class FloodResource(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.flood: Flood | None = None

    def render(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        self.flood = Flood(request)
        request.registerProducer(self.flood, True)
        reactor.callLater(0, self.flood.pump)
        return NOT_DONE_YET


class StallingClient(Protocol):
    """Sends one streaming request, then stops reading once the first bytes arrive."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = 0
        self.first_bytes: Deferred[None] = Deferred()
        self.finished: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if not self.first_bytes.called:
            self.transport.pauseProducing()  # type: ignore[union-attr]
            self.first_bytes.callback(None)
        if b"data: [DONE]" in data[-64:]:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if not self.finished.called:
            self.finished.callback(None)


@pytest_twisted.inlineCallbacks
def test_stalled_client_pauses_the_upstream() -> Any:
    upstream = FloodResource()
    upstream_port = reactor.listenTCP(0, Site(upstream), interface="127.0.0.1")
    config = parse_config({
        "listen": [{"address": "127.0.0.1:0"}],
        "clients": [{"name": "c", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
        "providers": [{"name": "o", "type": "openai", "backends": [
            {"name": "flood", "url": f"http://127.0.0.1:{upstream_port.getHost().port}",
             "api_key": "sk-up"}]}],
        "routes": [{"api": "openai", "provider": "o"}],
    })
    runtime = RelayRuntime(config, reactor)
    relay_port = reactor.listenTCP(0, RelaySite(lambda: runtime, reactor), interface="127.0.0.1")
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    client = StallingClient(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", relay_port.getHost().port)
        yield connectProtocol(endpoint, client)
        yield client.first_bytes
        assert upstream.flood is not None
        produced_when_paused = yield upstream.flood.was_paused
        # The upstream was told to stop long before its limit: the stall reached it.
        assert produced_when_paused < LIMIT
        assert not upstream.flood.stopped
        # Reading again resumes the upstream, and the whole stream arrives.
        client.transport.resumeProducing()  # type: ignore[union-attr]
        yield upstream.flood.resumed
        yield client.finished
        assert client.received > LIMIT
    finally:
        yield relay_port.stopListening()
        yield upstream_port.stopListening()
        yield runtime.close()
