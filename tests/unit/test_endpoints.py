"""Upstream endpoints: IP literals connect directly, host names go through the resolver."""

from __future__ import annotations

import pytest
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import URI, BrowserLikePolicyForHTTPS

from relayd.upstream import CachedEndpointFactory


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        (b"http://127.0.0.1:8900/v1/messages", TCP4ClientEndpoint),
        (b"http://[::1]:8900/v1/messages", TCP6ClientEndpoint),
        (b"http://api.example.test/v1/messages", HostnameEndpoint),
    ],
)
def test_ip_literals_skip_name_resolution(url: bytes, kind: type) -> None:
    """HostnameEndpoint sends even 127.0.0.1 through getaddrinfo in the thread pool, a
    thread round-trip per new connection: a burst of new connections queued behind it."""
    reactor = MemoryReactorClock()
    factory = CachedEndpointFactory(reactor, BrowserLikePolicyForHTTPS(), 7.0)
    endpoint = factory.endpointForURI(URI.fromBytes(url))
    assert isinstance(endpoint, kind)
    assert factory.endpointForURI(URI.fromBytes(url)) is endpoint  # built once
    if kind is not HostnameEndpoint:
        endpoint.connect(object())  # type: ignore[arg-type]
        host, port, _, timeout, _ = reactor.tcpClients[0]
        assert (host, port, timeout) == (("::1" if kind is TCP6ClientEndpoint else "127.0.0.1"),
                                         8900, 7.0)
