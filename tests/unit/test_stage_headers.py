"""An answer's head on its own (relayd.http.headers): the status and headers a client gets
for an upstream answer, and which upstream headers cross back."""

from __future__ import annotations

from email.utils import formatdate

import pytest
from stage_fakes import FakeResponse, endpoint_of, make_request
from twisted.web.http import Request
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from relayd.http.headers import copy_response_headers, write_answer_head
from relayd.http.translation import TRANSLATORS, UpstreamCall
from relayd.providers import PROVIDERS, LimitState

ANTHROPIC, OPENAI = PROVIDERS["anthropic"], PROVIDERS["openai"]
MESSAGES = endpoint_of("anthropic", "messages")
NOW = 1_700_000_000.0


def plain_call(dropped: tuple[str, ...] = ()) -> UpstreamCall:
    return UpstreamCall(ANTHROPIC, MESSAGES, b"/v1/messages", [], b"{}", dropped=dropped)


def translated_call() -> UpstreamCall:
    translator = TRANSLATORS[("anthropic", "messages")]
    return UpstreamCall(OPENAI, translator.upstream_endpoint, b"/v1/chat/completions",
                        [], b"{}", model="claude-x", translator=translator)


def head(
    response: FakeResponse,
    call: UpstreamCall | None = None,
    *,
    streaming: bool = False,
    rewritten: tuple[int, bytes] | None = None,
    limit_states: tuple[LimitState, ...] = (),
    retried: int = 0,
) -> Request:
    request = make_request()
    request.responseHeaders.setRawHeaders(b"content-type", [b"text/html"])  # a default
    write_answer_head(
        request, response, call or plain_call(), streaming=streaming, rewritten=rewritten,
        family=ANTHROPIC, limit_states=limit_states, retried=retried, now=NOW,
        max_retry_after=60.0,
    )
    return request


def out(request: Request, name: bytes) -> list[bytes] | None:
    values = request.responseHeaders.getRawHeaders(name)
    return None if values is None else list(values)


def copied(upstream: dict[bytes, list[bytes]], *, drop_limits: bool = False,
           translated: bool = False, rewritten: bool = False) -> Headers:
    into = Headers()
    copy_response_headers(Headers(upstream), into, now=NOW, max_retry_after=60.0,
                          drop_limits=drop_limits, translated=translated, rewritten=rewritten)
    return into


# -- write_answer_head -----------------------------------------------------------------------


def test_the_upstreams_status_and_phrase_go_to_the_client() -> None:
    request = head(FakeResponse(529, {b"content-type": [b"application/json"]},
                                phrase=b"Overloaded"))
    assert (request.code, request.code_message) == (529, b"Overloaded")
    assert out(request, b"content-type") == [b"application/json"]


def test_no_upstream_content_type_leaves_none_of_the_requests_default() -> None:
    request = head(FakeResponse(204))
    assert out(request, b"content-type") is None


def test_a_known_length_is_relayed_and_an_unknown_one_is_not() -> None:
    assert out(head(FakeResponse(200, length=42)), b"content-length") == [b"42"]
    assert out(head(FakeResponse(200, length=UNKNOWN_LENGTH)), b"content-length") is None


def test_a_rewritten_answer_has_its_own_status_and_length_and_no_encoding() -> None:
    response = FakeResponse(200, {b"content-encoding": [b"gzip"],
                                  b"content-type": [b"application/json"]}, length=999)
    request = head(response, rewritten=(201, b"0123456789"))
    assert request.code == 201
    assert out(request, b"content-length") == [b"10"]
    assert out(request, b"content-encoding") is None
    assert out(request, b"content-type") == [b"application/json"]


def test_a_translated_rewritten_answer_is_json_whatever_the_upstream_said() -> None:
    response = FakeResponse(200, {b"content-type": [b"text/plain"]})
    request = head(response, translated_call(), rewritten=(200, b"{}"))
    assert out(request, b"content-type") == [b"application/json"]


def test_a_stream_is_marked_unbuffered_and_has_no_length() -> None:
    response = FakeResponse(200, {b"content-type": [b"text/event-stream"]}, length=50)
    request = head(response, streaming=True)
    assert out(request, b"cache-control") == [b"no-cache"]
    assert out(request, b"x-accel-buffering") == [b"no"]
    assert out(request, b"content-length") is None
    assert out(request, b"content-type") == [b"text/event-stream"]


def test_a_translated_stream_is_the_clients_event_stream() -> None:
    response = FakeResponse(200, {b"content-type": [b"text/event-stream"]})
    request = head(response, translated_call(), streaming=True)
    assert out(request, b"content-type") == [b"text/event-stream; charset=utf-8"]


def test_the_clients_own_limits_replace_the_upstreams() -> None:
    response = FakeResponse(200, {b"anthropic-ratelimit-requests-limit": [b"4000"],
                                  b"x-ratelimit-limit-requests": [b"4000"]})
    request = head(response, limit_states=(LimitState("requests", 10, 9, 60.0),))
    assert out(request, b"anthropic-ratelimit-requests-limit") == [b"10"]
    assert out(request, b"anthropic-ratelimit-requests-remaining") == [b"9"]
    assert out(request, b"x-ratelimit-limit-requests") is None


def test_without_client_limits_the_upstreams_limit_headers_pass() -> None:
    response = FakeResponse(200, {b"anthropic-ratelimit-requests-limit": [b"4000"]})
    assert out(head(response), b"anthropic-ratelimit-requests-limit") == [b"4000"]
    translated = head(response, translated_call())  # in names the client's SDK reads not
    assert out(translated, b"anthropic-ratelimit-requests-limit") is None


def test_what_translation_dropped_is_named() -> None:
    request = head(FakeResponse(200), plain_call(dropped=("top_k", "metadata")))
    assert out(request, b"x-relayd-dropped") == [b"top_k, metadata"]
    assert out(head(FakeResponse(200)), b"x-relayd-dropped") is None


@pytest.mark.parametrize(("status", "should_retry"), [(503, [b"false"]), (200, None),
                                                      (400, None)])
def test_a_retried_answer_says_how_many_attempts_and_not_to_retry_a_retryable_one(
    status: int, should_retry: list[bytes] | None
) -> None:
    request = head(FakeResponse(status), retried=3)
    assert out(request, b"x-relayd-attempts") == [b"3"]
    assert out(request, b"x-should-retry") == should_retry


def test_an_answer_not_retried_says_nothing_of_attempts() -> None:
    request = head(FakeResponse(503))
    assert out(request, b"x-relayd-attempts") is None and out(request, b"x-should-retry") is None


# -- copy_response_headers -------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    b"set-cookie", b"server", b"date", b"cf-ray", b"cf-cache-status", b"alt-svc", b"via",
    b"anthropic-organization-id", b"openai-organization", b"connection", b"keep-alive",
    b"transfer-encoding", b"trailer", b"upgrade", b"te", b"proxy-connection",
])
def test_cookies_hop_by_hop_and_upstream_identity_stay_behind(name: bytes) -> None:
    into = copied({name: [b"x"], b"request-id": [b"req_1"]})
    assert not into.hasHeader(name)
    assert into.getRawHeaders(b"request-id") == [b"req_1"]


def test_every_value_of_a_relayed_header_crosses() -> None:
    into = copied({b"x-custom": [b"a", b"b"]})
    assert into.getRawHeaders(b"x-custom") == [b"a", b"b"]


def test_limit_content_type_and_encoding_headers_drop_only_when_asked() -> None:
    upstream = {b"x-ratelimit-remaining-tokens": [b"1"], b"anthropic-ratelimit-tokens-limit":
                [b"2"], b"content-type": [b"application/json"], b"content-encoding": [b"gzip"]}
    plain = copied(upstream)
    assert all(plain.getRawHeaders(name) == values for name, values in upstream.items())
    limits = copied(upstream, drop_limits=True)
    assert not limits.hasHeader(b"x-ratelimit-remaining-tokens")
    assert not limits.hasHeader(b"anthropic-ratelimit-tokens-limit")
    assert limits.hasHeader(b"content-type") and limits.hasHeader(b"content-encoding")
    translated = copied(upstream, translated=True)
    assert not translated.hasHeader(b"content-type")
    assert translated.hasHeader(b"x-ratelimit-remaining-tokens")
    rewritten = copied(upstream, rewritten=True)
    assert not rewritten.hasHeader(b"content-encoding") and rewritten.hasHeader(b"content-type")


@pytest.mark.parametrize(("value", "relayed"), [
    (b"3600", [b"60"]),
    (b"30", [b"30"]),
    (b"1.5", [b"1.5"]),
    (formatdate(NOW + 7200, usegmt=True).encode(), [b"60"]),
    (b"soon", [b"soon"]),  # unreadable: passed on as it is
])
def test_retry_after_is_capped(value: bytes, relayed: list[bytes]) -> None:
    assert copied({b"retry-after": [value]}).getRawHeaders(b"retry-after") == relayed


@pytest.mark.parametrize(("value", "relayed"), [
    (b"3600000", [b"60000"]), (b"1500", [b"1500"]), (b"soon", None),
])
def test_retry_after_ms_is_capped_and_an_unreadable_one_dropped(
    value: bytes, relayed: list[bytes] | None
) -> None:
    assert copied({b"retry-after-ms": [value]}).getRawHeaders(b"retry-after-ms") == relayed
