"""The shared level of the response cache (L2): entries in Redis, found by every instance.

It uses the state store's Redis connection (:meth:`relayd.limits.redis.RedisStore.command`),
so its deadline and its view of whether Redis is up are the store's: while Redis is
down every call answers at once with "nothing" and the cache serves from memory alone.
A failure is never the client's error.

Keys: ``{PREFIX}:cache:ROUTE:CLIENT:DIGEST`` (route and client percent-encoded, ``-``
for an entry shared by every client), kept in Redis for the entry's TTL plus its
``stale_if_error``; a coalescing lock is ``{PREFIX}:cache-lock:DIGEST``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from relayd.cache.entry import CachedAnswer
from relayd.limits.redis import RedisStore

__all__ = ["SharedCache"]

# Deletes a lock only while it still holds this instance's token.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_SCAN_BATCH = 500


def _segment(name: str) -> str:
    return quote(name, safe="") if name else "-"


class SharedCache:
    """Entries in the state store's Redis (see the module's docstring)."""

    __slots__ = ("_base", "_lock_base", "errors", "store")

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        prefix = store.config.key_prefix
        self._base = f"{{{prefix}}}:cache:"
        self._lock_base = f"{{{prefix}}}:cache-lock:"
        self.errors = 0  # calls that failed (Redis down or slow)

    def key(self, digest: str, route: str, client: str) -> str:
        return f"{self._base}{_segment(route)}:{_segment(client)}:{digest}"

    def get(self, key: str) -> Deferred[CachedAnswer | None]:
        """The entry stored under ``key``, or None (also when Redis fails)."""
        d = self.store.command("cache_get", "get", key)
        return d.addCallbacks(_entry, self._failed, errbackArgs=(None,))

    def put(self, key: str, entry: CachedAnswer, now: float) -> Deferred[Any]:
        """Store ``entry`` until its ``stale_until``."""
        milliseconds = max(int((entry.stale_until - now) * 1000), 1)
        d = self.store.command("cache_put", "set", key, entry.encode(), None, milliseconds)
        return d.addErrback(self._failed, None)

    def lock(self, digest: str, token: str, seconds: float) -> Deferred[bool | None]:
        """Take the coalescing lock of ``digest`` for ``seconds``: True if taken, False
        if another instance holds it, None if Redis failed."""
        d = self.store.command(
            "cache_lock", "set", self._lock_base + digest, token, None,
            max(int(seconds * 1000), 1), True,
        )
        return d.addCallbacks(lambda reply: reply is not None and reply != 0, self._failed,
                              errbackArgs=(None,))

    def unlock(self, digest: str, token: str) -> Deferred[Any]:
        d = self.store.command("cache_unlock", "eval", _UNLOCK, [self._lock_base + digest],
                               [token])
        return d.addErrback(self._failed, None)

    def purge(self, route: str | None, client: str | None) -> Deferred[int]:
        """Delete the entries of ``route`` and/or ``client`` (both None: all); how many."""
        # Prefix and percent-encoded names hold none of the glob's special characters.
        pattern = (
            f"{self._base}{'*' if route is None else _segment(route)}:"
            f"{'*' if client is None else _segment(client)}:*"
        )
        done: Deferred[int] = Deferred()
        deleted = [0]

        def scan(cursor: int) -> None:
            d = self.store.command("cache_purge", "scan", cursor, pattern, _SCAN_BATCH)
            d.addCallbacks(found, done.errback)

        def found(reply: Any) -> None:
            cursor, keys = int(reply[0]), list(reply[1])
            if keys:
                d = self.store.command("cache_purge", "delete", keys)
                d.addCallbacks(lambda count: deleted_then(count, cursor), done.errback)
            else:
                deleted_then(0, cursor)

        def deleted_then(count: Any, cursor: int) -> None:
            deleted[0] += int(count or 0)
            if cursor == 0:
                done.callback(deleted[0])
            else:
                scan(cursor)

        scan(0)
        return done

    def _failed(self, failure: Failure, value: Any) -> Any:
        self.errors += 1
        return value


def _entry(reply: Any) -> CachedAnswer | None:
    if reply is None:
        return None
    data = reply.encode() if isinstance(reply, str) else reply
    if not isinstance(data, bytes):
        return None
    return CachedAnswer.decode(data)
