"""The response cache a runtime holds: memory (L1), Redis (L2), flights, model lists.

One :class:`ResponseCache` lives for the whole process: a reload hands it on
(:mod:`relayd.runtime_diff`) and :meth:`ResponseCache.reconfigure` applies the new
``cache`` section: the memory level is kept unless ``memory_bytes`` changed, the shared
level follows the runtime's state store. Its counters are plain integers read by the
metrics collector at scrape time (nothing is done per request for them).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from relayd.accounting import CACHE_PROVIDER
from relayd.cache.entry import CachedAnswer
from relayd.cache.flights import Capture
from relayd.cache.memory import MemoryCache
from relayd.cache.shared import SharedCache
from relayd.config.model import CacheConfig
from relayd.limits import LimitStore, RedisStore

__all__ = ["CACHE_PROVIDER", "LOOKUP_RESULTS", "ResponseCache"]

#: What a lookup can come to (the ``x-relayd-cache`` header, the ``result`` label).
LOOKUP_RESULTS = ("hit", "miss", "bypass", "stale")


class ResponseCache:
    """Every level of the response cache, and what it has counted."""

    def __init__(self, config: CacheConfig, store: LimitStore, clock: IReactorTime) -> None:
        self.clock = clock
        self.config = config
        self.memory = MemoryCache(config.memory_bytes)
        self.shared: SharedCache | None = None
        self.flights: dict[str, Capture] = {}
        self.model_lists: dict[tuple[Any, ...], tuple[float, Any]] = {}
        self.lookups = dict.fromkeys(LOOKUP_RESULTS, 0)
        self.shared_hits = 0  # hits found in Redis (not in memory)
        self.coalesced = 0  # requests that waited for an identical one
        self.stores = 0
        self._bind(store)

    def reconfigure(self, config: CacheConfig, store: LimitStore) -> None:
        """Apply a reloaded ``cache`` section and the new runtime's state store."""
        if config.memory_bytes != self.config.memory_bytes:
            self.memory = MemoryCache(config.memory_bytes)
        # A reload may change what a provider's backends are: lists are asked afresh.
        self.model_lists.clear()
        self.config = config
        self._bind(store)

    def _bind(self, store: LimitStore) -> None:
        if self.config.shared and isinstance(store, RedisStore):
            if self.shared is None or self.shared.store is not store:
                self.shared = SharedCache(store)
        else:
            self.shared = None

    def counted(self, result: str) -> None:
        self.lookups[result] += 1

    def keep(self, key: str, shared_key: str | None, entry: CachedAnswer) -> None:
        """Store ``entry`` in memory and, when shared, in Redis (not waited for)."""
        if len(entry.body) > self.config.max_entry_bytes:
            return
        self.stores += 1
        self.memory.put(key, entry)
        if self.shared is not None and shared_key is not None:
            self.shared.put(shared_key, entry, self.clock.seconds())

    # -- model lists --------------------------------------------------------------------------

    def model_list(self, key: tuple[Any, ...]) -> Any:
        """A provider's model list kept under ``key``, or None (off, absent, expired)."""
        found = self.model_lists.get(key)
        if found is None:
            return None
        if self.clock.seconds() >= found[0]:
            del self.model_lists[key]
            return None
        return found[1]

    def keep_model_list(self, key: tuple[Any, ...], entries: Any) -> None:
        ttl = self.config.model_list_ttl
        if ttl > 0:
            self.model_lists[key] = (self.clock.seconds() + ttl, entries)

    # -- admin --------------------------------------------------------------------------------

    def purge(self, route: str | None, client: str | None) -> Deferred[dict[str, Any]]:
        """Drop the entries of ``route`` and/or ``client`` (both None: every entry)."""
        purged = self.memory.purge(route, client)
        if route is None and client is None:
            self.model_lists.clear()
        result: dict[str, Any] = {"memory": purged}
        if self.shared is None:
            return succeed(result)
        d = self.shared.purge(route, client)

        def shared(count: int) -> dict[str, Any]:
            result["shared"] = count
            return result

        def failed(failure: Any) -> dict[str, Any]:
            result["shared"] = None
            result["shared_error"] = failure.getErrorMessage()
            return result

        return d.addCallbacks(shared, failed)

    def stats(self) -> dict[str, Any]:
        memory = self.memory
        return {
            "memory": {
                "entries": len(memory),
                "bytes": memory.size,
                "max_bytes": memory.max_bytes,
                "evictions": memory.evictions,
            },
            "shared": None if self.shared is None else {"errors": self.shared.errors},
            "lookups": dict(self.lookups),
            "shared_hits": self.shared_hits,
            "coalesced": self.coalesced,
            "stores": self.stores,
            "in_flight": len(self.flights),
            "model_lists": len(self.model_lists),
        }
