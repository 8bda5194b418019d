"""The embedded state store: limits, budgets and usage in this process's memory.

The default (``state: {store: memory}``) for a single instance, and the per-instance
fallback of the Redis store while Redis is unreachable. Its algorithms are the Python
twin of the Redis scripts in :mod:`relayd.limits.redis`; both are exercised by the same
tests.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from relayd.accounting import UsageLedger
from relayd.limits.checks import (
    WINDOW_SECONDS,
    Adjustment,
    Check,
    CheckState,
    ConcurrencyCheck,
    Decision,
    PeriodCheck,
    WindowCheck,
    period_end,
    period_number,
)
from relayd.limits.store import OBJECT_TTL, ObjectRecord, UsageRecord

#: Object records kept by the memory store; the oldest go first beyond it.
MAX_OBJECTS = 100_000


class MemoryStore:
    """Counters in dictionaries; every operation completes synchronously."""

    name = "memory"

    def __init__(self, clock: IReactorTime, *, scale: float = 1.0, label: str = "memory") -> None:
        self._clock = clock
        self._scale = scale  # limits are multiplied by this (the fallback's share)
        self.name = label
        self._windows: dict[str, dict[int, int]] = {}
        self._periods: dict[str, dict[int, int]] = {}
        self._leases: dict[str, dict[str, float]] = {}
        self._objects: OrderedDict[tuple[str, str], tuple[ObjectRecord, float]] = OrderedDict()
        self.ledger = UsageLedger()

    # -- admission ---------------------------------------------------------------------

    def admit(self, checks: Sequence[Check]) -> Deferred[Decision]:
        return succeed(self.admit_now(checks))

    def admit_now(self, checks: Sequence[Check]) -> Decision:
        """Evaluate every check; consume all of them or none."""
        now = self._clock.seconds()
        second = int(now)
        checks = tuple(checks)
        pending: list[tuple[int, int, float]] = []  # (used after, slot, reset_after)
        for check in checks:
            limit = self._limit(check.limit)
            if isinstance(check, WindowCheck):
                buckets = self._window(check.key, second)
                used = sum(buckets.values())
                if used + check.amount > limit:
                    return self._refused(
                        checks, check, _window_retry(buckets, used, check.amount, limit, now)
                    )
                newest = max(buckets, default=second)
                pending.append(
                    (used + check.amount, second, max(newest, second) + WINDOW_SECONDS - now)
                )
            elif isinstance(check, PeriodCheck):
                number = period_number(check.period, now)
                counters = self._periods.setdefault(check.key, {})
                for stale in [n for n in counters if n < number]:
                    del counters[stale]
                used = counters.get(number, 0)
                if used + check.amount > limit:
                    return self._refused(checks, check, None)
                pending.append(
                    (used + check.amount, number, period_end(check.period, number) - now)
                )
            else:
                leases = self._leases.setdefault(check.key, {})
                for lease in [k for k, expiry in leases.items() if expiry <= now]:
                    del leases[lease]
                if len(leases) >= limit:
                    return self._refused(checks, check, 1.0)
                pending.append((len(leases) + 1, 0, check.ttl))
        states = []
        for check, (used, slot, reset_after) in zip(checks, pending, strict=True):
            if isinstance(check, WindowCheck):
                buckets = self._windows[check.key]
                buckets[slot] = buckets.get(slot, 0) + check.amount
            elif isinstance(check, PeriodCheck):
                counters = self._periods[check.key]
                counters[slot] = counters.get(slot, 0) + check.amount
            else:
                self._leases[check.key][check.lease] = now + check.ttl
            states.append(CheckState(used, slot, reset_after))
        return Decision(True, checks, tuple(states), store=self.name)

    def _limit(self, limit: int) -> int:
        if self._scale == 1.0:
            return limit
        return max(1, math.floor(limit * self._scale))

    def _window(self, key: str, second: int) -> dict[int, int]:
        buckets = self._windows.setdefault(key, {})
        oldest = second - WINDOW_SECONDS
        for stale in [b for b in buckets if b <= oldest]:
            del buckets[stale]
        return buckets

    def _refused(self, checks: tuple[Check, ...], check: Check, retry: float | None) -> Decision:
        return Decision(False, checks, failed=check, retry_after=retry, store=self.name)

    # -- settling ----------------------------------------------------------------------

    def settle(
        self,
        adjustments: Sequence[Adjustment],
        releases: Sequence[ConcurrencyCheck],
        usage: UsageRecord | None,
        *,
        local: bool = False,
    ) -> None:
        now = self._clock.seconds()
        oldest = int(now) - WINDOW_SECONDS
        for adjustment in adjustments:
            table = self._windows if adjustment.kind == "w" else self._periods
            counters = table.get(adjustment.key)
            if counters is None or adjustment.slot not in counters:
                continue  # the reservation has already left its window or period
            if adjustment.kind == "w" and adjustment.slot <= oldest:
                continue
            counters[adjustment.slot] = max(counters[adjustment.slot] + adjustment.delta, 0)
        for release in releases:
            leases = self._leases.get(release.key)
            if leases is not None:
                leases.pop(release.lease, None)
        if usage is not None:
            self.ledger.record(*usage)

    def usage_snapshot(self) -> Deferred[dict[str, Any]]:
        return succeed(self.ledger.snapshot())

    # -- objects -------------------------------------------------------------------------

    def claim(self, kind: str, object_id: str, record: ObjectRecord) -> Deferred[None]:
        self.claim_now(kind, object_id, record)
        return succeed(None)

    def claim_now(self, kind: str, object_id: str, record: ObjectRecord) -> None:
        objects = self._objects
        key = (kind, object_id)
        objects[key] = (record, self._clock.seconds() + OBJECT_TTL)
        objects.move_to_end(key)
        while len(objects) > MAX_OBJECTS:
            objects.popitem(last=False)

    def owners(self, kind: str, object_ids: Sequence[str]) -> Deferred[list[ObjectRecord | None]]:
        return succeed(self.owners_now(kind, object_ids))

    def owners_now(self, kind: str, object_ids: Sequence[str]) -> list[ObjectRecord | None]:
        now = self._clock.seconds()
        found: list[ObjectRecord | None] = []
        for object_id in object_ids:
            entry = self._objects.get((kind, object_id))
            found.append(entry[0] if entry is not None and entry[1] > now else None)
        return found

    def describe(self) -> dict[str, Any]:
        return {"store": self.name, "reachable": True}

    def close(self) -> Deferred[None]:
        return succeed(None)


def _window_retry(buckets: dict[int, int], used: int, amount: int, limit: int, now: float) -> float:
    """Seconds until enough of the window's oldest buckets leave it for ``amount`` to fit."""
    need = used + amount - limit
    freed = 0
    for second in sorted(buckets):
        freed += buckets[second]
        if freed >= need:
            return max(second + WINDOW_SECONDS - now, 0.001)
    return float(WINDOW_SECONDS)
