"""Opening the configured TCP listeners, plain or TLS-terminating."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.protocols.tls import TLSMemoryBIOFactory

from relayd.config.model import ListenerConfig
from relayd.tls import ReloadableServerContext


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
    port: IListeningPort = reactor.listenTCP(listener.port, factory, interface=listener.host)
    return port


def describe(listener: ListenerConfig, port: IListeningPort) -> str:
    """``http://127.0.0.1:8080`` with the real bound port (useful when configured as 0)."""
    scheme = "https" if listener.tls is not None else "http"
    host = listener.host
    if ":" in host:
        host = f"[{host}]"
    bound = port.getHost()
    return f"{scheme}://{host}:{getattr(bound, 'port', listener.port)}"
