"""Nonces of signed requests already seen, so that none is accepted twice.

Each (client, nonce) is kept for the client's ``window + future`` seconds: longer than
any timestamp that could still pass. With ``state.store: redis`` one ``SET NX EX`` per
request records it for every instance (a nonce replayed on another instance is refused
there too); while Redis is unreachable signed requests are refused (503: replay
protection fails closed). With the memory store the nonces are this process's, in a
bounded table that refuses new nonces (503) rather than evict live ones when full: an
attacker flooding it cannot push out a captured signature's nonce. Carried across
reloads.
"""

from __future__ import annotations

import heapq
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from relayd.limits import LimitStore
from relayd.limits.redis import RedisStore, StoreUnavailableError

__all__ = ["MAX_NONCES", "NonceStore", "NonceStoreFullError"]

#: Live nonces the memory table holds at most (about 100 bytes each).
MAX_NONCES = 1_000_000


class NonceStoreFullError(Exception):
    """The memory table holds :data:`MAX_NONCES` live nonces: none can be recorded."""


class NonceStore:
    """Records (client, nonce) pairs; answers whether a pair is new."""

    __slots__ = ("_base", "_clock", "_expiries", "_live", "_redis", "capacity", "refused")

    def __init__(self, clock: IReactorTime, store: LimitStore, capacity: int = MAX_NONCES) -> None:
        self._clock = clock
        self.capacity = capacity
        self._live: dict[tuple[str, bytes], float] = {}
        self._expiries: list[tuple[float, tuple[str, bytes]]] = []  # a heap
        self._redis: RedisStore | None = None
        self._base = ""
        self.refused = 0  # nonces refused because the table was full or Redis away
        self.bind(store)

    def bind(self, store: LimitStore) -> None:
        self._redis = store if isinstance(store, RedisStore) else None
        if self._redis is not None:
            self._base = f"{{{self._redis.config.key_prefix}}}:nonce:"

    def claim(self, client: str, nonce: bytes, ttl: float) -> bool | Deferred[bool]:
        """Record the pair: True if it is new, False if it was seen (a replay).

        Raises (or errbacks with) :class:`NonceStoreFullError` or ``StoreUnavailableError``
        when it cannot be recorded.
        """
        redis = self._redis
        if redis is not None:
            key = f"{self._base}{len(client)}:{client}:{nonce.decode('ascii')}"
            d = redis.command("nonce", "execute_command", "SET", key, "1", "NX", "PX",
                              max(int(ttl * 1000), 1))
            return d.addCallbacks(_was_set, self._unavailable)
        return self._claim_in_memory((client, nonce), ttl)

    def _unavailable(self, failure: Failure) -> Any:
        self.refused += 1
        failure.trap(StoreUnavailableError)
        return failure

    def _claim_in_memory(self, key: tuple[str, bytes], ttl: float) -> bool:
        now = self._clock.seconds()
        live, expiries = self._live, self._expiries
        while expiries and expiries[0][0] <= now:
            expired, old = heapq.heappop(expiries)
            if live.get(old) == expired:
                del live[old]
        until = live.get(key)
        if until is not None and until > now:
            return False
        if len(live) >= self.capacity:
            self.refused += 1
            raise NonceStoreFullError("the nonce table is full")
        live[key] = now + ttl
        heapq.heappush(expiries, (now + ttl, key))
        return True

    def __len__(self) -> int:
        return len(self._live)


def _was_set(reply: object) -> bool:
    # SET ... NX answers OK when it set the key, nil when the key existed.
    return reply is not None
