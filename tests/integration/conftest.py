"""Fixtures that start real processes: the fake upstream, ``twistd -n relayd``, redis-server.

Every process a test starts goes through its :class:`ProcessGroup` (the ``processes``
fixture, or the factories below that use it), which stops them all at teardown.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relayd.testing.certs import TestCertificates, make_certificates
from relayd.testing.processes import (
    FakeUpstreamProcess,
    ProcessGroup,
    RedisServerProcess,
    RelaydProcess,
)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def ca_context(certs: TestCertificates) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca))


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[ProcessGroup]:
    """Starts a test's fake upstreams, relays, Redis servers and commands; stops them all,
    whatever the test does (also one whose start failed)."""
    with ProcessGroup(tmp_path) as group:
        yield group


@pytest.fixture
def upstream_factory(processes: ProcessGroup) -> Callable[[str], FakeUpstreamProcess]:
    return processes.upstream


@pytest.fixture
def relayd_factory(processes: ProcessGroup) -> Callable[..., RelaydProcess]:
    return processes.relay


@pytest.fixture
def redis_server(processes: ProcessGroup) -> RedisServerProcess:
    """A private redis-server for one test (``make test`` installs redis-server)."""
    return processes.redis()
