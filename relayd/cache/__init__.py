"""The response cache: keys, entries, the memory (L1) and Redis (L2) stores, coalescing.

See docs/caching.md. :mod:`.key` makes the key of a request, :mod:`.controls` reads
the client's ``Cache-Control``, :mod:`.entry` is a stored answer and its wire form,
:mod:`.memory` and :mod:`.shared` are the two levels, :mod:`.flights` the requests in
flight that identical ones wait for, and :mod:`.store` the :class:`ResponseCache` a
runtime holds. The request path's cache stage is :mod:`relayd.http.caching`.
"""

from relayd.cache.controls import CacheControls, parse_cache_control
from relayd.cache.entry import CachedAnswer
from relayd.cache.key import cache_key, samples
from relayd.cache.store import CACHE_PROVIDER, ResponseCache

__all__ = [
    "CACHE_PROVIDER",
    "CacheControls",
    "CachedAnswer",
    "ResponseCache",
    "cache_key",
    "parse_cache_control",
    "samples",
]
