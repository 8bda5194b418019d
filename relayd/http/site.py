"""The twisted.web Site of a relay listener."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request, Site

from relayd.http.body import BoundedBody
from relayd.http.channel import relay_channel
from relayd.http.relay import RelayResource
from relayd.metrics import RelayMetrics
from relayd.runtime import RelayRuntime


class RelaySite(Site):
    """Serves :class:`RelayResource`; bounds request bodies; leaves logging to the relay.

    ``clock`` must be the reactor itself in production (Site uses it for its channels'
    timeouts).

    Twisted's own combined-format access log is turned off: the relay writes one
    structured line per request itself.
    """

    noisy = False
    displayTracebacks = False
    protocol = relay_channel  # answers half-closed clients with half_close: answer

    def __init__(
        self,
        get_runtime: Callable[[], RelayRuntime],
        clock: IReactorTime,
        metrics: RelayMetrics | None = None,
    ) -> None:
        # Bodies are JSON relayed as bytes: never parse them as HTML form submissions
        # (that costs a MIME parse of Content-Type on every POST).
        super().__init__(
            RelayResource(get_runtime, clock, metrics),
            requestFactory=Request,
            reactor=clock,
            parsePOSTFormSubmission=False,
        )
        self._get_runtime = get_runtime

    def answers_half_close(self) -> bool:
        return self._get_runtime().config.half_close == "answer"

    def getContentFile(self, length: int | None) -> Any:
        return BoundedBody(self._get_runtime().max_body_bytes)

    def log(self, request: Any) -> None:
        pass
