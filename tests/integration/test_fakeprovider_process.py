"""The fake upstream as a process (``python -m relayd.testing.fakeprovider``) on a real port.

The official SDKs must parse everything it answers, the CLI flags must work as the
tests, the benchmarks, the demo and the Debian package tests use them, and it must
stop cleanly on SIGTERM.  The behaviour itself is unit-tested in memory
(tests/unit/test_fakeprovider.py).
"""

from __future__ import annotations

import json
import ssl
from http.client import HTTPSConnection
from typing import Any, cast

import anthropic
import openai
import pytest

from relayd.testing.certs import TestCertificates
from relayd.testing.fakeprovider import input_tokens_for, reply_text
from relayd.testing.processes import FakeUpstreamProcess, ProcessGroup

REPLY = reply_text(5)
ANTHROPIC_BODY: dict[str, Any] = {
    "model": "claude-test-1",
    "max_tokens": 256,
    "messages": [{"role": "user", "content": "Say hello"}],
}
CHAT_BODY: dict[str, Any] = {
    "model": "gpt-test-1",
    "messages": [{"role": "user", "content": "Say hello"}],
}
#: Claude Code's Bash tool, as it offers it.
BASH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "command": {"type": "string"},
        "timeout": {"type": "number"},
        "description": {"type": "string"},
    },
    "required": ["command"],
    "additionalProperties": False,
}
BASH_INPUT = {"command": "echo fake-upstream"}
ANTHROPIC_TOOL_BODY: dict[str, Any] = dict(
    ANTHROPIC_BODY, tools=[{"name": "Bash", "description": "Run", "input_schema": BASH_SCHEMA}]
)
CHAT_TOOL_BODY: dict[str, Any] = dict(
    CHAT_BODY,
    tools=[
        {
            "type": "function",
            "function": {"name": "Bash", "parameters": BASH_SCHEMA, "strict": True},
        }
    ],
)


@pytest.fixture
def fake(processes: ProcessGroup) -> FakeUpstreamProcess:
    return processes.upstream("fake")


def anthropic_client(fake: FakeUpstreamProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="k", base_url=fake.url, max_retries=0)


def openai_client(fake: FakeUpstreamProcess) -> openai.OpenAI:
    return openai.OpenAI(api_key="k", base_url=fake.url + "/v1", max_retries=0)


def test_anthropic_sdk_parses_every_endpoint(fake: FakeUpstreamProcess) -> None:
    with anthropic_client(fake) as client:
        message = client.messages.create(**ANTHROPIC_BODY)
        counted = client.messages.count_tokens(model="m", messages=ANTHROPIC_BODY["messages"])
        models = [m.id for m in client.models.list()]
        batch = client.messages.batches.create(
            requests=[{"custom_id": "x", "params": cast(Any, ANTHROPIC_BODY)}]
        )
        fetched = client.messages.batches.retrieve(batch.id)
        results = [r.custom_id for r in client.messages.batches.results(batch.id)]
        with pytest.raises(anthropic.APIStatusError) as error:
            client.messages.create(**ANTHROPIC_BODY, extra_headers={"x-fake-status": "529"})
        with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
            with client.messages.stream(
                **ANTHROPIC_BODY, extra_headers={"x-fake-stream-error": "1"}
            ) as stream:
                list(stream)
    assert message.content[0].type == "text" and message.content[0].text == REPLY
    assert message.usage.output_tokens == 5
    assert counted.input_tokens > 0
    assert len(models) == 3
    assert fetched.processing_status == "ended" and results == ["x"]
    assert error.value.status_code == 529


def test_anthropic_sdk_stream_usage_is_the_messages(fake: FakeUpstreamProcess) -> None:
    """message_delta repeats the cumulative input and cache counts: the SDK's final usage
    is the fake's counts, not their sum."""
    with anthropic_client(fake) as client:
        with client.messages.stream(**ANTHROPIC_BODY) as stream:
            streamed = "".join(stream.text_stream)
            final = stream.get_final_message()
    recorded = fake.requests()
    assert len(recorded) == 1
    assert streamed == REPLY
    assert final.stop_reason == "end_turn"
    usage = final.usage
    assert usage.input_tokens == input_tokens_for(recorded[0]["body"].encode())
    assert (usage.output_tokens, usage.cache_creation_input_tokens) == (5, 7)
    assert usage.cache_read_input_tokens == 11


def test_openai_sdk_parses_every_endpoint(fake: FakeUpstreamProcess) -> None:
    with openai_client(fake) as client:
        chat = client.chat.completions.create(**CHAT_BODY)
        completion = client.completions.create(model="m", prompt="x")
        embedded = client.embeddings.create(model="e", input=["a", "b"])  # base64 by default
        response = client.responses.create(model="m", input="hi")
        with client.responses.stream(model="m", input="hi") as rstream:
            final = rstream.get_final_response()
        models = [m.id for m in client.models.list()]
        chunks = list(
            client.chat.completions.create(
                **CHAT_BODY, stream=True, stream_options={"include_usage": True}
            )
        )
        with pytest.raises(openai.RateLimitError) as error:
            client.chat.completions.create(**CHAT_BODY, extra_headers={"x-fake-status": "429"})
    assert chat.choices[0].message.content == REPLY
    assert completion.choices[0].text == REPLY
    assert [len(e.embedding) for e in embedded.data] == [16, 16]
    assert response.output_text == REPLY
    assert final.output_text == REPLY
    assert final.usage is not None and final.usage.output_tokens == 5
    assert "gpt-4o" in models
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == 5
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 11
    assert error.value.status_code == 429


def test_sdks_parse_tool_calls_with_schema_valid_inputs(fake: FakeUpstreamProcess) -> None:
    with anthropic_client(fake) as client:
        message = client.messages.create(**ANTHROPIC_TOOL_BODY)
        with client.messages.stream(**ANTHROPIC_TOOL_BODY) as stream:
            streamed = stream.get_final_message()
    with openai_client(fake) as oai:
        completion = oai.chat.completions.create(**CHAT_TOOL_BODY)
        with oai.chat.completions.stream(
            **CHAT_TOOL_BODY, stream_options={"include_usage": True}
        ) as ostream:
            done = ostream.get_final_completion()
    expected_tool = {"type": "tool_use", "name": "Bash", "input": BASH_INPUT}
    for final in (message, streamed):
        text, tool = (block.to_dict() for block in final.content)
        assert (text["type"], text["text"]) == ("text", REPLY)
        assert {key: tool[key] for key in expected_tool} == expected_tool
        assert final.stop_reason == "tool_use" and final.usage.output_tokens == 6
    calls = completion.choices[0].message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("Bash", BASH_INPUT)
    ]
    choice = done.choices[0]
    parsed = [c.function.parsed_arguments for c in choice.message.tool_calls or []]
    assert parsed == [BASH_INPUT]  # the SDK checked them against the strict schema
    assert choice.finish_reason == "tool_calls" and choice.message.content == REPLY
    assert done.usage is not None and done.usage.completion_tokens == 6


# ------------------------------------------------------------------------------ CLI


def test_cli_announces_its_address_and_stops_on_sigterm(processes: ProcessGroup) -> None:
    fake = processes.upstream("cli")
    with anthropic_client(fake) as client:
        assert client.messages.create(**ANTHROPIC_BODY).content[0].type == "text"
    assert fake.stop() == 0
    # Quiet by default: the address line and nothing else (no traceback, no access log).
    assert fake.log_path.read_text() == f"fake-upstream listening on {fake.url}\n"


def test_cli_config_sets_the_baseline_and_verbose_logs_requests(
    processes: ProcessGroup,
) -> None:
    fake = processes.upstream(
        "configured", extra_args=("--config", json.dumps({"chunks": 3}), "--verbose")
    )
    with anthropic_client(fake) as client:
        assert client.messages.create(**ANTHROPIC_BODY).content[0].text == reply_text(3)
        fake.configure()  # {} goes back to the --config baseline, not the built-in 5
        assert client.messages.create(**ANTHROPIC_BODY).content[0].text == reply_text(3)
    assert fake.stop() == 0
    log = fake.log_path.read_text()
    assert f"fake-upstream listening on {fake.url}" in log.splitlines()
    assert log.count('"POST /v1/messages HTTP/1.1" 200') == 2  # the access log


def test_cli_serves_tls(
    processes: ProcessGroup, certs: TestCertificates, ca_context: ssl.SSLContext
) -> None:
    fake = processes.upstream("tls", tls=(str(certs.chain), str(certs.key)))
    connection = HTTPSConnection("127.0.0.1", fake.port, context=ca_context, timeout=10)
    try:
        connection.request("GET", "/_fake/health")
        response = connection.getresponse()
        status, body = response.status, json.loads(response.read())
    finally:
        connection.close()
    assert (status, body) == (200, {"ok": True})
    assert fake.stop() == 0
    assert (
        fake.log_path.read_text() == f"fake-upstream listening on https://127.0.0.1:{fake.port}\n"
    )
