"""The relayd service: owns the runtime, the listeners, reloads and the shutdown drain.

Reload (SIGHUP): the file is read and validated off the reactor thread; an invalid file
is logged with every error and changes nothing. A valid one is applied in two steps:
first everything that can fail and touches nothing in use (the plan of what the new
runtime carries over, :func:`~relayd.runtime_diff.plan_reload`; new TLS contexts; new
listening sockets), so a failure leaves the old configuration serving untouched; then
the new runtime is built from the plan (which applies the new settings to the backends it
keeps) and one reference swap makes it current, after which TLS listeners hand new
handshakes the new certificate, removed listeners stop accepting, and removed backends
finish their in-flight requests before closing.
Requests already in progress keep the runtime they started with. Reloads are
serialised; SIGHUPs that arrive during one are coalesced into a single follow-up.

Shutdown (SIGTERM): stop accepting, let in-flight requests and streams finish for up to
``shutdown_timeout`` seconds, abort what is left, and exit 0. Under twistd relayd handles
SIGTERM itself (stopping the reactor, which runs the drain): the reactor's own handler
would also record the signal, and twistd would then re-raise it once the drain is done,
so the process would die of the signal it had answered.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.config import ConfigErrors, load_config
from relayd.config.model import Config, ListenerConfig
from relayd.http.admin import AdminListener, AdminResource
from relayd.http.site import RelaySite
from relayd.limits import StoreFactory
from relayd.listeners import (
    BoundPorts,
    ListenerPorts,
    ReloadRefusedError,
    listener_keys,
    plan_listeners,
)
from relayd.metrics import RelayMetrics
from relayd.oslimits import raise_open_file_limit
from relayd.runtime import AgentFactory, RelayRuntime
from relayd.runtime_diff import plan_reload
from relayd.sdnotify import Notifier
from relayd.tls import ReloadableServerContext, TlsSetupError, certificate_options
from relayd.upstream import Backend

__all__ = ["RelayService", "ReloadRefusedError"]

log = Logger(namespace="relayd.service")


@dataclass
class _OpenListener:
    key: str  # identity across reloads, see listener_keys
    config: ListenerConfig
    port: IListeningPort
    context: ReloadableServerContext | None


def stop_reactor(reactor: Any) -> None:
    """SIGTERM's work: stop the reactor, whose shutdown runs the services' drain."""
    log.info("received SIGTERM, shutting down")
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass  # a SIGTERM during the drain: it is already under way


def report_reload_failure(failure: Failure, path: str | None) -> str:
    """Log why a reload did not apply; the result to count (``invalid``, ``refused``)."""
    if failure.check(ConfigErrors):
        errors = failure.value.errors  # type: ignore[union-attr]
        for error in errors:
            log.error("reload rejected: {error}", error=str(error))
        log.error(
            "invalid configuration {path} ({n} errors); still running the previous one",
            path=path,
            n=len(errors),
        )
        return "invalid"
    if failure.check(ReloadRefusedError, TlsSetupError):
        log.error(
            "reload refused: {why}; still running the previous configuration",
            why=str(failure.value),
        )
    else:
        log.failure("reload failed; still running the previous configuration", failure)
    return "refused"


class RelayService(MultiService):
    """Serves the current runtime on every configured listener, plus the admin listener."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        config_path: str | None = None,
        notifier: Notifier | None = None,
        install_signal_handlers: bool = False,
        agent_factory: AgentFactory | None = None,
        ports: ListenerPorts | None = None,
        standalone: bool = True,
        store_factory: StoreFactory | None = None,
        on_connections: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.agent_factory = agent_factory
        # standalone: the one relayd process. A worker (relayd.workers) adopts the
        # daemon's sockets and leaves the admin listener and the memory store to it.
        self.ports: ListenerPorts = ports if ports is not None else BoundPorts(reactor)
        self.standalone = standalone
        self.store_factory = store_factory
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.install_signal_handlers = install_signal_handlers
        self.metrics = RelayMetrics()
        self.runtime = RelayRuntime(
            config, reactor, agent_factory=agent_factory, on_store_event=self.metrics.store_event,
            store_factory=store_factory,
        )
        self.metrics.set_runtime_source(self.current_runtime, reactor)
        # on_connections: told the open client connections at each change (a worker
        # writes them on the daemon's connection board, relayd.workers.board).
        self.site = RelaySite(self.current_runtime, reactor, self.metrics, on_connections)
        self.listeners: list[_OpenListener] = []
        self.admin = AdminListener(reactor, self._admin_resource)
        self.draining = False
        self.reloading = False
        self.reload_pending = False
        self.reload_count = 0

    def current_runtime(self) -> RelayRuntime:
        return self.runtime

    # -- start ----------------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind now, before twistd drops privileges, so ports below 1024 work."""
        before, after = raise_open_file_limit()
        if after > before:
            log.info("open file limit raised from {before} to {after}", before=before, after=after)
        config = self.runtime.config
        for key, listener in zip(listener_keys(list(config.listen)), config.listen, strict=True):
            self.listeners.append(self._open(key, listener))
        self._open_admin(config)
        super().privilegedStartService()

    def _open(self, key: str, listener: ListenerConfig) -> _OpenListener:
        context = (
            ReloadableServerContext(listener.tls, self.reactor)
            if listener.tls is not None else None
        )
        port = self.ports.open(key, listener, self.site, context)
        return _OpenListener(key, listener, port, context)

    @staticmethod
    def _close_unused(opened: list[_OpenListener], admin_port: IListeningPort | None) -> None:
        """Close the listeners a refused reload had bound already."""
        for listener in opened:
            listener.port.stopListening()
        if admin_port is not None:
            admin_port.stopListening()

    def _open_admin(self, config: Config) -> None:
        port = self._bind_admin(config)
        if port is not None:
            self.admin.switch(port, config)

    def _bind_admin(self, config: Config) -> IListeningPort | None:
        """Bind the admin listener of ``config`` if it is new or moved (may raise); a
        worker has none (its daemon answers for it)."""
        return self.admin.bind(config) if self.standalone else None

    def _admin_resource(self) -> AdminResource:
        return AdminResource(
            self.metrics,
            self.current_runtime,
            self.reactor,
            get_token=self._admin_token,
            is_draining=lambda: self.draining,
        )

    def _admin_token(self) -> str | None:
        admin = self.runtime.config.admin
        return admin.token if admin is not None else None

    def startService(self) -> None:
        super().startService()
        for backend in self.runtime.backends:
            backend.start_health_checks(self._health_changed)
        if self.install_signal_handlers:
            signal.signal(signal.SIGHUP, self._on_sighup)
            # The reactor installs its own SIGTERM handler as it starts, before it calls
            # what callWhenRunning was given: relayd's replaces it then.
            self.reactor.callWhenRunning(signal.signal, signal.SIGTERM, self._on_sigterm)
        config = self.runtime.config
        log.info(
            "relayd started: {clients} clients, {providers} providers, {routes} routes from {src}",
            clients=len(config.clients),
            providers=len(config.providers),
            routes=len(config.routes),
            src=config.source,
        )
        # READY=1 once the reactor runs: by then the SIGTERM handler is installed, so a
        # stop that follows READY always drains.
        self.reactor.callWhenRunning(self.notifier.ready)

    def _health_changed(self, backend: Backend, healthy: bool) -> None:
        if healthy:
            log.info("backend {backend} is healthy again", backend=backend)
        else:
            log.warn(
                "backend {backend} is unhealthy: {error}",
                backend=backend,
                error=backend.health.last_error,
            )

    # -- reload ---------------------------------------------------------------------------------

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.request_reload)

    # -- SIGTERM --------------------------------------------------------------------------------

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(stop_reactor, self.reactor)

    def request_reload(self) -> None:
        """Reload the config file; coalesces requests that arrive during a reload."""
        if self.reloading:
            self.reload_pending = True
            return
        if self.config_path is None:
            log.warn("reload requested but relayd has no configuration file to read")
            return
        self.reloading = True
        self.notifier.reloading()
        log.info("reloading configuration from {path}", path=self.config_path)
        d: Deferred[Config] = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), load_config, self.config_path
        )
        d.addCallbacks(self.apply_config, self._reload_failed)
        d.addErrback(self._reload_failed)
        d.addBoth(self._reload_done)

    def _reload_failed(self, failure: Failure) -> None:
        self.metrics.config_reload(report_reload_failure(failure, self.config_path))

    def _reload_done(self, _: object) -> None:
        self.reloading = False
        self.notifier.ready()
        if self.reload_pending:
            self.reload_pending = False
            self.request_reload()

    def apply_config(self, config: Config) -> None:
        """Switch to ``config``, or raise (changing nothing) when it can't be applied live."""
        if self.draining:
            raise ReloadRefusedError("relayd is shutting down")
        if self.standalone and config.workers != 1:
            raise ReloadRefusedError(
                "relayd runs as one process (workers: 1 when it started); starting workers "
                "needs a restart (systemctl restart relayd)"
            )
        current = {o.key: o for o in self.listeners}
        wanted = plan_listeners({k: o.config for k, o in current.items()}, config.listen)
        # Step 1: everything that can fail.
        new_contexts = {
            key: certificate_options(listener.tls)
            for key, listener in wanted.items()
            if listener.tls is not None and key in current
        }
        change = plan_reload(self.runtime, config)
        opened: list[_OpenListener] = []
        admin_port: IListeningPort | None = None
        try:
            for key, listener in wanted.items():
                if key not in current:
                    opened.append(self._open(key, listener))
            admin_port = self._bind_admin(config)
        except Exception as exc:
            self._close_unused(opened, admin_port)
            raise ReloadRefusedError(f"cannot open a new listener: {exc}") from exc
        # Step 2: build the runtime (this applies the new settings to the backends it
        # keeps), then the swap.
        try:
            runtime = RelayRuntime(
                config,
                self.reactor,
                agent_factory=self.agent_factory,
                on_store_event=self.metrics.store_event,
                store_factory=self.store_factory,
                carry=change,
            )
        except Exception:
            self._close_unused(opened, admin_port)
            raise
        self.runtime = runtime
        kept: list[_OpenListener] = []
        for key, open_listener in current.items():
            if key in wanted:
                if key in new_contexts and open_listener.context is not None:
                    tls = wanted[key].tls
                    assert tls is not None
                    open_listener.context.replace(new_contexts[key], tls)
                open_listener.config = wanted[key]
                kept.append(open_listener)
            else:
                log.info("closing listener {address}", address=open_listener.config.address)
                open_listener.port.stopListening()
        self.listeners = kept + opened
        self.admin.switch(admin_port, config)
        if change.replaced_store is not None:
            log.info(
                "state store changed to {store}; the previous one is closed",
                store=config.state.store,
            )
            change.replaced_store.close()
        for backend in change.retired:
            log.info("backend {backend} removed; it finishes in-flight requests", backend=backend)
            backend.retire()
        if self.running:
            for backend in change.built_anew(runtime):
                backend.start_health_checks(self._health_changed)
        self.reload_count += 1
        self.metrics.config_reload("ok")
        log.info(
            # A worker applies what its daemon reloaded (and reports once).
            ("configuration reloaded: " if self.standalone else "configuration applied: ")
            + "{clients} clients, {providers} providers, {backends} backends, {routes} routes",
            clients=len(config.clients),
            providers=len(config.providers),
            backends=len(runtime.backends),
            routes=len(config.routes),
        )

    # -- stop -----------------------------------------------------------------------------------

    def stopService(self) -> Deferred[Any]:
        """Drain: stop accepting, wait for in-flight requests, then abort the rest."""
        super().stopService()
        self.draining = True
        self.notifier.stopping()
        stopping = [o.port.stopListening() for o in self.listeners]
        self.listeners = []
        resource = self.site.resource
        timeout = self.runtime.config.shutdown_timeout
        active = len(resource.active)
        if active:
            log.info(
                "draining {n} in-flight requests (up to {timeout:g}s)", n=active, timeout=timeout
            )
        drained = resource.wait_idle()
        timer = self.reactor.callLater(timeout, self._abort_remaining, drained)

        def finished(_: object) -> Deferred[Any]:
            if timer.active():
                timer.cancel()
            closing: list[Deferred[Any] | None] = list(stopping)
            closing.append(self.admin.close())
            closing.append(self.runtime.close())
            return DeferredList([d for d in closing if d is not None], consumeErrors=True)

        return drained.addBoth(finished)

    def _abort_remaining(self, drained: Deferred[None]) -> None:
        remaining = list(self.site.resource.active)
        log.warn("shutdown timeout: aborting {n} unfinished requests", n=len(remaining))
        for exchange in remaining:
            try:
                exchange.abort()
            except Exception:  # one request's bug must not hold the stop up
                log.failure("unexpected error aborting {request_id}",
                            request_id=exchange.request_id)
        self.site.resource.report_finished()  # their lines now, not after the stop
        if not drained.called:
            drained.callback(None)

