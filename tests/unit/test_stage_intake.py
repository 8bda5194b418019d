"""Intake on its own (relayd.http.intake): the caller's key, its body within the limit,
and the model it names, checked against its allowlist."""

from __future__ import annotations

import hashlib
import json
from io import BytesIO
from typing import Any

import pytest
from stage_fakes import endpoint_of, make_request
from twisted.web.http import Request
from twisted.web.http_headers import Headers

from relayd.errors import Refusal
from relayd.http.body import BoundedBody
from relayd.http.intake import ClientCall, authenticate, parse_client_call, read_body
from relayd.routing import ModelMatcher
from relayd.runtime import Client

KEY = b"sk-relay-a"
LIMITED_KEY = b"sk-relay-b"
TEAM_A = Client("team-a", ModelMatcher(None))
TEAM_B = Client("team-b", ModelMatcher(["claude-*"]))
CLIENTS = {hashlib.sha256(KEY).digest(): TEAM_A, hashlib.sha256(LIMITED_KEY).digest(): TEAM_B}
LIMIT = 10_000

MESSAGES = endpoint_of("anthropic", "messages")
BATCHES = endpoint_of("anthropic", "messages.batches")
MODEL_ITEM = endpoint_of("anthropic", "models.item")


def post(body: object, key: bytes = KEY, uri: bytes = b"/v1/messages") -> Request:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return make_request(b"POST", uri, {b"x-api-key": key}, raw)


def refusal(request: Request, endpoint: Any = MESSAGES) -> Refusal:
    with pytest.raises(Refusal) as caught:
        parse_client_call(request, endpoint, CLIENTS, LIMIT)
    return caught.value


# -- the caller's key ------------------------------------------------------------------------


def test_x_api_key_and_bearer_token_both_name_the_client() -> None:
    assert authenticate(Headers({b"x-api-key": [KEY]}), CLIENTS) is TEAM_A
    assert authenticate(Headers({b"authorization": [b"Bearer " + KEY]}), CLIENTS) is TEAM_A
    # The scheme is case-insensitive and surrounding blanks are not part of the key.
    assert authenticate(Headers({b"authorization": [b"bEaReR  " + LIMITED_KEY + b" "]}),
                        CLIENTS) is TEAM_B
    assert authenticate(Headers({b"x-api-key": [b" " + KEY + b"\t"]}), CLIENTS) is TEAM_A


@pytest.mark.parametrize("headers", [
    {},
    {b"x-api-key": [b""]},
    {b"authorization": [b"Basic " + KEY]},
    {b"authorization": [b"Bearer "]},
    {b"authorization": [KEY]},
])
def test_no_relay_key_is_a_401_saying_where_to_send_one(headers: dict[bytes, list[bytes]]) -> None:
    with pytest.raises(Refusal) as caught:
        authenticate(Headers(headers), CLIENTS)
    assert caught.value.status == 401
    assert "missing relay key" in caught.value.message
    assert "x-api-key" in caught.value.message and "Bearer" in caught.value.message


@pytest.mark.parametrize("headers", [
    {b"x-api-key": [b"sk-relay-wrong"]},
    {b"authorization": [b"Bearer sk-relay-wrong"]},
    # x-api-key is the key when present: a valid bearer token does not rescue a bad one.
    {b"x-api-key": [b"sk-relay-wrong"], b"authorization": [b"Bearer " + KEY]},
    # A key's digest is looked up, never a prefix of it.
    {b"x-api-key": [KEY[:-1]]},
])
def test_an_unknown_relay_key_is_a_401(headers: dict[bytes, list[bytes]]) -> None:
    with pytest.raises(Refusal) as caught:
        authenticate(Headers(headers), CLIENTS)
    assert (caught.value.status, caught.value.message) == (401, "invalid relay key")


# -- the method and the body -----------------------------------------------------------------


def test_a_method_the_endpoint_does_not_take_is_a_405_with_allow() -> None:
    found = refusal(make_request(b"PUT", b"/v1/messages/batches", {b"x-api-key": KEY}), BATCHES)
    assert found.status == 405
    assert tuple(found.headers) == ((b"allow", b"GET, POST"),)
    assert "PUT" in found.message and "/v1/messages/batches" in found.message


def test_the_method_is_checked_before_the_key() -> None:
    """A GET of /v1/messages without a key learns the method is wrong, not the key."""
    assert refusal(make_request(b"GET", b"/v1/messages", {}, b"")).status == 405


def test_the_key_is_checked_before_the_body_size() -> None:
    """An unauthenticated caller learns nothing about the relay's body limit."""
    request = make_request(b"POST", b"/v1/messages", {}, b"x" * (LIMIT + 1))
    assert refusal(request).status == 401


def test_an_overflowed_bounded_body_is_a_413_naming_its_limit() -> None:
    body = BoundedBody(10)
    body.write(b"x" * 11)
    request = make_request(b"POST", b"/v1/messages", {}, content=body)
    with pytest.raises(Refusal) as caught:
        read_body(request, LIMIT)  # the bounded body's own limit is the one that counts
    assert caught.value.status == 413
    assert "limit of 10 bytes" in caught.value.message


def test_a_bounded_body_within_its_limit_is_read_whole() -> None:
    body = BoundedBody(10)
    body.write(b"01234")
    body.write(b"56789")
    request = make_request(b"POST", b"/v1/messages", {}, content=body)
    assert read_body(request, 5) == b"0123456789"


def test_plain_content_over_the_limit_is_a_413() -> None:
    request = make_request(b"POST", b"/v1/messages", {}, b"x" * (LIMIT + 1))
    with pytest.raises(Refusal) as caught:
        read_body(request, LIMIT)
    assert caught.value.status == 413
    assert f"limit of {LIMIT} bytes" in caught.value.message


def test_plain_content_is_read_from_its_start_and_no_content_is_empty() -> None:
    content = BytesIO(b'{"model": "claude-x"}')
    content.seek(0, 2)  # left at its end by whoever wrote it
    assert read_body(make_request(content=content), LIMIT) == b'{"model": "claude-x"}'
    assert read_body(make_request(body=None), LIMIT) == b""
    assert read_body(make_request(body=b"x" * LIMIT), LIMIT) == b"x" * LIMIT


# -- the model named in the body -------------------------------------------------------------


def test_the_model_and_stream_flag_come_from_the_body() -> None:
    payload = {"model": "claude-x", "stream": True, "messages": []}
    call = parse_client_call(post(payload), MESSAGES, CLIENTS, LIMIT)
    assert isinstance(call, ClientCall)
    assert (call.client, call.model, call.payload, call.stream) == (
        TEAM_A, "claude-x", payload, True
    )
    assert call.body == json.dumps(payload).encode()
    assert call.upstream_uri is None and call.batch_models is None


def test_only_a_json_true_stream_is_a_stream() -> None:
    call = parse_client_call(post({"model": "m", "stream": "true"}), MESSAGES, CLIENTS, LIMIT)
    assert call.stream is False


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "request body is not valid JSON"),
    (b"[" * 2000 + b"]" * 2000, "request body is not valid JSON: JSON nested too deeply"),
    (b"[1, 2]", "request body must be a JSON object"),
    (b'"claude-x"', "request body must be a JSON object"),
    (b"{}", "model: field required"),
    (b'{"model": ""}', "model: field required"),
    (b'{"model": 7}', "model: field required"),
])
def test_a_body_without_a_usable_model_is_a_400(body: bytes, message: str) -> None:
    found = refusal(post(body))
    assert found.status == 400
    assert found.message.startswith(message)


def test_a_model_outside_the_allowlist_is_a_403_naming_client_and_model() -> None:
    found = refusal(post({"model": "gpt-4o"}, key=LIMITED_KEY))
    assert found.status == 403
    assert "'team-b'" in found.message and "'gpt-4o'" in found.message
    call = parse_client_call(post({"model": "claude-x"}, key=LIMITED_KEY), MESSAGES, CLIENTS,
                             LIMIT)
    assert call.client is TEAM_B


# -- the model named in the path -------------------------------------------------------------


def get_model(path: bytes, key: bytes = KEY) -> Request:
    return make_request(b"GET", path, {b"x-api-key": key}, b"")


def test_a_model_in_the_path_goes_upstream_as_its_canonical_path() -> None:
    call = parse_client_call(get_model(b"/v1/models/claude%2Dx?beta=true"), MODEL_ITEM,
                             CLIENTS, LIMIT)
    assert call.model == "claude-x"
    assert call.upstream_uri == b"/v1/models/claude-x?beta=true"
    assert call.payload is None


def test_a_path_model_without_a_query_keeps_none() -> None:
    call = parse_client_call(get_model(b"/v1/models/ft:gpt-4o:org:x"), MODEL_ITEM, CLIENTS,
                             LIMIT)
    assert call.upstream_uri == b"/v1/models/ft:gpt-4o:org:x"


@pytest.mark.parametrize("last", [b"..%2F..%2Fadmin", b"%2E%2E", b".hidden", b"a%25b"])
def test_a_path_segment_that_is_no_model_id_is_a_400(last: bytes) -> None:
    found = refusal(get_model(b"/v1/models/" + last), MODEL_ITEM)
    assert found.status == 400
    assert found.message.startswith("not a model id")


def test_a_path_model_is_checked_against_the_allowlist() -> None:
    found = refusal(get_model(b"/v1/models/gpt-4o", key=LIMITED_KEY), MODEL_ITEM)
    assert found.status == 403


# -- the models of a batch -------------------------------------------------------------------


def batch(*models: object) -> dict[str, Any]:
    return {"requests": [{"custom_id": str(i), "params": {"model": m}}
                         for i, m in enumerate(models)]}


def test_a_batch_create_names_every_model_inside_it() -> None:
    call = parse_client_call(post(batch("claude-a", "claude-b"), uri=b"/v1/messages/batches"),
                             BATCHES, CLIENTS, LIMIT)
    assert call.batch_models == ["claude-a", "claude-b"]
    assert call.model is None  # a batch is routed by its models, not by one


def test_every_model_of_a_batch_is_checked_against_the_allowlist() -> None:
    request = post(batch("claude-a", "gpt-4o"), key=LIMITED_KEY, uri=b"/v1/messages/batches")
    found = refusal(request, BATCHES)
    assert found.status == 403 and "'gpt-4o'" in found.message


@pytest.mark.parametrize("body", [
    b"not json",
    b"[]",
    b'{"requests": {}}',
    json.dumps({"requests": ["x"]}).encode(),
    json.dumps({"requests": [{"params": "x"}]}).encode(),
    json.dumps(batch("claude-a", 3)).encode(),
])
def test_a_malformed_batch_create_is_a_400(body: bytes) -> None:
    found = refusal(post(body, uri=b"/v1/messages/batches"), BATCHES)
    assert found.status == 400
    assert found.message.startswith("requests: expected a list")


def test_a_batch_listing_reads_no_models() -> None:
    request = make_request(b"GET", b"/v1/messages/batches", {b"x-api-key": LIMITED_KEY}, b"")
    call = parse_client_call(request, BATCHES, CLIENTS, LIMIT)
    assert call.batch_models is None and call.model is None and call.body == b""
