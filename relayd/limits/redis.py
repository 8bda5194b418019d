"""The shared state store: limits, budgets and usage in Redis, for several instances.

Each admission is one ``EVAL`` of :data:`~relayd.limits.scripts.ADMIT` (atomic, on the
server's clock); each request's end is one ``EVAL`` of
:data:`~relayd.limits.scripts.SETTLE`. Every call has a deadline (``state.timeout``).

While Redis cannot be reached the store follows ``on_store_failure``: ``open`` decides
with a local :class:`~relayd.limits.memory.MemoryStore` holding this instance's share of
each limit, ``closed`` refuses. The change is logged once, counted in
``relayd_state_store_errors_total`` and shown by ``relayd_state_store_up``; a probe
(``PING`` every second) notices when Redis is back and the store resumes by itself.
Usage counted while Redis was away is kept and written once it is back.

txredisapi queues commands while it reconnects and would run them late; relayd never
hands it a command while it has no live connection, so an admission that timed out
here cannot consume a limit in Redis afterwards. The connection itself (and its
reconnect cap) is :mod:`relayd.limits.redis_connection`'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd.accounting import USAGE_KINDS, UsageLedger
from relayd.config.model import StateConfig
from relayd.limits.checks import (
    Adjustment,
    Check,
    CheckState,
    ConcurrencyCheck,
    Decision,
    PeriodCheck,
    WindowCheck,
)
from relayd.limits.memory import MemoryStore
from relayd.limits.redis_connection import RedisConnection, connect_redis
from relayd.limits.scripts import ADMIT, SETTLE
from relayd.limits.store import OBJECT_TTL, ObjectRecord, UsageRecord

log = Logger(namespace="relayd.state")

PROBE_INTERVAL = 1.0


class StoreUnavailableError(Exception):
    """The shared store could not be asked (not connected, timed out, or failed)."""


StoreEvent = Callable[[str, str], None]  # (store, what): "error:<op>" | "up" | "down"


class RedisStore:
    """Limits shared through Redis, with a local fallback while Redis is away."""

    name = "redis"

    def __init__(
        self,
        config: StateConfig,
        clock: IReactorTime,
        *,
        connection: RedisConnection | None = None,
        on_event: StoreEvent | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._timeout = config.timeout
        self._connection = connection if connection is not None else connect_redis(config)
        self._redis = self._connection.commands
        self._on_event = on_event
        self._usage_key = f"{{{config.key_prefix}}}:usage"
        self.fallback = MemoryStore(clock, scale=1.0 / config.fallback_instances, label="fallback")
        # "connecting" until the first probe answers, then "up" or "down".
        self.state = "connecting"
        self.down_since: float | None = None
        self.last_error: str | None = None
        self._unsent = UsageLedger()  # usage counted while Redis was away
        self._probe_call: IDelayedCall | None = None
        self._closed = False
        self._started = clock.seconds()
        self._probe()

    # -- admission ---------------------------------------------------------------------

    def admit(self, checks: Sequence[Check]) -> Deferred[Decision]:
        checks = tuple(checks)
        if self.state != "up" or not self._connected():
            if self.state == "up":
                self._went_down("admit", "no connection to Redis")
            return succeed(self._without_redis(checks))
        keys, args = _admit_arguments(checks)
        d = self._call("admit", self._redis.eval, ADMIT, keys, args)
        return d.addCallbacks(
            _decision, self._admit_failed, callbackArgs=(checks,), errbackArgs=(checks,)
        )

    def _admit_failed(self, failure: Failure, checks: tuple[Check, ...]) -> Decision:
        return self._without_redis(checks)

    def _without_redis(self, checks: tuple[Check, ...]) -> Decision:
        if self.config.on_store_failure == "open":
            decision = self.fallback.admit_now(checks)
        else:
            decision = Decision(False, checks, retry_after=PROBE_INTERVAL, store=self.name)
        decision.degraded = True
        return decision

    # -- settling ----------------------------------------------------------------------

    def settle(
        self,
        adjustments: Sequence[Adjustment],
        releases: Sequence[ConcurrencyCheck],
        usage: UsageRecord | None,
        *,
        local: bool = False,
    ) -> None:
        """Settle in Redis, or in the fallback when the reservation was made there."""
        if local:
            self.fallback.settle(adjustments, releases, None)
            adjustments, releases = (), ()
        if not adjustments and not releases and usage is None:
            return
        if self.state != "up" or not self._connected():
            if usage is not None:
                self._unsent.record(*usage)
            return
        keys: list[str] = []
        args: list[Any] = []
        for adjustment in adjustments:
            keys.append(adjustment.key)
            args += (adjustment.kind, adjustment.slot, adjustment.delta)
        for release in releases:
            keys.append(release.key)
            args += ("r", release.lease, 0)
        if usage is not None:
            self._usage_arguments(usage, keys, args)
        d = self._call("settle", self._redis.eval, SETTLE, keys, args)

        def keep_usage(failure: Failure) -> None:
            if usage is not None:
                self._unsent.record(*usage)

        d.addErrback(keep_usage)

    def _usage_arguments(self, usage: UsageRecord, keys: list[str], args: list[Any]) -> None:
        key = (usage.client, usage.model, usage.provider, usage.backend)
        self._row_arguments(key, [1, *UsageLedger.counts(usage.usage)], keys, args)

    def _row_arguments(
        self, key: tuple[str, str, str, str], row: Sequence[int], keys: list[str], args: list[Any]
    ) -> None:
        for kind, amount in zip(("requests", *USAGE_KINDS), row, strict=True):
            if amount:
                keys.append(self._usage_key)
                args += ("u", json.dumps([*key, kind]), amount)

    # -- objects -------------------------------------------------------------------------

    def _object_key(self, kind: str, object_id: str) -> str:
        return f"{{{self.config.key_prefix}}}:object:{kind}:{object_id}"

    def claim(self, kind: str, object_id: str, record: ObjectRecord) -> Deferred[None]:
        """Record the object in Redis; in this instance's memory too, so that it stays
        reachable here while Redis is away."""
        self.fallback.claim_now(kind, object_id, record)
        if self.state != "up" or not self._connected():
            return succeed(None)
        d = self._call(
            "claim", self._redis.set, self._object_key(kind, object_id),
            json.dumps(list(record)), int(OBJECT_TTL),  # value, then EX seconds
        )
        return d.addCallbacks(lambda _: None, lambda _: None)

    def owners(self, kind: str, object_ids: Sequence[str]) -> Deferred[list[ObjectRecord | None]]:
        """From Redis; while it is away, from what this instance recorded, and an error
        for objects it does not know (they may be another instance's)."""
        ids = list(object_ids)
        if not ids:
            return succeed([])

        def local(failure: Failure | None = None) -> list[ObjectRecord | None]:
            found = self.fallback.owners_now(kind, ids)
            if any(record is None for record in found):
                raise StoreUnavailableError("object records are in Redis, which is away")
            return found

        if self.state != "up" or not self._connected():
            return maybeDeferred(local)
        d = self._call(
            "owners", self._redis.mget, [self._object_key(kind, i) for i in ids]
        )
        d.addCallbacks(_object_records, local)
        return d

    def usage_snapshot(self) -> Deferred[dict[str, Any]]:
        if not self._connected():
            return fail(StoreUnavailableError("Redis is not connected"))
        d = self._call("usage", self._redis.hgetall, self._usage_key)
        return d.addCallback(_usage_from_hash)

    # -- reachability ------------------------------------------------------------------

    def _connected(self) -> bool:
        return self._connection.connected()

    def command(self, op: str, name: str, *args: Any) -> Deferred[Any]:
        """Run the txredisapi command ``name`` for another part of relayd (the response
        cache), with the store's deadline; fails with :class:`StoreUnavailableError`, at
        once while Redis is known to be down. A failure marks Redis down, as the store's
        own calls do (and is logged once)."""
        if self.state == "down":
            return fail(StoreUnavailableError("Redis is down"))
        if not self._connected():
            self._went_down(op, "no connection to Redis")
            return fail(StoreUnavailableError("no connection to Redis"))
        return self._call(op, getattr(self._redis, name), *args)

    def _call(self, op: str, method: Callable[..., Deferred[Any]], *args: Any) -> Deferred[Any]:
        """Run one Redis command with the store's deadline; failures mark Redis down."""
        try:
            d = method(*args)
        except Exception as exc:  # txredisapi raises ConnectionError synchronously
            d = fail(exc)
        d.addTimeout(self._timeout, self._clock)

        def failed(failure: Failure) -> Failure:
            self._went_down(op, failure.getErrorMessage() or repr(failure.value))
            return Failure(StoreUnavailableError(failure.getErrorMessage()))

        return d.addErrback(failed)

    def _went_down(self, op: str, error: str) -> None:
        self._event(f"error:{op}")
        self.last_error = error
        if self.state == "down":
            return
        was = self.state
        self.state = "down"
        self.down_since = self._clock.seconds()
        self._event("down")
        how = (
            "admitting requests under this instance's local share of each limit"
            if self.config.on_store_failure == "open"
            else "refusing requests that have limits (on_store_failure: closed)"
        )
        if was == "connecting":
            log.error(
                "state store: cannot reach Redis at {url} ({error}); {how} until it answers",
                url=self.config.url,
                error=error,
                how=how,
            )
        else:
            log.error(
                "state store: lost Redis at {url} ({error}); {how} until it is back",
                url=self.config.url,
                error=error,
                how=how,
            )
        self._schedule_probe()

    def _schedule_probe(self) -> None:
        if self._closed or (self._probe_call is not None and self._probe_call.active()):
            return
        self._probe_call = self._clock.callLater(PROBE_INTERVAL, self._probe)

    def _probe(self) -> None:
        self._probe_call = None
        if self._closed:
            return
        if not self._connected():
            startup_deadline = self._started + max(self._timeout * 4, 1.0)
            if self.state == "connecting" and self._clock.seconds() < startup_deadline:
                self._probe_call = self._clock.callLater(0.05, self._probe)
                return
            self._went_down("probe", "no connection to Redis")
            self._schedule_probe()
            return
        d = self._call("probe", self._redis.ping)
        d.addCallbacks(self._came_up, lambda _: self._schedule_probe())

    def _came_up(self, _: object) -> None:
        was = self.state
        self.state = "up"
        self._event("up")
        if was == "down":
            log.info(
                "state store: Redis at {url} is back after {seconds:.1f}s; shared limits resume",
                url=self.config.url,
                seconds=self._clock.seconds() - (self.down_since or self._clock.seconds()),
            )
            self.down_since = None
            self._flush_unsent()

    def _flush_unsent(self) -> None:
        """Write the usage counted while Redis was away (kept again if this fails)."""
        unsent, self._unsent = self._unsent, UsageLedger()
        keys: list[str] = []
        args: list[Any] = []
        for key, row in unsent.rows():
            self._row_arguments(key, row, keys, args)
        if not keys:
            return
        d = self._call("settle", self._redis.eval, SETTLE, keys, args)
        d.addErrback(lambda _: self._unsent.merge(unsent))

    def _event(self, what: str) -> None:
        if self._on_event is not None:
            self._on_event(self.name, what)

    def describe(self) -> dict[str, Any]:
        return {
            "store": self.name,
            "url": self.config.url,
            "state": self.state,
            "reachable": self.state == "up",
            "on_store_failure": self.config.on_store_failure,
            "last_error": self.last_error,
        }

    def close(self) -> Deferred[None]:
        self._closed = True
        if self._probe_call is not None and self._probe_call.active():
            self._probe_call.cancel()
        try:
            d: Deferred[Any] = self._connection.disconnect()
        except Exception:
            return succeed(None)
        d.addErrback(lambda _: None)
        return d.addCallback(lambda _: None)


# -- argument and answer encoding ----------------------------------------------------------


def _admit_arguments(checks: Sequence[Check]) -> tuple[list[str], list[Any]]:
    keys: list[str] = []
    args: list[Any] = [len(checks)]
    for check in checks:
        keys.append(check.key)
        if isinstance(check, WindowCheck):
            args += ("w", check.limit, check.amount, "", "")
        elif isinstance(check, PeriodCheck):
            args += ("p", check.limit, check.amount, check.period, "")
        else:
            args += ("c", check.limit, 1, int(check.ttl * 1000), check.lease)
    return keys, args


def _decision(reply: list[int], checks: tuple[Check, ...]) -> Decision:
    if reply[0] != 1:
        failed = checks[reply[1] - 1]
        retry = None if reply[2] < 0 else reply[2] / 1000
        return Decision(False, checks, failed=failed, retry_after=retry, store="redis")
    states = tuple(
        CheckState(int(reply[i]), int(reply[i + 1]), reply[i + 2] / 1000)
        for i in range(1, len(reply), 3)
    )
    return Decision(True, checks, states, store="redis")


def _object_records(values: Sequence[Any]) -> list[ObjectRecord | None]:
    records: list[ObjectRecord | None] = []
    for value in values:
        try:
            client, provider, backend = json.loads(value)
            records.append(ObjectRecord(str(client), str(provider), str(backend)))
        except (TypeError, ValueError):
            records.append(None)
    return records


def _usage_from_hash(fields: dict[str, Any]) -> dict[str, Any]:
    ledger = UsageLedger()
    for field, value in fields.items():
        try:
            client, model, provider, backend, kind = json.loads(field)
        except (ValueError, TypeError):
            continue
        ledger.add((client, model, provider, backend), kind, int(value))
    return ledger.snapshot()
