"""Fakes for testing one stage of the request path on its own.

A :class:`World` is a :class:`~relayd.runtime.RelayRuntime` built from a configuration
dict (as ``relay_harness.base_config`` makes), on a ``MemoryReactorClock``, whose
backends talk to :class:`FakeAgent` s: every upstream request is recorded and answered
(or failed, or left hanging) by the test itself. The other fakes stand in for the
neighbours of a stage: the exchange as an attempt's host or a body sink's host, the
client's request, an upstream answer and the transport of its body.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, cast
from weakref import WeakKeyDictionary

from relay_harness import CLIENT_KEY, base_config
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IReactorTime, ITransport
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import HTTPChannel, Request
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from twisted.web.test.requesthelper import DummyChannel
from zope.interface import implementer

from relayd.config import parse_config
from relayd.config.model import BackendConfig
from relayd.errors import Outcome, Refusal
from relayd.http.attempt import UpstreamAttempt
from relayd.http.bodies import BodySink
from relayd.http.intake import ClientCall
from relayd.http.planner import AttemptPlanner, Pick
from relayd.metrics import RelayMetrics
from relayd.providers import PROVIDERS, Endpoint, IProvider, Usage
from relayd.routing import ProviderRoute, Route
from relayd.runtime import Client, RelayRuntime
from relayd.upstream import Backend

REQUEST_ID = "req_stage_test"
# An Anthropic Messages body, the default request of a planner.
MESSAGE: dict[str, Any] = {"model": "claude-x", "max_tokens": 5,
                           "messages": [{"role": "user", "content": "hi"}]}


def sample(metrics: RelayMetrics, name: str, **labels: str) -> float:
    """A metric sample's value from the registry (0 when it was never recorded)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def endpoint_of(family: str, name: str) -> Endpoint:
    """The endpoint called ``name`` of the API ``family``."""
    return next(e for e in PROVIDERS[family].endpoints if e.name == name)


# -- the upstream side -----------------------------------------------------------------------


@dataclass
class AgentCall:
    """One request a :class:`FakeAgent` was asked to make."""

    method: bytes
    uri: bytes
    headers: Headers
    body: IBodyProducer | None
    deferred: Deferred[IResponse]
    cancelled: bool = False


@implementer(IAgent)
class FakeAgent:
    """Records every request; the test fires (or cancels) each one's Deferred."""

    def __init__(self) -> None:
        self.calls: list[AgentCall] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,  # noqa: N803 (IAgent's name)
    ) -> Deferred[IResponse]:
        def cancel(_: Deferred[IResponse]) -> None:
            call.cancelled = True  # Deferred.cancel then errbacks with CancelledError

        call = AgentCall(method, uri, headers or Headers(), bodyProducer, Deferred(cancel))
        self.calls.append(call)
        return call.deferred

    @property
    def last(self) -> AgentCall:
        return self.calls[-1]


class BodyTransport:
    """The transport an upstream body's protocol is connected to: records being stopped."""

    def __init__(self) -> None:
        self.stopped = 0

    def stopProducing(self) -> None:
        self.stopped += 1

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


@implementer(IResponse)
class FakeResponse:
    """An upstream answer's head; its body is delivered by the test (:meth:`connect`)."""

    version = (b"HTTP", 1, 1)

    def __init__(
        self,
        code: int = 200,
        headers: dict[bytes, list[bytes]] | None = None,
        *,
        length: int | object = UNKNOWN_LENGTH,
        phrase: bytes = b"OK",
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = Headers(headers or {})
        self.length = length
        self.request = None
        self.previousResponse: IResponse | None = None
        self.protocol: Any = None
        self.transport = BodyTransport()

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def connect(self) -> None:
        """Connect the body's protocol to :attr:`transport` (the body starts flowing)."""
        self.protocol.makeConnection(cast(ITransport, self.transport))

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self, reason: Failure | None = None) -> None:
        self.protocol.connectionLost(reason or Failure(ResponseDone()))

    def deliver(self, body: bytes) -> None:
        """The whole body at once, then its clean end."""
        self.connect()
        self.send(body)
        self.end()


# -- the runtime -----------------------------------------------------------------------------


class World:
    """A runtime over fake agents (one per backend name), its clock and a metrics registry."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.clock = MemoryReactorClock()
        self.agents: dict[str, FakeAgent] = {}
        self.metrics = RelayMetrics()

        def agent_for(backend: BackendConfig) -> IAgent:
            agent = self.agents[backend.name] = FakeAgent()
            return agent

        self.runtime = RelayRuntime(parse_config(config or base_config()), self.clock,
                                    agent_factory=agent_for)

    def backend(self, name: str) -> Backend:
        return next(b for b in self.runtime.backends if b.name == name)

    def client(self, key: str = CLIENT_KEY) -> Client:
        return self.runtime.clients[hashlib.sha256(key.encode()).digest()]

    def route(self, api: str, model: str | None) -> Route:
        route = self.runtime.router.route(api, model)
        assert route is not None
        return route

    def sample(self, name: str, **labels: str) -> float:
        return sample(self.metrics, name, **labels)

    def call(
        self, payload: dict[str, Any] | None = None, *, key: str = CLIENT_KEY,
        body: bytes | None = None,
    ) -> ClientCall:
        """A client call as intake makes it, for a JSON body naming its model."""
        raw = body if body is not None else json.dumps(payload or {}).encode()
        call = ClientCall(self.client(key), raw)
        if payload is not None:
            call.payload = payload
            model = payload.get("model")
            call.model = model if isinstance(model, str) else None
            call.stream = payload.get("stream") is True
        return call

    def planner(
        self,
        payload: dict[str, Any] | None = None,
        *,
        api: str = "anthropic",
        endpoint: str = "messages",
        pinned: tuple[ProviderRoute, Backend] | None = None,
        route: Route | None = None,
        call: ClientCall | None = None,
    ) -> AttemptPlanner:
        """A planner for one request on ``api``'s ``endpoint``."""
        if call is None:
            call = self.call(payload if payload is not None else MESSAGE)
        family = PROVIDERS[api]
        where = endpoint_of(api, endpoint)
        if route is None:
            route = self.route(api, call.model)
        return AttemptPlanner(
            self.runtime, self.clock, self.metrics, family, where, route, call,
            uri=where.path, upstream_headers=[], pinned=pinned, request_id=REQUEST_ID,
        )


# -- the exchange, as its stages see it -----------------------------------------------------


class FakeAttemptHost:
    """An attempt's host (relayd.http.attempt.AttemptHost) that records every report.

    With ``sink`` set, an answer is taken into it (as the exchange does after choosing
    one); without, the answer is only recorded.
    """

    def __init__(self, sink: BodySink | None = None) -> None:
        self.done = False
        self.sink = sink
        self.responded: list[IResponse] = []
        self.failed: list[tuple[str, str, bool]] = []
        self.body_started = 0
        self.body_ended: list[bool] = []
        self.unexpected: list[Failure] = []

    def attempt_responded(self, attempt: UpstreamAttempt, response: IResponse) -> None:
        self.responded.append(response)
        if self.sink is not None:
            attempt.receive(response, self.sink)

    def attempt_failed(
        self, attempt: UpstreamAttempt, result: str, message: str, answered: bool
    ) -> None:
        self.failed.append((result, message, answered))

    def attempt_body_started(self, attempt: UpstreamAttempt) -> None:
        self.body_started += 1

    def attempt_body_ended(self, attempt: UpstreamAttempt, clean: bool) -> None:
        self.body_ended.append(clean)
        if self.sink is not None:
            self.sink.end(clean)

    def on_unexpected(self, failure: Failure) -> None:
        self.unexpected.append(failure)


class RecordingSink(BodySink):
    """A body sink that only records what reaches it."""

    def __init__(self) -> None:  # no host: nothing is relayed anywhere
        self.fed: list[bytes] = []
        self.ended: list[bool] = []
        self.fail_on_feed: Exception | None = None

    def feed(self, data: bytes) -> None:
        if self.fail_on_feed is not None:
            raise self.fail_on_feed
        self.fed.append(data)

    def end(self, clean: bool) -> None:
        self.ended.append(clean)


@implementer(IConsumer)
class ClientRequest:
    """The client's request as a body sink uses it: what is written, producers let go,
    and (for an object call's answer) the address the client reached."""

    def __init__(self, host_header: bytes | None = None) -> None:
        self.written: list[bytes] = []
        self.unregistered = 0
        self.host_header = host_header

    def getHeader(self, name: bytes) -> bytes | None:
        return self.host_header if name.lower() == b"host" else None

    def isSecure(self) -> bool:
        return False

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8080)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        self.unregistered += 1

    @property
    def body(self) -> bytes:
        return b"".join(self.written)


@dataclass
class FakeSinkHost:
    """The exchange as a body sink sees it (relayd.http.bodies.SinkHost), recording.

    ``events`` keeps the order of what the sink asked for: ``begin``, ``write`` (the
    client request's writes are in ``client.written``), ``finished``, ``finish``,
    ``cut_off``, ``refuse``, ``fail_over``.
    """

    clock: IReactorTime
    family: IProvider = PROVIDERS["anthropic"]
    status: int | None = 200
    next_pick: Pick | None = None  # what retry() answers
    done: bool = False
    outcome: str = Outcome.OK
    usage: Usage | None = None
    request_id: str = REQUEST_ID
    client: ClientRequest = field(default_factory=ClientRequest)
    events: list[str] = field(default_factory=list)
    began: list[tuple[int, bytes] | None] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    failed_over: list[tuple[UpstreamAttempt, Pick, str]] = field(default_factory=list)
    unexpected: list[Failure] = field(default_factory=list)
    request: Request = field(init=False)  # the client request, as the sink's type says

    def __post_init__(self) -> None:
        self.request = cast(Request, self.client)

    def begin_response(self, sink: BodySink, rewritten: tuple[int, bytes] | None = None) -> None:
        self.events.append("begin")
        self.began.append(rewritten)

    def upstream_finished(self) -> None:
        self.events.append("finished")

    def finish(self) -> None:
        self.events.append("finish")
        self.done = True

    def cut_off(self) -> None:
        self.events.append("cut_off")
        self.done = True

    def refuse(self, refusal: Refusal) -> None:
        self.events.append("refuse")
        self.refused.append(refusal)
        self.done = True

    def retry(self, result: str) -> Pick | None:
        self.retried.append(result)
        return self.next_pick

    def fail_over(self, attempt: UpstreamAttempt, pick: Pick, message: str) -> None:
        self.events.append("fail_over")
        self.failed_over.append((attempt, pick, message))

    def on_unexpected(self, failure: Failure) -> None:
        self.unexpected.append(failure)


# The channel of each request make_request built: a finished request lets go of its own.
_CHANNELS: WeakKeyDictionary[Request, Any] = WeakKeyDictionary()


def make_request(
    method: bytes = b"POST",
    uri: bytes = b"/v1/messages",
    headers: dict[bytes, bytes] | None = None,
    body: bytes | None = b"",
    *,
    content: Any = None,
    secure: bool = False,
) -> Request:
    """A real twisted.web request as the channel hands it over (head and body read)."""
    channel = DummyChannel()
    if secure:
        channel.transport = DummyChannel.SSL()
    request = Request(cast(HTTPChannel, channel))
    _CHANNELS[request] = channel
    request.method = method
    request.uri = uri
    request.path = uri.partition(b"?")[0]
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    request.content = content if content is not None else (
        None if body is None else BytesIO(body)
    )
    return request


def written(request: Request) -> bytes:
    """What a real request wrote to its (dummy) connection."""
    data: bytes = _CHANNELS[request].transport.written.getvalue()
    return data
