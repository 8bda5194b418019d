"""The client's ``Cache-Control`` request header, as the response cache reads it.

``no-store``: neither looked up nor stored. ``no-cache``: not looked up (a fresh answer
is fetched) but stored. ``max-age=N``: only an entry at most N seconds old is good.
Unknown directives are ignored, as RFC 9111 asks; a malformed ``max-age`` is ignored too.
"""

from __future__ import annotations

from typing import NamedTuple

from twisted.web.http_headers import Headers

__all__ = ["CacheControls", "parse_cache_control"]


class CacheControls(NamedTuple):
    no_store: bool = False
    no_cache: bool = False
    max_age: float | None = None


_NONE = CacheControls()


def parse_cache_control(headers: Headers) -> CacheControls:
    """The directives of every ``Cache-Control`` header of the request."""
    values = headers.getRawHeaders(b"cache-control")
    if not values:
        return _NONE
    no_store = no_cache = False
    max_age: float | None = None
    for value in values:
        for directive in value.split(b","):
            name, _, argument = directive.strip().partition(b"=")
            name = name.strip().lower()
            if name == b"no-store":
                no_store = True
            elif name == b"no-cache":
                no_cache = True
            elif name == b"max-age":
                text = argument.strip().strip(b'"')
                if text.isdigit() and len(text) <= 10:
                    seconds = float(int(text))
                    max_age = seconds if max_age is None else min(max_age, seconds)
    return CacheControls(no_store, no_cache, max_age)
