"""The memory store with several workers: held by the daemon, used by every worker.

With ``state.store: memory`` and ``workers`` above 1, limits, budgets, usage counters
and object owners must not be kept per worker (a 60 rpm limit would admit 60 per
worker). So the daemon process holds the one :class:`~relayd.limits.MemoryStore`, and
each worker's runtime gets a :class:`DaemonStore`, which asks it over the control
channel. The daemon answers each call in one go on its reactor, so an admission stays
atomic across workers: the same semantics as one process, for one local round trip.

Settlements (usage, token reservations made good, leases given back) need no answer:
they are queued and sent as one message, and always before the worker's next call, so
the daemon sees them in the order the worker made them. A settlement that gives a
concurrency lease back goes at the end of the reactor turn (another worker may be
waiting for the slot); the others (usage counts, corrections of token reservations)
wait up to :data:`SETTLE_DELAY` seconds, so a busy worker sends one message for many
requests instead of one each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from relayd.limits import MemoryStore, ObjectRecord, UsageRecord
from relayd.limits.checks import Adjustment, Check, ConcurrencyCheck, Decision
from relayd.limits.redis import StoreUnavailableError
from relayd.timers import rearm
from relayd.workers.channel import ControlChannel

#: How long a settlement without a lease to give back may wait for others.
SETTLE_DELAY = 0.05
#: Seconds a worker waits for the daemon's answer before it decides alone.
CALL_TIMEOUT = 5.0

#: The store operations a worker may ask of the daemon's memory store.
OPERATIONS = frozenset({"admit", "usage_snapshot", "claim", "owners"})

#: One settlement as queued and sent: adjustments, releases, usage.
Settlement = tuple[tuple[Adjustment, ...], tuple[ConcurrencyCheck, ...], "UsageRecord | None"]


class DaemonStore:
    """A worker's :class:`~relayd.limits.LimitStore`: the daemon's memory store.

    Should the daemon be gone or not answer within :data:`CALL_TIMEOUT` (the worker is
    then on its way out), admissions are decided by a store of the worker's own, as the
    Redis store does while Redis is away (marked ``degraded``, and settled there), and
    object owners cannot be read.
    """

    name = "memory"

    def __init__(self, channel: ControlChannel, clock: IReactorTime) -> None:
        self._channel = channel
        self._clock = clock
        self._queued: list[Settlement] = []
        self._flush_at: Any = None  # the pending flush (a DelayedCall)
        self._fallback: MemoryStore | None = None

    def admit(self, checks: Sequence[Check]) -> Deferred[Decision]:
        checks = tuple(checks)
        d = self._call("admit", checks)
        return d.addErrback(self._admit_locally, checks)

    def _admit_locally(self, failure: Failure, checks: tuple[Check, ...]) -> Decision:
        decision = self._local().admit_now(checks)
        decision.degraded = True
        return decision

    def _local(self) -> MemoryStore:
        if self._fallback is None:
            self._fallback = MemoryStore(self._clock)
        return self._fallback

    def settle(
        self,
        adjustments: Sequence[Adjustment],
        releases: Sequence[ConcurrencyCheck],
        usage: UsageRecord | None,
        *,
        local: bool = False,
    ) -> None:
        if local or not self._channel.open:
            self._local().settle(adjustments, releases, usage)
            return
        self._queued.append((tuple(adjustments), tuple(releases), usage))
        delay = 0.0 if releases else SETTLE_DELAY
        pending = self._flush_at
        if pending is None:
            self._flush_at = self._clock.callLater(delay, self.flush)
        elif delay == 0.0 and pending.getTime() > self._clock.seconds():
            self._flush_at = rearm(self._clock, pending, 0.0, self.flush)

    def flush(self) -> None:
        """Send the queued settlements now (one message)."""
        pending, self._flush_at = self._flush_at, None
        if pending is not None and pending.active():
            pending.cancel()
        if self._queued:
            queued, self._queued = self._queued, []
            self._channel.cast("settle", queued)

    def usage_snapshot(self) -> Deferred[dict[str, Any]]:
        return self._call("usage_snapshot")

    def claim(self, kind: str, object_id: str, record: ObjectRecord) -> Deferred[None]:
        return self._call("claim", kind, object_id, record).addErrback(lambda _: None)

    def owners(self, kind: str, object_ids: Sequence[str]) -> Deferred[list[ObjectRecord | None]]:
        return self._call("owners", kind, tuple(object_ids)).addErrback(self._unavailable)

    @staticmethod
    def _unavailable(failure: Failure) -> Any:
        raise StoreUnavailableError(f"the daemon's store: {failure.getErrorMessage()}")

    def describe(self) -> dict[str, Any]:
        return {"store": self.name, "reachable": self._channel.open, "held_by": "daemon"}

    def close(self) -> Deferred[None]:
        self.flush()
        return succeed(None)

    def sync(self) -> Deferred[Any]:
        """Fires once the daemon has applied every settlement sent so far (a worker's
        last step before it exits: its shutdown would drop unsent bytes)."""
        return self._call("sync")

    def _call(self, operation: str, *args: Any) -> Deferred[Any]:
        self.flush()
        d = self._channel.call("store", operation, args)
        return d.addTimeout(CALL_TIMEOUT, self._clock)


class StoreHost:
    """The daemon's side: runs the workers' store calls on its memory store.

    The concurrency leases each worker holds are remembered, so a worker that dies
    (``kill -9``, the OOM killer) gives its slots back at once instead of holding them
    until the leases expire.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.store = MemoryStore(clock)
        self.leases: dict[int, dict[tuple[str, str], ConcurrencyCheck]] = {}

    def reset(self) -> None:
        """A new, empty store (the ``state`` section changed on reload, as one process
        would start a new store then)."""
        self.store = MemoryStore(self.clock)
        self.leases = {}

    def handlers(self, worker: int) -> dict[str, Any]:
        """The control-channel handlers for worker ``worker`` (its serial number)."""
        return {
            "store": lambda operation, args: self.call(operation, args, worker),
            "settle": lambda queued: self.settle(queued, worker),
        }

    def call(self, operation: str, args: tuple[Any, ...], worker: int = -1) -> Any:
        if operation == "sync":
            return None  # answered after every message before it
        if operation not in OPERATIONS:
            raise ValueError(f"unknown store operation {operation!r}")
        if operation == "admit":
            decision = self.store.admit_now(*args)
            if decision.allowed:
                held = self.leases.setdefault(worker, {})
                for check in decision.checks:
                    if isinstance(check, ConcurrencyCheck):
                        held[(check.key, check.lease)] = check
            return decision
        return getattr(self.store, operation)(*args)

    def settle(self, queued: list[Settlement], worker: int = -1) -> None:
        store = self.store
        held = self.leases.get(worker, {})
        for adjustments, releases, usage in queued:
            store.settle(adjustments, releases, usage)
            for release in releases:
                held.pop((release.key, release.lease), None)

    def worker_gone(self, worker: int) -> None:
        """Give back the leases a worker that exited still held."""
        held = self.leases.pop(worker, {})
        if held:
            self.store.settle((), tuple(held.values()), None)


