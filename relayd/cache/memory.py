"""The in-process level of the response cache (L1): bounded by bytes, LRU out first.

An entry stays until it is past ``stale_until`` (its TTL plus the route's
``stale_if_error``), is pushed out by newer ones, or is purged. No timer runs: expired
entries go when they are looked up or when room is needed.
"""

from __future__ import annotations

from collections import OrderedDict

from relayd.cache.entry import CachedAnswer

__all__ = ["MemoryCache"]


class MemoryCache:
    """Entries by key, at most ``max_bytes`` of them (see :attr:`CachedAnswer.size`)."""

    __slots__ = ("_entries", "evictions", "max_bytes", "size")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedAnswer] = OrderedDict()
        self.size = 0
        self.evictions = 0  # pushed out for room (not expiry or purge)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> CachedAnswer | None:
        """The entry of ``key`` (fresh or stale), made the most recently used."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.stale_until:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: CachedAnswer) -> bool:
        """Keep ``entry`` (replacing one of the same key); False if it can never fit."""
        size = entry.size
        if size > self.max_bytes:
            return False
        if key in self._entries:
            self._drop(key)
        entries = self._entries
        while self.size + size > self.max_bytes and entries:
            _, old = entries.popitem(last=False)
            self.size -= old.size
            self.evictions += 1
        entries[key] = entry
        self.size += size
        return True

    def purge(self, route: str | None = None, client: str | None = None) -> int:
        """Drop the entries of ``route`` and/or ``client`` (both None: all); how many."""
        doomed = [
            key for key, entry in self._entries.items()
            if (route is None or entry.route == route)
            and (client is None or entry.client == client)
        ]
        for key in doomed:
            self._drop(key)
        return len(doomed)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.size -= entry.size
