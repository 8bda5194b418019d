"""The key ring: round-robin over a backend's upstream keys, cooldowns and benching.

Time is driven by hand with :class:`twisted.internet.task.Clock`.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from relayd.keyring import KeyRing


def ring(clock: Clock, *secrets: str) -> KeyRing:
    return KeyRing([(s, [(b"x-api-key", s.encode())]) for s in secrets], clock)


def names(kr: KeyRing, n: int) -> list[str | None]:
    picks = []
    for _ in range(n):
        key = kr.choose()
        picks.append(key.secret if key is not None else None)
    return picks


def test_keyring_round_robin_order() -> None:
    kr = ring(Clock(), "a", "b", "c")
    assert names(kr, 7) == ["a", "b", "c", "a", "b", "c", "a"]
    assert [k.index for k in kr.keys] == [0, 1, 2]
    assert kr.keys[1].auth_headers == [(b"x-api-key", b"b")]


def test_keyring_skips_cooled_keys_and_returns_them_later() -> None:
    clock = Clock()
    kr = ring(clock, "a", "b", "c")
    kr.cool_down(kr.keys[1], 10.0, "rate_limited")
    assert kr.keys[1].cooldown_until == 10.0
    assert kr.keys[1].cooldown_reason == "rate_limited"
    assert names(kr, 4) == ["a", "c", "a", "c"]
    clock.advance(10)
    assert names(kr, 3) == ["a", "b", "c"]
    assert kr.keys[1].cooldown_reason is None
    assert kr.keys[1].cooldown_until == 0.0


def test_keyring_none_when_all_cooled_and_next_available_at() -> None:
    clock = Clock()
    kr = ring(clock, "a", "b")
    assert kr.next_available_at() is None
    kr.cool_down(kr.keys[0], 30.0, "rate_limited")
    assert kr.available()
    assert kr.next_available_at() is None
    kr.cool_down(kr.keys[1], 12.0, "rate_limited")
    assert not kr.available()
    assert kr.choose() is None
    assert kr.next_available_at() == 12.0
    clock.advance(12)
    assert kr.available()
    assert names(kr, 2) == ["b", "b"]


def test_keyring_cool_down_never_shortens() -> None:
    clock = Clock()
    kr = ring(clock, "a")
    key = kr.keys[0]
    kr.cool_down(key, 60.0, "rate_limited")
    kr.cool_down(key, 5.0, "rate_limited")
    assert key.cooldown_until == 60.0
    clock.advance(10)
    kr.cool_down(key, 100.0, "rate_limited")
    assert key.cooldown_until == 110.0


def test_keyring_available_has_no_side_effects() -> None:
    kr = ring(Clock(), "a", "b")
    for _ in range(3):
        assert kr.available()
    assert names(kr, 2) == ["a", "b"]


def test_keyring_reject_doubles_and_caps() -> None:
    clock = Clock()
    kr = ring(clock, "a", "b")
    key = kr.keys[0]
    cooldowns = []
    for _ in range(6):
        kr.reject(key)
        assert key.cooldown_reason == "rejected"
        cooldowns.append(key.cooldown_until - clock.seconds())
        clock.advance(key.cooldown_until - clock.seconds())
    assert cooldowns == [300.0, 600.0, 1200.0, 2400.0, 3600.0, 3600.0]
    assert key.rejections == 6
    kr.record_success(key)
    kr.reject(key, 10.0)
    assert key.cooldown_until - clock.seconds() == 10.0


def test_keyring_concurrent_rejections_do_not_double() -> None:
    clock = Clock()
    kr = ring(clock, "a")
    key = kr.keys[0]
    kr.reject(key)
    kr.reject(key)  # a second in-flight request with the same key got its 401 too
    assert key.rejections == 2
    assert key.cooldown_until == 300.0


def test_keyring_reconfigure_keeps_state_by_secret() -> None:
    clock = Clock()
    kr = ring(clock, "a", "b", "c")
    kr.reject(kr.keys[1])
    kr.cool_down(kr.keys[2], 50.0, "rate_limited")
    kr.reconfigure([("b", [(b"x-api-key", b"b2")]), ("d", []), ("c2", [])])
    b, d, c2 = kr.keys
    assert (b.index, b.secret, b.auth_headers) == (0, "b", [(b"x-api-key", b"b2")])
    assert b.cooldown_until == 300.0
    assert b.cooldown_reason == "rejected"
    assert b.rejections == 1
    assert d.cooldown_until == 0.0 and d.rejections == 0
    assert c2.cooldown_until == 0.0 and c2.cooldown_reason is None
    assert names(kr, 3) == ["d", "c2", "d"]


def test_a_429_reported_after_a_reload_cools_the_key_that_serves_now() -> None:
    """A request chose a key before the reload and gets its answer after it."""
    clock = Clock()
    kr = ring(clock, "a", "b")
    chosen = kr.choose()
    assert chosen is not None and chosen.secret == "a"
    kr.reconfigure([("b", []), ("a", [(b"x-api-key", b"a")])])
    kr.cool_down(chosen, 30.0, "rate_limited")
    kr.reject(kr.keys[0])
    kr.reject(kr.keys[0])  # "b" benched too: nothing is usable
    assert kr.keys[1] is chosen and chosen.index == 1
    assert kr.choose() is None
    clock.advance(30.0)
    picked = kr.choose()
    assert picked is chosen


def test_keyring_repr_hides_secrets() -> None:
    secret = "sk-ant-supersecret-123"
    kr = ring(Clock(), secret, "sk-other-456")
    kr.reject(kr.keys[0])
    text = repr(kr) + repr(kr.keys[0]) + str(kr.keys[1])
    assert "supersecret" not in text
    assert "other-456" not in text
    assert "#0" in repr(kr.keys[0])


def test_keyring_empty() -> None:
    kr = KeyRing([], Clock())
    assert kr.choose() is None
    assert not kr.available()
    assert kr.next_available_at() is None
