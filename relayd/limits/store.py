"""The interface every state store implements (memory, Redis)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from twisted.internet.defer import Deferred

from relayd.limits.checks import Adjustment, Check, ConcurrencyCheck, Decision
from relayd.providers.base import Usage


class UsageRecord(NamedTuple):
    """One request's usage, for the usage counters (``/admin/usage``)."""

    client: str
    model: str
    provider: str
    backend: str
    usage: Usage | None


class LimitStore(Protocol):
    """Limits, budgets and usage counters: checked and consumed atomically."""

    name: str

    def admit(self, checks: Sequence[Check]) -> Deferred[Decision]:
        """Evaluate ``checks`` together: consume all of them, or none and say which failed.

        Never errbacks: a store that cannot decide answers per its failure mode.
        """

    def settle(
        self,
        adjustments: Sequence[Adjustment],
        releases: Sequence[ConcurrencyCheck],
        usage: UsageRecord | None,
        *,
        local: bool = False,
    ) -> None:
        """Turn reservations into actual usage, release leases, count usage (no answer).

        ``local``: the reservations were made by the store's local fallback.
        """

    def usage_snapshot(self) -> Deferred[dict[str, Any]]:
        """Usage totals: ``{"clients": {...}, "entries": [...]}`` (see UsageLedger)."""

    def describe(self) -> dict[str, Any]:
        """The store's state for ``/admin/backends`` and logs."""

    def close(self) -> Deferred[None]:
        """Stop using the store (after a reload replaced it, or at shutdown)."""
