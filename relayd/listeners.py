"""Opening the configured TCP listeners, plain or TLS-terminating."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from relayd.config.model import ListenerConfig
from relayd.oslimits import somaxconn
from relayd.tls import ReloadableServerContext

log = Logger(namespace="relayd.service")


def listen(
    reactor: Any,
    listener: ListenerConfig,
    factory: Any,
    context: ReloadableServerContext | None = None,
) -> IListeningPort:
    """Bind one listener now (raises ``CannotListenError`` or ``TlsSetupError``).

    TLS is layered with :class:`TLSMemoryBIOFactory` over a plain TCP port, which
    provides ``negotiatedProtocol`` so twisted.web serves HTTP/2 when ALPN picks it.
    ``context`` (built from ``listener.tls`` when not given) supplies each new
    connection's TLS context, so a reload can swap the certificate.
    """
    if listener.tls is not None:
        if context is None:
            context = ReloadableServerContext(listener.tls)
        factory = TLSMemoryBIOFactory(context, False, factory)
    port: IListeningPort = reactor.listenTCP(
        listener.port, factory, backlog=effective_backlog(listener), interface=listener.host
    )
    return port


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


def describe(listener: ListenerConfig, port: IListeningPort) -> str:
    """``http://127.0.0.1:8080`` with the real bound port (useful when configured as 0)."""
    scheme = "https" if listener.tls is not None else "http"
    host = listener.host
    if ":" in host:
        host = f"[{host}]"
    bound = port.getHost()
    return f"{scheme}://{host}:{getattr(bound, 'port', listener.port)}"
