"""Waiting for a backend slot: a request whose usable backends are all at their
``max_concurrent`` waits, first come first served and bounded in time and number,
rather than being refused at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime

from relayd.errors import Outcome, Refusal
from relayd.metrics import RelayMetrics
from relayd.upstream import Backend, QueuedRequest

if TYPE_CHECKING:
    from relayd.config.model import Config


class WaitingRoom:
    """The count of requests waiting for a slot on one listener's resource."""

    __slots__ = ("waiting",)

    def __init__(self) -> None:
        self.waiting = 0


class SlotWait:
    """One request's wait for a slot on any of ``blocked``.

    ``on_slot(backend)`` is called when one of them frees a slot; it must then pick (and
    :meth:`leave`), or :meth:`wait_on` again. ``on_timeout()`` is called once the
    ``queue_timeout`` is over, after the wait was left.
    """

    __slots__ = ("_clock", "_metrics", "_queued", "_room")

    def __init__(
        self,
        room: WaitingRoom,
        config: Config,
        clock: IReactorTime,
        metrics: RelayMetrics,
        blocked: list[Backend],
        on_slot: Callable[[Backend], None],
        on_timeout: Callable[[], None],
        what: str,
    ) -> None:
        """Start waiting; raises :class:`Refusal` when the queue is full (or off)."""
        if room.waiting >= config.max_queued or config.queue_timeout <= 0:
            raise queue_refusal(
                metrics, "full",
                f"every backend of {what} is at its concurrency limit and the queue is full "
                f"({config.max_queued} requests waiting)",
            )
        self._room = room
        self._clock = clock
        self._metrics = metrics
        queued = self._queued = QueuedRequest(on_slot, clock.seconds())
        queued.wait_on(blocked)

        def timed_out() -> None:
            queued.timer = None
            self.leave()
            on_timeout()

        queued.timer = clock.callLater(config.queue_timeout, timed_out)
        room.waiting += 1
        metrics.queue_entered()

    def wait_on(self, blocked: list[Backend]) -> None:
        """Keep waiting, on these backends too."""
        self._queued.wait_on(blocked)

    def leave(self) -> None:
        """Stop waiting (once): picked, refused, timed out or the exchange ended."""
        queued = self._queued
        if queued.on_slot is _left:
            return
        queued.on_slot = _left
        queued.leave()
        self._room.waiting -= 1
        self._metrics.queue_left(self._clock.seconds() - queued.since)


def queue_refusal(metrics: RelayMetrics, reason: str, message: str) -> Refusal:
    """503 for want of a backend slot (``full`` or ``timeout``): worth a retry soon."""
    metrics.queue_refused(reason)
    outcome = Outcome.QUEUE_FULL if reason == "full" else Outcome.QUEUE_TIMEOUT
    return Refusal(503, message, outcome=outcome, retry_after=1.0)


def _left(backend: Backend) -> None:
    """The slot callback of a wait that is over."""
