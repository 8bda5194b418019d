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


#: The longest SSE line, and the most ``data`` one event may carry, that relayd reads: an
#: OpenAI Responses ``response.completed`` event holds a whole answer in one line, so the
#: bound is generous; past it the stream is an upstream failure, not a memory sink.
MAX_LINE_BYTES = 16 * 1024 * 1024
MAX_EVENT_BYTES = 16 * 1024 * 1024


class SseTooLargeError(ValueError):
    """A line or an event of the stream exceeds :data:`MAX_LINE_BYTES` /
    :data:`MAX_EVENT_BYTES`."""


class SseParser:
    """Turns a byte stream into :class:`SseEvent` objects, incrementally.

    Linear in the bytes fed: a line split over many reads is kept as a list of pieces and
    joined once, when its end arrives (joining at every read made 100 MB without a newline
    cost 90 s of CPU). Raises :class:`SseTooLargeError` past the size bounds.
    """

    __slots__ = (
        "_data",
        "_data_size",
        "_event",
        "_pending",
        "_pending_cr",
        "_pending_size",
        "max_event",
        "max_line",
    )

    def __init__(self, max_line: int | None = None, max_event: int | None = None) -> None:
        self._pending: list[bytes] = []  # pieces of a line whose end has not come yet
        self._pending_size = 0
        self._pending_cr = False
        self._event: bytes | None = None
        self._data: list[bytes] = []
        self._data_size = 0
        self.max_line = MAX_LINE_BYTES if max_line is None else max_line
        self.max_event = MAX_EVENT_BYTES if max_event is None else max_event

    @property
    def at_boundary(self) -> bool:
        """Whether what was fed so far ends between two events (nothing half-read), so
        a comment line may be inserted without changing any event."""
        return (
            not self._pending and not self._pending_cr and not self._data and self._event is None
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
        end = chunk.rfind(b"\n")
        if end < 0:
            self._keep(chunk)
            return []
        if self._pending:
            self._pending.append(chunk[:end])
            lines = b"".join(self._pending).split(b"\n")
            self._pending = []
            self._pending_size = 0
            rest = chunk[end + 1 :]
        else:
            lines = chunk.split(b"\n")
            rest = lines.pop()  # after the last line end: the start of the next line
        if rest:
            self._keep(rest)
        return self._lines(lines)

    def _lines(self, lines: list[bytes]) -> list[SseEvent]:
        """The events that complete lines finish (the event being read is kept in local
        names while the lines go by, and stored back at the end)."""
        events: list[SseEvent] = []
        event = self._event
        data = self._data
        max_line = self.max_line
        try:
            for line in lines:
                if not line:
                    if data or event is not None:
                        # One data line (the common case) needs no join.
                        events.append(
                            SseEvent(event, data[0] if len(data) == 1 else b"\n".join(data))
                        )
                        event = None
                        data = []
                        self._data_size = 0
                    continue
                if line[0] == 0x3A:  # ":" starts a comment
                    continue
                if len(line) > max_line:
                    raise SseTooLargeError(f"an SSE line is longer than {max_line} bytes")
                if line.startswith(b"data: "):
                    name = b"data"
                    value = line[6:]
                else:
                    name, sep, value = line.partition(b":")
                    if sep and value.startswith(b" "):
                        value = value[1:]
                if name == b"data":
                    size = self._data_size = self._data_size + len(value)
                    if size > self.max_event:
                        raise SseTooLargeError(
                            f"an SSE event carries more than {self.max_event} bytes"
                        )
                    data.append(value)
                elif name == b"event":
                    event = value
                # "id" and "retry" carry nothing the relay needs.
        finally:
            self._event = event
            self._data = data
        return events

    def _keep(self, piece: bytes) -> None:
        self._pending.append(piece)
        self._pending_size += len(piece)
        if self._pending_size > self.max_line:
            raise SseTooLargeError(f"an SSE line is longer than {self.max_line} bytes")
