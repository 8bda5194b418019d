"""The client's address: the TCP peer, or, behind trusted proxies, what they forwarded.

Only when the direct peer is in ``trusted_proxies`` is ``X-Forwarded-For`` read, and
then from the right: each proxy appends the address it got the request from, so the
rightmost entries were written by relayd's own proxies and the leftmost by whoever sent
the request (anyone can forge those). The walk skips trusted addresses and stops at the
first untrusted one: that is the client. If an entry is not an IP address the walk stops
there and the last good hop counts; if every hop is trusted, the leftmost does. With no
trusted proxies (the default) the header is never read.

This address is the one the access log (``client_ip``), region routing and every
per-address rule use.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from twisted.web.http import Request

from relayd.config.regions import Network

__all__ = ["Networks", "TrustedProxies", "peer_host"]

_FORWARDED_FOR = b"x-forwarded-for"


def peer_host(request: Request) -> str:
    """The TCP peer's address ("" for peers without one, such as a UNIX socket)."""
    peer = request.getClientAddress()
    return getattr(peer, "host", "") or ""


class Networks:
    """A set of IP networks, asked whether an address is in it (answers memoised)."""

    __slots__ = ("_memo", "_networks")

    def __init__(self, networks: Sequence[Network]) -> None:
        self._networks = tuple(networks)
        self._memo: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        memo = self._memo
        found = memo.get(address)
        if found is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                found = False
            else:
                if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                found = any(ip in network for network in self._networks)
            if len(memo) < 4096:
                memo[address] = found
        return found


class TrustedProxies:
    """``trusted_proxies``: which peers may say where a request came from."""

    __slots__ = ("_networks",)

    def __init__(self, networks: Sequence[Network]) -> None:
        self._networks = Networks(networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: str) -> bool:
        return address in self._networks

    def client_address(self, request: Request) -> str:
        """The address the request came from (see the module's docstring)."""
        peer = peer_host(request)
        if not self._networks or not self.trusts(peer):
            return peer
        values = request.requestHeaders.getRawHeaders(_FORWARDED_FOR)
        if not values:
            return peer
        hops = [hop.strip() for value in values for hop in value.decode("latin-1").split(",")]
        client = peer
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                break
            client = address
            if not self.trusts(address):
                break
        return client


def _address(hop: str) -> str | None:
    """The IP address of one ``X-Forwarded-For`` entry, normalized, or None."""
    if hop.startswith("[") and "]" in hop:  # [v6]:port
        hop = hop[1:hop.index("]")]
    elif hop.count(":") == 1:  # v4:port
        hop = hop.partition(":")[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return None
