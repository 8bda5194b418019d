"""The daemon's worker processes: spawning one, its control channel, its end."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from relayd.workers.channel import ControlChannel, Handler, adopt_channel

#: The worker's module, run with this interpreter.
WORKER_MODULE = "relayd.workers.worker"


class WorkerProcess(ProcessProtocol):
    """One worker: its process, its control channel and what the daemon knows of it.

    ``state`` is ``starting`` (spawned, not yet serving), ``serving``, ``stopping``
    (sent SIGTERM: draining) or ``exited``. ``keys`` are the listeners it was handed.
    """

    def __init__(
        self, index: int, serial: int, on_exit: Callable[[WorkerProcess, Failure], None]
    ) -> None:
        self.index = index
        self.serial = serial  # unique in the daemon's life: an index is reused by restarts
        self.on_exit = on_exit
        self.state = "starting"
        self.keys: set[str] = set()
        self.generation = -1  # the daemon's configuration generation it runs
        self.started_at = 0.0
        self.pid: int | None = None
        self.channel: ControlChannel | None = None
        self.exited: Deferred[None] = Deferred()

    def spawn(
        self, reactor: Any, handlers: Mapping[str, Handler], log_style: str, board: int
    ) -> ControlChannel:
        """Start the process with its end of a fresh socket pair as descriptor 3 and the
        connection board ``board`` as descriptor 4."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
            argv = [sys.executable, "-m", WORKER_MODULE, "--index", str(self.index),
                    "--log", log_style]
            reactor.spawnProcess(
                self, sys.executable, argv, env=env,
                childFDs={1: 1, 2: 2, 3: theirs.fileno(), 4: board},
            )
        finally:
            theirs.close()
        self.started_at = reactor.seconds()
        channel = ControlChannel(handlers, on_lost=lambda: None)
        self.channel = adopt_channel(reactor, ours.detach(), channel)
        return channel

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def signal(self, signum: int) -> None:
        """Send ``signum`` unless the process is gone already."""
        if self.state == "exited" or self.transport is None:
            return
        try:
            self.transport.signalProcess(signum)
        except (ProcessExitedAlready, OSError):
            pass

    def stop(self) -> None:
        """Drain and exit (SIGTERM)."""
        if self.state != "exited":
            self.state = "stopping"
            self.signal(signal.SIGTERM)

    def processEnded(self, reason: Failure) -> None:
        self.state = "exited"
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.loseConnection()
        self.exited.callback(None)
        self.on_exit(self, reason)


def describe_exit(reason: Failure) -> str:
    """``exit code 3``, ``signal 9`` or ``exit code 0`` from a processEnded reason."""
    value = reason.value
    signum = getattr(value, "signal", None)
    if signum is not None:
        return f"signal {signum}"
    return f"exit code {getattr(value, 'exitCode', '?')}"
