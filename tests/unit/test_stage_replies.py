"""Relay-made answers on their own (relayd.http.replies): a refusal's headers and body in
the caller's error shape, and a whole JSON answer."""

from __future__ import annotations

import json

import pytest
from stage_fakes import REQUEST_ID, make_request, written
from twisted.web.http import Request

from relayd.errors import Refusal
from relayd.http.replies import refusal_body, send_json
from relayd.providers import PROVIDERS, IProvider

ANTHROPIC, OPENAI = PROVIDERS["anthropic"], PROVIDERS["openai"]


def rendered(refusal: Refusal, family: IProvider = ANTHROPIC,
             max_retry_after: float = 60.0) -> tuple[Request, bytes]:
    request = make_request()
    body = refusal_body(request, refusal, family, REQUEST_ID, max_retry_after)
    return request, body


def header(request: Request, name: bytes) -> list[bytes] | None:
    values = request.responseHeaders.getRawHeaders(name)
    return None if values is None else list(values)


def test_a_refusals_own_headers_are_set() -> None:
    request, _ = rendered(Refusal(405, "no", headers=((b"allow", b"GET, POST"),)))
    assert header(request, b"allow") == [b"GET, POST"]


@pytest.mark.parametrize(("retry_after", "sent"), [
    (1.2, [b"2"]),  # whole seconds, never sooner than asked
    (30.0, [b"30"]),
    (3600.0, [b"60"]),  # capped at failover.max_retry_after
    (None, None),
])
def test_retry_after_is_rounded_up_and_capped(retry_after: float | None,
                                              sent: list[bytes] | None) -> None:
    request, _ = rendered(Refusal(503, "busy", retry_after=retry_after))
    assert header(request, b"retry-after") == sent


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 413])
def test_a_4xx_that_asking_again_cannot_fix_says_do_not_retry(status: int) -> None:
    request, _ = rendered(Refusal(status, "no"))
    assert header(request, b"x-should-retry") == [b"false"]


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_what_sdks_retry_by_themselves_is_left_to_them(status: int) -> None:
    request, _ = rendered(Refusal(status, "try later"))
    assert header(request, b"x-should-retry") is None


def test_a_refusals_own_should_retry_header_wins_over_none() -> None:
    request, _ = rendered(Refusal(429, "budget", headers=((b"x-should-retry", b"false"),)))
    assert header(request, b"x-should-retry") == [b"false"]


def test_the_body_is_in_the_anthropic_error_shape() -> None:
    _, body = rendered(Refusal(403, "client 'team-b' may not use model 'gpt-4o'"))
    assert json.loads(body) == {
        "type": "error",
        "error": {"type": "permission_error",
                  "message": "client 'team-b' may not use model 'gpt-4o'"},
        "request_id": REQUEST_ID,
    }


def test_the_body_is_in_the_openai_error_shape_with_its_code() -> None:
    _, body = rendered(Refusal(429, "token budget exhausted", code="insufficient_quota"),
                       OPENAI)
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    assert error["message"] == f"token budget exhausted (relayd request id {REQUEST_ID})"


def test_send_json_answers_whole_and_finishes() -> None:
    request = make_request()
    send_json(request, 418, b'{"ok": false}')
    assert request.code == 418 and request.finished
    assert header(request, b"content-type") == [b"application/json"]
    assert header(request, b"content-length") == [b"13"]
    assert written(request).endswith(b'\r\n\r\n{"ok": false}')
