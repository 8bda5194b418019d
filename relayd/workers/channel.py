"""The control channel between the daemon and one worker: a Unix socket pair.

Messages are length-prefixed pickles of tuples. Both ends are this same program, and
the socket pair is created by the daemon and handed to the worker it spawns (no address
anyone else can connect to), so pickle's trust requirement holds. Three kinds:

``("call", id, op, args)``
    Run handler ``op`` with ``args``; the answer comes back as ``("reply", id, ok,
    value)``, ``value`` being the result or, when ``ok`` is false, the error's text.
``("cast", op, args)``
    Run handler ``op``; no answer.

Listening sockets travel as file descriptors (``SCM_RIGHTS``) sent just before the
message that names them; the receiving end queues them in arrival order
(:meth:`ControlChannel.take_descriptors`).
"""

from __future__ import annotations

import os
import pickle
import socket
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger(namespace="relayd.workers")

Handler = Callable[..., Any]

#: The largest message either end accepts (a metrics answer of a big deployment, a
#: configuration file): far above what relayd sends, far below what would hurt.
MAX_MESSAGE = 256 * 1024 * 1024


class ChannelClosedError(Exception):
    """The other end went away before it answered."""


class RemoteError(Exception):
    """The other end's handler failed; the message is its error's text."""


@implementer(IFileDescriptorReceiver)
class ControlChannel(Int32StringReceiver):
    """One end of the control channel: calls, casts, answers and passed descriptors."""

    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, handlers: Mapping[str, Handler], on_lost: Callable[[], None]) -> None:
        self.handlers = handlers
        self.on_lost = on_lost
        self.pending: dict[int, Deferred[Any]] = {}
        self.descriptors: deque[int] = deque()
        self.next_id = 0
        self.open = True

    # -- sending ----------------------------------------------------------------------

    def call(self, op: str, *args: Any, descriptors: Sequence[int] = ()) -> Deferred[Any]:
        """Run ``op`` on the other end; fires with its result (or RemoteError).

        ``descriptors`` are duplicated first: the transport sends them on a later turn,
        by which time the caller may have closed its own (the duplicates are closed once
        the answer, or the end of the channel, shows they were received or never will be).
        """
        if not self.open:
            return fail(ChannelClosedError(f"control channel closed before {op}"))
        self.next_id += 1
        d: Deferred[Any] = Deferred()
        self.pending[self.next_id] = d
        copies = [os.dup(fd) for fd in descriptors]
        self._send(("call", self.next_id, op, args), copies)
        if copies:
            d.addBoth(_closing, copies)
        return d

    def cast(self, op: str, *args: Any) -> None:
        """Run ``op`` on the other end, without an answer (dropped when closed)."""
        if self.open:
            self._send(("cast", op, args), ())

    def _send(self, message: tuple[Any, ...], descriptors: Sequence[int]) -> None:
        for fd in descriptors:
            self.transport.sendFileDescriptor(fd)  # type: ignore[union-attr]
        self.sendString(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))

    # -- receiving --------------------------------------------------------------------

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self.descriptors.append(descriptor)

    def take_descriptors(self, count: int) -> list[int]:
        """The next ``count`` received descriptors, in the order they were sent."""
        return [self.descriptors.popleft() for _ in range(count)]

    def stringReceived(self, string: bytes) -> None:
        message = pickle.loads(string)
        kind = message[0]
        if kind == "reply":
            _, call_id, ok, value = message
            d = self.pending.pop(call_id, None)
            if d is not None:
                if ok:
                    d.callback(value)
                else:
                    d.errback(RemoteError(value))
        elif kind == "call":
            _, call_id, op, args = message
            answer = maybeDeferred(self._run, op, args)
            answer.addCallbacks(
                self._answer, self._failed, callbackArgs=(call_id,), errbackArgs=(call_id, op)
            )
        else:
            _, op, args = message
            maybeDeferred(self._run, op, args).addErrback(self._cast_failed, op)

    def _run(self, op: str, args: tuple[Any, ...]) -> Any:
        return self.handlers[op](*args)

    def _answer(self, value: Any, call_id: int) -> None:
        if self.open:
            self._send(("reply", call_id, True, value), ())

    def _failed(self, failure: Failure, call_id: int, op: str) -> None:
        if self.open:
            self._send(("reply", call_id, False, failure.getErrorMessage()), ())

    @staticmethod
    def _cast_failed(failure: Failure, op: str) -> None:
        log.failure("relayd: control message {op} failed", failure, op=op)

    def lengthLimitExceeded(self, length: int) -> None:
        log.error("relayd: control message of {n} bytes refused", n=length)
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.open = False
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(ChannelClosedError("control channel closed"))
        while self.descriptors:
            os.close(self.descriptors.popleft())
        self.on_lost()


def _closing(result: Any, descriptors: list[int]) -> Any:
    for fd in descriptors:
        os.close(fd)
    return result


def adopt_channel(reactor: Any, fd: int, channel: ControlChannel) -> ControlChannel:
    """Run ``channel`` over the connected Unix socket ``fd`` (which is closed here: the
    reactor works on its own duplicate)."""
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, Factory.forProtocol(lambda: channel))
    os.close(fd)
    return channel
