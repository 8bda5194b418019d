"""The fake upstream as one ``twisted.web`` leaf resource: records, dispatches, controls.

Every request under ``/_fake/`` is a control call (never recorded):
``GET /_fake/requests[?since=ID]``, ``POST /_fake/reset``,
``GET|POST /_fake/config`` and ``GET /_fake/health``.  Every other request is
recorded, gets its knobs (instance config, then ``x-fake-*`` headers) and is
answered by an :class:`~relayd.testing.fakeprovider.exchange.Exchange` running
the handler :func:`~relayd.testing.fakeprovider.routes.route` picks.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from relayd.testing.fakeprovider.anthropic_batches import BatchStore
from relayd.testing.fakeprovider.exchange import Clock, Exchange, WebRequest
from relayd.testing.fakeprovider.families import ResetStamp, family_for
from relayd.testing.fakeprovider.knobs import BUILTIN_KNOBS, KnobError, Knobs, header_overrides
from relayd.testing.fakeprovider.record import RecordedRequest
from relayd.testing.fakeprovider.routes import route
from relayd.testing.fakeprovider.wire import JSON_CT, dumps

#: Default size of the request log; the oldest entries are dropped beyond it.
DEFAULT_MAX_LOG: Final = 10000


class FakeProvider(Resource):
    """The fake upstream as a single leaf resource (routing is a dict lookup).

    :param clock: the reactor's time interface; every delay is a ``callLater``
        on it, so tests can drive time with ``twisted.internet.task.Clock``.
    :param defaults: knob values that ``POST /_fake/config`` starts from (and
        that ``{}`` resets to).
    :param max_log: how many recorded requests to keep.
    """

    isLeaf = True

    def __init__(
        self,
        clock: IReactorTime,
        *,
        defaults: Mapping[str, object] | None = None,
        max_log: int = DEFAULT_MAX_LOG,
    ) -> None:
        super().__init__()
        self.clock: Clock = cast(Clock, clock)
        self.baseline = BUILTIN_KNOBS.updated(defaults or {})
        self.config = self.baseline
        #: The Anthropic message batches created so far.
        self.batches = BatchStore()
        #: Prompt prefixes seen (the ``prompt_cache`` knob).
        self.prompts_seen: set[str] = set()
        self._log: deque[RecordedRequest] = deque(maxlen=max_log)
        self._next_id = 1
        self._waiters: list[tuple[Callable[[FakeProvider], bool], Deferred[None]]] = []
        self._reset_stamp = ResetStamp()

    # -- public API for in-process use

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the request log, oldest first."""
        return list(self._log)

    def configure(self, values: Mapping[str, object]) -> Knobs:
        """Replace the instance config with baseline + ``values`` (``{}`` resets)."""
        self.config = self.baseline.updated(values)
        return self.config

    def reset_log(self) -> int:
        """Forget recorded requests (not the config); return how many were dropped."""
        count = len(self._log)
        self._log.clear()
        self.changed()
        return count

    def wait_for(self, predicate: Callable[[FakeProvider], bool]) -> Deferred[None]:
        """A Deferred that fires once ``predicate(self)`` holds.

        It is re-checked whenever a request is recorded or its state changes
        (events sent, finished, disconnected), so tests need neither sleeps nor
        polling.  The Deferred fires synchronously from inside the server's
        processing, after the fake's own state is updated.
        """
        waiter: Deferred[None]

        def cancel(_: Deferred[None]) -> None:
            self._waiters = [w for w in self._waiters if w[1] is not waiter]

        waiter = Deferred(cancel)
        if predicate(self):
            waiter.callback(None)
        else:
            self._waiters.append((predicate, waiter))
        return waiter

    # -- for the exchanges

    def changed(self) -> None:
        """A request was recorded or changed state: fire the waiters whose predicate holds."""
        if not self._waiters:
            return
        ready = [w for w in self._waiters if w[0](self)]
        if ready:
            self._waiters = [w for w in self._waiters if w not in ready]
            for _, waiter in ready:
                waiter.callback(None)

    def reset_stamp(self) -> bytes:
        """The ``anthropic-ratelimit-*-reset`` value for a response sent now."""
        return self._reset_stamp.at(self.clock.seconds())

    # -- twisted.web

    def render(self, request: Request) -> bytes | int:
        """Entry point for every request: control endpoints or a recorded API call."""
        req = cast(WebRequest, request)
        path = req.path
        if path.startswith(b"/_fake/"):
            return self._render_control(req, path)
        content = req.content
        if content is None:
            body = b""
        else:
            content.seek(0)
            body = content.read()
        record = RecordedRequest(
            self._next_id,
            req.method.decode("latin-1"),
            req.uri.decode("utf-8", "replace"),
            req.requestHeaders,
            body,
            self.clock.seconds(),
        )
        self._next_id += 1
        self._log.append(record)
        family = family_for(path, req.requestHeaders)
        try:
            overrides = header_overrides(req.requestHeaders.getAllRawHeaders())
            knobs = self.config.updated(overrides) if overrides else self.config
        except KnobError as exc:
            # No faults on the complaint itself.
            exchange = Exchange(self, req, record, body, family, BUILTIN_KNOBS)
            exchange.send_error(400, f"fake-upstream: {exc}")
        else:
            Exchange(self, req, record, body, family, knobs).start(route(req.method, path))
        # Last, so a waiter that runs synchronously sees a consistent state.
        self.changed()
        return NOT_DONE_YET

    def _render_control(self, request: WebRequest, path: bytes) -> bytes:
        method = request.method
        status, result = 404, cast(object, {"error": f"unknown control endpoint {path!r}"})
        if path == b"/_fake/health" and method == b"GET":
            status, result = 200, {"ok": True}
        elif path == b"/_fake/requests" and method == b"GET":
            status, result = 200, [r.to_json() for r in self._log if r.id > _since(request.uri)]
        elif path == b"/_fake/reset" and method == b"POST":
            status, result = 200, {"ok": True, "cleared": self.reset_log()}
        elif path == b"/_fake/config" and method == b"GET":
            status, result = 200, self.config.as_dict()
        elif path == b"/_fake/config" and method == b"POST":
            status, result = self._post_config(request)
        request.setResponseCode(status)
        request.responseHeaders.setRawHeaders(b"content-type", [JSON_CT])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
        return dumps(result)

    def _post_config(self, request: WebRequest) -> tuple[int, object]:
        raw = request.content.read() if request.content is not None else b""
        try:
            values = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            return 400, {"error": f"body is not valid JSON: {exc}"}
        if not isinstance(values, dict):
            return 400, {"error": "body must be a JSON object of knobs"}
        try:
            return 200, self.configure(values).as_dict()
        except KnobError as exc:
            return 400, {"error": str(exc)}


def _since(uri: bytes) -> int:
    """The ``since`` query parameter of ``GET /_fake/requests`` (0 when absent)."""
    since = 0
    for part in uri.partition(b"?")[2].split(b"&"):
        key, _, value = part.partition(b"=")
        if key == b"since" and value.isdigit():
            since = int(value)
    return since
