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


class ObjectRecord(NamedTuple):
    """Who created an upstream object (a batch, a stored response) and where it lives."""

    client: str
    provider: str
    backend: str


#: How long an object's record is kept: Anthropic keeps batch results 29 days, OpenAI
#: stored responses 30.
OBJECT_TTL = 31 * 24 * 3600.0


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

    def claim(self, kind: str, object_id: str, record: ObjectRecord) -> Deferred[None]:
        """Record who created the upstream object ``kind``/``object_id`` (for
        :data:`OBJECT_TTL`). Never errbacks."""

    def owners(self, kind: str, object_ids: Sequence[str]) -> Deferred[list[ObjectRecord | None]]:
        """The records of the objects (None: unknown). Errbacks with
        ``StoreUnavailableError`` when the records cannot be read now."""

    def describe(self) -> dict[str, Any]:
        """The store's state for ``/admin/backends`` and logs."""

    def close(self) -> Deferred[None]:
        """Stop using the store (after a reload replaced it, or at shutdown)."""
