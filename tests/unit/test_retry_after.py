"""Parsing ``retry-after``: delta-seconds, HTTP-dates, and what is refused."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from relayd.retry_after import parse_retry_after


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"7", 7.0),
        (b" 7 ", 7.0),
        (b"0", 0.0),
        (b"1.5", 1.5),
        (None, None),
        (b"", None),
        (b"soon", None),
        (b"-5", None),
        (b"nan", None),
        (b"1e3", None),
        (b"\xff\xfe", None),
        (b"Mon, 99 Foo 2024 25:61:00 GMT", None),
    ],
)
def test_parse_retry_after_values(value: bytes | None, expected: float | None) -> None:
    assert parse_retry_after(value, 1_000_000.0) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    value = formatdate(now + 42, usegmt=True).encode()
    assert parse_retry_after(value, now) == pytest.approx(42.0)
    past = formatdate(now - 42, usegmt=True).encode()
    assert parse_retry_after(past, now) is None
