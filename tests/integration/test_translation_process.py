"""Either API, either provider: the official SDKs through a real relay that translates.

A real ``twistd -n relayd`` (TLS listener, certificates made for the test run) sits
between the official ``openai`` and ``anthropic`` SDKs and two fake upstream processes,
one configured as an Anthropic-type provider and one as an OpenAI-type provider. Every
check is on what the SDK parsed and what the fake upstream received.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from support import CLIENT_KEY, UPSTREAM_KEYS, backend, relay_config

from relayd.testing.certs import TestCertificates
from relayd.testing.fakeprovider import input_tokens_for, reply_text
from relayd.testing.processes import FakeUpstreamProcess, RelaydProcess

# A 1x1 transparent PNG.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
    )
).decode()

WEATHER_OPENAI: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
WEATHER_ANTHROPIC: Any = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": WEATHER_OPENAI["function"]["parameters"],
}
FAKE_INPUT = {"city": "fake"}  # what the fake upstream calls the tool with (the required part)
# The fake's default cache counts: Anthropic reports both, OpenAI only the cached reads.
CACHE_WRITE, CACHE_READ = 7, 11


@dataclass
class Setup:
    relay: RelaydProcess
    claude_up: FakeUpstreamProcess  # behind the Anthropic-type provider
    gpt_up: FakeUpstreamProcess  # behind the OpenAI-type provider
    ca: ssl.SSLContext

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=CLIENT_KEY,
            base_url=self.relay.url("https") + "/v1",
            http_client=httpx2.Client(verify=self.ca),
            max_retries=0,
        )

    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            api_key=CLIENT_KEY,
            base_url=self.relay.url("https"),
            http_client=httpx2.Client(verify=self.ca),
            max_retries=0,
        )


@pytest.fixture
def setup(
    certs: TestCertificates,
    ca_context: ssl.SSLContext,
    upstream_factory: Callable[[str], FakeUpstreamProcess],
    relayd_factory: Callable[..., RelaydProcess],
) -> Iterator[Setup]:
    claude_up, gpt_up = upstream_factory("a1"), upstream_factory("o1")
    dual = [
        {"provider": "anthropic", "model": "claude-sonnet-4-5"},
        {"provider": "openai", "model": "gpt-5"},
    ]
    config = relay_config(
        certs,
        [backend("a1", claude_up, health={"enabled": False})],
        [backend("o1", gpt_up, health={"enabled": False})],
        routes=[
            {"api": "openai", "models": ["claude-*"], "provider": "anthropic"},
            {"api": "anthropic", "models": ["gpt-*"], "provider": "openai"},
            {"api": "anthropic", "models": ["smart"], "targets": dual},
            {"api": "openai", "models": ["smart"], "targets": dual},
        ],
        failover={"max_attempts": 3, "retry_budget_ratio": 1.0},
    )
    yield Setup(relayd_factory(config), claude_up, gpt_up, ca_context)


def only_request(upstream: FakeUpstreamProcess) -> dict[str, Any]:
    (recorded,) = upstream.requests()
    return recorded


def test_openai_sdk_chat_with_tools_served_by_anthropic(setup: Setup) -> None:
    client = setup.openai()
    messages: list[Any] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    completion = client.chat.completions.create(
        model="claude-sonnet-4-5", messages=messages, tools=[WEATHER_OPENAI], max_tokens=64
    )
    choice = completion.choices[0]
    assert completion.model == "claude-sonnet-4-5"
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == reply_text(5)
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == FAKE_INPUT  # type: ignore[union-attr]

    sent = only_request(setup.claude_up)
    assert sent["path"] == "/v1/messages"
    assert sent["headers"]["x-api-key"] == [UPSTREAM_KEYS["a1"]]
    assert sent["headers"]["anthropic-version"] == ["2023-06-01"]
    assert "authorization" not in sent["headers"]
    assert CLIENT_KEY not in json.dumps(sent["headers"])
    body = json.loads(sent["body"])
    assert body["system"] == "You are terse."
    assert body["tools"] == [WEATHER_ANTHROPIC]
    assert body["max_tokens"] == 64
    # Usage: the fake's count for the body it received, in OpenAI's arithmetic.
    assert completion.usage is not None
    uncached = input_tokens_for(sent["body"].encode())
    assert completion.usage.prompt_tokens == uncached + CACHE_WRITE + CACHE_READ
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == CACHE_READ
    assert completion.usage.completion_tokens == 6  # five text chunks and the tool call

    # The second turn carries the tool result back; the fake answers in text.
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"},
    ]
    final = client.chat.completions.create(
        model="claude-sonnet-4-5", messages=messages, tools=[WEATHER_OPENAI], max_tokens=64
    )
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.tool_calls is None
    second = json.loads(setup.claude_up.requests()[-1]["body"])
    assert second["messages"][-2]["content"][-1]["type"] == "tool_use"
    result = second["messages"][-1]["content"][0]
    assert result["type"] == "tool_result"
    assert result["tool_use_id"] == second["messages"][-2]["content"][-1]["id"]


def test_openai_sdk_streams_tool_calls_and_usage_from_anthropic(setup: Setup) -> None:
    client = setup.openai()
    stream = client.chat.completions.create(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER_OPENAI],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = ""
    arguments = ""
    names = []
    finish = None
    for chunk in chunks:
        assert chunk.model == "claude-sonnet-4-5"
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for call in delta.tool_calls or []:
            assert call.index == 0
            if call.function and call.function.name:
                names.append(call.function.name)
            if call.function and call.function.arguments:
                arguments += call.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert text == reply_text(5)
    assert names == ["get_weather"]
    assert json.loads(arguments) == FAKE_INPUT
    assert finish == "tool_calls"
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    sent = only_request(setup.claude_up)
    assert json.loads(sent["body"])["stream"] is True
    uncached = input_tokens_for(sent["body"].encode())
    assert usage.prompt_tokens == uncached + CACHE_WRITE + CACHE_READ
    assert usage.completion_tokens == 6


def test_anthropic_sdk_tools_and_images_served_by_openai(setup: Setup) -> None:
    client = setup.anthropic()
    message = client.messages.create(
        model="gpt-5",
        max_tokens=64,
        system="You are terse.",
        tools=[WEATHER_ANTHROPIC],
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
                    {"type": "text", "text": "Where is this? And the weather there?"},
                ],
            }
        ],
    )
    assert message.model == "gpt-5"
    assert message.stop_reason == "tool_use"
    text, tool = message.content
    assert text.type == "text" and text.text == reply_text(5)
    assert tool.type == "tool_use"
    assert tool.name == "get_weather" and tool.input == FAKE_INPUT
    sent = only_request(setup.gpt_up)
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["authorization"] == [f"Bearer {UPSTREAM_KEYS['o1']}"]
    assert "anthropic-version" not in sent["headers"]
    body = json.loads(sent["body"])
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    parts = body["messages"][1]["content"]
    assert parts[0] == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
    assert parts[1] == {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}
    assert body["tools"][0]["function"]["name"] == "get_weather"
    assert body["max_completion_tokens"] == 64
    assert message.usage.input_tokens == input_tokens_for(sent["body"].encode())
    assert message.usage.cache_read_input_tokens == CACHE_READ
    assert message.usage.output_tokens == 6


def test_anthropic_sdk_stream_accumulates_a_translated_openai_stream(setup: Setup) -> None:
    client = setup.anthropic()
    with client.messages.stream(
        model="gpt-5",
        max_tokens=64,
        tools=[WEATHER_ANTHROPIC],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == reply_text(5)
    assert final.model == "gpt-5"
    assert final.stop_reason == "tool_use"
    text, tool = final.content
    assert text.type == "text" and text.text == reply_text(5)
    assert tool.type == "tool_use" and tool.input == FAKE_INPUT
    sent = only_request(setup.gpt_up)
    body = json.loads(sent["body"])
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert final.usage.input_tokens == input_tokens_for(sent["body"].encode())
    assert final.usage.cache_read_input_tokens == CACHE_READ
    assert final.usage.output_tokens == 6


def test_anthropic_overloaded_falls_back_to_openai_invisibly(setup: Setup) -> None:
    setup.claude_up.configure(status=529)
    client = setup.anthropic()
    message = client.messages.create(
        model="smart", max_tokens=64, messages=[{"role": "user", "content": "Hello"}]
    )
    assert message.model == "smart"
    assert message.content[0].type == "text" and message.content[0].text == reply_text(5)
    with client.messages.stream(
        model="smart", max_tokens=64, messages=[{"role": "user", "content": "Hello"}]
    ) as stream:
        streamed = "".join(stream.text_stream)
    assert streamed == reply_text(5)
    tried = setup.claude_up.requests()
    assert [json.loads(r["body"])["model"] for r in tried] == ["claude-sonnet-4-5"] * 2
    served = setup.gpt_up.requests()
    assert [json.loads(r["body"])["model"] for r in served] == ["gpt-5"] * 2
    assert [r["path"] for r in served] == ["/v1/chat/completions"] * 2

    # An OpenAI client of the same route falls back to its own family, renamed.
    completion = setup.openai().chat.completions.create(
        model="smart", messages=[{"role": "user", "content": "Hello"}]
    )
    assert completion.model == "smart"
    assert completion.choices[0].message.content == reply_text(5)
    assert json.loads(setup.gpt_up.requests()[-1]["body"])["model"] == "gpt-5"


def test_strict_and_dropped_features_reach_the_sdk(setup: Setup) -> None:
    client = setup.openai()
    raw = client.chat.completions.with_raw_response.create(
        model="claude-sonnet-4-5",
        messages=[{"role": "user", "content": "Hi"}],
        logprobs=True,
        seed=7,
    )
    assert raw.headers["x-relayd-dropped"] == "logprobs, seed"
    assert raw.parse().choices[0].message.content == reply_text(5)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "Hi"}], n=2
        )
    assert info.value.status_code == 400
    assert "x-relayd-request-id" in info.value.response.headers
