"""The connection board: workers' open connections on a shared page, and the accept gate
that leaves a new connection to the worker with fewest."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from relay_harness import base_config
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from relayd.config import parse_config
from relayd.http.site import RelaySite
from relayd.metrics import RelayMetrics
from relayd.runtime import RelayRuntime
from relayd.workers.board import MARGIN, PATIENCE, RECHECK, AcceptGate, ConnectionBoard


@pytest.fixture
def boards() -> Iterator[tuple[ConnectionBoard, ConnectionBoard, ConnectionBoard]]:
    """The daemon's board and two workers' views of the same page (as after the spawn
    handed the descriptor over)."""
    daemon = ConnectionBoard.create()
    views = [ConnectionBoard(os.dup(daemon.fileno())) for _ in range(2)]
    yield daemon, views[0], views[1]
    for board in (daemon, *views):
        board.close()
        os.close(board.fileno())


def test_counts_written_by_one_worker_are_read_by_the_other(
    boards: tuple[ConnectionBoard, ConnectionBoard, ConnectionBoard],
) -> None:
    daemon, zero, one = boards
    daemon.serving(0, True)
    daemon.serving(1, True)
    zero.set_open(0, 7)
    assert one.open_count(0) == 7 and daemon.open_count(0) == 7


def test_a_worker_is_crowded_when_a_serving_peer_has_margin_fewer(
    boards: tuple[ConnectionBoard, ConnectionBoard, ConnectionBoard],
) -> None:
    daemon, zero, one = boards
    daemon.serving(0, True)
    daemon.serving(1, True)
    one.set_open(1, 3)
    zero.set_open(0, 3 + MARGIN - 1)
    assert not zero.crowded(0)
    zero.set_open(0, 3 + MARGIN)
    assert zero.crowded(0)
    assert not one.crowded(1)  # the one with fewer takes them


def test_a_peer_that_does_not_serve_is_not_waited_for(
    boards: tuple[ConnectionBoard, ConnectionBoard, ConnectionBoard],
) -> None:
    daemon, zero, one = boards
    daemon.serving(0, True)
    zero.set_open(0, 10)
    assert not zero.crowded(0)  # worker 1 is still starting
    daemon.serving(1, True)
    assert zero.crowded(0)  # it serves with 0 open
    one.set_open(1, 4)
    daemon.serving(1, False)  # it drains, or died
    assert one.open_count(1) == 0
    assert not zero.crowded(0)


def test_slots_beyond_the_highest_serving_worker_are_not_read(
    boards: tuple[ConnectionBoard, ConnectionBoard, ConnectionBoard],
) -> None:
    daemon, zero, _ = boards
    daemon.serving(0, True)
    daemon.serving(5, True)
    zero.set_open(0, MARGIN)
    assert zero.crowded(0)  # worker 5 has none
    daemon.serving(5, False)
    assert not zero.crowded(0)


class FakePort:
    """What the gate uses of a listening port: its accept, reading on and off."""

    def __init__(self) -> None:
        self.accepts = 0
        self.reading = True
        self.connected = True
        self.disconnecting = False

    def doRead(self) -> None:
        self.accepts += 1

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class Crowding:
    """A board whose answer the test sets."""

    def __init__(self) -> None:
        self.now = False

    def crowded(self, index: int) -> bool:
        return self.now


def _gate() -> tuple[FakePort, Crowding, Clock]:
    port, board, clock = FakePort(), Crowding(), Clock()
    AcceptGate(port, board, 0, clock)  # type: ignore[arg-type]
    return port, board, clock


def test_the_gate_accepts_while_the_worker_is_not_crowded() -> None:
    port, _, clock = _gate()
    for _ in range(3):
        port.doRead()
    assert port.accepts == 3 and port.reading and not clock.getDelayedCalls()


def test_a_crowded_worker_stops_accepting_and_looks_again() -> None:
    port, board, clock = _gate()
    board.now = True
    port.doRead()
    assert port.accepts == 0 and not port.reading
    assert [call.getTime() for call in clock.getDelayedCalls()] == [RECHECK]
    clock.advance(RECHECK)
    assert port.reading  # the next wake-up looks again
    board.now = False
    port.doRead()
    assert port.accepts == 1


def test_a_crowded_worker_accepts_after_patience_until_even_again() -> None:
    port, board, clock = _gate()
    board.now = True
    waited = 0.0
    while waited < PATIENCE - RECHECK / 2:
        port.doRead()
        assert port.accepts == 0
        clock.advance(RECHECK)
        waited += RECHECK
    clock.advance(RECHECK)
    port.doRead()
    port.doRead()
    assert port.accepts == 2  # the peer did not take them: this worker does
    board.now = False
    port.doRead()  # even again: the next crowding waits afresh
    board.now = True
    port.doRead()
    assert port.accepts == 3 and not port.reading


def test_a_port_closed_while_waiting_is_not_read_again() -> None:
    port, board, clock = _gate()
    board.now = True
    port.doRead()
    port.connected = False  # the worker drains: the port stopped listening
    clock.advance(RECHECK)
    assert not port.reading


def test_the_site_tells_each_change_of_its_open_connections() -> None:
    clock = MemoryReactorClock()
    runtime = RelayRuntime(parse_config(base_config()), clock)
    counts: list[int] = []
    site = RelaySite(lambda: runtime, clock, RelayMetrics(), counts.append)
    opened: list[Any] = []
    for port in (40000, 40001):
        protocol = site.buildProtocol(IPv4Address("TCP", "10.0.0.1", port))
        protocol.makeConnection(StringTransport())
        opened.append(protocol)
    opened[0].connectionLost(None)
    assert counts == [1, 2, 1]
