"""Body sinks: what happens to an upstream answer's body, one class per treatment.

The exchange chooses one sink per relayed answer, from its status, content type and
the upstream call (:func:`choose_sink`):

* :class:`PassThrough`: every chunk goes to the client as it comes (the fast path);
* :class:`CollectUsage`: the same, while a bounded copy of a JSON success is kept to
  read its usage at the end;
* :class:`BufferedRewrite`: the whole answer is held (bounded) and rewritten for the
  client (translated, its model renamed, or an object call's answer filtered);
* :class:`StreamSink`: an SSE stream watched for usage and its end; held back before
  its first content (so an error event can still fail over invisibly), then live.

A sink reads what it is fed; what comes of it (the client's answer, a failover, an
error event) goes through its :class:`SinkHost`.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request
from twisted.web.iweb import IResponse

from relayd.errors import Outcome, Refusal, Result
from relayd.http.attempt import UpstreamAttempt, first
from relayd.http.collected import BadEncodingError, BodyTooLargeError, CollectedBody
from relayd.http.objects import ObjectKeeper
from relayd.http.planner import Pick
from relayd.http.translation import BadUpstreamBodyError, StreamRewriter
from relayd.providers import IProvider, IStreamWatcher, Usage
from relayd.sse import SseTooLargeError

log = Logger(namespace="relayd.relay")

# JSON bodies larger than this (decoded) are relayed but not parsed for usage.
MAX_COLLECTED_BODY = 4 * 1024 * 1024
# A body that is rewritten (translated, or its model renamed) is held whole until its end;
# an upstream answer larger than this (decoded) is refused with a 502.
MAX_REWRITTEN_BODY = 64 * 1024 * 1024
# A stream held back before its first content (for failover) is released past this.
MAX_HELD_BYTES = 1024 * 1024


class SinkHost(Protocol):
    """The exchange, as a body sink sees it."""

    done: bool
    outcome: str
    usage: Usage | None
    status: int | None
    request: Request
    request_id: str
    family: IProvider
    clock: IReactorTime

    def begin_response(
        self, sink: BodySink, rewritten: tuple[int, bytes] | None = None
    ) -> None: ...

    def upstream_finished(self) -> None: ...

    def finish(self) -> None: ...

    def cut_off(self) -> None: ...

    def refuse(self, refusal: Refusal) -> None: ...

    def retry(self, result: str) -> Pick | None: ...

    def fail_over(self, attempt: UpstreamAttempt, pick: Pick, message: str) -> None: ...

    def on_unexpected(self, failure: Failure) -> None: ...


def choose_sink(
    host: SinkHost,
    attempt: UpstreamAttempt,
    response: IResponse,
    *,
    objects: ObjectKeeper | None,
    keepalive: float,
    now: float,
) -> BodySink:
    """The sink for an answer to relay (``objects``: the keeper of an object call)."""
    status = response.code
    call = attempt.call
    headers = response.headers
    content_type = first(headers.getRawHeaders(b"content-type")) or b""
    event_stream = content_type.startswith(b"text/event-stream")
    stream = event_stream and status == 200
    if not stream and (
        (call.rewrites and (call.translated or status < 300))
        or (objects is not None and status < 300 and b"json" in content_type)
    ):
        # Translated answers (and renamed successes) are rewritten whole: status and
        # headers wait for the end of the body.
        return BufferedRewrite(host, attempt, _gzipped(response), objects)
    if event_stream:
        rewriter = call.stream_rewriter(int(now)) if stream and call.rewrites else None
        return StreamSink(
            host, attempt, call.family.stream_watcher(call.endpoint), rewriter,
            hold=stream, keepalive=keepalive, now=now,
            objects=objects if objects is not None and objects.role == "create" else None,
        )
    if status < 300 and b"json" in content_type:
        return CollectUsage(host, attempt, _gzipped(response))
    return PassThrough(host, attempt)


def _gzipped(response: IResponse) -> bool:
    encoding = first(response.headers.getRawHeaders(b"content-encoding")) or b""
    return encoding.lower() == b"gzip"


class BodySink:
    """The base of every sink: relays nothing by itself."""

    __slots__ = ("attempt", "host")

    streaming = False  # an SSE stream (for the access log and stream headers)

    def __init__(self, host: SinkHost, attempt: UpstreamAttempt) -> None:
        self.host = host
        self.attempt = attempt

    def feed(self, data: bytes) -> None:
        raise NotImplementedError

    def end(self, clean: bool) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """The exchange ends (or fails over): stop any timer of the sink."""

    @property
    def complete(self) -> bool:
        """Whether the answer's usage is final (its stream reached its terminal event)."""
        return True

    def usage_so_far(self) -> Usage | None:
        """The usage seen before the exchange ended early (a stream cut by the client)."""
        return None

    def final_usage(self) -> Usage | None:
        """The usage of an answer relayed whole that the sink left to be read later (once
        the answer is sent), or None."""
        return None

    def _broken(self, clean: bool) -> str | None:
        """The outcome of a body that did not end cleanly, or None."""
        timed_out = self.attempt.timed_out
        if timed_out is not None:
            return f"timeout_{timed_out}"
        return None if clean else Outcome.UPSTREAM_BROKEN


class PassThrough(BodySink):
    """Relays every chunk at once; status and headers go first."""

    __slots__ = ("write",)

    def __init__(self, host: SinkHost, attempt: UpstreamAttempt) -> None:
        super().__init__(host, attempt)
        self.write = host.request.write
        host.begin_response(self)

    def feed(self, data: bytes) -> None:
        self.write(data)

    def end(self, clean: bool) -> None:
        host = self.host
        host.upstream_finished()
        broken = self._broken(clean)
        if broken is not None:
            # Headers are gone; the only honest signal left is an incomplete body.
            host.outcome = broken
            self.attempt.record(Result.BODY_BROKEN, failure=f"body {broken}")
            self.attempt.backend.note_error(f"response body {broken}")
            host.cut_off()
            return
        self.finished()

    def finished(self) -> None:
        self.host.finish()


class CollectUsage(PassThrough):
    """Relays a JSON success at once and keeps a bounded copy for its usage, read from
    it once the answer is whole and sent (:meth:`final_usage`)."""

    __slots__ = ("collected", "whole")

    def __init__(self, host: SinkHost, attempt: UpstreamAttempt, gzipped: bool) -> None:
        super().__init__(host, attempt)
        self.collected: CollectedBody | None = CollectedBody(MAX_COLLECTED_BODY, gzipped)
        self.whole = False

    def feed(self, data: bytes) -> None:
        collected = self.collected
        if collected is not None:
            try:
                collected.feed(data)
            except (BodyTooLargeError, BadEncodingError):
                self.collected = None  # relayed all the same; its usage stays unknown
        self.write(data)

    def finished(self) -> None:
        self.whole = True
        self.host.finish()

    def final_usage(self) -> Usage | None:
        collected = self.collected
        if not self.whole or collected is None:
            return None
        try:
            body = collected.value()
        except BadEncodingError:
            return None
        return self.attempt.backend.provider.usage_from_json(body)


class BufferedRewrite(BodySink):
    """Holds the whole answer, then sends it rewritten; status and headers wait for it."""

    __slots__ = ("body", "objects")

    def __init__(
        self, host: SinkHost, attempt: UpstreamAttempt, gzipped: bool,
        objects: ObjectKeeper | None,
    ) -> None:
        super().__init__(host, attempt)
        self.body: CollectedBody | None = CollectedBody(MAX_REWRITTEN_BODY, gzipped)
        self.objects = objects

    def feed(self, data: bytes) -> None:
        body = self.body
        if body is None:
            return
        try:
            body.feed(data)
        except BodyTooLargeError:
            self._refuse(f"is larger than {MAX_REWRITTEN_BODY} bytes (decoded)")
        except BadEncodingError:
            self._refuse("is not valid gzip")

    def _refuse(self, problem: str) -> None:
        """The answer cannot be rewritten: a 502, before any byte was sent."""
        self.attempt.record(Result.BAD_BODY, failure=f"response body {problem}")
        self.body = None
        transport = self.attempt.body
        self.host.request.unregisterProducer()
        self.host.refuse(Refusal(502, f"the upstream's answer could not be relayed: its "
                                      f"body {problem}", outcome=Outcome.UPSTREAM_BAD_BODY))
        if transport is not None:
            transport.stopProducing()

    def end(self, clean: bool) -> None:
        host = self.host
        host.upstream_finished()
        held, self.body = self.body, None
        if held is None:
            return
        broken = self._broken(clean)
        if broken is not None:
            # Nothing was sent yet: the client gets a proper error instead of a cut body.
            self.attempt.record(Result.BODY_BROKEN, failure=f"body {broken}")
            host.refuse(Refusal(504 if self.attempt.timed_out else 502,
                                f"upstream response body broke off ({broken})", outcome=broken))
            return
        try:
            body = held.value()
        except BadEncodingError:
            self._refuse("is not valid gzip")
            return
        self._rewrite(body)

    def _rewrite(self, body: bytes) -> None:
        host = self.host
        attempt = self.attempt
        call = attempt.call
        status = host.status
        assert status is not None
        if status < 300:
            host.usage = call.family.usage_from_json(body)
        try:
            rewritten = (
                call.rewrite_body(status, body, int(host.clock.seconds()))
                if call.rewrites
                else (status, body)
            )
        except BadUpstreamBodyError as exc:
            self._refuse(str(exc))
            return
        except RecursionError:
            self._refuse("is nested too deeply")
            return
        except Exception:
            log.failure("{request_id}: rewriting the answer failed", request_id=host.request_id)
            self._refuse("could not be translated")
            return
        if self.objects is None or rewritten[0] >= 300:
            self._send(rewritten)
            return
        answer = self.objects.answer(rewritten[1], attempt.backend, host.request)
        answer.addCallback(lambda body: self._send((rewritten[0], body)))
        answer.addErrback(host.on_unexpected)

    def _send(self, rewritten: tuple[int, bytes]) -> None:
        host = self.host
        if host.done:
            return
        host.status = rewritten[0]
        host.begin_response(self, rewritten)
        host.request.write(rewritten[1])
        host.finish()


class StreamSink(BodySink):
    """An SSE stream: watched on the side; held back until content starts, then live.

    While held (a 200 stream before its first content event), an in-stream error, a
    break or a timeout is failed over to another backend without the client seeing any
    of it. Once live, a failure ends the stream with an error event in the client's
    family's shape. During long silences an SSE comment keeps idle proxies from
    closing the connection (``stream_keepalive``).
    """

    __slots__ = ("held", "held_size", "holding", "interval", "keepalive", "objects",
                 "rewriter", "watcher", "wrote_at")

    streaming = True

    def __init__(
        self,
        host: SinkHost,
        attempt: UpstreamAttempt,
        watcher: IStreamWatcher,
        rewriter: StreamRewriter | None,
        *,
        hold: bool,
        keepalive: float,
        now: float,
        objects: ObjectKeeper | None = None,
    ) -> None:
        super().__init__(host, attempt)
        self.objects = objects  # a create call's keeper: records the object streamed
        self.watcher = watcher
        self.rewriter = rewriter
        self.holding = hold
        self.held: list[bytes] = []
        self.held_size = 0
        self.interval = keepalive
        self.keepalive: IDelayedCall | None = None
        self.wrote_at = now  # when stream bytes last went to the client
        if not hold:
            host.begin_response(self)
        elif keepalive > 0:
            self.keepalive = host.clock.callLater(keepalive, self._keep_alive)

    @property
    def complete(self) -> bool:
        return bool(self.watcher.complete)

    def usage_so_far(self) -> Usage | None:
        usage: Usage = self.watcher.usage
        return usage

    def feed(self, data: bytes) -> None:
        watcher = self.watcher
        try:
            watcher.feed(data)
            if self.objects is not None and watcher.created_id is not None:
                self.objects.claim_streamed(watcher.created_id, self.attempt.backend)
            if self.holding:
                self.held.append(data)
                self.held_size += len(data)
                if watcher.error_seen and not watcher.content_started:
                    self._fail_over(Result.STREAM_ERROR, "in-stream error before content")
                elif watcher.content_started or watcher.complete or (
                    self.held_size > MAX_HELD_BYTES
                ):
                    # Past the cap (100 MB of pings), holding costs more than the
                    # failover it buys: the stream goes live.
                    self._release()
                return
            if self.rewriter is not None:
                data = self.rewriter.feed(data)
                if not data:
                    return
        except SseTooLargeError as exc:
            self._bad_stream(str(exc))
            return
        self.wrote_at = self.attempt.last_data
        self.host.request.write(data)

    def _release(self) -> None:
        """The stream is past the point of failover: send what was held, then go live."""
        self.holding = False
        host = self.host
        self.wrote_at = host.clock.seconds()
        host.begin_response(self)
        held, self.held = self.held, []
        self.held_size = 0
        rewriter = self.rewriter
        if rewriter is not None:
            held = [rewriter.feed(b"".join(held))]
        write = host.request.write
        for chunk in held:
            if chunk:
                write(chunk)

    def _fail_over(self, result: str, message: str) -> bool:
        """A held stream failed before any content reached the client: try elsewhere.

        Returns False (having released what was held) when no retry is possible, so the
        caller goes on relaying this attempt's outcome to the client.
        """
        attempt = self.attempt
        attempt.record(result, failure=message)
        pick = self.host.retry(result)
        if pick is None:
            self._release()
            return False
        self.stop()
        self.held = []
        self.held_size = 0
        self.host.fail_over(attempt, pick, message)
        return True

    def _bad_stream(self, problem: str) -> None:
        """The stream cannot be read (a line or event past the parser's bounds): an
        upstream failure, failed over while nothing was sent, else an error event."""
        message = f"upstream stream could not be relayed: {problem}"
        if self.holding:
            self.held = []  # nothing of it is worth sending
            self.held_size = 0
            if self._fail_over(Result.BAD_STREAM, message):
                return
        else:
            self.attempt.record(Result.BAD_STREAM, failure=message)
        self.host.outcome = Outcome.UPSTREAM_BAD_BODY
        transport = self.attempt.body
        self.host.request.unregisterProducer()
        self._end_with_error(message)
        if transport is not None:
            transport.stopProducing()

    def end(self, clean: bool) -> None:
        attempt = self.attempt
        timed_out = attempt.timed_out
        if self.holding:
            if timed_out is not None or not clean:
                result = Result.TIMEOUT if timed_out else Result.STREAM_BROKEN
                if self._fail_over(result, f"stream {result} before content"):
                    return
            else:
                self._release()
        host = self.host
        host.upstream_finished()
        watcher = self.watcher
        host.usage = watcher.usage
        if timed_out is not None:
            host.outcome = f"timeout_{timed_out}"
            attempt.record(Result.TIMEOUT, failure=f"stream {timed_out} timeout")
            self._end_with_error(
                f"upstream stream stopped: no data within the {timed_out} timeout"
            )
        elif not clean:
            host.outcome = Outcome.UPSTREAM_BROKEN
            attempt.record(Result.STREAM_BROKEN, failure="stream broke off")
            self._end_with_error("upstream connection broke off before the stream ended")
        elif not (watcher.complete or watcher.error_seen) and host.status == 200:
            host.outcome = Outcome.UPSTREAM_TRUNCATED
            attempt.record(Result.STREAM_TRUNCATED, failure="stream truncated")
            self._end_with_error("upstream stream ended without its final event")
        else:
            if self.rewriter is not None:
                tail = self.rewriter.finish()
                if tail:
                    host.request.write(tail)
            host.finish()

    def _end_with_error(self, message: str) -> None:
        host = self.host
        log.warn("{request_id}: {message} (backend {backend})",
                 request_id=host.request_id, message=message, backend=self.attempt.backend)
        event = host.family.stream_error_event(message, host.request_id)
        if self.rewriter is None and not self.watcher.at_event_boundary():
            # Cut mid-event: end that event first, so the error event parses on its own.
            event = b"\n\n" + event
        host.request.write(event)
        host.finish()

    def _keep_alive(self) -> None:
        """After ``stream_keepalive`` seconds in which no stream byte reached the client,
        send an SSE comment (every SDK ignores comments), so that a proxy in front does
        not close the connection as idle during a long pause.

        A stream still held back for failover is released first: a pause that long means
        content is slow to come, and the client must see bytes now. A comment is only put
        between two events, never inside one.
        """
        self.keepalive = None
        host = self.host
        if host.done:
            return
        clock = host.clock
        now = clock.seconds()
        due = self.wrote_at + self.interval
        if now < due:
            self.keepalive = clock.callLater(due - now, self._keep_alive)
            return
        if self.holding:
            self._release()
        if self.rewriter is not None or self.watcher.at_event_boundary():
            host.request.write(b": keepalive\n\n")
        self.wrote_at = now
        self.keepalive = clock.callLater(self.interval, self._keep_alive)

    def stop(self) -> None:
        keepalive, self.keepalive = self.keepalive, None
        if keepalive is not None and keepalive.active():
            keepalive.cancel()
