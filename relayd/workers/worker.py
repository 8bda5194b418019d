"""A worker process: ``python -m relayd.workers.worker``, started by the daemon only.

The daemon (:mod:`relayd.workers.daemon`) passes the worker's end of a control
channel as file descriptor 3, and the connection board (:mod:`relayd.workers.board`)
as descriptor 4. Over it the worker gets the configuration (the bytes the
daemon validated) and the listening sockets, serves them with the same
:class:`~relayd.service.RelayService` one process runs, and answers the daemon's
questions (metrics, admin views, readiness). It never binds a port, never reads the
configuration file, never talks to systemd.

SIGTERM (from the daemon) drains as one process does; a lost control channel (the
daemon died) drains too, so no worker outlives its daemon. SIGHUP is ignored: reloads
come from the daemon.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    globalLogBeginner,
    textFileLogObserver,
)
from zope.interface import implementer

from relayd.config import config_from_bytes
from relayd.config.model import Config, ListenerConfig, StateConfig
from relayd.http.admin import AdminResource
from relayd.limits import LimitStore, StoreEvent, build_store
from relayd.listeners import adopt
from relayd.logs import batch_access_lines, journal_observer
from relayd.sdnotify import Notifier
from relayd.service import RelayService
from relayd.tls import ReloadableServerContext
from relayd.workers.board import BOARD_FD, AcceptGate, ConnectionBoard
from relayd.workers.channel import ControlChannel, adopt_channel
from relayd.workers.merge import Family, registry_families
from relayd.workers.store import DaemonStore

log = Logger(namespace="relayd.workers")

#: The control channel's descriptor in a worker.
CONTROL_FD = 3


class AdoptedPorts:
    """A worker's :class:`~relayd.listeners.ListenerPorts`: the daemon's sockets, each
    accepting through an :class:`~relayd.workers.board.AcceptGate`."""

    def __init__(self, reactor: Any, index: int, board: ConnectionBoard) -> None:
        self.reactor = reactor
        self.index = index
        self.board = board
        self.descriptors: dict[str, int] = {}

    def hand_over(self, keys: Iterable[str], descriptors: Iterable[int]) -> None:
        for key, fd in zip(keys, descriptors, strict=True):
            old = self.descriptors.pop(key, None)
            if old is not None:
                os.close(old)
            self.descriptors[key] = fd

    def open(
        self, key: str, listener: ListenerConfig, factory: Any,
        context: ReloadableServerContext | None,
    ) -> IListeningPort:
        fd = self.descriptors.pop(key, None)
        if fd is None:
            raise RuntimeError(f"the daemon sent no socket for listener {listener.address}")
        try:
            port = adopt(self.reactor, listener, fd, factory, context)
        finally:
            os.close(fd)
        AcceptGate(port, self.board, self.index, self.reactor)
        return port


class _Query:
    """What an admin handler reads of a request, for answers asked over the channel."""

    def __init__(self, args: dict[bytes, list[bytes]]) -> None:
        self.args = args


class Worker:
    """The worker's side of the control channel, and its relay service."""

    def __init__(self, reactor: Any, index: int, board: ConnectionBoard) -> None:
        self.reactor = reactor
        self.index = index
        self.board = board
        self.ports = AdoptedPorts(reactor, index, board)
        self.service: RelayService | None = None
        self.admin: AdminResource | None = None
        self.stopping = False
        self.channel = ControlChannel(
            {
                "start": self.start,
                "reload": self.reload,
                "metrics": self.metrics,
                "admin": self.admin_view,
                "readiness": self.readiness,
            },
            on_lost=self._daemon_gone,
        )

    def _store_factory(
        self, state: StateConfig, clock: Any, on_event: StoreEvent | None
    ) -> LimitStore:
        if state.store == "memory":
            return DaemonStore(self.channel, clock)
        return build_store(state, clock, on_event)

    # -- the daemon's calls ------------------------------------------------------------

    def start(self, raw: bytes, path: str, keys: list[str]) -> str:
        self.ports.hand_over(keys, self.channel.take_descriptors(len(keys)))
        config = config_from_bytes(raw, path)
        service = RelayService(
            config,
            self.reactor,
            notifier=Notifier({}),
            ports=self.ports,
            standalone=False,
            store_factory=self._store_factory,
            on_connections=self._count_connections,
        )
        self.board.set_open(self.index, 0)  # not what an earlier worker of this index left
        self.service = service
        service.privilegedStartService()
        service.startService()
        self.admin = AdminResource(
            service.metrics, service.current_runtime, self.reactor,
            get_token=lambda: None, is_draining=lambda: service.draining,
        )
        self.reactor.addSystemEventTrigger("before", "shutdown", self._drain)
        return "serving"

    def _count_connections(self, count: int) -> None:
        # A draining worker no longer counts (the daemon took it off the board): a new
        # worker of the same index may be writing this slot.
        if not self.stopping:
            self.board.set_open(self.index, count)

    def _drain(self) -> Deferred[Any]:
        """The drain, then one round trip so the daemon has every settlement (the
        reactor's shutdown drops bytes not yet written)."""
        self.stopping = True
        d = self._service().stopService()
        # Exchanges are settled before the drain's waiter fires (RelayResource.
        # report_finished); the sync a turn later is a margin.
        return d.addBoth(lambda _: deferLater(self.reactor, 0, self._sync))

    def _sync(self) -> Deferred[Any] | None:
        store = self._service().runtime.store
        if not isinstance(store, DaemonStore) or not self.channel.open:
            return None
        return store.sync().addErrback(
            lambda f: log.warn("worker {index}: last settlements not confirmed: {why}",
                               index=self.index, why=f.getErrorMessage())
        )

    def reload(self, raw: bytes, path: str, keys: list[str]) -> Deferred[str]:
        self.ports.hand_over(keys, self.channel.take_descriptors(len(keys)))
        service = self._service()
        d: Deferred[Config] = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), config_from_bytes, raw, path
        )
        d.addCallback(service.apply_config)
        return d.addCallback(lambda _: "ok")

    def metrics(self) -> list[Family]:
        return registry_families(self._service().metrics.registry)

    def admin_view(self, path: bytes, args: dict[bytes, list[bytes]]) -> Any:
        """An ``/admin/*`` answer of this worker: (status, content type, body)."""
        admin = self.admin
        assert admin is not None
        handler = admin.admin_routes.get(path)
        if handler is None:
            raise ValueError(f"no admin view {path!r}")
        return handler(admin, _Query(args))  # type: ignore[arg-type]

    def readiness(self) -> tuple[bool, list[str]]:
        service = self._service()
        if service.draining:
            return False, ["draining"]
        return service.runtime.readiness()

    def _service(self) -> RelayService:
        if self.service is None:
            raise RuntimeError("the worker has not started")
        return self.service

    # -- going away --------------------------------------------------------------------

    def _daemon_gone(self) -> None:
        if not self.stopping:
            log.warn("worker {index}: the daemon is gone; draining", index=self.index)
            self.stop()

    def stop(self) -> None:
        self.stopping = True
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass


@implementer(ILogObserver)
class _WorkerTag:
    """Marks each event but the access lines (which need no tag) with the worker."""

    def __init__(self, observer: ILogObserver, index: int) -> None:
        self.observer = observer
        self.index = index

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") != "relayd.access" and "log_system" not in event:
            name = getattr(event.get("log_level"), "name", "-")
            event = {
                **event,
                "log_system": f"{event.get('log_namespace', '-')}#{name} worker={self.index}",
            }
        self.observer(event)


def _begin_logging(style: str, index: int) -> None:
    """Log as the daemon does (its ``--logger``), to the standard output it shares."""
    observer = journal_observer() if style == "journal" else textFileLogObserver(sys.stdout)
    # As twistd does: every event goes to the observer (relayd logs no debug events).
    globalLogBeginner.beginLoggingTo([_WorkerTag(observer, index)], redirectStandardIO=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relayd worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--log", choices=("journal", "text"), default="text")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the daemon's
    _begin_logging(args.log, args.index)
    from twisted.internet import reactor  # the process entry point owns the reactor

    batch_access_lines(reactor)  # the journal observer's batching, as under twistd
    worker = Worker(reactor, args.index, ConnectionBoard(BOARD_FD))
    adopt_channel(reactor, CONTROL_FD, worker.channel)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
