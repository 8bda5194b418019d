"""The open client connections of the relay listeners, and their bound.

Every client connection holds a file descriptor, and a request being relayed holds a
second one upstream; at the process's open-file limit nothing is accepted, not even
ordinary requests, and upstream connections and the admin listener cannot open either.
So relayd keeps at most ``connections.max`` client connections open (``auto``: half of
the open-file limit left after a reserve, so each can have its upstream connection).
When a new connection arrives at the bound, the connection that has been idle longest
(between requests, or still sending its request's head) is closed to make room; when
none is idle, the new connection is closed at once. ``connections.per_address``
optionally bounds the connections of one client address (off by default: many clients
may share one NAT or proxy address). Each refusal and eviction is counted in
``relayd_client_connections_closed_total`` and logged at most once per 10 seconds.
"""

from __future__ import annotations

import resource
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from relayd.config.model import ConnectionsConfig

if TYPE_CHECKING:
    from relayd.http.channel import RelayChannel
    from relayd.metrics import RelayMetrics

log = Logger(namespace="relayd.service")

#: File descriptors kept out of ``max: auto`` for everything else: the listeners, the
#: admin listener, Redis, log files, health probes.
FD_RESERVE = 256
#: How often at most the same bound is logged.
LOG_INTERVAL = 10.0


def auto_max_connections() -> int:
    """``connections.max: auto``: half the open-file limit left after the reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max((soft - FD_RESERVE) // 2, 16)


class ConnectionTracker:
    """Counts the open client connections and decides about new ones."""

    def __init__(
        self,
        clock: IReactorTime,
        metrics: RelayMetrics,
        get_config: Callable[[], ConnectionsConfig],
        on_count: Callable[[int], None] | None = None,
    ) -> None:
        self._clock = clock
        # Told the count of open connections at each change (a worker's connection board).
        self._on_count = on_count
        self._metrics = metrics
        self._get_config = get_config
        self.open: set[RelayChannel] = set()
        # Connections that may be evicted, oldest idle first (insertion order).
        self._idle: OrderedDict[RelayChannel, None] = OrderedDict()
        self._per_address: dict[str, int] = {}
        self._logged: dict[str, float] = {}
        self._auto: int | None = None

    def limit(self, config: ConnectionsConfig) -> int:
        if config.max is not None:
            return config.max
        if self._auto is None:
            self._auto = auto_max_connections()
        return self._auto

    def admit(self, address: str | None) -> bool:
        """Whether a new connection from ``address`` may open (after evicting one)."""
        config = self._get_config()
        if (
            config.per_address is not None
            and address is not None
            and self._per_address.get(address, 0) >= config.per_address
        ):
            self._refused("refused_per_address", config)
            return False
        limit = self.limit(config)
        if len(self.open) < limit:
            return True
        if self._idle:
            victim, _ = self._idle.popitem(last=False)
            self._closed_by_relay("evicted", limit)
            victim.close()
            return True
        self._closed_by_relay("refused", limit)
        return False

    def _refused(self, reason: str, config: ConnectionsConfig) -> None:
        self._metrics.client_connection_closed(reason)
        self._log_once(
            reason,
            "connections: refusing a new connection from an address that already has "
            "{n} (connections.per_address)",
            n=config.per_address,
        )

    def _closed_by_relay(self, reason: str, limit: int) -> None:
        self._metrics.client_connection_closed(reason)
        what = (
            "closing the longest-idle one for a new connection"
            if reason == "evicted"
            else "refusing new connections (none is idle)"
        )
        self._log_once(
            reason, "connections: {n} open, the bound (connections.max); {what}",
            n=limit, what=what,
        )

    def _log_once(self, reason: str, message: str, **fields: Any) -> None:
        now = self._clock.seconds()
        if now - self._logged.get(reason, -LOG_INTERVAL) >= LOG_INTERVAL:
            self._logged[reason] = now
            log.warn(message, **fields)

    def timed_out(self, stage: str) -> None:
        self._metrics.client_connection_closed(f"{stage}_timeout")

    # -- reports from the channels --------------------------------------------------------

    def opened(self, channel: RelayChannel) -> None:
        self.open.add(channel)
        self._idle[channel] = None
        address = channel.address
        if address is not None:
            self._per_address[address] = self._per_address.get(address, 0) + 1
        self._metrics.client_connection_opened(len(self.open))
        if self._on_count is not None:
            self._on_count(len(self.open))

    def busy(self, channel: RelayChannel) -> None:
        self._idle.pop(channel, None)

    def idle(self, channel: RelayChannel) -> None:
        if channel in self.open:
            self._idle[channel] = None
            self._idle.move_to_end(channel)

    def closed(self, channel: RelayChannel) -> None:
        if channel not in self.open:
            return
        self.open.discard(channel)
        self._idle.pop(channel, None)
        address = channel.address
        if address is not None:
            left = self._per_address.get(address, 1) - 1
            if left:
                self._per_address[address] = left
            else:
                self._per_address.pop(address, None)
        self._metrics.client_connections(len(self.open))
        if self._on_count is not None:
            self._on_count(len(self.open))


class Refused(Protocol):
    """A connection relayd will not serve: closed as soon as it is made (also under TLS,
    whose factory needs a protocol to wrap)."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]
