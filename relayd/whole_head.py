"""An HTTP request head that arrives whole, given to twisted's line receiver in one pass.

twisted.web parses a request head (``HTTPChannel``) as a ``LineReceiver``: for every
line the receiver splits its buffer, copying everything after the line, the body
included. A 64 KiB request body (a Claude Code request) that arrives in the head's read
is copied once per header. Here the head is split once and each line handed to the
receiver's own ``lineReceived``, in order, exactly as the receiver would (all checks,
limits, folding and errors stay Twisted's); the blank line that ends the head, and what
follows, go through the receiver as ever, so body framing, pipelining and the switch to
the body are Twisted's too. (Upstream answers are read by relayd's own client protocol,
:mod:`relayd.client_protocol`.)

Only non-empty lines are handed over, each as the receiver would hand it (in line mode,
with nothing buffered, a non-empty head line never changes the receiver's mode), so the
data may start a head or continue one. Left to the receiver: a partial line already
buffered, a receiver paused or busy, a bare LF or CR in the head, an empty line before
the end (a blank line before a request, or data that is not a head at all), and a line
over ``MAX_LENGTH``. If a line makes the receiver drop the connection (a bad request),
the rest stays in its buffer, as it would.

The one place that touches ``LineReceiver``'s buffer state (``_buffer``,
``_busyReceiving``); ``tests/unit/test_request_head.py`` compares the outcome with
Twisted's own channel on the same bytes.
"""

from __future__ import annotations

from typing import Any

from twisted.protocols.basic import LineReceiver

__all__ = ["feed_whole_head"]

_END = b"\r\n\r\n"


def feed_whole_head(receiver: LineReceiver, data: bytes) -> bytes | None:
    """Give ``receiver`` the head lines of ``data`` if it holds a whole head.

    Returns what the receiver's ``LineReceiver.dataReceived`` must still get (the blank
    line ending the head and what follows; all of ``data`` when there was nothing to do
    here), or None when the receiver began dropping the connection on the way.
    """
    if not receiver.line_mode or receiver._buffer or receiver._busyReceiving or receiver.paused:
        return data
    end = data.find(_END)
    if end <= 0:
        return data
    head = data[:end]
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
        return data
    lines = head.split(b"\r\n")
    limit = receiver.MAX_LENGTH
    for line in lines:
        if not line or len(line) > limit:
            # An empty line ends a head: only the receiver may act on it (this data may
            # be the rest of a head, or a chunked body, rather than a new request).
            return data
    position = 0
    for line in lines:
        position += len(line) + 2
        receiver.lineReceived(line)
        transport: Any = receiver.transport
        if transport is not None and transport.disconnecting:
            receiver._buffer = data[position:]
            return None
    return data[end + 2:]
