"""A request head that arrives whole, given to twisted.web's HTTP/1.1 channel in one pass.

``HTTPChannel`` is a ``LineReceiver``: it takes the head a line at a time, and for every
line the receiver splits its buffer, copying everything after the line, the request body
included. A 64 KiB body (a Claude Code request) that arrives in the head's read is copied
once per header; and the loop itself costs about a microsecond a line. Here the head is
split once and each line handed to the channel's own ``lineReceived``, in order, exactly
as the receiver would (its checks, limits and errors are the channel's); the blank line
that ends the head, and what follows, go through the receiver as ever, so body framing,
pipelined requests and the switch to the body are Twisted's.

Only non-empty lines are handed over, each exactly as the receiver would hand it (in
line mode, with nothing buffered, a non-empty line never changes the receiver's mode),
so the data may start a request or continue one. Left to the receiver: a partial line
already buffered, a receiver paused or busy, an empty line before the end (a blank line
before a request, or data that is not a head at all), and a line over ``MAX_LENGTH``.
If a line makes the channel drop the connection (a bad request), the rest stays in the
receiver's buffer, as it would.

The one place that touches ``LineReceiver``'s buffer state (``_buffer``,
``_busyReceiving``); ``tests/unit/test_request_head.py`` compares the outcome with
Twisted's own channel on the same bytes.
"""

from __future__ import annotations

from typing import Any

from twisted.web.http import HTTPChannel

__all__ = ["feed_whole_head"]

_END = b"\r\n\r\n"


def feed_whole_head(channel: HTTPChannel, data: bytes) -> bytes | None:
    """Give ``channel`` the head lines of ``data`` if it holds a whole head.

    Returns what the channel's ``LineReceiver.dataReceived`` must still get (the blank
    line ending the head and what follows; all of ``data`` when there was nothing to do
    here), or None when the channel began dropping the connection on the way.
    """
    if not channel.line_mode or channel._buffer or channel._busyReceiving or channel.paused:
        return data
    end = data.find(_END)
    if end <= 0:
        return data
    lines = data[:end].split(b"\r\n")
    limit = channel.MAX_LENGTH
    for line in lines:
        if not line or len(line) > limit:
            # An empty line ends a head: only the receiver may act on it (this data may
            # be the rest of a head, or a chunked body, rather than a new request).
            return data
    position = 0
    for line in lines:
        position += len(line) + 2
        channel.lineReceived(line)
        transport: Any = channel.transport
        if transport is not None and transport.disconnecting:
            channel._buffer = data[position:]
            return None
    return data[end + 2:]
