"""Waiting for a backend slot: a request whose usable backends are all at their
``max_concurrent`` waits, first come first served and bounded in time and number,
rather than being refused at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from relayd.errors import Outcome, Refusal
from relayd.http.planner import AttemptPlanner, Pick
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
    """One request's wait for a slot on any backend its planner could pick.

    When one of them frees a slot, the planner picks again: a pick goes to ``on_pick``;
    with none, the wait goes on if backends are still only full, else it ends with a
    no-backend :class:`Refusal` to ``on_failure``, as does the ``queue_timeout`` (and
    anything that goes wrong meanwhile: this runs inside another request's release).
    """

    __slots__ = ("_clock", "_metrics", "_on_failure", "_on_pick", "_planner", "_queued",
                 "_room", "_timeout")

    def __init__(
        self,
        room: WaitingRoom,
        config: Config,
        clock: IReactorTime,
        metrics: RelayMetrics,
        planner: AttemptPlanner,
        blocked: list[Backend],
        on_pick: Callable[[Pick], None],
        on_failure: Callable[[Failure], None],
    ) -> None:
        """Start waiting; raises :class:`Refusal` when the queue is full (or off)."""
        what = planner.provider_names()
        if room.waiting >= config.max_queued or config.queue_timeout <= 0:
            raise queue_refusal(
                metrics, "full",
                f"every backend of {what} is at its concurrency limit and the queue is full "
                f"({config.max_queued} requests waiting)",
            )
        self._room = room
        self._clock = clock
        self._metrics = metrics
        self._planner = planner
        self._on_pick = on_pick
        self._on_failure = on_failure
        self._timeout = config.queue_timeout
        queued = self._queued = QueuedRequest(self._slot_freed, clock.seconds())
        queued.wait_on(blocked)
        queued.timer = clock.callLater(config.queue_timeout, self._timed_out)
        room.waiting += 1
        metrics.queue_entered()

    def _slot_freed(self, backend: Backend) -> None:
        """A backend this request waits for released a slot (called from its release)."""
        planner = self._planner
        try:
            pick = planner.next()
            if pick is None:
                blocked = planner.capacity_blocked()
                if blocked:
                    self._queued.wait_on(blocked)
                    return
            self.leave()
            if pick is None:
                raise planner.no_backend()
            self._on_pick(pick)
        except Exception:
            self._on_failure(Failure())

    def _timed_out(self) -> None:
        self._queued.timer = None
        self.leave()
        self._on_failure(Failure(queue_refusal(
            self._metrics, "timeout",
            f"no backend of {self._planner.provider_names()} had a free slot within "
            f"{self._timeout:g}s (all at their concurrency limit)",
        )))

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
