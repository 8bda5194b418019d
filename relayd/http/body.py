"""A request body buffer with a size limit.

twisted.web hands each received body chunk to ``Site.getContentFile(length)``'s object.
:class:`BoundedBody` keeps at most ``limit`` bytes in memory and only remembers that
more arrived, so an oversized upload costs no memory and gets a clean 413.
"""

from __future__ import annotations

from io import BytesIO


class BoundedBody:
    """A write-once, file-like body store that drops everything past ``limit`` bytes."""

    __slots__ = ("_buffer", "_size", "limit", "overflowed")

    def __init__(self, limit: int) -> None:
        self._buffer = BytesIO()
        self._size = 0
        self.limit = limit
        self.overflowed = False

    def write(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self.limit:
            if not self.overflowed:
                self.overflowed = True
                self._buffer = BytesIO()
            return
        self._buffer.write(data)

    def getvalue(self) -> bytes:
        return self._buffer.getvalue()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._buffer.seek(offset, whence)

    def tell(self) -> int:
        return self._size

    def read(self, size: int = -1) -> bytes:
        return self._buffer.read(size)

    def close(self) -> None:
        self._buffer.close()
