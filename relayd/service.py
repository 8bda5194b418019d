"""The relayd service: owns the runtime and the listeners."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from relayd.config.model import Config
from relayd.http.site import RelaySite
from relayd.listeners import describe, listen
from relayd.runtime import RelayRuntime

log = Logger(namespace="relayd.service")


class RelayService(MultiService):
    """Binds every listener at (privileged) start and serves the current runtime."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.runtime = RelayRuntime(config, reactor)
        self.site = RelaySite(self.current_runtime, reactor)
        self.ports: list[IListeningPort] = []

    def current_runtime(self) -> RelayRuntime:
        return self.runtime

    def privilegedStartService(self) -> None:
        """Bind now, before twistd drops privileges, so ports below 1024 work."""
        for listener in self.runtime.config.listen:
            port = listen(self.reactor, listener, self.site)
            self.ports.append(port)
            log.info("relayd listening on {url}", url=describe(listener, port))
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        config = self.runtime.config
        log.info(
            "relayd started: {clients} clients, {providers} providers, {routes} routes from {src}",
            clients=len(config.clients),
            providers=len(config.providers),
            routes=len(config.routes),
            src=config.source,
        )

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        stopping = [port.stopListening() for port in self.ports]
        self.ports = []
        stopping.append(self.runtime.close())
        return DeferredList([d for d in stopping if d is not None], consumeErrors=True)
