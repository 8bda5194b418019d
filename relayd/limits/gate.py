"""The limits gate of one request: admission before each attempt, settlement at the end.

Built only when a limit applies (the client has ``limits``, or some backend has an
upstream quota). The first admission checks the client's limits and the upstream key's
quota in one atomic step of the state store; a later attempt (failover) checks only its
own key's quota. Each admission's :class:`~relayd.limits.checks.Ticket` is settled when
the request ends: token reservations become the usage the upstream reported, and
concurrency leases are released.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from relayd.config.model import DEFAULT_RESERVE_OUTPUT_TOKENS
from relayd.errors import Outcome, Refusal
from relayd.keyring import UpstreamKey
from relayd.limits.checks import (
    Decision,
    PeriodCheck,
    Ticket,
    WindowCheck,
    period_end,
    period_number,
)
from relayd.limits.policy import ClientPolicy, UpstreamPolicy, estimate_tokens
from relayd.limits.store import LimitStore, UsageRecord
from relayd.metrics import RelayMetrics
from relayd.providers import IProvider, LimitState
from relayd.upstream import Backend

if TYPE_CHECKING:
    from relayd.runtime import Client, RelayRuntime

_NOTHING_USED = (0, True)


class LimitGate:
    """Admits one request's attempts against its limits and settles them at its end."""

    __slots__ = (
        "_clock", "_estimate", "_metrics", "_payload", "_policy", "_request_id", "_store",
        "_tickets", "_upstream", "client", "family", "limit_states",
    )

    def __init__(
        self,
        store: LimitStore,
        client: str,
        policy: ClientPolicy | None,
        upstream: dict[Backend, UpstreamPolicy],
        payload: dict[str, Any] | None,
        *,
        family: IProvider,
        clock: IReactorTime,
        metrics: RelayMetrics,
        request_id: str,
    ) -> None:
        self._store = store
        self.client = client
        self._policy = policy
        self._upstream = upstream
        self._payload = payload
        self.family = family
        self._clock = clock
        self._metrics = metrics
        self._request_id = request_id
        self._estimate = 0  # tokens reserved against token limits
        self._tickets: list[tuple[Ticket, object]] = []
        self.limit_states: list[LimitState] = []  # the client's, for its response headers

    @classmethod
    def for_request(
        cls,
        runtime: RelayRuntime,
        client: Client,
        payload: dict[str, Any] | None,
        family: IProvider,
        clock: IReactorTime,
        metrics: RelayMetrics,
        request_id: str,
    ) -> LimitGate | None:
        """The gate of a request, or None when no limit applies to it."""
        if client.policy is None and not runtime.upstream_policies:
            return None
        return cls(runtime.store, client.name, client.policy, runtime.upstream_policies,
                   payload, family=family, clock=clock, metrics=metrics, request_id=request_id)

    def admit_client(self) -> Deferred[Decision] | None:
        """The store's decision on the client's own limits alone, before any attempt (a
        request the cache may answer: a hit counts as a request and reserves tokens
        that its settlement gives back); None when the client has no limits."""
        policy = self._policy
        if policy is None or self._tickets:
            return None
        if policy.counts_tokens and not self._estimate:
            self._estimate = estimate_tokens(self._payload or {}, policy.reserve_output)
        return self._store.admit(policy.checks(self._estimate, self._request_id))

    def admit(self, backend: Backend, key: UpstreamKey, first: bool) -> Deferred[Decision] | None:
        """The store's decision on an attempt on ``backend`` with ``key``; None when no
        limit applies to it (it may go at once)."""
        upstream = self._upstream.get(backend) if self._upstream else None
        policy = self._policy if first and not self._tickets else None
        if upstream is None and policy is None:
            return None
        if (policy is not None and policy.counts_tokens) or upstream is not None:
            if not self._estimate:
                reserve = (
                    self._policy.reserve_output
                    if self._policy is not None
                    else DEFAULT_RESERVE_OUTPUT_TOKENS
                )
                self._estimate = estimate_tokens(self._payload or {}, reserve)
        checks = policy.checks(self._estimate, self._request_id) if policy is not None else []
        if upstream is not None:
            checks += upstream.checks(key.index, self._estimate)
        return self._store.admit(checks)

    def admitted(self, decision: Decision, attempt: object) -> None:
        """Keep an allowed decision's ticket (settled at the end, for ``attempt``)."""
        self._tickets.append((Ticket.of(decision), attempt))
        for check, state in zip(decision.checks, decision.states, strict=True):
            if isinstance(check, WindowCheck) and check.scope == "client":
                remaining = max(check.limit - state.used, 0)
                self.limit_states.append(
                    LimitState(check.unit, check.limit, remaining, state.reset_after)
                )

    def give_back(self, decision: Decision) -> None:
        """An allowed decision whose attempt never went (the client left meanwhile)."""
        if decision.allowed:
            self._settle_ticket(
                Ticket.of(decision), {"client": _NOTHING_USED, "upstream": _NOTHING_USED}, None
            )

    @staticmethod
    def quota_used_up(decision: Decision) -> bool:
        """Whether a refusal is the upstream key's quota (try another key), not the client's."""
        failed = decision.failed
        return failed is not None and failed.scope == "upstream"

    def refusal(self, decision: Decision) -> Refusal:
        """The answer to a client over one of its limits (or whose store is closed)."""
        failed = decision.failed
        now = self._clock.seconds()
        if failed is None:
            return Refusal(
                503, "the rate-limit store is unreachable and this relay fails closed; retry",
                outcome=Outcome.STORE_UNAVAILABLE, retry_after=decision.retry_after or 1.0,
            )
        client = self.client
        self._metrics.limit_rejected(client, failed.name)
        headers: list[tuple[bytes, bytes]] = [(b"x-relayd-limit", failed.name.encode())]
        if isinstance(failed, PeriodCheck):
            ends = period_end(failed.period, period_number(failed.period, now))
            reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ends))
            headers.append((b"x-relayd-budget-reset", reset.encode()))
            # A retry cannot help before the period ends: tell SDKs not to.
            headers.append((b"x-should-retry", b"false"))
            return Refusal(
                429,
                f"token budget exhausted: client {client!r} has used its {failed.name} "
                f"({failed.limit}) or this request (up to {failed.amount} tokens) would "
                f"exceed it; the budget resets at {reset}",
                code="insufficient_quota", headers=headers, outcome=Outcome.BUDGET_EXHAUSTED,
            )
        retry_after = decision.retry_after or 1.0
        if isinstance(failed, WindowCheck):
            what = failed.unit
            headers += self.family.rate_limit_headers(
                [LimitState(what, failed.limit, 0, retry_after)], now
            )
            detail = (
                f"{failed.limit} requests per minute"
                if what == "requests"
                else f"{failed.limit} tokens per minute (this request reserves {failed.amount})"
            )
        else:
            detail = f"{failed.limit} concurrent requests"
        return Refusal(
            429, f"rate limit exceeded: client {client!r} is limited to {detail}",
            code="rate_limit_exceeded", headers=headers, outcome=Outcome.RATE_LIMITED,
            retry_after=retry_after,
        )

    def settle(
        self,
        record: UsageRecord | None,
        outcome: tuple[int, bool] | None,
        final_attempt: object,
    ) -> None:
        """Settle every ticket and hand over the usage record (once, with the first).

        ``outcome`` is (tokens used, final) of the relayed answer, or None when nothing
        was relayed; only the attempt that answered used its key's quota.
        """
        if not self._tickets:
            if record is not None:
                self._store.settle((), (), record)
            return
        client = outcome if outcome is not None else _NOTHING_USED
        for ticket, attempt in self._tickets:
            upstream = client if attempt is final_attempt else _NOTHING_USED
            self._settle_ticket(ticket, {"client": client, "upstream": upstream}, record)
            record = None
        self._tickets = []

    def _settle_ticket(
        self, ticket: Ticket, outcomes: dict[str, tuple[int, bool]], record: UsageRecord | None
    ) -> None:
        adjustments, releases = ticket.settle(outcomes)
        self._store.settle(adjustments, releases, record, local=ticket.decision.degraded)
