"""The retry budget: retries capped at a ratio of client requests over a sliding window.

Driven by an injected clock (``IReactorTime``); recording and checking are O(1) and
allocate nothing, as the request path calls them once or a few times per request.
"""

from __future__ import annotations

import math

from twisted.internet.interfaces import IReactorTime

__all__ = ["RetryBudget"]

_BUCKETS = 10  # one per second: the budget looks at the last 10 seconds


class RetryBudget:
    """Caps retries at ``ratio`` x requests (+ a floor) over a sliding 10-second window.

    Counts live in 10 one-second buckets (a ring, with running sums), so recording and
    checking are O(1); a bucket is emptied when the second it stands for leaves the
    window. The floor of ``min_per_second`` x 10 retries lets a quiet relay retry at all.
    """

    __slots__ = (
        "_clock",
        "_requests",
        "_requests_sum",
        "_retries",
        "_retries_sum",
        "_second",
        "min_per_second",
        "ratio",
        "refused",
    )

    def __init__(self, ratio: float, min_per_second: float, clock: IReactorTime) -> None:
        self._clock = clock
        self.ratio = ratio
        self.min_per_second = min_per_second
        self._requests = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._second = math.floor(clock.seconds())  # the second the newest bucket holds
        self._requests_sum = 0
        self._retries_sum = 0
        self.refused = 0  # retries refused since start

    @property
    def requests_in_window(self) -> int:
        """Client requests recorded in the last 10 seconds."""
        self._advance()
        return self._requests_sum

    @property
    def retries_in_window(self) -> int:
        """Retries granted in the last 10 seconds."""
        self._advance()
        return self._retries_sum

    def record_request(self) -> None:
        """Count one client request (not one per attempt)."""
        self._requests[self._advance()] += 1
        self._requests_sum += 1

    def try_acquire_retry(self) -> bool:
        """Grant (and count) one retry if the budget allows it, else count a refusal."""
        slot = self._advance()
        allowed = self.ratio * self._requests_sum + self.min_per_second * _BUCKETS
        if self._retries_sum + 1 <= allowed:
            self._retries[slot] += 1
            self._retries_sum += 1
            return True
        self.refused += 1
        return False

    def reconfigure(self, ratio: float, min_per_second: float) -> None:
        """New ratio and floor; the counts already in the window are kept."""
        self.ratio = ratio
        self.min_per_second = min_per_second

    def _advance(self) -> int:
        """Drop the buckets of seconds that left the window; the current bucket's index."""
        second = math.floor(self._clock.seconds())
        last = self._second
        if second > last:
            if second - last >= _BUCKETS:
                for i in range(_BUCKETS):
                    self._requests[i] = self._retries[i] = 0
                self._requests_sum = self._retries_sum = 0
            else:
                for s in range(last + 1, second + 1):
                    i = s % _BUCKETS
                    self._requests_sum -= self._requests[i]
                    self._retries_sum -= self._retries[i]
                    self._requests[i] = self._retries[i] = 0
            self._second = second
        # A clock that steps back keeps counting in the newest bucket.
        return self._second % _BUCKETS
