"""JSON responses and errors, Anthropic Messages <-> OpenAI Chat: golden cases."""

from __future__ import annotations

import json
from typing import Any

import pytest

from relayd.translate import (
    anthropic_to_openai_response,
    openai_to_anthropic_response,
    translate_error,
)
from relayd.translate.mapping import (
    FINISH_REASON_FOR_STOP_REASON,
    STOP_REASON_FOR_FINISH_REASON,
    anthropic_input_tokens,
    openai_prompt_tokens,
)

JsonDict = dict[str, Any]

A_USAGE: JsonDict = {
    "input_tokens": 10,
    "output_tokens": 7,
    "cache_creation_input_tokens": 3,
    "cache_read_input_tokens": 100,
}
O_USAGE: JsonDict = {
    "prompt_tokens": 113,
    "completion_tokens": 7,
    "total_tokens": 120,
    "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 3},
}


def a_message(content: list[JsonDict], stop_reason: str = "end_turn", **extra: Any) -> JsonDict:
    return {
        "id": "msg_01ABC",
        "type": "message",
        "role": "assistant",
        "model": "claude-upstream-name",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": A_USAGE,
        **extra,
    }


def o_completion(message: JsonDict, finish_reason: str = "stop", **extra: Any) -> JsonDict:
    return {
        "id": "chatcmpl-01ABC",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-upstream-name",
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": O_USAGE,
        **extra,
    }


def o_expected(message: JsonDict, finish_reason: str = "stop") -> JsonDict:
    return {
        "id": "chatcmpl-01ABC",
        "object": "chat.completion",
        "created": 0,
        "model": "client-model",
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        ],
        "usage": O_USAGE,
    }


def a_expected(content: list[JsonDict], stop_reason: str = "end_turn") -> JsonDict:
    return {
        "id": "msg_01ABC",
        "type": "message",
        "role": "assistant",
        "model": "client-model",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": A_USAGE,
    }


# --- Anthropic -> OpenAI ------------------------------------------------------------------


def test_text_response() -> None:
    body = a_message([{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}])
    assert anthropic_to_openai_response(body, model="client-model") == o_expected(
        {"role": "assistant", "content": "Hello world", "refusal": None}
    )


def test_tool_use_response_drops_thinking_and_server_blocks() -> None:
    body = a_message(
        [
            {"type": "thinking", "thinking": "...", "signature": "sig"},
            {"type": "redacted_thinking", "data": "xx"},
            {"type": "text", "text": "Let me check.", "citations": [{"type": "x"}]},
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
            {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {"q": "ü", "n": 2}},
            {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {}},
        ],
        stop_reason="tool_use",
    )
    assert anthropic_to_openai_response(body, model="client-model", created=42) == {
        **o_expected(
            {
                "role": "assistant",
                "content": "Let me check.",
                "refusal": None,
                "tool_calls": [
                    {"id": "toolu_1", "type": "function",
                     "function": {"name": "get", "arguments": '{"q":"ü","n":2}'}},
                    {"id": "toolu_2", "type": "function",
                     "function": {"name": "now", "arguments": "{}"}},
                ],
            },
            "tool_calls",
        ),
        "created": 42,
    }


def test_tool_only_response_has_null_content() -> None:
    body = a_message([{"type": "tool_use", "id": "t", "name": "f", "input": {}}], "tool_use")
    message = anthropic_to_openai_response(body, model="m")["choices"][0]["message"]
    assert message["content"] is None


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", "stop"),
    ],
)
def test_stop_reason_to_finish_reason(stop_reason: str, finish_reason: str) -> None:
    body = a_message([{"type": "text", "text": "x"}], stop_reason)
    result = anthropic_to_openai_response(body, model="m")
    assert result["choices"][0]["finish_reason"] == finish_reason


def test_usage_arithmetic_anthropic_to_openai() -> None:
    body = a_message([], usage={"input_tokens": 5, "output_tokens": 2,
                                "cache_creation_input_tokens": 11,
                                "cache_read_input_tokens": 13})
    assert anthropic_to_openai_response(body, model="m")["usage"] == {
        "prompt_tokens": 29,
        "completion_tokens": 2,
        "total_tokens": 31,
        "prompt_tokens_details": {"cached_tokens": 13, "cache_write_tokens": 11},
    }


def test_missing_usage_counts_are_zero() -> None:
    body = a_message([], usage={"input_tokens": 5})
    assert anthropic_to_openai_response(body, model="m")["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 0,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
    }


# --- OpenAI -> Anthropic ------------------------------------------------------------------


def test_openai_text_response() -> None:
    body = o_completion({"role": "assistant", "content": "Hi", "refusal": None})
    assert openai_to_anthropic_response(body, model="client-model") == a_expected(
        [{"type": "text", "text": "Hi"}]
    )


def test_openai_tool_calls_response() -> None:
    body = o_completion(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_abc", "type": "function",
                 "function": {"name": "get", "arguments": '{"q": "x"}'}},
                {"id": "call:odd", "type": "function", "function": {"name": "now",
                                                                    "arguments": ""}},
                {"id": "call_bad", "type": "function", "function": {"name": "f",
                                                                    "arguments": "{oops"}},
            ],
        },
        "tool_calls",
    )
    assert openai_to_anthropic_response(body, model="client-model") == a_expected(
        [
            {"type": "tool_use", "id": "call_abc", "name": "get", "input": {"q": "x"}},
            {"type": "tool_use", "id": "call_odd_b77f0a93", "name": "now", "input": {}},
            {"type": "tool_use", "id": "call_bad", "name": "f", "input": {}},
        ],
        "tool_use",
    )


def test_openai_refusal_response() -> None:
    body = o_completion({"role": "assistant", "content": None, "refusal": "I can't."})
    assert openai_to_anthropic_response(body, model="client-model") == a_expected(
        [{"type": "text", "text": "I can't."}], "refusal"
    )


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("function_call", "tool_use"),
        ("content_filter", "refusal"),
        ("brand_new", "end_turn"),
    ],
)
def test_finish_reason_to_stop_reason(finish_reason: str, stop_reason: str) -> None:
    body = o_completion({"role": "assistant", "content": "x"}, finish_reason)
    assert openai_to_anthropic_response(body, model="m")["stop_reason"] == stop_reason


def test_usage_arithmetic_openai_to_anthropic() -> None:
    body = o_completion({"role": "assistant", "content": ""}, usage={
        "prompt_tokens": 50, "completion_tokens": 4, "total_tokens": 54,
        "prompt_tokens_details": {"cached_tokens": 30},
        "completion_tokens_details": {"reasoning_tokens": 2},
    })
    assert openai_to_anthropic_response(body, model="m")["usage"] == {
        "input_tokens": 20,
        "output_tokens": 4,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 30,
    }


def test_reverse_usage_never_goes_negative() -> None:
    assert anthropic_input_tokens(10, 8, 5) == 0
    assert anthropic_input_tokens(20, 8, 5) == 7
    assert openai_prompt_tokens(7, 5, 8) == 20


def test_empty_openai_response() -> None:
    assert openai_to_anthropic_response({"choices": []}, model="m") == {
        "id": "msg_relayd",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0},
    }


def test_reason_tables_round_trip_where_lossless() -> None:
    for finish, stop in STOP_REASON_FOR_FINISH_REASON.items():
        if finish != "function_call":
            assert FINISH_REASON_FOR_STOP_REASON[stop] == finish


# --- errors -------------------------------------------------------------------------------


def anthropic_error_bytes(kind: str, message: str) -> bytes:
    return json.dumps({"type": "error", "error": {"type": kind, "message": message},
                       "request_id": "req_1"}).encode()


def openai_error_bytes(kind: str, message: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": code}}).encode()


@pytest.mark.parametrize(
    ("status", "kind", "out_status", "out_type", "out_code"),
    [
        (400, "invalid_request_error", 400, "invalid_request_error", None),
        (401, "authentication_error", 401, "invalid_request_error", "invalid_api_key"),
        (403, "permission_error", 403, "invalid_request_error", "model_not_allowed"),
        (404, "not_found_error", 404, "invalid_request_error", "not_found"),
        (413, "request_too_large", 413, "invalid_request_error", "request_too_large"),
        (429, "rate_limit_error", 429, "rate_limit_exceeded", "rate_limit_exceeded"),
        (500, "api_error", 500, "server_error", None),
        (504, "timeout_error", 504, "server_error", "timeout"),
        (529, "overloaded_error", 503, "server_error", "server_is_overloaded"),
    ],
)
def test_anthropic_error_to_openai(
    status: int, kind: str, out_status: int, out_type: str, out_code: str | None
) -> None:
    result = translate_error(status, anthropic_error_bytes(kind, "Boom"), "anthropic", "openai")
    assert result == (
        out_status,
        json.dumps(
            {"error": {"message": "Boom", "type": out_type, "param": None, "code": out_code}},
            separators=(",", ":"),
        ).encode(),
    )


@pytest.mark.parametrize(
    ("status", "kind", "code", "out_status", "out_type"),
    [
        (400, "invalid_request_error", None, 400, "invalid_request_error"),
        (401, "invalid_request_error", "invalid_api_key", 401, "authentication_error"),
        (403, "invalid_request_error", None, 403, "permission_error"),
        (404, "invalid_request_error", "model_not_found", 404, "not_found_error"),
        (429, "requests", "rate_limit_exceeded", 429, "rate_limit_error"),
        (429, "insufficient_quota", "insufficient_quota", 402, "billing_error"),
        (500, "server_error", None, 500, "api_error"),
        (503, "server_error", "server_is_overloaded", 503, "overloaded_error"),
    ],
)
def test_openai_error_to_anthropic(
    status: int, kind: str, code: str | None, out_status: int, out_type: str
) -> None:
    result = translate_error(status, openai_error_bytes(kind, "Nope", code), "openai", "anthropic")
    assert result == (
        out_status,
        json.dumps({"type": "error", "error": {"type": out_type, "message": "Nope"}},
                   separators=(",", ":")).encode(),
    )


def test_error_body_that_is_not_json_gets_a_generic_message() -> None:
    assert translate_error(502, b"<html>bad gateway</html>", "anthropic", "openai") == (
        502,
        b'{"error":{"message":"upstream returned HTTP 502","type":"server_error",'
        b'"param":null,"code":"bad_gateway"}}',
    )
    assert translate_error(502, b"", "openai", "anthropic") == (
        502,
        b'{"type":"error","error":{"type":"api_error","message":"upstream returned HTTP 502"}}',
    )


def test_same_family_error_is_untouched() -> None:
    body = anthropic_error_bytes("overloaded_error", "x")
    assert translate_error(529, body, "anthropic", "anthropic") == (529, body)
