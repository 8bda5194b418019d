"""In-memory harness for relay tests: fake upstream resources, StubTreq clients, a clock.

Nothing here opens a socket: the relay's backends talk to twisted.web resources through
``RequestTraversalAgent`` and the client talks to the relay the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from relayd.config import parse_config
from relayd.config.model import BackendConfig
from relayd.http.relay import RelayResource
from relayd.http.site import RelayRequest
from relayd.limits import ObjectRecord
from relayd.runtime import RelayRuntime

CLIENT_KEY = "sk-relay-team-a"
OTHER_KEY = "sk-relay-team-b"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Recorded:
    method: bytes
    path: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes


@dataclass
class FakeUpstream(Resource):
    """A scripted upstream: answers with ``handler(request, body)`` and records requests."""

    name: str
    handler: Callable[[Request, bytes], Any] | None = None
    seen: list[Recorded] = field(default_factory=list)
    pending: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        Resource.__init__(self)

    isLeaf = True

    def render(self, request: Request) -> Any:
        assert request.content is not None
        body = request.content.read()
        self.seen.append(
            Recorded(
                request.method,
                request.uri,
                {k.lower(): list(v) for k, v in request.requestHeaders.getAllRawHeaders()},
                body,
            )
        )
        if self.handler is None:
            return json_reply(request, {"id": "msg_1", "usage": {"input_tokens": 3,
                                                              "output_tokens": 4}})
        return self.handler(request, body)


def json_reply(request: Request, payload: object, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(payload).encode()


def hang(request: Request, body: bytes) -> Any:
    return NOT_DONE_YET


def lose_client(exchange: Any) -> None:
    """What a lost client connection does to a relay request: the channel stops the
    producer it holds (the upstream body, if one flows), then the request hears of it."""
    request = exchange.request
    if request.producer is not None:
        request.producer.stopProducing()
    request.connectionLost(Failure(ConnectionDone("client hung up")))


@implementer(ILogObserver)
class LogCapture:
    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def access(self) -> list[dict[str, Any]]:
        return [e["access"] for e in self.events if "access" in e]


def base_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": [{"address": "127.0.0.1:0"}],
        "clients": [
            {"name": "team-a", "key_sha256": sha(CLIENT_KEY)},
            {"name": "team-b", "key_sha256": sha(OTHER_KEY), "models": ["claude-*"]},
        ],
        "providers": [
            {
                "name": "anthropic",
                "type": "anthropic",
                "backends": [
                    {"name": "us", "url": "http://up-us.test", "api_key": "sk-up-us",
                     "weight": 3},
                    {"name": "eu", "url": "http://up-eu.test/prefix", "api_key": "sk-up-eu"},
                ],
            },
            {
                "name": "openai",
                "type": "openai",
                "backends": [{"name": "main", "url": "http://up-oai.test", "api_key": "sk-up-oai"}],
            },
        ],
        "routes": [
            {"api": "anthropic", "models": ["claude-*"], "provider": "anthropic"},
            {"api": "openai", "provider": "openai"},
        ],
    }
    config.update(overrides)
    return config


class Harness:
    """A relay resource over fake upstreams, and a StubTreq client for it."""

    def __init__(
        self, config: dict[str, Any] | None = None, agents: dict[str, IAgent] | None = None
    ) -> None:
        """``agents`` replaces the fake upstream of the named backends with an agent."""
        self.clock = MemoryReactorClock()
        self.upstreams: dict[str, FakeUpstream] = {}
        self.agents: list[RequestTraversalAgent] = []
        parsed = parse_config(config or base_config())

        def agent_for(backend: BackendConfig) -> IAgent:
            if agents and backend.name in agents:
                return agents[backend.name]
            upstream = FakeUpstream(backend.name)
            self.upstreams[backend.name] = upstream
            agent = RequestTraversalAgent(upstream)
            self.agents.append(agent)
            return agent

        self.runtime = RelayRuntime(parsed, self.clock, agent_factory=agent_for)
        self.resource = RelayResource(lambda: self.runtime, self.clock)
        self.client: Any = StubTreq(self.resource)
        # The relay's own request class, as its Site uses (the cache's tap lives there).
        self.client._agent._serverFactory.requestFactory = RelayRequest
        self.logs = LogCapture()
        globalLogPublisher.addObserver(self.logs)

    def own(self, kind: str, object_id: str, backend: str, client: str = "team-a") -> None:
        """Record an upstream object as created by ``client`` on ``backend``."""
        record = next(
            ObjectRecord(client, b.provider_name, b.name)
            for b in self.runtime.backends if b.name == backend
        )
        self.runtime.store.claim(kind, object_id, record)

    def hold_upstreams(self) -> list[Request]:
        """Make every fake upstream keep its requests unanswered; the list gets them, in
        arrival order, for the test to answer."""
        held: list[Request] = []

        def later(request: Request, body: bytes) -> Any:
            held.append(request)
            return NOT_DONE_YET

        for upstream in self.upstreams.values():
            upstream.handler = later
        return held

    def close(self) -> None:
        globalLogPublisher.removeObserver(self.logs)

    def flush(self) -> None:
        """Deliver everything buffered: upstream answers written later, then the client's."""
        for agent in self.agents:
            agent.flush()
        self.client.flush()
        self.turn()

    def turn(self) -> None:
        """Run what the reactor runs once the answer is sent: the exchange's record
        (usage, limits, metrics, access line) waits for that."""
        self.clock.advance(0)

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        key: str | None = CLIENT_KEY,
        api: str = "anthropic",
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, list[str]], bytes]:
        """Make one request and flush everything; returns status, headers and body."""
        sent: dict[str, str] = {}
        if api == "anthropic":
            sent["anthropic-version"] = "2023-06-01"
            if key is not None:
                sent["x-api-key"] = key
        elif key is not None:
            sent["authorization"] = f"Bearer {key}"
        sent.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        d = self.client.request(method, "http://relay.test" + path, headers=sent, data=data)
        self.client.flush()
        results: list[Any] = []
        d.addBoth(results.append)
        self.client.flush()
        assert results, "the relay did not answer"
        response = results[0]
        if hasattr(response, "raiseException"):
            response.raiseException()
        content: list[Any] = []
        self.client.content(response).addBoth(content.append)
        self.client.flush()
        assert content, "the relay did not finish the body"
        if hasattr(content[0], "raiseException"):
            content[0].raiseException()
        self.turn()
        headers_out = {
            k.decode().lower(): [v.decode() for v in vs]
            for k, vs in response.headers.getAllRawHeaders()
        }
        if response.length is not UNKNOWN_LENGTH:
            # Agent keeps Content-Length out of the headers and reports it as .length.
            headers_out["content-length"] = [str(response.length)]
        return response.code, headers_out, content[0]
