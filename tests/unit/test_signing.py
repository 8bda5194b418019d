"""Signed requests (relayd.signing, relayd.nonces, relayd.http.signed)."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from relay_harness import Harness, base_config
from twisted.internet.task import Clock

from relayd.config import ConfigErrors, parse_config
from relayd.limits.memory import MemoryStore
from relayd.nonces import NonceStore, NonceStoreFullError
from relayd.signing import SignatureError, canonical_string, sign, sign_headers, verify

SECRET = "s3cret-signing-key-0123456789"
MESSAGE = {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def test_the_canonical_string_is_five_lines_without_a_trailing_newline() -> None:
    body = b'{"model":"claude-x"}'
    canonical = canonical_string(b"POST", b"/v1/messages?beta=true", b"1764680000",
                                 b"n0nce-0123456789ab", body)
    assert canonical == (b"POST\n/v1/messages?beta=true\n1764680000\nn0nce-0123456789ab\n"
                         + hashlib.sha256(body).hexdigest().encode())
    assert sign(SECRET.encode(), canonical) == "v1=" + hmac.new(
        SECRET.encode(), canonical, hashlib.sha256).hexdigest()


def test_the_worked_example_of_the_docs() -> None:
    # docs/security.md shows these exact values.
    headers = sign_headers("example-secret-0123456789", "POST", "https://relay.example/v1/messages",
                           b'{"model":"claude-x"}', now=1764680000, nonce="abcdefghijklmnop")
    assert headers == {
        "x-relayd-timestamp": "1764680000",
        "x-relayd-nonce": "abcdefghijklmnop",
        "x-relayd-signature": sign(b"example-secret-0123456789", canonical_string(
            b"POST", b"/v1/messages", b"1764680000", b"abcdefghijklmnop",
            b'{"model":"claude-x"}')),
    }
    docs = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    assert headers["x-relayd-signature"] in docs


def headers_for(now: float, **overrides: Any) -> dict[bytes, bytes | None]:
    signed = sign_headers(SECRET, "POST", "/v1/messages", b"{}", now=now,
                          nonce="nonce-0123456789abcdef")
    found: dict[bytes, bytes | None] = {k.encode(): v.encode() for k, v in signed.items()}
    found.update({k.replace("_", "-").encode(): v for k, v in overrides.items()})
    return found


def check(headers: dict[bytes, bytes | None], now: float = 1000.0,
          body: bytes = b"{}", target: bytes = b"/v1/messages") -> bytes:
    return verify(SECRET.encode(), b"POST", target, body, headers, now, 300, 30)


@pytest.mark.parametrize(("stamp", "outcome"), [
    (700, "ok"), (699, "stale"), (1030, "ok"), (1031, "future"),
])
def test_the_window_is_asymmetric(stamp: int, outcome: str) -> None:
    headers = headers_for(stamp)
    if outcome == "ok":
        assert check(headers) == b"nonce-0123456789abcdef"
    else:
        with pytest.raises(SignatureError) as raised:
            check(headers)
        assert raised.value.check == outcome


@pytest.mark.parametrize(("change", "failed"), [
    ({"x_relayd_signature": None}, "missing"),
    ({"x_relayd_nonce": None, "x_relayd_timestamp": None}, "missing"),
    ({"x_relayd_timestamp": b"12.5"}, "malformed"),
    ({"x_relayd_nonce": b"short"}, "malformed"),
    ({"x_relayd_nonce": b"has spaces in it, no"}, "malformed"),
    ({"x_relayd_signature": b"v2=" + b"0" * 64}, "malformed"),
    ({"x_relayd_signature": b"v1=" + b"0" * 64}, "bad_signature"),
])
def test_each_failed_check_is_named(change: dict[str, bytes | None], failed: str) -> None:
    with pytest.raises(SignatureError) as raised:
        check(headers_for(1000, **change))
    assert raised.value.check == failed


def test_the_signature_covers_body_path_and_query() -> None:
    headers = headers_for(1000)
    for body, target in ((b"{} ", b"/v1/messages"), (b"{}", b"/v1/messages?x=1"),
                         (b"{}", b"/v1/messages/count_tokens")):
        with pytest.raises(SignatureError) as raised:
            check(headers, body=body, target=target)
        assert raised.value.check == "bad_signature"


def test_a_nonce_is_accepted_once_per_client_and_kept_for_its_ttl() -> None:
    clock = Clock()
    nonces = NonceStore(clock, MemoryStore(clock))
    assert nonces.claim("a", b"n1", 330) is True
    assert nonces.claim("a", b"n1", 330) is False
    assert nonces.claim("b", b"n1", 330) is True  # another client's
    clock.advance(329)
    assert nonces.claim("a", b"n1", 330) is False
    clock.advance(2)
    assert nonces.claim("a", b"n1", 330) is True  # its timestamp could no longer pass
    assert len(nonces) == 1  # b's expired too, and went with the purge


def test_a_full_table_refuses_new_nonces_rather_than_evicting_live_ones() -> None:
    clock = Clock()
    nonces = NonceStore(clock, MemoryStore(clock), capacity=3)
    for name in (b"n1", b"n2", b"n3"):
        assert nonces.claim("a", name, 60) is True
    with pytest.raises(NonceStoreFullError):
        nonces.claim("a", b"n4", 60)
    assert nonces.claim("a", b"n1", 60) is False  # still known: a replay stays refused
    clock.advance(61)
    assert nonces.claim("a", b"n4", 60) is True  # expired ones made room


# -- in the relay ------------------------------------------------------------------------


def signing_config(secret_file: Path, **signing: Any) -> dict[str, Any]:
    config = base_config()
    config["clients"][0]["signing"] = {"secret_file": str(secret_file), "window": 300,
                                       "future": 30, **signing}
    return config


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "signing-secret"
    path.write_text(SECRET + "\n")
    return path


@pytest.fixture
def harness(secret_file: Path) -> Iterator[Harness]:
    h = Harness(signing_config(secret_file))
    h.clock.advance(1_764_680_000)
    yield h
    h.close()


def signed_call(h: Harness, nonce: str | None = None, now: float | None = None,
                body: object = MESSAGE) -> tuple[int, dict[str, list[str]], bytes]:
    raw = json.dumps(body).encode()
    headers = sign_headers(SECRET, "POST", "/v1/messages", raw,
                           now=h.clock.seconds() if now is None else now, nonce=nonce)
    return h.call("POST", "/v1/messages", raw=raw, headers=headers)


def test_a_signed_request_is_relayed_without_its_signature_headers(harness: Harness) -> None:
    status, _, _ = signed_call(harness)
    assert status == 200
    seen = harness.upstreams["us"].seen + harness.upstreams["eu"].seen
    assert seen and not any(name.startswith(b"x-relayd-") for name in seen[0].headers)


def test_an_unsigned_request_of_a_signing_client_is_refused(harness: Harness) -> None:
    status, headers, body = harness.call("POST", "/v1/messages", MESSAGE)
    assert status == 401 and headers["x-should-retry"] == ["false"]
    error = json.loads(body)
    assert error["type"] == "error" and "missing x-relayd-timestamp" in error["error"]["message"]
    assert not harness.upstreams["us"].seen and not harness.upstreams["eu"].seen


def test_a_replayed_request_is_refused(harness: Harness) -> None:
    assert signed_call(harness, nonce="the-same-nonce-123")[0] == 200
    status, headers, body = signed_call(harness, nonce="the-same-nonce-123")
    assert status == 401 and b"nonce was used before" in body
    assert headers["x-should-retry"] == ["false"]


def test_a_stale_request_is_refused_and_counted(harness: Harness) -> None:
    status, _, body = signed_call(harness, now=harness.clock.seconds() - 301)
    assert status == 401 and b"more than 300 s old" in body
    registry = harness.resource.metrics.registry
    assert registry.get_sample_value(
        "relayd_edge_rejections_total", {"reason": "signature_stale"}) == 1.0


def test_other_clients_sign_nothing(harness: Harness) -> None:
    from relay_harness import OTHER_KEY

    status, _, _ = harness.call("POST", "/v1/messages", MESSAGE, key=OTHER_KEY)
    assert status == 200


def test_signing_not_required_accepts_unsigned_but_checks_signed(secret_file: Path) -> None:
    h = Harness(signing_config(secret_file, required=False))
    h.clock.advance(1_764_680_000)
    try:
        assert h.call("POST", "/v1/messages", MESSAGE)[0] == 200
        assert signed_call(h)[0] == 200
        assert signed_call(h, now=1)[0] == 401  # signed, but stale: still checked
    finally:
        h.close()


def test_the_secret_must_be_long_enough_and_is_never_shown(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("tooshort")
    with pytest.raises(ConfigErrors) as raised:
        parse_config(signing_config(short))
    assert "at least 16 characters" in str(raised.value)
    assert "tooshort" not in str(raised.value)


def test_the_standalone_helper_of_the_docs_signs_as_relayd_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    import re
    import time

    docs = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", docs, re.DOTALL)
    (helper,) = [b for b in blocks if "def sign_headers" in b]
    namespace: dict[str, Any] = {}
    exec(helper, namespace)  # the docs' own code, run as a reader would
    monkeypatch.setattr(time, "time", lambda: 1000.0)
    monkeypatch.setattr(os, "urandom", lambda n: b"\x01" * n)
    headers = namespace["sign_headers"](SECRET, "post", "https://relay.example/v1/messages",
                                        b"{}")
    found = {k.encode(): v.encode() for k, v in headers.items()}
    assert check(found) == (b"01" * 18)  # verified by relayd, with its nonce
