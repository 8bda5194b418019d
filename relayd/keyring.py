"""A backend's upstream API keys: round-robin choice and per-key cooldowns.

A 429 cools a key down for the upstream's ``retry-after``; a 401 repeated
:data:`REJECTIONS_TO_BENCH` times in a row benches it for longer, doubling while the key
keeps being rejected. Driven by an injected clock (``IReactorTime``), never the global
reactor. The request path calls :meth:`KeyRing.choose` and the reporting methods once or a
few times per request: O(number of keys) at worst, no allocation, no logging.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.interfaces import IReactorTime

from relayd.backoff import doubled

__all__ = ["MAX_REJECT_COOLDOWN", "REJECTIONS_TO_BENCH", "KeyRing", "UpstreamKey"]


class UpstreamKey:
    """One upstream API key of a backend, with its cooldown state.

    ``index`` (its position in the backend's key list) names it in logs and metrics; the
    secret itself never appears in ``repr``.
    """

    __slots__ = (
        "_auth_failures",
        "_reject_streak",
        "auth_headers",
        "cooldown_reason",
        "cooldown_until",
        "index",
        "rejections",
        "secret",
    )

    def __init__(self, index: int, secret: str, auth_headers: list[tuple[bytes, bytes]]) -> None:
        self.index = index
        self.secret = secret
        self.auth_headers = auth_headers
        self.cooldown_until = 0.0
        self.cooldown_reason: str | None = None  # "rate_limited" | "rejected" | None
        self.rejections = 0  # every 401 ever reported for this key
        self._reject_streak = 0  # rejection cooldowns since the last success
        self._auth_failures = 0  # 401s in a row since the last success or bench

    def __repr__(self) -> str:
        return (
            f"<UpstreamKey #{self.index} cooldown_until={self.cooldown_until}"
            f" reason={self.cooldown_reason} rejections={self.rejections}>"
        )


# A rejected key's cooldown doubles per consecutive rejection up to this many seconds.
MAX_REJECT_COOLDOWN = 3600.0
# 401s in a row (no success between) that bench a key: one can be a fluke of a single
# request; a key the upstream no longer accepts fails every request.
REJECTIONS_TO_BENCH = 2


class KeyRing:
    """Round-robin over a backend's upstream keys, skipping keys in cooldown.

    A 429 cools a key down for the upstream's ``retry-after`` (:meth:`cool_down`); a
    401/403 for longer, doubling while the key keeps being rejected (:meth:`reject`).
    A key whose cooldown has ended is usable again without any call; its
    ``cooldown_reason`` is cleared when it is next chosen.
    """

    __slots__ = ("_clock", "_next", "keys")

    def __init__(
        self, keys: Sequence[tuple[str, list[tuple[bytes, bytes]]]], clock: IReactorTime
    ) -> None:
        self._clock = clock
        self._next = 0
        self.keys: tuple[UpstreamKey, ...] = tuple(
            UpstreamKey(i, secret, headers) for i, (secret, headers) in enumerate(keys)
        )

    def choose(self) -> UpstreamKey | None:
        """The next usable key in round-robin order, or None when every key is cooling down."""
        keys = self.keys
        n = len(keys)
        if n == 0:
            return None
        now = self._clock.seconds()
        start = self._next
        for step in range(n):
            i = start + step
            if i >= n:
                i -= n
            key = keys[i]
            if key.cooldown_until <= now:
                if key.cooldown_reason is not None:
                    key.cooldown_reason = None
                    key.cooldown_until = 0.0
                self._next = 0 if i + 1 == n else i + 1
                return key
        return None

    def take(self, index: int) -> UpstreamKey | None:
        """Key ``index`` if it is usable now (a session's pinned key), else None; the
        round-robin order is left as it is."""
        if not 0 <= index < len(self.keys):
            return None
        key = self.keys[index]
        if key.cooldown_until > self._clock.seconds():
            return None
        if key.cooldown_reason is not None:
            key.cooldown_reason = None
            key.cooldown_until = 0.0
        return key

    def available(self) -> bool:
        """Whether some key is usable now (no side effects, no rotation)."""
        now = self._clock.seconds()
        return any(key.cooldown_until <= now for key in self.keys)

    def cool_down(self, key: UpstreamKey, seconds: float, reason: str) -> None:
        """Keep ``key`` out for ``seconds`` (never shortening a longer cooldown)."""
        until = self._clock.seconds() + seconds
        if until >= key.cooldown_until:
            key.cooldown_until = until
            key.cooldown_reason = reason

    def reject(self, key: UpstreamKey, seconds: float = 300.0) -> None:
        """The upstream refused ``key`` (401/403): cool it down, doubling per repeat.

        Rejections of requests sent before the key's current rejection cooldown began
        (concurrent requests with the same key) count in ``rejections`` but do not double
        the cooldown again; :meth:`record_success` ends the streak.
        """
        key.rejections += 1
        now = self._clock.seconds()
        if key.cooldown_reason == "rejected" and key.cooldown_until > now:
            return
        key._reject_streak += 1
        self.cool_down(key, doubled(seconds, key._reject_streak, MAX_REJECT_COOLDOWN), "rejected")
        key.cooldown_reason = "rejected"

    def authentication_failed(self, key: UpstreamKey) -> bool:
        """The upstream answered 401 (authentication) for ``key``: bench it once that
        happened :data:`REJECTIONS_TO_BENCH` times in a row; True when benched now.

        A 403 is not reported here: a permission error is about the request (a model, a
        beta feature the account may not use), and benching the shared key for it would
        refuse every other client too.
        """
        key._auth_failures += 1
        if key._auth_failures < REJECTIONS_TO_BENCH:
            key.rejections += 1
            return False
        key._auth_failures = 0
        self.reject(key)
        return True

    def record_success(self, key: UpstreamKey) -> None:
        """The upstream accepted ``key``: the next rejection starts from the base cooldown."""
        key._auth_failures = 0
        if key._reject_streak:
            key._reject_streak = 0

    def next_available_at(self) -> float | None:
        """The earliest cooldown end when no key is usable now, else None."""
        if not self.keys or self.available():
            return None
        return min(key.cooldown_until for key in self.keys)

    def reconfigure(self, keys: Sequence[tuple[str, list[tuple[bytes, bytes]]]]) -> None:
        """Replace the key list, keeping the keys whose secret is unchanged.

        Matching is by secret: a kept key is the same :class:`UpstreamKey` (under its new
        index and auth headers), so a request that chose it before the reload and gets
        its 429 or 401 after still cools it down in the ring that serves now. New keys
        start fresh.
        """
        old = {key.secret: key for key in self.keys}
        fresh: list[UpstreamKey] = []
        for i, (secret, headers) in enumerate(keys):
            key = old.pop(secret, None)  # pop: a secret listed twice gets a second key
            if key is None:
                key = UpstreamKey(i, secret, headers)
            else:
                key.index = i
                key.auth_headers = headers
            fresh.append(key)
        self.keys = tuple(fresh)
        if self._next >= len(self.keys):
            self._next = 0

    def __repr__(self) -> str:
        return f"<KeyRing {len(self.keys)} keys: {list(self.keys)!r}>"
