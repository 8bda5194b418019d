"""Per-address rules, checked before authentication: a leaky bucket per client address
(``edge.per_address``) and a cooldown for addresses that keep failing to authenticate
(``edge.auth_failures``). The address is the one :mod:`relayd.client_address` gives
(behind trusted proxies, the forwarded one).

The bucket follows nginx ``limit_req`` with ``nodelay``: each request adds one to the
address's excess, which drains at ``rate`` per second; a request that would take the
excess above ``burst`` is refused (429, ``retry-after`` the time until it would pass)
and not counted. So ``burst + 1`` requests pass at once, then ``rate`` per second. The
buckets live in memory (at most :data:`MAX_ADDRESSES`, least recently used out first:
losing an idle address's bucket only forgets that it was idle) and, with ``state.store:
redis``, in Redis for every instance (one ``EVAL`` per request, on Redis's clock; while
Redis is away the memory buckets decide: a per-address limit fails open, per instance).

Failed authentications are counted per address in this process's memory, in fixed
windows: past ``limit`` in ``window`` seconds the address gets 429 for ``cooldown``
seconds, before its key is even looked at.

Addresses in ``edge.exempt`` skip both. Rejections are counted by reason only
(``relayd_edge_rejections_total``), never by address.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from relayd.client_address import Networks
from relayd.config.model import EdgeConfig
from relayd.limits import LimitStore
from relayd.limits.redis import RedisStore

__all__ = ["MAX_ADDRESSES", "AddressRules"]

#: Addresses whose bucket or failure count is kept in memory.
MAX_ADDRESSES = 100_000

# KEYS[1] the address's bucket; ARGV rate, burst. Nil: admitted; else seconds to wait.
_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'e', 't')
local e = 0
if v[1] then
  e = tonumber(v[1]) - rate * (now - tonumber(v[2])) + 1
  if e < 0 then e = 0 end  -- as nginx: the new request counted, then the drain clamped
  if e > burst then return tostring((e - burst) / rate) end
end
redis.call('HSET', KEYS[1], 'e', tostring(e), 't', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst + 1) / rate * 1000) + 1000)
return false
"""


class AddressRules:
    """The ``edge`` section at run time; carried across reloads with its state."""

    __slots__ = ("_base", "_buckets", "_clock", "_exempt", "_failures", "_redis", "config")

    def __init__(self, clock: IReactorTime, store: LimitStore, config: EdgeConfig) -> None:
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # excess, at
        self._failures: OrderedDict[str, tuple[int, float, float]] = OrderedDict()
        self._redis: RedisStore | None = None
        self._base = ""
        self.config = config
        self.reconfigure(config, store)

    def reconfigure(self, config: EdgeConfig, store: LimitStore) -> None:
        if config.per_address != self.config.per_address:
            self._buckets.clear()
        self.config = config
        self._exempt = Networks(config.exempt)
        self._redis = store if isinstance(store, RedisStore) else None
        if self._redis is not None:
            self._base = f"{{{self._redis.config.key_prefix}}}:address:"

    @property
    def active(self) -> bool:
        config = self.config
        return config.per_address is not None or config.auth_failures is not None

    # -- before authentication -------------------------------------------------------------

    def admit(self, address: str) -> tuple[str, float] | Deferred[tuple[str, float] | None] | None:
        """None when ``address`` may go on; else (reason, seconds to wait). A Deferred
        while Redis decides."""
        if address in self._exempt:
            return None
        blocked = self._cooling(address)
        if blocked is not None:
            return ("auth_failures", blocked)
        limit = self.config.per_address
        if limit is None:
            return None
        redis = self._redis
        if redis is not None and redis.state == "up":
            d = redis.command("address", "eval", _BUCKET, [self._base + address],
                              [repr(limit.rate), str(limit.burst)])
            return d.addCallbacks(_bucket_reply, self._locally, errbackArgs=(address,))
        return self._drip(address)

    def _locally(self, failure: Failure, address: str) -> tuple[str, float] | None:
        return self._drip(address)

    def _drip(self, address: str) -> tuple[str, float] | None:
        limit = self.config.per_address
        assert limit is not None
        now = self._clock.seconds()
        buckets = self._buckets
        found = buckets.get(address)
        excess = 0.0
        if found is not None:
            excess = max(found[0] - limit.rate * (now - found[1]) + 1.0, 0.0)
            if excess > limit.burst:
                return ("per_address", (excess - limit.burst) / limit.rate)
            buckets.move_to_end(address)
        buckets[address] = (excess, now)
        if len(buckets) > MAX_ADDRESSES:
            buckets.popitem(last=False)
        return None

    # -- failed authentications --------------------------------------------------------------

    def _cooling(self, address: str) -> float | None:
        """Seconds ``address`` still waits for failing to authenticate, or None."""
        rule = self.config.auth_failures
        found = self._failures.get(address) if rule is not None else None
        if found is None:
            return None
        _, _, blocked_until = found
        wait = blocked_until - self._clock.seconds()
        return wait if wait > 0 else None

    def auth_failed(self, address: str) -> None:
        """Count a failed authentication from ``address``."""
        rule = self.config.auth_failures
        if rule is None or address in self._exempt:
            return
        now = self._clock.seconds()
        failures = self._failures
        count, started, blocked_until = failures.get(address, (0, now, 0.0))
        if now - started >= rule.window:
            count, started = 0, now
        count += 1
        if count >= rule.limit:
            blocked_until = now + rule.cooldown
            count, started = 0, now
        failures[address] = (count, started, blocked_until)
        failures.move_to_end(address)
        if len(failures) > MAX_ADDRESSES:
            failures.popitem(last=False)

    def stats(self) -> dict[str, Any]:
        return {"buckets": len(self._buckets), "failing": len(self._failures)}


def _bucket_reply(reply: object) -> tuple[str, float] | None:
    if reply is None:
        return None
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    wait = float(text)
    return ("per_address", wait if math.isfinite(wait) else 1.0)
