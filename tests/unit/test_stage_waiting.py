"""Waiting for a backend slot on its own (relayd.http.waiting.SlotWait): refused when the
queue is full, a pick when a slot frees, the wait bounded in time, left once."""

from __future__ import annotations

from typing import Any

import pytest
from relay_harness import base_config
from stage_fakes import World
from twisted.python.failure import Failure

from relayd.errors import Outcome, Refusal
from relayd.http.planner import AttemptPlanner, Pick
from relayd.http.waiting import SlotWait, WaitingRoom
from relayd.upstream import Backend

CHAT = {"model": "gpt-4o", "messages": []}


class Waiter:
    """What the exchange passes a wait: where its pick or its failure goes."""

    def __init__(self) -> None:
        self.picks: list[Pick] = []
        self.failures: list[Failure] = []
        self.raise_on_pick: Exception | None = None

    def on_pick(self, pick: Pick) -> None:
        self.picks.append(pick)
        if self.raise_on_pick is not None:
            raise self.raise_on_pick

    def on_failure(self, failure: Failure) -> None:
        self.failures.append(failure)


def capped_world(backends: int = 1, **top: Any) -> World:
    """openai's backends (main, then side...) take one request each, and trip at once."""
    built = base_config(**top)
    provider = built["providers"][1]
    provider["breaker"] = {"failures": 1, "window": 1}
    provider["backends"] = [
        {"name": name, "url": f"http://up-{name}.test", "api_key": f"sk-{name}",
         "max_concurrent": 1}
        for name in ["main", "side"][:backends]
    ]
    return World(built)


def fill(world: World, planner: AttemptPlanner) -> list[Backend]:
    """Take every slot (as other requests would); the backends now blocked."""
    while (pick := planner.next()) is not None:
        planner.sent(pick)
    blocked = planner.capacity_blocked()
    assert blocked
    return blocked


def start(world: World, room: WaitingRoom, waiter: Waiter) -> tuple[SlotWait, list[Backend]]:
    planner = world.planner(CHAT, api="openai", endpoint="chat.completions")
    blocked = fill(world, world.planner(CHAT, api="openai", endpoint="chat.completions"))
    wait = SlotWait(room, world.runtime.config, world.clock, world.metrics, planner, blocked,
                    waiter.on_pick, waiter.on_failure)
    return wait, blocked


def queued(world: World) -> float:
    return world.sample("relayd_queued_requests")


def waits(world: World) -> tuple[float, float]:
    """How many waits ended, and the seconds they took together."""
    return (world.sample("relayd_queue_wait_seconds_count"),
            world.sample("relayd_queue_wait_seconds_sum"))


def refusal_of(failure: Failure) -> Refusal:
    assert isinstance(failure.value, Refusal)
    return failure.value


def test_a_wait_is_counted_while_it_lasts() -> None:
    world, room, waiter = capped_world(), WaitingRoom(), Waiter()
    _, blocked = start(world, room, waiter)
    assert room.waiting == 1 and queued(world) == 1
    assert [len(b.waiters) for b in blocked] == [1]
    assert len(world.clock.getDelayedCalls()) == 1  # the queue timeout
    assert not waiter.picks and not waiter.failures


@pytest.mark.parametrize("top", [{"max_queued": 2}, {"queue_timeout": 0}])
def test_a_full_or_disabled_queue_refuses_at_once(top: dict[str, Any]) -> None:
    world, room, waiter = capped_world(**top), WaitingRoom(), Waiter()
    room.waiting = 2
    with pytest.raises(Refusal) as caught:
        start(world, room, waiter)
    found = caught.value
    assert (found.status, found.outcome, found.retry_after) == (503, Outcome.QUEUE_FULL, 1.0)
    assert "the queue is full (" in found.message
    assert world.sample("relayd_queue_refusals_total", reason="full") == 1
    assert room.waiting == 2 and queued(world) == 0
    assert not world.backend("main").waiters
    assert world.clock.getDelayedCalls() == []


def test_a_freed_slot_is_picked_at_once_and_the_wait_ends() -> None:
    world, room, waiter = capped_world(), WaitingRoom(), Waiter()
    start(world, room, waiter)
    main = world.backend("main")
    world.clock.advance(2)
    main.release()  # the request holding the slot is done
    assert [p.backend for p in waiter.picks] == [main] and not waiter.failures
    assert main.in_flight == 1  # the slot went to the waiting request, not to a newcomer
    assert room.waiting == 0 and queued(world) == 0 and not main.waiters
    assert waits(world) == (1, 2.0)
    assert world.clock.getDelayedCalls() == []  # the timeout is cancelled


def test_the_wait_goes_on_while_its_backends_are_still_only_full() -> None:
    world, room, waiter = capped_world(backends=2), WaitingRoom(), Waiter()
    _, blocked = start(world, room, waiter)
    main, side = world.backend("main"), world.backend("side")
    assert blocked == [main, side]
    main.breaker.record_failure("test")  # main cannot serve, its freed slot is no use
    main.release()
    assert not waiter.picks and not waiter.failures
    assert room.waiting == 1 and queued(world) == 1 and side.waiters
    side.release()
    assert [p.backend for p in waiter.picks] == [side]
    assert room.waiting == 0 and not side.waiters


def test_a_freed_slot_with_nothing_left_to_wait_for_is_a_no_backend_refusal() -> None:
    world, room, waiter = capped_world(), WaitingRoom(), Waiter()
    start(world, room, waiter)
    main = world.backend("main")
    main.breaker.record_failure("test")
    main.release()
    assert not waiter.picks and len(waiter.failures) == 1
    found = refusal_of(waiter.failures[0])
    assert (found.status, found.outcome) == (503, Outcome.NO_BACKEND)
    assert room.waiting == 0 and queued(world) == 0


def test_a_wait_past_queue_timeout_is_refused_and_forgotten() -> None:
    world, room, waiter = capped_world(queue_timeout=3), WaitingRoom(), Waiter()
    start(world, room, waiter)
    main = world.backend("main")
    world.clock.advance(2.9)
    assert not waiter.failures
    world.clock.advance(0.1)
    assert len(waiter.failures) == 1
    found = refusal_of(waiter.failures[0])
    assert (found.status, found.outcome, found.retry_after) == (503, Outcome.QUEUE_TIMEOUT, 1.0)
    assert "within 3s" in found.message
    assert world.sample("relayd_queue_refusals_total", reason="timeout") == 1
    assert room.waiting == 0 and queued(world) == 0 and not main.waiters
    assert waits(world) == (1, 3.0)
    main.release()  # a slot freed later goes to nobody
    assert not waiter.picks and main.in_flight == 0


def test_leaving_is_done_once() -> None:
    world, room, waiter = capped_world(), WaitingRoom(), Waiter()
    wait, _ = start(world, room, waiter)
    main = world.backend("main")
    world.clock.advance(1)
    wait.leave()
    wait.leave()
    assert room.waiting == 0 and queued(world) == 0
    assert waits(world) == (1, 1.0)
    assert not main.waiters and world.clock.getDelayedCalls() == []
    main.release()
    world.clock.advance(60)
    assert not waiter.picks and not waiter.failures


def test_a_failure_inside_the_pick_goes_to_on_failure_not_to_the_releaser() -> None:
    world, room, waiter = capped_world(), WaitingRoom(), Waiter()
    waiter.raise_on_pick = RuntimeError("the exchange broke")
    start(world, room, waiter)
    main = world.backend("main")
    main.release()  # another request's release: it must not see the error
    assert len(waiter.picks) == 1 and len(waiter.failures) == 1
    assert waiter.failures[0].check(RuntimeError)
    assert room.waiting == 0 and queued(world) == 0
