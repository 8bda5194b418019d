"""Upstream answer bodies the relay must read whole: kept as they arrive, gzip undone
chunk by chunk, and never past a size limit.

A JSON answer is read for its usage, and a translated or renamed one is rewritten; either
may come gzip-encoded. Inflating only at the end, in one call and without a cap, let a
1 MB gzip "bomb" from a broken upstream grow into gigabytes on the reactor thread. Here
each chunk is inflated when it arrives (``zlib`` ``max_length``), and the decoded size
is checked as it grows, so at most ``limit + 1`` bytes are ever produced.
"""

from __future__ import annotations

import zlib


class BodyTooLargeError(Exception):
    """The body (decoded) grew past its limit."""


class BadEncodingError(Exception):
    """The body is not valid gzip (corrupt, or cut short)."""


class CollectedBody:
    """The decoded bytes of one response body, up to ``limit`` bytes."""

    __slots__ = ("_inflater", "_parts", "limit", "size")

    def __init__(self, limit: int, gzipped: bool) -> None:
        self.limit = limit
        self.size = 0  # decoded bytes so far
        self._parts: list[bytes] = []
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None

    def feed(self, data: bytes) -> None:
        """Add the next raw chunk.

        Raises :class:`BodyTooLargeError` past the limit, :class:`BadEncodingError` on
        corrupt gzip.
        """
        inflater = self._inflater
        if inflater is not None:
            try:
                data = inflater.decompress(data, self.limit - self.size + 1)
            except zlib.error as exc:
                raise BadEncodingError(str(exc)) from None
        self.size += len(data)
        if self.size > self.limit:
            self._parts = []
            raise BodyTooLargeError(self.limit)
        self._parts.append(data)

    def value(self) -> bytes:
        """The whole decoded body; :class:`BadEncodingError` if the gzip stream is cut short."""
        inflater = self._inflater
        if inflater is not None and not inflater.eof:
            raise BadEncodingError("the gzip stream is incomplete")
        return b"".join(self._parts)
