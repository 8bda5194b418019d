"""RelayService on a MemoryReactorClock: the two-phase reload (plan, bind, build, switch),
its rollback, the SIGTERM handler, and the drain on stop.

No socket and no global reactor: listeners are the fake reactor's ports, clients are
protocols built from the listening factory over StringTransports, upstreams are
twisted.web resources reached through ``RequestTraversalAgent``, config files are read
by a thread pool that runs at once, and time moves only when a test advances it.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from relay_harness import CLIENT_KEY, LogCapture, base_config
from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from relayd import service as service_module
from relayd.config import load_config
from relayd.config.model import BackendConfig
from relayd.runtime import RelayRuntime
from relayd.sdnotify import Notifier
from relayd.service import RelayService, ReloadRefusedError
from relayd.upstream import Backend

MESSAGE = {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
ANSWER = {"id": "msg_1", "type": "message", "usage": {"input_tokens": 3, "output_tokens": 4}}


class Port:
    """A listening port of the fake reactor that records being closed."""

    def __init__(self, port: int, factory: Any) -> None:
        self.port = port
        self.factory = factory
        self.closed = False

    def stopListening(self) -> None:
        self.closed = True

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)


class ImmediatePool:
    """A thread pool that runs what it is given at once on the caller's thread, or, while
    ``hold`` is set, when the test calls :meth:`release`."""

    def __init__(self) -> None:
        self.hold = False
        self.held: list[Callable[[], None]] = []

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *args: Any
    ) -> None:
        def run() -> None:
            try:
                result = f(*args)
            except Exception:
                on_result(False, Failure())
            else:
                on_result(True, result)

        if self.hold:
            self.held.append(run)
        else:
            run()

    def release(self) -> None:
        """Run the oldest held call."""
        self.held.pop(0)()


class ServiceReactor(MemoryReactorClock):
    """MemoryReactorClock plus what the service asks of a reactor besides: ports that
    record their closing, ports that are taken, callFromThread, a thread pool, and the
    runtime that was current each time a port was bound."""

    def __init__(self) -> None:
        super().__init__()
        self.taken: set[int] = set()
        self.ports: list[Port] = []
        self.bound_while: list[tuple[int, Any]] = []
        self.service: RelayService | None = None
        self.stops = 0
        self.pool = ImmediatePool()

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port in self.taken:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        super().listenTCP(port, factory, backlog, interface)
        if self.service is not None:
            self.bound_while.append((port, self.service.runtime))
        bound = Port(port, factory)
        self.ports.append(bound)
        return bound

    def open_ports(self) -> list[int]:
        return sorted(p.port for p in self.ports if not p.closed)

    def port(self, number: int) -> Port:
        return [p for p in self.ports if p.port == number][-1]

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def getThreadPool(self) -> ImmediatePool:
        return self.pool

    def stop(self) -> None:
        if self.hasStopped:
            raise ReactorNotRunning("Can't stop reactor that isn't running.")
        self.stops += 1
        super().stop()


class Upstream(Resource):
    """A fake upstream: health probes get 200; relayed requests wait in ``pending``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Request] = []

    def render(self, request: Request) -> Any:
        if request.method == b"GET":
            return b"{}"
        self.pending.append(request)
        return NOT_DONE_YET

    def answer_all(self) -> None:
        for request in self.pending:
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps(ANSWER).encode())
            request.finish()
        self.pending = []


def config(
    ports: tuple[int, ...] = (8001,), weight: int = 3, **top: Any
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "admin": {"address": "127.0.0.1:9001"}, "shutdown_timeout": 5, **top
    }
    raw = base_config(listen=[{"address": f"127.0.0.1:{port}"} for port in ports], **settings)
    raw["providers"][0]["backends"][0]["weight"] = weight
    return raw


class Relay:
    """A started RelayService over fakes, with its config file in ``tmp_path``."""

    def __init__(self, tmp_path: Path, raw: dict[str, Any], **options: Any) -> None:
        self.reactor = ServiceReactor()
        self.path = tmp_path / "relayd.yaml"
        self.write(raw)
        self.upstreams: dict[str, list[Upstream]] = {}
        self.agents: list[RequestTraversalAgent] = []
        self.refuse_agents_for: set[str] = set()
        self.service = RelayService(
            load_config(str(self.path)),
            self.reactor,
            config_path=str(self.path),
            notifier=Notifier({}),
            agent_factory=self.agent_for,
            **options,
        )
        self.reactor.service = self.service
        self.service.privilegedStartService()
        self.service.startService()
        self.first = self.service.runtime

    def agent_for(self, backend: BackendConfig) -> IAgent:
        if backend.name in self.refuse_agents_for:
            raise RuntimeError(f"no agent for {backend.name}")
        upstream = Upstream()
        self.upstreams.setdefault(backend.name, []).append(upstream)
        agent = RequestTraversalAgent(upstream)
        self.agents.append(agent)
        return agent

    def write(self, raw: dict[str, Any] | str) -> None:
        self.path.write_text(raw if isinstance(raw, str) else json.dumps(raw))

    def backend(self, name: str, runtime: RelayRuntime | None = None) -> Backend:
        runtime = runtime or self.service.runtime
        return next(b for b in runtime.backends if b.name == name)

    def reloads(self, result: str) -> float:
        value = self.service.metrics.registry.get_sample_value(
            "relayd_config_reloads_total", {"result": result}
        )
        return value or 0.0

    def flush(self) -> None:
        """Deliver the upstreams' answers, and run the reactor's next turns (an
        exchange's access line is written once its answer is sent)."""
        for agent in self.agents:
            agent.flush()
        self.reactor.advance(0)

    def send(self, port: int = 8001) -> StringTransport:
        """A client connection to ``port`` that sends one Messages request."""
        factory = self.reactor.port(port).factory
        address = IPv4Address("TCP", "127.0.0.1", 50000)
        protocol = factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        body = json.dumps(MESSAGE).encode()
        protocol.dataReceived(
            b"POST /v1/messages HTTP/1.1\r\nHost: relay.test\r\n"
            b"x-api-key: " + CLIENT_KEY.encode() + b"\r\nanthropic-version: 2023-06-01\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body
        )
        self.flush()
        return transport


@pytest.fixture(autouse=True)
def _no_rlimit_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """privilegedStartService raises the process's open file limit: not in tests."""
    monkeypatch.setattr(service_module, "raise_open_file_limit", lambda: (1024, 1024))


# -- start ------------------------------------------------------------------------------------


def test_start_binds_every_listener_and_the_admin_one(tmp_path: Path) -> None:
    relay = Relay(tmp_path, config(ports=(8001, 8002)))
    assert relay.reactor.open_ports() == [8001, 8002, 9001]
    assert relay.reactor.port(8001).factory is relay.service.site
    assert all(b.checker is not None for b in relay.service.runtime.backends)


# -- reload: plan, bind, build, switch ----------------------------------------------------------


def test_a_reload_binds_new_listeners_before_it_switches_runtimes(tmp_path: Path) -> None:
    relay = Relay(tmp_path, config())
    us = relay.backend("us")
    relay.write(config(ports=(8002,), weight=7))
    relay.service.request_reload()
    assert relay.reloads("ok") == 1 and relay.service.reload_count == 1
    new = relay.service.runtime
    assert new is not relay.first
    assert relay.reactor.bound_while[-1] == (8002, relay.first)  # bound, then switched
    assert relay.reactor.open_ports() == [8002, 9001]  # the removed listener is closed
    assert [o.key for o in relay.service.listeners] == ["127.0.0.1:8002"]
    assert relay.backend("us", new) is us and us.weight == 7  # kept, new settings
    assert relay.service.reloading is False


def test_a_reload_retires_removed_backends_and_checks_new_ones(tmp_path: Path) -> None:
    relay = Relay(tmp_path, config())
    eu, main = relay.backend("eu"), relay.backend("main")
    raw = config()
    raw["providers"][0]["backends"][1]["url"] = "http://elsewhere.test"  # eu: rebuilt
    del raw["providers"][1]
    raw["routes"] = raw["routes"][:1]
    relay.write(raw)
    relay.service.request_reload()
    assert relay.reloads("ok") == 1
    assert eu.retired and main.retired and eu.checker is None
    new_eu = relay.backend("eu")
    assert new_eu is not eu and new_eu.checker is not None and new_eu.checker.running


def test_an_invalid_file_changes_nothing(tmp_path: Path) -> None:
    relay = Relay(tmp_path, config())
    relay.write("listen: [{address: '127.0.0.1:8002'}]\nunknown_section: 1\n")
    relay.service.request_reload()
    assert relay.reloads("invalid") == 1 and relay.reloads("ok") == 0
    assert relay.service.runtime is relay.first
    assert relay.reactor.open_ports() == [8001, 9001]
    assert len(relay.reactor.ports) == 2  # nothing was bound


@pytest.mark.parametrize("taken", [8003, 9002])  # a relay listener, the admin listener
def test_a_listener_that_cannot_bind_leaves_the_old_runtime_and_listeners_serving(
    tmp_path: Path, taken: int
) -> None:
    relay = Relay(tmp_path, config())
    us = relay.backend("us")
    relay.reactor.taken.add(taken)
    relay.write(config(ports=(8001, 8002, 8003), weight=7, admin={"address": "127.0.0.1:9002"}))
    relay.service.request_reload()
    assert relay.reloads("refused") == 1 and relay.reloads("ok") == 0
    assert relay.service.runtime is relay.first
    assert relay.reactor.port(8002).closed  # bound by the refused reload, then closed
    assert relay.reactor.open_ports() == [8001, 9001]
    assert [o.key for o in relay.service.listeners] == ["127.0.0.1:8001"]
    assert us.weight == 3  # the plan touched nothing
    transport = relay.send(8001)  # still served by the old runtime
    for upstream in relay.upstreams["us"] + relay.upstreams["eu"]:
        upstream.answer_all()
    relay.flush()
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_runtime_that_cannot_be_built_closes_what_the_reload_bound(tmp_path: Path) -> None:
    relay = Relay(tmp_path, config())
    us = relay.backend("us")
    raw = config(ports=(8001, 8002), weight=7)
    raw["providers"][0]["backends"].append(
        {"name": "ap", "url": "http://up-ap.test", "api_key": "sk-up-ap"}
    )
    relay.refuse_agents_for.add("ap")
    with pytest.raises(RuntimeError, match="no agent for ap"):
        relay.service.apply_config(load_config(_write(tmp_path / "next.yaml", raw)))
    assert relay.service.runtime is relay.first
    assert relay.reactor.port(8002).closed
    assert relay.reactor.open_ports() == [8001, 9001]
    assert us.weight == 3  # nothing carried was changed


def test_switching_a_listener_to_tls_is_refused(tmp_path: Path) -> None:
    relay = Relay(tmp_path, config())
    raw = config()
    raw["listen"][0]["tls"] = {"certificate": "cert.pem", "private_key": "key.pem"}
    parsed = load_config(_write(tmp_path / "tls.yaml", raw))  # files are read when used
    with pytest.raises(ReloadRefusedError, match="between plain HTTP and TLS"):
        relay.service.apply_config(parsed)
    assert relay.service.runtime is relay.first


def test_reload_requests_during_a_reload_are_coalesced(tmp_path: Path) -> None:
    relay = Relay(tmp_path, config())
    pool = relay.reactor.pool
    pool.hold = True  # the file is being read
    relay.service.request_reload()
    relay.service.request_reload()
    relay.service.request_reload()
    assert len(pool.held) == 1 and relay.service.reload_pending
    pool.release()  # the first reload ends: one follow-up starts
    assert relay.reloads("ok") == 1 and len(pool.held) == 1
    pool.release()
    assert relay.reloads("ok") == 2 and not pool.held and not relay.service.reloading


# -- SIGTERM and the drain ------------------------------------------------------------------


def test_sigterm_is_relayds_own_once_the_reactor_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    installed: dict[int, Any] = {}

    def install(number: int, handler: Any) -> None:
        installed[number] = handler

    monkeypatch.setattr(signal, "signal", install)
    relay = Relay(tmp_path, config(), install_signal_handlers=True)
    assert signal.SIGHUP in installed and signal.SIGTERM not in installed
    for hook, args, kwargs in relay.reactor.whenRunningHooks:  # the reactor starts
        hook(*args, **kwargs)
    handler = installed[signal.SIGTERM]
    handler(signal.SIGTERM, None)
    assert relay.reactor.stops == 1  # the reactor's shutdown runs the drain
    handler(signal.SIGTERM, None)  # a second one during the drain is harmless
    assert relay.reactor.stops == 1


def test_stop_waits_for_in_flight_requests(tmp_path: Path) -> None:
    relay = Relay(tmp_path, config())
    transport = relay.send()
    upstream = next(u for u in relay.upstreams["us"] + relay.upstreams["eu"] if u.pending)
    assert len(relay.service.site.resource.active) == 1
    stopped: list[Any] = []
    relay.service.stopService().addBoth(stopped.append)
    assert relay.service.draining
    assert relay.reactor.port(8001).closed and not relay.reactor.port(9001).closed
    relay.reactor.advance(4.9)
    assert not stopped  # still waiting
    upstream.answer_all()
    relay.flush()
    assert stopped and not isinstance(stopped[0], Failure)
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n")
    assert relay.reactor.port(9001).closed
    assert all(  # the abort timer is cancelled
        getattr(call, "func", None) != relay.service._abort_remaining
        for call in relay.reactor.getDelayedCalls()
    )


def test_stop_aborts_what_is_left_at_the_drain_timeout(tmp_path: Path) -> None:
    relay = Relay(tmp_path, config())
    transports = [relay.send(), relay.send()]
    assert len(relay.service.site.resource.active) == 2
    logs = LogCapture()
    globalLogPublisher.addObserver(logs)
    stopped: list[Any] = []
    lines_when_stopped: list[list[str]] = []

    def on_stop(result: Any) -> None:
        stopped.append(result)
        lines_when_stopped.append([line["outcome"] for line in logs.access()])

    try:
        relay.service.stopService().addBoth(on_stop)
        relay.reactor.advance(4.9)
        assert not stopped and not any(t.disconnecting for t in transports)
        relay.reactor.advance(0.1)  # shutdown_timeout: 5 s
    finally:
        globalLogPublisher.removeObserver(logs)
    assert stopped and not isinstance(stopped[0], Failure)
    # The aborted requests' access lines are written before the stop goes on.
    assert lines_when_stopped == [["aborted", "aborted"]]
    assert all(t.disconnecting for t in transports)
    assert all(b"200 OK" not in t.value() for t in transports)
    assert not relay.service.site.resource.active
    assert relay.reactor.port(9001).closed


def test_a_bug_aborting_one_request_does_not_hold_the_stop_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relayd.http.exchange import Exchange

    relay = Relay(tmp_path, config())
    transports = [relay.send(), relay.send()]
    first = next(iter(relay.service.site.resource.active))
    abort = Exchange.abort

    def broken(self: Exchange) -> None:
        if self is first:
            raise RuntimeError("a bug in abort()")
        abort(self)

    monkeypatch.setattr(Exchange, "abort", broken)
    logs = LogCapture()
    globalLogPublisher.addObserver(logs)
    stopped: list[Any] = []
    try:
        relay.service.stopService().addBoth(stopped.append)
        relay.reactor.advance(5)
    finally:
        globalLogPublisher.removeObserver(logs)
    assert stopped and not isinstance(stopped[0], Failure)
    assert [line["outcome"] for line in logs.access()] == ["aborted"]  # the other one
    assert sum(t.disconnecting for t in transports) == 1
    assert any("a bug in abort()" in str(e.get("log_failure", "")) for e in logs.events)


def test_a_reload_during_the_drain_is_refused(tmp_path: Path) -> None:
    relay = Relay(tmp_path, config())
    relay.service.stopService()
    with pytest.raises(ReloadRefusedError, match="shutting down"):
        relay.service.apply_config(load_config(str(relay.path)))


def test_one_process_refuses_a_reload_that_asks_for_workers(tmp_path: Path) -> None:
    relay = Relay(tmp_path, config())
    path = _write(tmp_path / "workers.yaml", {**config(), "workers": 2})
    with pytest.raises(ReloadRefusedError, match="needs a restart"):
        relay.service.apply_config(load_config(path))


# -- helpers ----------------------------------------------------------------------------------


def _write(path: Path, raw: dict[str, Any]) -> str:
    path.write_text(json.dumps(raw))
    return str(path)

