"""Opening the configured TCP listeners, plain or TLS-terminating."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any, Protocol

from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from relayd.config.model import ListenerConfig
from relayd.oslimits import somaxconn
from relayd.tls import ReloadableServerContext

log = Logger(namespace="relayd.service")


class ReloadRefusedError(Exception):
    """A valid configuration that cannot be applied to the running process."""


class ListenerPorts(Protocol):
    """How a relay service gets the listening port of each configured listener."""

    def open(
        self, key: str, listener: ListenerConfig, factory: Any,
        context: ReloadableServerContext | None,
    ) -> IListeningPort: ...


class BoundPorts:
    """Binds each listener in this process (one process, or the daemon's own)."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def open(
        self, key: str, listener: ListenerConfig, factory: Any,
        context: ReloadableServerContext | None,
    ) -> IListeningPort:
        port = listen(self.reactor, listener, factory, context)
        announce(listener, getattr(port.getHost(), "port", listener.port))
        return port


def listener_keys(listeners: list[ListenerConfig]) -> list[str]:
    """Identities of listeners across reloads: host:port, or for ephemeral (port 0)
    listeners host:0 with their position among that host's port-0 listeners."""
    keys = []
    ephemeral: dict[str, int] = {}
    for listener in listeners:
        key = f"{listener.host}:{listener.port}"
        if listener.port == 0:
            ephemeral[listener.host] = ephemeral.get(listener.host, -1) + 1
            key += f"#{ephemeral[listener.host]}"
        keys.append(key)
    return keys


def plan_listeners(
    current: Mapping[str, ListenerConfig], listeners: tuple[ListenerConfig, ...]
) -> dict[str, ListenerConfig]:
    """The listeners a reload wants, by key; refuses a switch between plain and TLS."""
    wanted: dict[str, ListenerConfig] = {}
    for key, listener in zip(listener_keys(list(listeners)), listeners, strict=True):
        existing = current.get(key)
        if existing is not None and (existing.tls is None) != (listener.tls is None):
            raise ReloadRefusedError(
                f"listener {listener.address} would switch between plain HTTP and TLS; "
                "that needs a restart"
            )
        wanted[key] = listener
    return wanted


def _serving_factory(
    listener: ListenerConfig, factory: Any, context: ReloadableServerContext | None
) -> Any:
    """``factory``, behind TLS when the listener terminates it.

    TLS is layered with :class:`TLSMemoryBIOFactory` over a plain TCP port, which
    provides ``negotiatedProtocol`` so twisted.web serves HTTP/2 when ALPN picks it.
    ``context`` (built from ``listener.tls`` when not given) supplies each new
    connection's TLS context, so a reload can swap the certificate.
    """
    if listener.tls is None:
        return factory
    if context is None:
        context = ReloadableServerContext(listener.tls)
    return TLSMemoryBIOFactory(context, False, factory)


def listen(
    reactor: Any,
    listener: ListenerConfig,
    factory: Any,
    context: ReloadableServerContext | None = None,
) -> IListeningPort:
    """Bind one listener now (raises ``CannotListenError`` or ``TlsSetupError``)."""
    port: IListeningPort = reactor.listenTCP(
        listener.port,
        _serving_factory(listener, factory, context),
        backlog=effective_backlog(listener),
        interface=listener.host,
    )
    return port


def adopt(
    reactor: Any,
    listener: ListenerConfig,
    descriptor: int,
    factory: Any,
    context: ReloadableServerContext | None = None,
) -> IListeningPort:
    """Serve ``listener`` on the listening socket ``descriptor`` bound by the daemon
    (:func:`bind_socket`); the reactor works on a duplicate, so the caller closes it."""
    port: IListeningPort = reactor.adoptStreamPort(
        descriptor, _family(listener), _serving_factory(listener, factory, context)
    )
    accept_one_at_a_time(port)
    return port


def accept_one_at_a_time(port: Any) -> None:
    """Make ``port`` accept one connection per wake-up instead of Twisted's up to 100.

    Every worker sharing a socket is woken for each new connection. With Twisted's
    accept loop the first awake takes a whole burst (50 connections at once went all to
    one of two workers); accepting one per turn lets each worker take the next one
    when it is free, so a busier worker takes fewer (measured in docs/performance.md).
    """
    read = port.doRead

    def doRead() -> Any:
        port.numberAccepts = 1  # Twisted grows it after a full loop: keep it at one
        return read()

    port.doRead = doRead


def _family(listener: ListenerConfig) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in listener.host else socket.AF_INET


def bind_socket(listener: ListenerConfig) -> socket.socket:
    """A listening socket for ``listener``, outside any reactor (the daemon's, handed to
    every worker). Options as Twisted's ``listenTCP`` sets them."""
    sock = socket.socket(_family(listener), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listener.host, listener.port))
        sock.listen(effective_backlog(listener))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def effective_backlog(listener: ListenerConfig, cap: int | None = None) -> int:
    """The listener's backlog as the kernel will apply it: at most ``net.core.somaxconn``
    (logged when that cuts the configured value, so the operator can raise it)."""
    cap = somaxconn() if cap is None else cap
    if cap is None or listener.backlog <= cap:
        return listener.backlog
    log.warn(
        "listener {address}: backlog {backlog} is capped at {cap} by net.core.somaxconn; "
        "raise it (sysctl -w net.core.somaxconn={backlog}) to absorb larger bursts",
        address=listener.address,
        backlog=listener.backlog,
        cap=cap,
    )
    return cap


def announce(listener: ListenerConfig, bound_port: int) -> None:
    """Log ``relayd listening on http://127.0.0.1:8080`` with the real bound port
    (useful when configured as 0): the line operators and the tests look for."""
    scheme = "https" if listener.tls is not None else "http"
    host = f"[{listener.host}]" if ":" in listener.host else listener.host
    log.info("relayd listening on {url}", url=f"{scheme}://{host}:{bound_port}")
