"""A small HTTP/1.1 load generator for relayd's benchmark and its load-and-fault suite.

asyncio protocols speaking raw HTTP/1.1 over keep-alive sockets: request bytes are built
once and sent as they are, responses are parsed by Content-Length or chunked framing,
and timestamps are taken at the write, at the first body byte and at the end. It costs
about a tenth of the relay's CPU per request, so on a small machine it does not starve
what it measures. Also here: CPU and memory readings of a process by PID from /proc.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_FAILURES_PER_PHASE = 50  # past this a batch stops early


# ----------------------------------------------------------------------- request shapes


def message_body(stream: bool) -> bytes:
    """A small realistic Messages request (about 1 KB): system prompt, a short dialogue."""
    payload: dict[str, Any] = {
        "model": "claude-sonnet-4-5-20250929",
        "max_tokens": 1024,
        "system": (
            "You are a concise assistant for an internal engineering team. Answer in plain "
            "English, cite file paths when you refer to code, and say so when you are unsure."
        ),
        "messages": [
            {
                "role": "user",
                "content": (
                    "Our Twisted service logs 'Connection was closed cleanly' warnings after "
                    "we put a load balancer in front of it. The balancer's idle timeout is 60 "
                    "seconds and our HTTP client pool keeps connections for 240 seconds. What "
                    "is going on and what should we change?"
                ),
            },
            {
                "role": "assistant",
                "content": (
                    "The balancer closes idle connections after 60 s while your pool still "
                    "thinks they are usable, so the next request on such a connection fails. "
                    "Keep the pool's idle timeout below the balancer's."
                ),
            },
            {
                "role": "user",
                "content": (
                    "Makes sense. Which setting is that on HTTPConnectionPool, and should we "
                    "also turn on automatic retries for idempotent requests?"
                ),
            },
        ],
        "temperature": 0.2,
        "metadata": {"user_id": "bench-user-0001"},
    }
    if stream:
        payload["stream"] = True
    return json.dumps(payload, separators=(",", ":")).encode()


def chat_body(stream: bool) -> bytes:
    """A small Chat Completions request; streams ask for the usage chunk."""
    payload: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Say hello to the load generator, briefly."},
        ],
    }
    if stream:
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
    return json.dumps(payload, separators=(",", ":")).encode()


def build_request(
    port: int,
    key: str,
    body: bytes,
    path: str = "/v1/messages",
    headers: dict[str, str] | None = None,
) -> bytes:
    """The whole HTTP/1.1 request, built once and sent as is for every request.

    ``/v1/messages`` sends the key as ``x-api-key`` with ``anthropic-version``; other
    paths (the OpenAI API) as ``Authorization: Bearer``.
    """
    if path.startswith("/v1/messages"):
        auth = f"anthropic-version: 2023-06-01\r\nx-api-key: {key}\r\n"
    else:
        auth = f"Authorization: Bearer {key}\r\n"
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "User-Agent: relay-bench/1\r\n"
        "Accept: application/json\r\n"
        "Content-Type: application/json\r\n"
        f"{auth}{extra}"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode("ascii") + body


# ------------------------------------------------------------------------- load generator


class ResponseError(Exception):
    """A broken or malformed response."""


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    sent: float  # perf_counter() when the request was written
    first_body: float  # when the first body byte arrived (== headers for an empty body)
    done: float


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection: one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self._buf = b""
        self._head_done = False
        self._status = 0
        self._headers: dict[bytes, bytes] = {}
        self._length: int | None = None
        self._chunked = False
        self._parts: list[bytes] = []
        self._sent = 0.0
        self._first_body = 0.0
        self._body_seen = False
        self._close_after = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            self.waiter = None
            waiter.set_exception(ResponseError(f"connection lost: {exc or 'closed by peer'}"))

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            self._fail("unexpected data between responses")
            return
        self._buf = self._buf + data if self._buf else data
        try:
            if not self._head_done and not self._parse_head():
                return
            if self._chunked:
                finished = self._parse_chunks()
            else:
                finished = self._parse_sized()
        except (ValueError, ResponseError) as exc:
            self._fail(f"malformed response: {exc}")
            return
        if finished:
            self._complete()

    # parsing

    def _parse_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > 65536:
                raise ResponseError("response head too large")
            return False
        lines = self._buf[:end].split(b"\r\n")
        self._buf = self._buf[end + 4 :]
        version, status, _ = (lines[0] + b" ").split(b" ", 2)
        if not version.startswith(b"HTTP/1."):
            raise ResponseError(f"bad status line {lines[0][:80]!r}")
        self._status = int(status)
        headers = self._headers
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            self._chunked = True
        else:
            length = headers.get(b"content-length")
            if length is None:
                raise ResponseError("neither content-length nor chunked")
            self._length = int(length)
        self._close_after = headers.get(b"connection", b"").lower() == b"close"
        self._head_done = True
        self._first_body = time.perf_counter()  # replaced below if body bytes come later
        self._body_seen = bool(self._buf)
        return True

    def _note_body(self) -> None:
        if not self._body_seen and self._buf:
            self._body_seen = True
            self._first_body = time.perf_counter()

    def _parse_sized(self) -> bool:
        assert self._length is not None
        self._note_body()
        if len(self._buf) < self._length:
            return False
        if len(self._buf) > self._length:
            raise ResponseError("more bytes than content-length")
        self._parts.append(self._buf)
        self._buf = b""
        return True

    def _parse_chunks(self) -> bool:
        self._note_body()
        buf = self._buf
        pos = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            if size == 0:
                # No trailers expected: the last chunk is "0\r\n\r\n".
                if len(buf) < eol + 4:
                    break
                if buf[eol + 2 : eol + 4] != b"\r\n":
                    raise ResponseError("trailers are not supported")
                if len(buf) > eol + 4:
                    raise ResponseError("bytes after the last chunk")
                self._buf = b""
                return True
            end = eol + 2 + size
            if len(buf) < end + 2:
                break
            self._parts.append(buf[eol + 2 : end])
            pos = end + 2
        self._buf = buf[pos:]
        return False

    def _complete(self) -> None:
        waiter = self.waiter
        assert waiter is not None
        response = Response(
            self._status,
            self._headers,
            b"".join(self._parts),
            self._sent,
            self._first_body,
            time.perf_counter(),
        )
        close = self._close_after
        self.waiter = None
        self._reset()
        if close and self.transport is not None:
            self.transport.close()
            self.closed = True
        waiter.set_result(response)

    def _fail(self, why: str) -> None:
        waiter = self.waiter
        self.waiter = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        if waiter is not None and not waiter.done():
            waiter.set_exception(ResponseError(why))

    # use

    def request(self, data: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None and self.waiter is None and not self.closed
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Response] = loop.create_future()
        self.waiter = waiter
        self._sent = time.perf_counter()
        self.transport.write(data)
        return waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True


async def connect(port: int) -> HttpConnection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(HttpConnection, "127.0.0.1", port)
    return protocol


async def send_once(port: int, data: bytes, timeout: float) -> Response:
    """One request on a connection of its own, closed afterwards."""
    conn = await connect(port)
    try:
        return await asyncio.wait_for(conn.request(data), timeout)
    finally:
        conn.close()


class _Hangup(asyncio.Protocol):
    """A client that sends a request and hangs up (aborts) when told to, counting what it
    received until then."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = b""
        self.body_started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Nobody may wait for it (give_up): retrieve its exception so asyncio stays quiet.
        self.body_started.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data
        head_end = self.received.find(b"\r\n\r\n")
        if head_end >= 0 and len(self.received) > head_end + 4:
            if not self.body_started.done():
                self.body_started.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.body_started.done():
            self.body_started.set_exception(ResponseError("closed before any body byte"))


async def give_up(port: int, data: bytes, after: float) -> bytes:
    """Send ``data``, wait ``after`` seconds, hang up; returns what had arrived by then
    (nothing, when the upstream is slower than ``after``)."""
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(_Hangup, "127.0.0.1", port)
    assert client.transport is not None
    client.transport.write(data)
    await asyncio.sleep(after)
    client.transport.abort()
    return client.received


async def hang_up_mid_answer(port: int, data: bytes, timeout: float) -> bytes:
    """Send ``data``, hang up as soon as the first body bytes arrived; returns them."""
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(_Hangup, "127.0.0.1", port)
    assert client.transport is not None
    client.transport.write(data)
    try:
        await asyncio.wait_for(asyncio.shield(client.body_started), timeout)
    finally:
        client.transport.abort()
    return client.received


@dataclass
class Target:
    """One side of the comparison: the fake upstream directly, or through relayd."""

    name: str
    port: int
    plain: bytes  # the non-streaming request
    stream: bytes  # the streaming request
    via_relay: bool = False  # responses must carry relayd's request id


@dataclass
class Tally:
    """Failures of one phase, with the first few reasons."""

    phase: str
    failures: int = 0
    reconnects: int = 0
    reasons: list[str] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.failures += 1
        if len(self.reasons) < 3:
            self.reasons.append(why)


def check(response: Response, stream: bool, via_relay: bool) -> str | None:
    """Why a response does not count as a success, or None."""
    if not 200 <= response.status < 300:
        return f"HTTP {response.status}: {response.body[:120]!r}"
    if stream:
        body = response.body
        if b"event: message_stop" not in body and not body.endswith(b"data: [DONE]\n\n"):
            return "stream ended without its terminal event (message_stop / [DONE])"
        if b"event: error" in body or b'data: {"error"' in body:
            return "stream carried an error event"
    elif not response.body.startswith(b"{"):
        return f"non-JSON body {response.body[:80]!r}"
    if via_relay and b"x-relayd-request-id" not in response.headers:
        return "response did not come through relayd (no x-relayd-request-id)"
    return None


class Client:
    """A keep-alive connection that reconnects after a failure (counted in the tally)."""

    def __init__(self, target: Target, tally: Tally) -> None:
        self.target = target
        self.tally = tally
        self.conn: HttpConnection | None = None

    async def send(self, data: bytes, stream: bool) -> Response | None:
        if self.conn is None or self.conn.closed:
            if self.conn is not None:
                self.tally.reconnects += 1
            try:
                self.conn = await connect(self.target.port)
            except OSError as exc:
                self.tally.fail(f"{self.target.name}: cannot connect: {exc}")
                return None
        try:
            response = await self.conn.request(data)
        except ResponseError as exc:
            self.tally.fail(f"{self.target.name}: {exc}")
            self.conn.close()
            return None
        why = check(response, stream, self.target.via_relay)
        if why is not None:
            self.tally.fail(f"{self.target.name}: {why}")
            return None
        return response

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


async def sequential_interleaved(
    targets: Sequence[Target], count: int, stream: bool, tally: Tally
) -> dict[str, list[float]]:
    """``count`` requests per target, one at a time, alternating which target goes first.

    Returns per target the latencies in ms: whole response for plain requests, time to
    the first body byte for streams.
    """
    clients = [Client(t, tally) for t in targets]
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    try:
        for i in range(count):
            order = clients if i % 2 == 0 else clients[::-1]
            for client in order:
                data = client.target.stream if stream else client.target.plain
                response = await client.send(data, stream)
                if response is None:
                    if tally.failures >= MAX_FAILURES_PER_PHASE:
                        return samples
                    continue
                end = response.first_body if stream else response.done
                samples[client.target.name].append((end - response.sent) * 1000.0)
    finally:
        for client in clients:
            client.close()
    return samples


async def concurrent_batch(
    target: Target,
    total: int,
    concurrency: int,
    stream: bool,
    tally: Tally,
    *,
    rate: float = 0.0,
    latencies: list[float] | None = None,
) -> int:
    """``total`` requests over ``concurrency`` keep-alive connections; returns successes.

    ``rate`` (requests/s in all) paces them instead of sending flat out; ``latencies``
    gets each success's whole-response time in ms.
    """
    remaining = total
    ok = 0
    data = target.stream if stream else target.plain
    loop = asyncio.get_running_loop()
    gap = concurrency / rate if rate else 0.0

    async def worker(client: Client) -> None:
        nonlocal remaining, ok
        due = loop.time()
        while remaining > 0 and tally.failures < MAX_FAILURES_PER_PHASE:
            remaining -= 1
            if gap:
                due += gap
                await asyncio.sleep(max(due - loop.time(), 0.0))
            response = await client.send(data, stream)
            if response is not None:
                ok += 1
                if latencies is not None:
                    latencies.append((response.done - response.sent) * 1000.0)

    clients = [Client(target, tally) for _ in range(concurrency)]
    try:
        # Connect first so connection setup is not part of the measured batch.
        for client in clients:
            try:
                client.conn = await connect(target.port)
            except OSError as exc:
                tally.fail(f"{target.name}: cannot connect: {exc}")
        await asyncio.gather(*(worker(c) for c in clients))
    finally:
        for client in clients:
            client.close()
    return ok


# ------------------------------------------------------------------------------ processes


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (``/proc/PID/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        raw = handle.read()
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
    return found




def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]
