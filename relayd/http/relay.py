"""The relay resource: the root of a relay listener, one :class:`Exchange` per request.

:class:`EndpointTable` finds which API family and endpoint a path belongs to; the
exchange (:mod:`relayd.http.exchange`) takes the request from there through the stages
of the request path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http import Request
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from relayd.http.exchange import REQUEST_ID_HEADER, Exchange
from relayd.http.waiting import WaitingRoom
from relayd.metrics import RelayMetrics
from relayd.providers import PROVIDERS, Endpoint, IProvider, family_of
from relayd.runtime import RelayRuntime

__all__ = ["REQUEST_ID_HEADER", "EndpointTable", "Exchange", "RelayResource"]

log = Logger(namespace="relayd.relay")


class EndpointTable:
    """Finds the (family, endpoint) for a path; exact paths by dict, the rest by regex."""

    def __init__(self, families: list[IProvider]) -> None:
        self._exact: dict[bytes, list[tuple[IProvider, Endpoint]]] = {}
        self._patterns: list[tuple[IProvider, Endpoint]] = []
        for family in families:
            for ep in family.endpoints:
                literal = ep.path
                if literal.replace(b"/", b"").replace(b"_", b"").isalnum():
                    self._exact.setdefault(literal, []).append((family, ep))
                else:
                    self._patterns.append((family, ep))

    def lookup(self, request: Request, path: bytes) -> tuple[IProvider, Endpoint] | None:
        candidates = self._exact.get(path)
        if candidates is None:
            candidates = [(f, ep) for f, ep in self._patterns if ep.pattern.match(path)]
            if not candidates:
                return None
        if len(candidates) == 1:
            return candidates[0]
        preferred = family_of(request.requestHeaders)
        for family, ep in candidates:
            if family is preferred:
                return family, ep
        return candidates[0]


class RelayResource(Resource):
    """The root resource of a relay listener: every path is handled by an :class:`Exchange`.

    ``active`` holds the exchanges in progress (and those whose access line is still to
    be written), so a shutdown can wait for them.
    """

    isLeaf = True

    def __init__(
        self,
        get_runtime: Callable[[], RelayRuntime],
        clock: IReactorTime,
        metrics: RelayMetrics | None = None,
    ) -> None:
        super().__init__()
        self.get_runtime = get_runtime
        self.clock = clock
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self.endpoints = EndpointTable(list(PROVIDERS.values()))
        self.active: set[Exchange] = set()
        self.waiting_room = WaitingRoom()  # exchanges waiting for a backend slot
        self._idle_waiters: list[Deferred[None]] = []
        self._finished: list[tuple[Exchange, str | None, float]] = []

    def exchange_done(
        self, exchange: Exchange, model: str | None, finished_at: float
    ) -> None:
        """Have a finished exchange settled, counted and logged once its answer is sent.

        The reactor sends what the exchange wrote at its next poll, and calls made due
        now (``callLater(0)``) run before that poll; the calls those make due run after
        it. The settlement, the metrics and the access line wait for the second, so that
        their work (about 0.08 ms) does not hold back the answer's last bytes (``model``:
        the exchange's model label if it is settled already). The exchange stays
        in :attr:`active` until then, so that a drain waits for its line.
        """
        finished = self._finished
        finished.append((exchange, model, finished_at))
        if len(finished) == 1:
            clock = self.clock
            clock.callLater(0, clock.callLater, 0, self.report_finished)

    def report_finished(self) -> None:
        """Settle, count and log the exchanges finished so far (at once at a drain's end)."""
        finished, self._finished = self._finished, []
        active = self.active
        for exchange, model, finished_at in finished:
            try:
                exchange.report(model, finished_at)
            except Exception:
                log.failure("unexpected error reporting {request_id}",
                            request_id=exchange.request_id)
            active.discard(exchange)
        if not active and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.called:  # (a drain that ran out of time fired its own)
                    waiter.callback(None)

    def wait_idle(self) -> Deferred[None]:
        """Fires once no exchange is in progress."""
        waiter: Deferred[None] = Deferred()
        if not self.active:
            waiter.callback(None)
        else:
            self._idle_waiters.append(waiter)
        return waiter

    def render(self, request: Request) -> Any:
        exchange = Exchange(self, request, self.get_runtime())
        self.active.add(exchange)
        self.metrics.request_started()
        try:
            exchange.start()
        except Exception:
            log.failure("unexpected error handling {request_id}", request_id=exchange.request_id)
            exchange.fail_unexpectedly()
        return NOT_DONE_YET
