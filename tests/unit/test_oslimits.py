"""Open-file limit, listen backlog and the capacity keys of the configuration."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactor
from twisted.web.server import Site

from relayd.config import ConfigErrors, parse_config
from relayd.config.model import DEFAULT_BACKLOG
from relayd.listeners import effective_backlog, listen
from relayd.oslimits import raise_open_file_limit, somaxconn


@pytest.fixture
def low_soft_limit() -> Iterator[int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(low_soft_limit: int) -> None:
    """systemd's default soft limit (1024) is two fds short of 512 streams."""
    before, after = raise_open_file_limit()
    assert before == min(256, low_soft_limit)
    assert after == low_soft_limit == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert raise_open_file_limit() == (after, after)  # nothing more to raise


def test_somaxconn_is_read_from_proc(tmp_path: Path) -> None:
    (tmp_path / "somaxconn").write_text("4096\n")
    assert somaxconn(tmp_path / "somaxconn") == 4096
    assert somaxconn(tmp_path / "missing") is None


def test_listeners_get_a_burst_sized_backlog_by_default() -> None:
    config = parse_config({"listen": [{"address": "127.0.0.1:0"},
                                      {"address": "127.0.0.1:0", "backlog": 64}]})
    reactor = MemoryReactor()
    for listener in config.listen:
        listen(reactor, listener, Site(None))
    backlogs = [server[2] for server in reactor.tcpServers]
    assert backlogs[1] == 64
    assert backlogs[0] == min(DEFAULT_BACKLOG, somaxconn() or DEFAULT_BACKLOG) >= 128
    assert DEFAULT_BACKLOG == 1024


def test_a_backlog_above_somaxconn_is_capped() -> None:
    (listener,) = parse_config({"listen": [{"address": "127.0.0.1:0", "backlog": 5000}]}).listen
    assert effective_backlog(listener, cap=4096) == 4096
    assert effective_backlog(listener, cap=8192) == 5000


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ({"listen": [{"address": "127.0.0.1:0", "backlog": 0}]},
         "listen[0].backlog: must be an integer from 1 to 65535, got 0"),
        ({"queue_timeout": -1}, "queue_timeout: must be a non-negative number, got -1"),
        ({"max_queued": 1.5}, "max_queued: must be a non-negative integer, got 1.5"),
    ],
)
def test_capacity_keys_are_checked(document: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigErrors) as raised:
        parse_config(document)
    assert [str(e) for e in raised.value.errors] == [error]


def test_capacity_defaults() -> None:
    config = parse_config({
        "providers": [{"name": "p", "type": "openai",
                       "backends": [{"name": "b", "url": "http://x.test", "api_key": "k"}]}],
    })
    assert (config.queue_timeout, config.max_queued) == (30.0, 1000)
    assert config.providers[0].backends[0].max_concurrent is None
