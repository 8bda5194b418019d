"""Fixtures that start real processes: the fake upstream and ``twistd -n relayd``."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relayd.testing.certs import TestCertificates, make_certificates
from relayd.testing.processes import FakeUpstreamProcess, RedisServerProcess, RelaydProcess


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def ca_context(certs: TestCertificates) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca))


@pytest.fixture
def upstream_factory(tmp_path: Path) -> Iterator[Callable[[str], FakeUpstreamProcess]]:
    started: list[FakeUpstreamProcess] = []

    def start(name: str) -> FakeUpstreamProcess:
        process = FakeUpstreamProcess(tmp_path / "upstreams", name).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def relayd_factory(tmp_path: Path) -> Iterator[Callable[..., RelaydProcess]]:
    started: list[RelaydProcess] = []

    def start(config: dict[str, Any], name: str = "relayd", **kwargs: Any) -> RelaydProcess:
        process = RelaydProcess(tmp_path / name, config, **kwargs).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServerProcess]:
    """A private redis-server for one test (``make test`` installs redis-server)."""
    server = RedisServerProcess(tmp_path / "redis").start()
    yield server
    server.stop()
