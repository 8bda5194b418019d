"""A stored answer, and its wire form in the shared store.

An entry holds what the client got: the status (always 200), the answer's headers
without the per-response ones (:func:`kept_headers`), and the body's exact bytes (for a
stream, every event as it was sent, so a replay is the same events in the same order
with the same ids). It also keeps what the usage counters and the admin purge need.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from typing import Any

from relayd.providers.base import Usage

__all__ = ["CachedAnswer", "kept_headers"]

_MAGIC = b"RCE1"
_HEAD = struct.Struct(">4sI")
# Headers of one answer only: never replayed from a stored entry. Relayd's own (request
# id, cache state, limits, retries) are made for each request; the upstream's request
# ids, rate-limit state and timings describe the call that filled the entry.
_PER_RESPONSE = frozenset({
    b"age", b"connection", b"content-length", b"date", b"keep-alive", b"request-id",
    b"retry-after", b"server", b"set-cookie", b"transfer-encoding", b"x-request-id",
    b"openai-processing-ms", b"cf-ray", b"via",
})
_PER_RESPONSE_PREFIXES = (b"x-relayd-", b"x-ratelimit-", b"anthropic-ratelimit-")


def kept_headers(headers: Iterable[tuple[bytes, list[bytes]]]) -> tuple[tuple[bytes, bytes], ...]:
    """The headers of an answer that a replay of it carries."""
    kept: list[tuple[bytes, bytes]] = []
    for name, values in headers:
        lower = name.lower()
        if lower in _PER_RESPONSE or lower.startswith(_PER_RESPONSE_PREFIXES):
            continue
        kept.extend((lower, value) for value in values)
    return tuple(kept)


class CachedAnswer:
    """One stored answer (see the module's docstring)."""

    __slots__ = ("body", "client", "expires_at", "headers", "model", "route", "stale_until",
                 "status", "stored_at", "streamed", "usage")

    def __init__(
        self,
        *,
        status: int,
        headers: tuple[tuple[bytes, bytes], ...],
        body: bytes,
        streamed: bool,
        stored_at: float,
        expires_at: float,
        stale_until: float,
        route: str,
        client: str,
        model: str,
        usage: Usage | None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.streamed = streamed
        self.stored_at = stored_at
        self.expires_at = expires_at
        self.stale_until = stale_until
        self.route = route
        self.client = client  # "" for an entry shared by every client
        self.model = model
        self.usage = usage

    @property
    def size(self) -> int:
        """The bytes it holds (what the memory bound counts)."""
        return len(self.body) + sum(len(n) + len(v) for n, v in self.headers) + 256

    def fresh(self, now: float, max_age: float | None) -> bool:
        """Whether it may be served as a hit now (``max_age``: the client's bound)."""
        if now >= self.expires_at:
            return False
        return max_age is None or now - self.stored_at <= max_age

    def encode(self) -> bytes:
        """The entry as bytes for the shared store."""
        usage = self.usage
        meta = {
            "status": self.status,
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in self.headers],
            "streamed": self.streamed,
            "stored_at": self.stored_at,
            "expires_at": self.expires_at,
            "stale_until": self.stale_until,
            "route": self.route,
            "client": self.client,
            "model": self.model,
            "usage": None if usage is None else [
                usage.input_tokens, usage.output_tokens,
                usage.cache_read_tokens, usage.cache_write_tokens,
            ],
        }
        head = json.dumps(meta, separators=(",", ":")).encode()
        return _HEAD.pack(_MAGIC, len(head)) + head + self.body

    @classmethod
    def decode(cls, data: bytes) -> CachedAnswer | None:
        """The entry ``data`` holds, or None when it is not one (of this version)."""
        try:
            magic, length = _HEAD.unpack_from(data)
            if magic != _MAGIC:
                return None
            start = _HEAD.size
            meta: dict[str, Any] = json.loads(data[start:start + length])
            usage = meta["usage"]
            return cls(
                status=int(meta["status"]),
                headers=tuple(
                    (n.encode("latin-1"), v.encode("latin-1")) for n, v in meta["headers"]
                ),
                body=data[start + length:],
                streamed=bool(meta["streamed"]),
                stored_at=float(meta["stored_at"]),
                expires_at=float(meta["expires_at"]),
                stale_until=float(meta["stale_until"]),
                route=str(meta["route"]),
                client=str(meta["client"]),
                model=str(meta["model"]),
                usage=None if usage is None else Usage(*usage),
            )
        except (struct.error, ValueError, KeyError, TypeError, UnicodeError):
            return None
