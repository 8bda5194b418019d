"""The daemon of ``workers: N``: one process systemd sees, N workers that serve.

``twistd relayd`` with ``workers`` other than 1 runs :class:`WorkerDaemon` instead of
one :class:`~relayd.service.RelayService`. The daemon

* binds every listener once (before twistd drops privileges) and hands the sockets to
  each worker, which adopts them: the workers share each socket's accept queue, so a
  worker that stops (drain, crash) leaves the queued connections to the others;
* holds the memory store for every worker (:mod:`relayd.workers.store`);
* starts the workers, and starts a worker that died again under the same index (after
  0.5 s, doubling to 30 s while it keeps dying within 30 s of its start);
* sends ``READY=1`` once every worker serves, and answers the admin listener for all
  of them (:mod:`relayd.workers.admin`);
* on SIGHUP validates the file once: an invalid one changes nothing anywhere. A valid
  one is checked for what can fail (listener changes, certificates, new sockets), then
  every worker applies it with the one-process rules; new listeners' sockets travel
  with it. The result is logged, counted and sent to systemd once. ``workers`` itself
  may change: workers are added, or the last ones drained;
* on SIGTERM stops every worker (each drains its requests for up to
  ``shutdown_timeout``), waits for them, and exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.backoff import doubled
from relayd.config import config_from_bytes, read_config_file
from relayd.config.model import Config, ListenerConfig
from relayd.http.admin import AdminListener
from relayd.listeners import (
    ReloadRefusedError,
    announce,
    bind_socket,
    listener_keys,
    plan_listeners,
)
from relayd.logs import journal_in_use
from relayd.sdnotify import Notifier
from relayd.service import report_reload_failure, stop_reactor
from relayd.tls import certificate_options
from relayd.workers.admin import DaemonAdmin, DaemonMetrics
from relayd.workers.board import ConnectionBoard
from relayd.workers.channel import Handler
from relayd.workers.merge import WorkerFamilies
from relayd.workers.processes import WorkerProcess, describe_exit
from relayd.workers.store import StoreHost

log = Logger(namespace="relayd.workers")

#: A worker that dies within this many seconds of its start counts as failing again.
STEADY_SECONDS = 30.0
RESTART_BASE, RESTART_CAP = 0.5, 30.0
#: Beyond ``shutdown_timeout``, how long the daemon waits for draining workers to exit
#: before it kills them.
EXIT_GRACE = 10.0
#: Seconds a worker has to start serving, or to apply a reload, before it is killed
#: (and started again).
CALL_TIMEOUT = 60.0


def worker_count(config: Config) -> int:
    """``workers`` as a number: ``auto`` (0) is the CPUs this process may use."""
    if config.workers:
        return config.workers
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return max(os.cpu_count() or 1, 1)


@dataclass
class _Socket:
    config: ListenerConfig
    sock: socket.socket


class WorkerDaemon(MultiService):
    """Binds, spawns, supervises and reloads the workers (see the module)."""

    def __init__(
        self,
        config: Config,
        raw: bytes,
        reactor: Any,
        *,
        config_path: str,
        notifier: Notifier | None = None,
        install_signal_handlers: bool = False,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.raw = raw
        self.config_path = config_path
        self.generation = 0
        self.notifier = notifier or Notifier()
        self.install_signal_handlers = install_signal_handlers
        self.metrics = DaemonMetrics()
        self.store = StoreHost(reactor)
        self.board = ConnectionBoard.create()
        self.sockets: dict[str, _Socket] = {}
        self.workers: dict[int, WorkerProcess] = {}
        self.retiring: set[WorkerProcess] = set()  # scaled down, draining
        self.failures: dict[int, int] = {}
        self.spawned = 0
        self.families = WorkerFamilies()
        self.wanted = worker_count(config)
        self.admin = AdminListener(reactor, self._admin_resource)
        self.draining = False
        self.reloading = False
        self.reload_pending = False
        self.announced_ready = False

    # -- start ----------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        # The open-file limit is each worker's to raise (its RelayService does, as one
        # process does); the daemon holds a few descriptors only.
        for key, listener in zip(
            listener_keys(list(self.config.listen)), self.config.listen, strict=True
        ):
            self.sockets[key] = self._bind(listener)
        self.admin.switch(self.admin.bind(self.config), self.config)
        super().privilegedStartService()

    def _bind(self, listener: ListenerConfig) -> _Socket:
        if listener.tls is not None:
            certificate_options(listener.tls)  # refuse a bad certificate here, once
        sock = bind_socket(listener)
        announce(listener, sock.getsockname()[1])
        return _Socket(listener, sock)

    def startService(self) -> None:
        super().startService()
        if self.install_signal_handlers:
            signal.signal(signal.SIGHUP, self._on_sighup)
            self.reactor.callWhenRunning(signal.signal, signal.SIGTERM, self._on_sigterm)
        log.info(
            "relayd daemon (pid {pid}) starting {n} workers from {src}",
            pid=os.getpid(), n=self.wanted, src=self.config.source,
        )
        self.reactor.callWhenRunning(self._scale)

    def _scale(self) -> None:
        """Start the workers that are missing, or drain the surplus (highest first)."""
        if self.draining:
            return
        for index in range(self.wanted):
            if index not in self.workers:
                self._spawn(index)
        for index in sorted(self.workers, reverse=True):
            if index >= self.wanted:
                worker = self.workers.pop(index)
                log.info("worker {index} (pid {pid}) is no longer wanted; it drains",
                         index=index, pid=worker.pid)
                self.retiring.add(worker)
                self.board.serving(index, False)
                worker.stop()

    def _spawn(self, index: int) -> None:
        self.spawned += 1
        worker = WorkerProcess(index, self.spawned, self._worker_exited)
        handlers: dict[str, Handler] = self.store.handlers(worker.serial)
        # Read now: twistd starts its log observer after it made this service.
        log_style = "journal" if journal_in_use() else "text"
        try:
            channel = worker.spawn(self.reactor, handlers, log_style, self.board.fileno())
        except OSError as exc:  # fork or socketpair failed (EAGAIN, ENOMEM, EMFILE)
            failures = self.failures.get(index, 0) + 1
            self.failures[index] = failures
            delay = doubled(RESTART_BASE, failures, RESTART_CAP)
            log.error("cannot start worker {index}: {why}; trying again in {delay:g}s",
                      index=index, why=str(exc), delay=delay)
            self.reactor.callLater(delay, self._restart, index)
            return
        self.workers[index] = worker
        keys = list(self.sockets)
        worker.keys = set(keys)
        worker.generation = self.generation
        d = channel.call(
            "start", self.raw, self.config_path, keys,
            descriptors=[self.sockets[k].sock.fileno() for k in keys],
        )
        d.addTimeout(CALL_TIMEOUT, self.reactor)
        d.addCallbacks(self._worker_serving, self._worker_failed_start,
                       callbackArgs=(worker,), errbackArgs=(worker,))

    def _worker_serving(self, _: object, worker: WorkerProcess) -> None:
        if worker.state != "starting":
            return
        worker.state = "serving"
        self.board.serving(worker.index, True)
        log.info("worker {index} (pid {pid}) serving", index=worker.index, pid=worker.pid)
        if worker.generation != self.generation:  # a reload came while it started
            self._catch_up(worker).addErrback(
                lambda f: log.error("worker {index} refused the reloaded configuration: "
                                    "{why}", index=worker.index, why=f.getErrorMessage())
            )
        if not self.announced_ready and self._all_serving():
            self.announced_ready = True
            log.info("relayd serving with {n} workers", n=len(self.workers))
            self.notifier.ready(f"serving with {len(self.workers)} workers")

    def _worker_failed_start(self, failure: Failure, worker: WorkerProcess) -> None:
        if worker.state == "exited":
            return  # processEnded says why
        log.error("worker {index} failed to start: {why}", index=worker.index,
                  why=failure.getErrorMessage())
        worker.signal(signal.SIGKILL)

    def _all_serving(self) -> bool:
        return len(self.workers) >= self.wanted and all(
            w.state == "serving" for w in self.workers.values()
        )

    def _worker_exited(self, worker: WorkerProcess, reason: Failure) -> None:
        how = describe_exit(reason)
        self.retiring.discard(worker)
        if self.workers.get(worker.index) is worker:
            self.board.serving(worker.index, False)
        self.families.worker_gone(worker.serial)
        self.store.worker_gone(worker.serial)
        if self.workers.get(worker.index) is not worker:
            log.info("worker {index} (pid {pid}) exited ({how})", index=worker.index,
                     pid=worker.pid, how=how)
            return  # drained on purpose (scaled down), or replaced already
        del self.workers[worker.index]
        if self.draining:
            log.info("worker {index} (pid {pid}) exited ({how})", index=worker.index,
                     pid=worker.pid, how=how)
            return
        steady = self.reactor.seconds() - worker.started_at >= STEADY_SECONDS
        failures = 0 if steady else self.failures.get(worker.index, 0) + 1
        self.failures[worker.index] = failures
        delay = doubled(RESTART_BASE, failures, RESTART_CAP) if failures else RESTART_BASE
        log.error(
            "worker {index} (pid {pid}) died ({how}); starting it again in {delay:g}s",
            index=worker.index, pid=worker.pid, how=how, delay=delay,
        )
        self.metrics.worker_restarted(worker.index)
        self.reactor.callLater(delay, self._restart, worker.index)

    def _restart(self, index: int) -> None:
        if not self.draining and index < self.wanted and index not in self.workers:
            self._spawn(index)

    # -- reload ---------------------------------------------------------------------------

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.request_reload)

    def request_reload(self) -> None:
        """Validate the file once, then have every worker apply it (coalesced)."""
        if self.reloading:
            self.reload_pending = True
            return
        self.reloading = True
        self.notifier.reloading()
        log.info("reloading configuration from {path}", path=self.config_path)
        d: Deferred[tuple[bytes, Config]] = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), _read_and_check, self.config_path
        )
        d.addCallback(self.apply)
        d.addCallbacks(self._reloaded, self._reload_failed)
        d.addBoth(self._reload_done)

    def apply(self, loaded: tuple[bytes, Config]) -> Deferred[list[str]]:
        """Step 1 here (what can fail), then every worker; fires with their refusals."""
        raw, config = loaded
        if self.draining:
            raise ReloadRefusedError("relayd is shutting down")
        wanted = plan_listeners({k: s.config for k, s in self.sockets.items()}, config.listen)
        for key, listener in wanted.items():
            if listener.tls is not None and key in self.sockets:
                certificate_options(listener.tls)  # new listeners: checked as they are bound
        opened: dict[str, _Socket] = {}
        admin_port = None
        try:
            for key, listener in wanted.items():
                if key not in self.sockets:
                    opened[key] = self._bind(listener)
            admin_port = self.admin.bind(config)
        except Exception as exc:
            for new in opened.values():
                new.sock.close()
            if admin_port is not None:
                admin_port.stopListening()
            raise ReloadRefusedError(f"cannot open a new listener: {exc}") from exc
        removed = [key for key in self.sockets if key not in wanted]
        for key, listener in wanted.items():
            if key in self.sockets:
                self.sockets[key].config = listener
        self.sockets.update(opened)
        if config.state != self.config.state:
            self.store.reset()
        self.config, self.raw = config, raw
        self.generation += 1
        self.admin.switch(admin_port, config)
        workers = [w for w in self.workers.values() if w.state == "serving"]
        d = DeferredList([self._catch_up(w) for w in workers], consumeErrors=True)

        def applied(results: list[tuple[bool, Any]]) -> list[str]:
            if self.draining:
                return []  # the stop closed the sockets and stops every worker
            for key in removed:
                log.info("closing listener {address}", address=self.sockets[key].config.address)
                self.sockets.pop(key).sock.close()
            for worker in self.workers.values():
                worker.keys.difference_update(removed)
            self.wanted = worker_count(config)
            self._scale()
            return [
                f"worker {w.index}: {value.getErrorMessage()}"
                for w, (ok, value) in zip(workers, results, strict=True) if not ok
            ]

        return d.addCallback(applied)

    def _catch_up(self, worker: WorkerProcess) -> Deferred[Any]:
        """Send ``worker`` the current configuration and the sockets it lacks."""
        if worker.channel is None:
            return succeed(None)
        generation = self.generation
        missing = [key for key in self.sockets if key not in worker.keys]
        worker.keys.update(missing)
        d = worker.channel.call(
            "reload", self.raw, self.config_path, missing,
            descriptors=[self.sockets[k].sock.fileno() for k in missing],
        )
        d.addTimeout(CALL_TIMEOUT, self.reactor)

        def done(result: Any) -> Any:
            worker.generation = generation
            return result

        def hung(failure: Failure) -> Failure:
            if failure.check(defer.TimeoutError):
                log.error("worker {index} did not apply the configuration in {n:g}s; "
                          "killing it (it starts again)", index=worker.index, n=CALL_TIMEOUT)
                worker.signal(signal.SIGKILL)
            return failure

        return d.addCallbacks(done, hung)

    def _reloaded(self, refusals: list[str]) -> None:
        if refusals:
            for refusal in refusals:
                log.error("reload refused by {refusal}", refusal=refusal)
            self.metrics.config_reload("refused")
            return
        self.metrics.config_reload("ok")
        config = self.config
        log.info(
            "configuration reloaded: {clients} clients, {providers} providers, "
            "{routes} routes, {workers} workers",
            clients=len(config.clients), providers=len(config.providers),
            routes=len(config.routes), workers=self.wanted,
        )

    def _reload_failed(self, failure: Failure) -> None:
        self.metrics.config_reload(report_reload_failure(failure, self.config_path))

    def _reload_done(self, _: object) -> None:
        self.reloading = False
        if self.announced_ready and not self.draining:
            self.notifier.ready(f"serving with {len(self.workers)} workers")
        if self.reload_pending:
            self.reload_pending = False
            self.request_reload()

    # -- the admin listener ---------------------------------------------------------------

    def _admin_resource(self) -> DaemonAdmin:
        return DaemonAdmin(
            self.metrics, lambda: list(self.workers.values()), self.reactor,
            families=self.families, wanted=lambda: self.wanted,
            get_token=lambda: self.config.admin.token if self.config.admin else None,
            is_draining=lambda: self.draining,
        )

    # -- stop -----------------------------------------------------------------------------

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(stop_reactor, self.reactor)

    def stopService(self) -> Deferred[Any]:
        """Every worker drains and exits; then the daemon closes what it holds."""
        super().stopService()
        self.draining = True
        self.notifier.stopping()
        for held in self.sockets.values():
            held.sock.close()  # the workers' copies keep the sockets until they drain
        self.sockets = {}
        workers = list(self.workers.values()) + list(self.retiring)
        log.info("stopping {n} workers (each drains for up to {timeout:g}s)",
                 n=len(workers), timeout=self.config.shutdown_timeout)
        for worker in workers:
            worker.stop()
        timer = self.reactor.callLater(
            self.config.shutdown_timeout + EXIT_GRACE, self._kill_remaining, workers
        )
        exited = DeferredList([w.exited for w in workers])

        def finished(_: object) -> Any:
            if timer.active():
                timer.cancel()
            return self.admin.close()

        return exited.addBoth(finished)

    @staticmethod
    def _kill_remaining(workers: list[WorkerProcess]) -> None:
        for worker in workers:
            if worker.state != "exited":
                log.warn("worker {index} (pid {pid}) did not exit; killing it",
                         index=worker.index, pid=worker.pid)
                worker.signal(signal.SIGKILL)


def _read_and_check(path: str) -> tuple[bytes, Config]:
    raw = read_config_file(path)
    return raw, config_from_bytes(raw, path)
