"""TLS session resumption through a real relayd: a client reconnecting with the session
of its previous connection resumes it (TLS 1.2 and 1.3); after a reload (which rotates
the ticket keys) one full handshake, then resumed again."""

from __future__ import annotations

import signal
import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest
from support import backend, relay_config

from relayd.testing.certs import TestCertificates
from relayd.testing.processes import FakeUpstreamProcess, RelaydProcess, wait_for

UpstreamFactory = Callable[[str], FakeUpstreamProcess]
RelaydFactory = Callable[..., RelaydProcess]


def connect(port: int, context: ssl.SSLContext, session: Any = None) -> tuple[bool | None, Any]:
    """One HTTPS request on a new connection; (whether it resumed, its session)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            while tls.recv(65536):  # read to the end: TLS 1.3 tickets come after the handshake
                pass
            return tls.session_reused, tls.session


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["tls1.2", "tls1.3"])
def test_a_reconnecting_client_resumes_its_session(
    certs: TestCertificates, upstream_factory: UpstreamFactory, relayd_factory: RelaydFactory,
    version: ssl.TLSVersion,
) -> None:
    config = relay_config(certs, [backend("a1", upstream_factory("a1"))], [],
                          health={"enabled": False})
    config["providers"] = config["providers"][:1]
    config["routes"] = config["routes"][:1]
    relay = relayd_factory(config)
    port = int(relay.url("https").rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.minimum_version = context.maximum_version = version
    resumed, session = connect(port, context)
    assert not resumed and session is not None
    results = []
    for _ in range(3):
        resumed, session = connect(port, context, session)
        results.append(resumed)
    assert results == [True, True, True]
    # A reload makes a new TLS context: new ticket keys, one full handshake, then resumed.
    relay.signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in relay.log_text(), 10, "the reload",
             relay.log_path)
    first, session = connect(port, context, session)
    second, _ = connect(port, context, session)
    assert (first, second) == (False, True)
