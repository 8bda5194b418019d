"""Request translation, OpenAI Chat <-> Anthropic Messages: one golden case per table row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relayd.translate import (
    TranslatedRequest,
    TranslationError,
    anthropic_to_openai_request,
    lossy_table_markdown,
    normalize_tool_call_id,
    openai_to_anthropic_request,
)
from relayd.translate.mapping import LOSSY_FEATURES, Scope, lossy_feature

JsonDict = dict[str, Any]

LEGACY = "2023-06-01"
NEW = "2026-10-21"
USER_HI: JsonDict = {"role": "user", "content": "hi"}
A_USER_HI: JsonDict = {"role": "user", "content": "hi"}


def o2a(
    body: JsonDict,
    *,
    version: str = LEGACY,
    strict: bool = False,
    target: str | None = None,
    default_max_tokens: int = 1024,
) -> TranslatedRequest:
    return openai_to_anthropic_request(
        body,
        default_max_tokens=default_max_tokens,
        anthropic_version=version,
        strict=strict,
        target_model=target,
    )


def a2o(body: JsonDict, *, strict: bool = False, target: str | None = None) -> TranslatedRequest:
    return anthropic_to_openai_request(body, strict=strict, target_model=target)


def o_body(*messages: JsonDict, **extra: Any) -> JsonDict:
    return {"model": "gpt-x", "messages": list(messages) or [USER_HI], **extra}


def a_body(*messages: JsonDict, **extra: Any) -> JsonDict:
    return {"model": "claude-x", "max_tokens": 1024, "messages": list(messages) or [A_USER_HI],
            **extra}


def a_expected(*messages: JsonDict, **extra: Any) -> JsonDict:
    """The Anthropic body an ``o_body`` with default limits translates to."""
    return {"model": "gpt-x", "max_tokens": 1024, "messages": list(messages) or [A_USER_HI],
            **extra}


def o_expected(*messages: JsonDict, **extra: Any) -> JsonDict:
    """The OpenAI body an ``a_body`` translates to."""
    return {"model": "claude-x", "max_completion_tokens": 1024,
            "messages": list(messages) or [USER_HI], **extra}


# --- OpenAI -> Anthropic: golden cases, one per mapping-table row -------------------------

O2A_CASES: list[tuple[str, JsonDict, JsonDict, list[str]]] = [
    (
        "minimal",
        o_body(),
        a_expected(),
        [],
    ),
    (
        "system and developer become one top-level system, one block each",
        o_body(
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
            USER_HI,
        ),
        a_expected(
            A_USER_HI,
            system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use French."}],
        ),
        [],
    ),
    (
        "single system message stays a string",
        o_body({"role": "system", "content": "S"}, USER_HI),
        a_expected(A_USER_HI, system="S"),
        [],
    ),
    (
        "mid-conversation system is hoisted on 2023-06-01",
        o_body(
            {"role": "system", "content": "S1"},
            USER_HI,
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": "S2"},
            {"role": "user", "content": "again"},
        ),
        a_expected(
            A_USER_HI,
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
            system=[{"type": "text", "text": "S1"}, {"type": "text", "text": "S2"}],
        ),
        [],
    ),
    (
        "text parts become text blocks; consecutive user turns merge",
        o_body(
            {"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}]},
        ),
        a_expected(
            {"role": "user", "content": [
                {"type": "text", "text": "one"}, {"type": "text", "text": "two"},
            ]},
        ),
        [],
    ),
    (
        "consecutive assistant turns merge",
        o_body(
            USER_HI,
            {"role": "assistant", "content": "a"},
            {"role": "assistant", "content": "b"},
        ),
        a_expected(
            A_USER_HI,
            {"role": "assistant", "content": [
                {"type": "text", "text": "a"}, {"type": "text", "text": "b"},
            ]},
        ),
        [],
    ),
    (
        "message name is dropped",
        o_body({"role": "user", "content": "hi", "name": "alice"}),
        a_expected(),
        ["messages.name"],
    ),
    (
        "images: base64 data URL and http URL; detail auto is not a loss",
        o_body({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR=",
                                                "detail": "auto"}},
            {"type": "image_url", "image_url": {"url": "https://x.test/cat.jpg"}},
        ]}),
        a_expected({"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBOR="}},
            {"type": "image", "source": {"type": "url", "url": "https://x.test/cat.jpg"}},
        ]}),
        [],
    ),
    (
        "image detail high is dropped",
        o_body({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "high"}},
        ]}),
        a_expected({"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
        ]}),
        ["image_url.detail"],
    ),
    (
        "tools: function schema becomes input_schema; strict kept; missing parameters",
        o_body(tools=[
            {"type": "function", "function": {
                "name": "get_weather", "description": "Weather.", "strict": True,
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            }},
            {"type": "function", "function": {"name": "now"}},
        ]),
        a_expected(tools=[
            {"name": "get_weather", "description": "Weather.", "strict": True,
             "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
            {"name": "now", "input_schema": {"type": "object", "properties": {}}},
        ]),
        [],
    ),
    *[
        (
            f"tool_choice {name}",
            o_body(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice=choice),
            a_expected(
                tools=[{"name": "f", "input_schema": {"type": "object", "properties": {}}}],
                tool_choice=expected,
            ),
            [],
        )
        for name, choice, expected in [
            ("auto", "auto", {"type": "auto"}),
            ("none", "none", {"type": "none"}),
            ("required", "required", {"type": "any"}),
            ("function", {"type": "function", "function": {"name": "f"}},
             {"type": "tool", "name": "f"}),
        ]
    ],
    (
        "parallel_tool_calls false without tool_choice",
        o_body(tools=[{"type": "function", "function": {"name": "f"}}],
               parallel_tool_calls=False),
        a_expected(
            tools=[{"name": "f", "input_schema": {"type": "object", "properties": {}}}],
            tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        ),
        [],
    ),
    (
        "parallel_tool_calls false with required; true is the default",
        o_body(tools=[{"type": "function", "function": {"name": "f"}}],
               tool_choice="required", parallel_tool_calls=False),
        a_expected(
            tools=[{"name": "f", "input_schema": {"type": "object", "properties": {}}}],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
        ),
        [],
    ),
    (
        "assistant tool_calls become tool_use blocks; tool messages one user turn",
        o_body(
            USER_HI,
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "f", "arguments": "{\"x\": 1}"}},
                {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": ""}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "one"},
            {"role": "tool", "tool_call_id": "call_2",
             "content": [{"type": "text", "text": "two"}]},
            {"role": "user", "content": "thanks"},
        ),
        a_expected(
            A_USER_HI,
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "f", "input": {"x": 1}},
                {"type": "tool_use", "id": "call_2", "name": "g", "input": {}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "one"},
                {"type": "tool_result", "tool_use_id": "call_2",
                 "content": [{"type": "text", "text": "two"}]},
                {"type": "text", "text": "thanks"},
            ]},
        ),
        [],
    ),
    (
        "assistant with null content and tool_calls; foreign ids normalised on both sides",
        o_body(
            USER_HI,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "fc.9/a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            ]},
            {"role": "tool", "tool_call_id": "fc.9/a", "content": "ok"},
        ),
        a_expected(
            A_USER_HI,
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "fc_9_a_36588ea8", "name": "f", "input": {}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "fc_9_a_36588ea8", "content": "ok"},
            ]},
        ),
        [],
    ),
    (
        "max_completion_tokens wins over max_tokens",
        o_body(max_tokens=10, max_completion_tokens=20),
        a_expected(max_tokens=20),
        [],
    ),
    (
        "max_tokens alone",
        o_body(max_tokens=10),
        a_expected(max_tokens=10),
        [],
    ),
    (
        "temperature is clamped to 0..1 and top_p kept on 2023-06-01",
        o_body(temperature=1.7, top_p=0.9),
        a_expected(temperature=1, top_p=0.9),
        [],
    ),
    (
        "temperature in range is kept",
        o_body(temperature=0.3),
        a_expected(temperature=0.3),
        [],
    ),
    (
        "stop string and user",
        o_body(stop="END", user="u-42"),
        a_expected(stop_sequences=["END"], metadata={"user_id": "u-42"}),
        [],
    ),
    (
        "stop list",
        o_body(stop=["a", "b"]),
        a_expected(stop_sequences=["a", "b"]),
        [],
    ),
    (
        "stream with include_usage",
        o_body(stream=True, stream_options={"include_usage": True}),
        a_expected(stream=True),
        [],
    ),
    (
        "response_format json_schema becomes output_config.format",
        o_body(response_format={"type": "json_schema", "json_schema": {
            "name": "answer", "strict": True,
            "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
        }}),
        a_expected(output_config={"format": {
            "type": "json_schema",
            "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
        }}),
        [],
    ),
    (
        "response_format text is the default",
        o_body(response_format={"type": "text"}),
        a_expected(),
        [],
    ),
    (
        "response_format json_object is dropped",
        o_body(response_format={"type": "json_object"}),
        a_expected(),
        ["response_format.json_object"],
    ),
    *[
        (
            f"reasoning_effort {effort}",
            o_body(reasoning_effort=effort),
            a_expected(output_config={"effort": mapped}),
            [],
        )
        for effort, mapped in [("minimal", "low"), ("low", "low"), ("medium", "medium"),
                               ("high", "high"), ("xhigh", "high")]
    ],
    (
        "reasoning_effort none is omitted; format and effort share output_config",
        o_body(reasoning_effort="none"),
        a_expected(),
        [],
    ),
    (
        "response_format and reasoning_effort together",
        o_body(reasoning_effort="low", response_format={
            "type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}},
        }),
        a_expected(output_config={
            "effort": "low", "format": {"type": "json_schema", "schema": {"type": "object"}},
        }),
        [],
    ),
    (
        "neutral values of lossy fields are not losses",
        o_body(n=1, logprobs=False, top_logprobs=0, logit_bias={}, presence_penalty=0,
               frequency_penalty=0.0, modalities=["text"], parallel_tool_calls=True,
               seed=None),
        a_expected(),
        [],
    ),
    (
        "every droppable OpenAI field, reported once each, in a stable order",
        o_body(logprobs=True, top_logprobs=3, logit_bias={"50256": -100}, seed=7,
               presence_penalty=0.5, frequency_penalty=-0.5, audio={"voice": "alloy"},
               modalities=["text", "audio"], store=True, metadata={"k": "v"},
               service_tier="flex"),
        a_expected(),
        ["logprobs", "top_logprobs", "logit_bias", "seed", "presence_penalty",
         "frequency_penalty", "audio", "modalities", "store", "metadata", "service_tier"],
    ),
]


@pytest.mark.parametrize(
    ("body", "expected", "dropped"),
    [case[1:] for case in O2A_CASES],
    ids=[case[0] for case in O2A_CASES],
)
def test_openai_to_anthropic_golden(body: JsonDict, expected: JsonDict, dropped: list[str]) -> None:
    result = o2a(body)
    assert result.body == expected
    assert result.dropped == dropped


def test_openai_to_anthropic_does_not_modify_its_input() -> None:
    body = o_body(
        {"role": "user", "content": "a"},
        {"role": "user", "content": [{"type": "text", "text": "b"}]},
        tools=[{"type": "function", "function": {"name": "f"}}],
    )
    snapshot = repr(body)
    o2a(body)
    assert repr(body) == snapshot


def test_target_model_replaces_the_client_model() -> None:
    assert o2a(o_body(), target="claude-sonnet").body["model"] == "claude-sonnet"
    assert a2o(a_body(), target="gpt-5").body["model"] == "gpt-5"


def test_default_max_tokens_fills_the_required_field() -> None:
    assert o2a(o_body(), default_max_tokens=333).body["max_tokens"] == 333


def test_stream_flags_are_reported() -> None:
    result = o2a(o_body(stream=True, stream_options={"include_usage": True}))
    assert (result.stream, result.include_usage) == (True, True)
    result = o2a(o_body(stream=True))
    assert (result.stream, result.include_usage) == (True, False)
    result = o2a(o_body(stream=False, stream_options={"include_usage": True}))
    assert (result.stream, result.include_usage) == (False, False)
    assert "stream" not in result.body


def test_new_version_drops_temperature_and_top_p() -> None:
    result = o2a(o_body(temperature=0.5, top_p=0.5), version=NEW)
    assert result.body == a_expected()
    assert result.dropped == ["temperature", "top_p"]


def test_new_version_keeps_mid_conversation_system_in_place() -> None:
    result = o2a(
        o_body(
            {"role": "system", "content": "S1"},
            USER_HI,
            {"role": "system", "content": "S2"},
            {"role": "user", "content": "again"},
        ),
        version=NEW,
    )
    assert result.body == a_expected(
        A_USER_HI,
        {"role": "system", "content": "S2"},
        {"role": "user", "content": "again"},
        system="S1",
    )


def test_assistant_refusal_becomes_text() -> None:
    result = o2a(o_body(USER_HI, {"role": "assistant", "content": None, "refusal": "No."}))
    assert result.body["messages"][1] == {
        "role": "assistant", "content": [{"type": "text", "text": "No."}],
    }


def test_tool_results_go_first_when_user_text_precedes_them() -> None:
    result = o2a(o_body(
        USER_HI,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        ]},
        {"role": "user", "content": "note"},
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
    ))
    assert result.body["messages"][2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "c1", "content": "r"},
        {"type": "text", "text": "note"},
    ]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (o_body(n=2), "n > 1 is not supported: the upstream returns one choice"),
        (
            o_body({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}),
            "messages[0].content[0]: content part type 'input_audio' cannot be translated",
        ),
        (
            o_body({"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}),
            "messages[0].content[0]: image URLs must be base64 data: URLs or http(s) URLs",
        ),
        (
            o_body(tools=[{"type": "custom", "custom": {"name": "x"}}]),
            "tools[0]: only function tools can be translated",
        ),
        (
            o_body(tool_choice={"type": "allowed_tools", "allowed_tools": {}}),
            'tool_choice {"type":"allowed_tools","allowed_tools":{}} cannot be translated',
        ),
        (
            o_body(USER_HI, {"role": "assistant", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}),
            "messages[1].tool_calls[0].function.arguments must be a JSON object",
        ),
        (
            o_body(USER_HI, {"role": "assistant", "content": None,
                             "function_call": {"name": "f", "arguments": "{}"}}),
            "messages[1]: legacy function_call cannot be translated",
        ),
        (o_body({"role": "function", "content": "x"}),
         "messages[0]: role 'function' cannot be translated"),
        (o_body(reasoning_effort="extreme"), "reasoning_effort 'extreme' is not supported"),
        ({"model": "m"}, "messages must be an array"),
        (o_body(max_tokens="10"), "max_tokens must be an integer"),
    ],
)
def test_openai_to_anthropic_rejections(body: JsonDict, message: str) -> None:
    with pytest.raises(TranslationError) as caught:
        o2a(body)
    assert (caught.value.status, caught.value.message) == (400, message)


def test_strict_rejects_every_drop_at_once() -> None:
    with pytest.raises(TranslationError) as caught:
        o2a(o_body(seed=1, logprobs=True), strict=True)
    assert caught.value.status == 400
    assert caught.value.message == (
        "strict translation: cannot translate logprobs, seed to the upstream API"
    )


def test_strict_accepts_lossless_requests() -> None:
    body = o_body({"role": "system", "content": "S"}, USER_HI, temperature=0.2, stop="x")
    assert o2a(body, strict=True) == o2a(body)


def test_strict_rejects_temperature_on_new_versions() -> None:
    with pytest.raises(TranslationError) as caught:
        o2a(o_body(temperature=0.2), version=NEW, strict=True)
    assert caught.value.message == (
        "strict translation: cannot translate temperature to the upstream API"
    )


# --- Anthropic -> OpenAI ------------------------------------------------------------------

A2O_CASES: list[tuple[str, JsonDict, JsonDict, list[str]]] = [
    ("minimal", a_body(), o_expected(), []),
    (
        "system string",
        a_body(system="Be brief."),
        o_expected({"role": "system", "content": "Be brief."}, USER_HI),
        [],
    ),
    (
        "system blocks become one system message with text parts; cache_control dropped",
        a_body(system=[
            {"type": "text", "text": "A"},
            {"type": "text", "text": "B", "cache_control": {"type": "ephemeral"}},
        ]),
        o_expected(
            {"role": "system", "content": [{"type": "text", "text": "A"},
                                           {"type": "text", "text": "B"}]},
            USER_HI,
        ),
        ["cache_control"],
    ),
    (
        "role system inside messages (2026-10-21) stays in place",
        a_body(A_USER_HI, {"role": "assistant", "content": "yo"},
               {"role": "system", "content": "S"}, {"role": "user", "content": "more"}),
        o_expected(USER_HI, {"role": "assistant", "content": "yo"},
                   {"role": "system", "content": "S"}, {"role": "user", "content": "more"}),
        [],
    ),
    (
        "text blocks become text parts",
        a_body({"role": "user", "content": [{"type": "text", "text": "a"},
                                            {"type": "text", "text": "b"}]}),
        o_expected({"role": "user", "content": [{"type": "text", "text": "a"},
                                                {"type": "text", "text": "b"}]}),
        [],
    ),
    (
        "images: base64 becomes a data URL, url stays a URL",
        a_body({"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                         "data": "/9j/4A=="}},
            {"type": "image", "source": {"type": "url", "url": "https://x.test/i.png"}},
        ]}),
        o_expected({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4A=="}},
            {"type": "image_url", "image_url": {"url": "https://x.test/i.png"}},
        ]}),
        [],
    ),
    (
        "tools: input_schema becomes function parameters; strict kept",
        a_body(tools=[{"name": "f", "description": "F.", "strict": True,
                       "input_schema": {"type": "object", "properties": {}}},
                      {"type": "custom", "name": "g", "input_schema": {"type": "object"}}]),
        o_expected(tools=[
            {"type": "function", "function": {
                "name": "f", "description": "F.", "strict": True,
                "parameters": {"type": "object", "properties": {}}}},
            {"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}},
        ]),
        [],
    ),
    *[
        (
            f"tool_choice {choice['type']}",
            a_body(tools=[{"name": "f", "input_schema": {"type": "object"}}], tool_choice=choice),
            o_expected(
                tools=[{"type": "function",
                        "function": {"name": "f", "parameters": {"type": "object"}}}],
                tool_choice=expected,
            ),
            [],
        )
        for choice, expected in [
            ({"type": "auto"}, "auto"),
            ({"type": "any"}, "required"),
            ({"type": "none"}, "none"),
            ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
        ]
    ],
    (
        "disable_parallel_tool_use becomes parallel_tool_calls false",
        a_body(tools=[{"name": "f", "input_schema": {"type": "object"}}],
               tool_choice={"type": "any", "disable_parallel_tool_use": True}),
        o_expected(
            tools=[{"type": "function",
                    "function": {"name": "f", "parameters": {"type": "object"}}}],
            tool_choice="required", parallel_tool_calls=False,
        ),
        [],
    ),
    (
        "tool_use blocks become tool_calls; tool_result blocks become tool messages first",
        a_body(
            A_USER_HI,
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"x": "é"}},
            ]},
            {"role": "user", "content": [
                {"type": "text", "text": "also this"},
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "done"},
            ]},
        ),
        o_expected(
            USER_HI,
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "f", "arguments": '{"x":"é"}'}},
            ]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "done"},
            {"role": "user", "content": [{"type": "text", "text": "also this"}]},
        ),
        ["thinking_blocks"],
    ),
    (
        "tool_use only: content null; tool_result blocks only: no user message",
        a_body(
            A_USER_HI,
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
                {"type": "tool_use", "id": "t2", "name": "f", "input": {}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1",
                 "content": [{"type": "text", "text": "r1"}]},
                {"type": "tool_result", "tool_use_id": "t2"},
            ]},
        ),
        o_expected(
            USER_HI,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "t2", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            ]},
            {"role": "tool", "tool_call_id": "t1", "content": [{"type": "text", "text": "r1"}]},
            {"role": "tool", "tool_call_id": "t2", "content": ""},
        ),
        [],
    ),
    (
        "tool_result is_error and images are dropped",
        a_body(
            A_USER_HI,
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "is_error": True, "content": [
                    {"type": "text", "text": "boom"},
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/e.png"}},
                ]},
            ]},
        ),
        o_expected(
            USER_HI,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            ]},
            {"role": "tool", "tool_call_id": "t1", "content": [{"type": "text", "text": "boom"}]},
        ),
        ["tool_result.is_error", "tool_result.image"],
    ),
    (
        "several assistant text blocks stay separate parts; citations dropped",
        a_body(A_USER_HI, {"role": "assistant", "content": [
            {"type": "text", "text": "a", "citations": [{"type": "char_location"}]},
            {"type": "text", "text": "b"},
        ]}),
        o_expected(USER_HI, {"role": "assistant", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
        ["citations"],
    ),
    (
        "sampling, stop_sequences, user_id, stream",
        a_body(temperature=0.5, top_p=0.8, stop_sequences=["x", "y"],
               metadata={"user_id": "u1"}, stream=True),
        o_expected(temperature=0.5, top_p=0.8, stop=["x", "y"], user="u1", stream=True,
                   stream_options={"include_usage": True}),
        [],
    ),
    (
        "output_config.format becomes response_format json_schema",
        a_body(output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}}),
        o_expected(response_format={"type": "json_schema", "json_schema": {
            "name": "response", "schema": {"type": "object"}, "strict": True}}),
        [],
    ),
    *[
        (
            f"thinking {thinking}",
            a_body(thinking=thinking),
            o_expected(**({"reasoning_effort": effort} if effort else {})),
            [],
        )
        for thinking, effort in [
            ({"type": "enabled", "budget_tokens": 1024}, "low"),
            ({"type": "enabled", "budget_tokens": 4096}, "medium"),
            ({"type": "enabled", "budget_tokens": 16384}, "high"),
            ({"type": "adaptive"}, "medium"),
            ({"type": "disabled"}, None),
        ]
    ],
    *[
        (
            f"output_config.effort {effort}",
            a_body(output_config={"effort": effort},
                   thinking={"type": "enabled", "budget_tokens": 2000}),
            o_expected(reasoning_effort=mapped),
            [],
        )
        for effort, mapped in [("low", "low"), ("medium", "medium"), ("high", "high"),
                               ("max", "high")]
    ],
    (
        "every droppable Anthropic field",
        a_body(
            {"role": "user", "content": [
                {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
            top_k=5, cache_control={"type": "ephemeral"}, service_tier="auto",
            metadata={"user_id": "u", "tenant": "t"},
            output_config={"format": {"type": "json_schema", "schema": {}}, "verbosity": "low"},
            container="c1",
        ),
        o_expected(
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            user="u",
            response_format={"type": "json_schema",
                             "json_schema": {"name": "response", "schema": {}, "strict": True}},
        ),
        ["cache_control", "top_k", "metadata.tenant", "output_config.verbosity",
         "service_tier", "container"],
    ),
]


@pytest.mark.parametrize(
    ("body", "expected", "dropped"),
    [case[1:] for case in A2O_CASES],
    ids=[case[0] for case in A2O_CASES],
)
def test_anthropic_to_openai_golden(body: JsonDict, expected: JsonDict, dropped: list[str]) -> None:
    result = a2o(body)
    assert result.body == expected
    assert result.dropped == dropped


def test_anthropic_max_tokens_default_only_when_absent() -> None:
    body = {"model": "m", "messages": [A_USER_HI]}
    assert "max_completion_tokens" not in a2o(body).body
    result = anthropic_to_openai_request(body, strict=False, target_model=None,
                                         default_max_tokens=77)
    assert result.body["max_completion_tokens"] == 77
    result = anthropic_to_openai_request(a_body(), strict=False, target_model=None,
                                         default_max_tokens=77)
    assert result.body["max_completion_tokens"] == 1024


def test_anthropic_stream_flags() -> None:
    result = a2o(a_body(stream=True))
    assert (result.stream, result.include_usage) == (True, False)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            a_body({"role": "user", "content": [{"type": "document", "source": {}}]}),
            "messages[0].content[0]: block type 'document' cannot be translated",
        ),
        (
            a_body(tools=[{"type": "web_search_20250305", "name": "web_search"}]),
            "tools[0]: server tool 'web_search_20250305' cannot be translated",
        ),
        (
            a_body({"role": "user", "content": [
                {"type": "image", "source": {"type": "file", "file_id": "f"}}]}),
            "messages[0].content[0]: image source type 'file' cannot be translated",
        ),
        (a_body(tool_choice={"type": "magic"}), "tool_choice type 'magic' cannot be translated"),
        (a_body(output_config={"effort": "turbo"}),
         "output_config.effort 'turbo' is not supported"),
        (a_body(thinking={"type": "weird"}), "thinking type 'weird' is not supported"),
        (a_body({"role": "bot", "content": "x"}), "messages[0]: role 'bot' cannot be translated"),
    ],
)
def test_anthropic_to_openai_rejections(body: JsonDict, message: str) -> None:
    with pytest.raises(TranslationError) as caught:
        a2o(body)
    assert (caught.value.status, caught.value.message) == (400, message)


def test_anthropic_strict_rejects_drops() -> None:
    with pytest.raises(TranslationError) as caught:
        a2o(a_body(top_k=3, service_tier="auto"), strict=True)
    assert caught.value.message == (
        "strict translation: cannot translate top_k, service_tier to the upstream API"
    )


# --- the lossy table and the code agree ---------------------------------------------------


def test_every_reported_name_is_a_dropped_row() -> None:
    names: dict[Scope, list[str]] = {
        "request O->A": [
            name for case in O2A_CASES for name in case[3]
        ] + ["temperature", "top_p"],
        "request A->O": [name for case in A2O_CASES for name in case[3]],
    }
    for scope, reported in names.items():
        assert reported, scope  # the cases do report dropped names
        for name in reported:
            assert lossy_feature(scope, name).policy == "dropped", (scope, name)


def test_strict_policy_of_every_request_drop_is_reject() -> None:
    for row in LOSSY_FEATURES:
        if row.scope.startswith("request") and row.policy == "dropped":
            assert row.strict_policy == "rejected", row.name
        if row.policy != "dropped":
            assert row.strict_policy == row.policy, row.name


def test_docs_embed_the_lossy_table() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "translation.md"
    assert lossy_table_markdown() in docs.read_text(encoding="utf-8")


def test_tool_call_id_normalisation() -> None:
    assert normalize_tool_call_id("toolu_01-AZ") == "toolu_01-AZ"
    assert normalize_tool_call_id("a.b") != normalize_tool_call_id("a:b")
    assert normalize_tool_call_id("a.b") == normalize_tool_call_id("a.b")
    assert normalize_tool_call_id("a.b").startswith("a_b_")
    assert normalize_tool_call_id("") == "_e3b0c442"
