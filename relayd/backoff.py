"""Capped exponential backoff, shared by the circuit breaker and the key ring."""

from __future__ import annotations

__all__ = ["doubled"]

# 2.0 ** 60 times any sane cooldown is far beyond any cap; bounding the exponent keeps
# the float arithmetic finite however many times a breaker or a key re-opens.
_MAX_EXPONENT = 60


def doubled(base: float, n: int, cap: float) -> float:
    """``base * 2**(n-1)`` capped at ``cap``, for ``n >= 1`` (``base`` for ``n < 1``)."""
    return min(base * 2.0 ** min(max(n - 1, 0), _MAX_EXPONENT), cap)
