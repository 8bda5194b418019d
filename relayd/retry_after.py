"""Parsing an upstream's ``retry-after`` header value.

Its own module because two unrelated callers read the header: the key ring's 429
cooldown and the cap on the ``retry-after`` relayed to a client. Neither owns the format.
"""

from __future__ import annotations

import math
import re
from datetime import UTC
from email.utils import parsedate_to_datetime

__all__ = ["parse_retry_after"]

_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def parse_retry_after(headers_value: bytes | None, now: float) -> float | None:
    """Seconds to wait from a ``retry-after`` value, or None when absent or unusable.

    Accepts delta-seconds (digits, with a decimal fraction tolerated: some upstreams send
    ``1.5``) and an HTTP-date, taken relative to ``now`` (a Unix time). Negative values,
    dates already past and anything unparsable give None, so the caller falls back to
    its own default rather than retrying at once.
    """
    if headers_value is None:
        return None
    try:
        text = headers_value.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when.timestamp() - now
    return delta if delta >= 0 else None
