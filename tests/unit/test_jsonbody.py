"""relayd.jsonbody: a whole parse that fails only with ValueError, and the read of a
trailing top-level member (the usage of an Anthropic answer) without the whole parse."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from relayd import jsonbody
from relayd.jsonbody import MISSING, trailing_member
from relayd.providers.anthropic import AnthropicProvider
from relayd.providers.base import Usage

USAGE = {"input_tokens": 21, "output_tokens": 5, "cache_read_input_tokens": 11}


def whole(data: bytes) -> Any:
    """What a whole parse says the top-level ``usage`` is (MISSING when it has none)."""
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        return MISSING
    if not isinstance(payload, dict) or "usage" not in payload:
        return MISSING
    return payload["usage"]


@pytest.mark.parametrize(
    "data",
    [
        json.dumps({"id": "msg_1", "content": [{"type": "text", "text": "hi"}],
                    "usage": USAGE}).encode(),
        json.dumps({"id": "msg_1", "usage": USAGE}, separators=(",", ":")).encode(),
        json.dumps({"id": "msg_1", "usage": USAGE}, indent=2).encode() + b"\n",
        b'{"usage":{"input_tokens":1}}',
        b'{"usage":{"input_tokens":1} } \r\n',
        b'{"usage":7}',
        # a tool's input with its own "usage" comes first; the answer's own usage is last
        json.dumps({"content": [{"type": "tool_use", "input": {"usage": {"x": 1}}}],
                    "usage": USAGE}).encode(),
        # a string value that ends in a backslash, then the member
        b'{"text":"C:\\\\","usage":{"input_tokens":2}}',
    ],
)
def test_a_trailing_usage_is_read_as_the_whole_parse_reads_it(data: bytes) -> None:
    assert whole(data) is not MISSING
    assert trailing_member(data, b"usage") == whole(data)


@pytest.mark.parametrize(
    "data",
    [
        # not last: another member follows it (OpenAI's order)
        b'{"usage":{"prompt_tokens":2},"system_fingerprint":"fp"}',
        # only nested ones
        b'{"content":[{"type":"tool_use","input":{"usage":{"a":1}}}]}',
        b'{"a":{"usage":1}}',
        # inside a string the quotes are escaped
        b'{"text":"say \\"usage\\":{\\"input_tokens\\":1}}"}',
        # a key that ends in an escaped quote and usage
        b'{"a\\"usage":{"input_tokens":1}}',
        # no object around it, or more than one closing brace
        b'"usage":{}}',
        b'{"usage":{"input_tokens":1}}}',
        # a space before the colon: left to the whole parse
        b'{"usage" :{"input_tokens":1}}',
        # broken or too deep values
        b'{"usage":{"input_tokens":}}',
        b'{"usage":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"usage":{"x":"\xff"}}',
        # only JSON's whitespace may follow: json.loads refuses these
        b'{"usage":{"input_tokens":5}}\x1c',
        b'{"usage":{"input_tokens":5}\x0c}',
        '{"usage":{"input_tokens":5}\u00a0}'.encode(),
        b"",
        b"usage",
    ],
)
def test_anything_else_is_left_to_the_whole_parse(data: bytes) -> None:
    assert trailing_member(data, b"usage") is MISSING


def _value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.randrange(-5, 10_000)
    if kind == 1:
        return rng.choice(["", "usage", '"usage":{}', "\\", 'x\\"usage\\":', "}", "é"])
    if kind == 2:
        return rng.choice([None, True, 1.5])
    if kind == 3:
        return rng.choice(["usage", "text"])
    if kind == 4:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {rng.choice(["usage", "input", "text", 'a"usage', "usage\\"]): _value(rng, depth + 1)
            for _ in range(rng.randrange(3))}


def test_it_never_disagrees_with_the_whole_parse_on_generated_documents() -> None:
    """Whenever the fast read gives a value, the whole parse gives the same one."""
    rng = random.Random(13)
    fast = 0
    for _ in range(3000):
        document = {key: _value(rng, 1) for key in rng.sample(["id", "content", "usage", "x"], 3)}
        data = json.dumps(document, ensure_ascii=rng.random() < 0.5,
                          separators=rng.choice([(",", ":"), (", ", ": ")])).encode()
        found = trailing_member(data, b"usage")
        if found is not MISSING:
            fast += 1
            assert found == whole(data), data
    assert fast > 300  # the fast read was taken often enough for this to mean something


def test_anthropic_usage_is_the_same_by_either_read() -> None:
    provider = AnthropicProvider()
    last = json.dumps({"id": "m", "usage": USAGE}).encode()
    first = json.dumps({"usage": USAGE, "id": "m"}).encode()
    by_fast, by_whole = provider.usage_from_json(last), provider.usage_from_json(first)
    assert by_fast is not None and by_whole is not None
    assert by_fast == by_whole == Usage(input_tokens=21, output_tokens=5, cache_read_tokens=11)
    assert provider.usage_from_json(b'{"id":"m"}') is None
    assert provider.usage_from_json(b"not json") is None


def test_loads_turns_deep_nesting_into_a_value_error() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        jsonbody.loads(b"[" * 100_000 + b"]" * 100_000)
