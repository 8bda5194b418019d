"""A backend's latency as ``balance: least_latency`` sees it: a peak-sensitive EWMA.

As in Finagle's and Linkerd's peak-EWMA balancers: every answer's time to response
headers (the first byte of a stream, never its whole duration) is a sample; a sample
above the average replaces it at once (a backend that slows down is noticed on its
first slow answer), a sample below it pulls it down with weight ``1 - exp(-dt/decay)``,
``dt`` being the time since the previous sample, so old samples fade in about ``decay``
seconds. Without new samples the estimate decays towards zero the same way, so a
backend passed over for being slow is tried again after a while (and its next answer
says whether it still is). A backend without samples costs ``default_rtt``: keep it
below real latencies, so that a new backend is tried soon.
"""

from __future__ import annotations

import math

__all__ = ["PeakEwma"]


class PeakEwma:
    """The peak-EWMA of one backend's time to response headers, in seconds."""

    __slots__ = ("decay", "default_rtt", "last", "samples", "value")

    def __init__(self, decay: float = 10.0, default_rtt: float = 0.05) -> None:
        self.decay = decay
        self.default_rtt = default_rtt
        self.value = 0.0
        self.last = 0.0  # clock time of the last sample
        self.samples = 0

    def configure(self, decay: float, default_rtt: float) -> None:
        self.decay = decay
        self.default_rtt = default_rtt

    def observe(self, rtt: float, now: float) -> None:
        """Add one sample (``rtt`` seconds to response headers, seen at ``now``)."""
        rtt = max(rtt, 0.0)
        if self.samples == 0 or rtt > self.value:
            self.value = rtt
        else:
            weight = math.exp(-max(now - self.last, 0.0) / self.decay)
            self.value = self.value * weight + rtt * (1.0 - weight)
        self.last = now
        self.samples += 1

    def estimate(self, now: float) -> float:
        """The latency to expect at ``now``: the average decayed since its last sample,
        or ``default_rtt`` with no samples."""
        if not self.samples:
            return self.default_rtt
        return self.value * math.exp(-max(now - self.last, 0.0) / self.decay)
