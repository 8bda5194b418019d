"""An incremental Server-Sent Events parser.

Feeds arbitrary byte splits (one byte at a time included) and returns complete events.
Lines end in ``\\n``, ``\\r\\n`` or ``\\r``, also when the two bytes of ``\\r\\n`` arrive in
different reads. Lines are split on bytes before any decoding, so a UTF-8 character
split across reads is never decoded half-way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched event: the ``event:`` name (``None`` when absent) and joined ``data:``."""

    event: bytes | None
    data: bytes


class SseParser:
    """Turns a byte stream into :class:`SseEvent` objects, incrementally."""

    __slots__ = ("_buffer", "_data", "_event", "_pending_cr")

    def __init__(self) -> None:
        self._buffer = b""
        self._pending_cr = False
        self._event: bytes | None = None
        self._data: list[bytes] = []

    @property
    def at_boundary(self) -> bool:
        """Whether what was fed so far ends between two events (nothing half-read), so
        a comment line may be inserted without changing any event."""
        return (
            not self._buffer and not self._pending_cr and not self._data and self._event is None
        )

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Consume ``chunk`` and return the events it completed (possibly none)."""
        if self._pending_cr:
            self._pending_cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._pending_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._buffer:
            chunk = self._buffer + chunk
        lines = chunk.split(b"\n")
        self._buffer = lines.pop()
        events: list[SseEvent] = []
        for line in lines:
            if not line:
                if self._data or self._event is not None:
                    events.append(SseEvent(self._event, b"\n".join(self._data)))
                self._event = None
                self._data = []
                continue
            if line[0] == 0x3A:  # ":" starts a comment
                continue
            name, sep, value = line.partition(b":")
            if sep and value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                self._data.append(value)
            elif name == b"event":
                self._event = value
            # "id" and "retry" carry nothing the relay needs.
        return events
