"""Property tests: translating there and back keeps everything the lossy table calls lossless.

Requests are generated from the lossless subset of each API, translated in strict mode
(so any drop would fail the test) to the other family and back, and compared in a
canonical form that forgets only what the table says is mapped approximately (tool-call
id normalisation, system/developer role names, turn merging, ``max_tokens`` spelling,
argument JSON spacing, the json_schema name). Responses and streams are checked the same
way, and each stream translator is compared with the JSON translator over random splits.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.sse import SseParser
from relayd.translate import (
    AnthropicToOpenAIStream,
    OpenAIToAnthropicStream,
    anthropic_to_openai_request,
    anthropic_to_openai_response,
    normalize_tool_call_id,
    openai_to_anthropic_request,
    openai_to_anthropic_response,
)

JsonDict = dict[str, Any]
Draw = Callable[[st.SearchStrategy[Any]], Any]
DEFAULT_MAX = 4096
PROPERTY = settings(max_examples=200, deadline=None)

# --- strategies ---------------------------------------------------------------------------

texts = st.text(min_size=1, max_size=12)
ID_ALPHABET = "abcXYZ019_-"
names = st.text(ID_ALPHABET, min_size=1, max_size=16)
anthropic_ids = st.text(ID_ALPHABET, min_size=1, max_size=12)
json_scalars = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=6,
)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=4)
schemas = st.fixed_dictionaries(
    {"type": st.just("object"),
     "properties": st.dictionaries(names, st.just({"type": "string"}), max_size=3)}
)
media_types = st.sampled_from(["image/png", "image/jpeg", "image/gif", "image/webp"])
base64_data = st.builds(lambda body, pad: body + pad, st.text("AZaz09+/", max_size=16),
                        st.sampled_from(["", "=", "=="]))
http_urls = st.builds(lambda path: f"https://img.test/{path}.png", names)
unit_floats = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


# OpenAI side


@st.composite
def openai_image_parts(draw: st.DrawFn) -> JsonDict:
    if draw(st.booleans()):
        url = f"data:{draw(media_types)};base64,{draw(base64_data)}"
    else:
        url = draw(http_urls)
    return {"type": "image_url", "image_url": {"url": url}}


openai_text_parts = st.builds(lambda t: {"type": "text", "text": t}, texts)
openai_user_content = texts | st.lists(openai_text_parts | openai_image_parts(), min_size=1,
                                       max_size=3)


@st.composite
def openai_tool_calls(draw: st.DrawFn, counter: list[int]) -> list[JsonDict]:
    calls = []
    for _ in range(draw(st.integers(1, 3))):
        counter[0] += 1
        prefix = draw(st.text(max_size=6))  # any characters: ids are normalised on the way
        arguments = draw(json_objects)
        indent = draw(st.sampled_from([None, 2]))
        calls.append({
            "id": f"{prefix}{counter[0]}",
            "type": "function",
            "function": {"name": draw(names), "arguments": json.dumps(arguments, indent=indent)},
        })
    return calls


@st.composite
def openai_conversations(draw: st.DrawFn) -> list[JsonDict]:
    messages: list[JsonDict] = []
    for _ in range(draw(st.integers(0, 2))):
        role = draw(st.sampled_from(["system", "developer"]))
        content = draw(texts | st.lists(openai_text_parts, min_size=1, max_size=2))
        messages.append({"role": role, "content": content})
    counter = [0]
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(openai_user_content)})
        if draw(st.booleans()):
            messages.append({"role": "assistant", "content": draw(texts)})
            continue
        calls = draw(openai_tool_calls(counter))
        said = draw(st.none() | texts | st.lists(openai_text_parts, min_size=2, max_size=2))
        messages.append({"role": "assistant", "content": said, "tool_calls": calls})
        for call in calls:
            result = draw(st.text(max_size=8) | st.lists(openai_text_parts, min_size=1,
                                                         max_size=2))
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        if draw(st.booleans()):
            messages.append({"role": "user", "content": draw(openai_user_content)})
    return messages


@st.composite
def openai_tools(draw: st.DrawFn) -> list[JsonDict]:
    tools = []
    for name in draw(st.lists(names, min_size=1, max_size=3, unique=True)):
        fn: JsonDict = {"name": name}
        if draw(st.booleans()):
            fn["description"] = draw(texts)
        if draw(st.booleans()):
            fn["parameters"] = draw(schemas)
        if draw(st.booleans()):
            fn["strict"] = draw(st.booleans())
        tools.append({"type": "function", "function": fn})
    return tools


@st.composite
def openai_requests(draw: st.DrawFn) -> JsonDict:
    body: JsonDict = {"model": draw(names), "messages": draw(openai_conversations())}
    optional: dict[str, st.SearchStrategy[Any]] = {
        "max_tokens": st.integers(1, 100_000),
        "max_completion_tokens": st.integers(1, 100_000),
        "temperature": unit_floats,
        "top_p": unit_floats,
        "stop": texts | st.lists(texts, min_size=1, max_size=4),
        "user": texts,
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "reasoning_effort": st.sampled_from(["low", "medium", "high"]),
        "response_format": st.builds(
            lambda schema: {"type": "json_schema",
                            "json_schema": {"name": "response", "schema": schema,
                                            "strict": True}},
            schemas,
        ),
        "n": st.just(1),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    if draw(st.booleans()):
        tools = draw(openai_tools())
        body["tools"] = tools
        choices = ["auto", "none", "required",
                   {"type": "function", "function": {"name": tools[0]["function"]["name"]}}]
        if draw(st.booleans()):
            body["tool_choice"] = draw(st.sampled_from(choices))
        if draw(st.booleans()):
            body["parallel_tool_calls"] = draw(st.booleans())
    return body


# Anthropic side


@st.composite
def anthropic_images(draw: st.DrawFn) -> JsonDict:
    if draw(st.booleans()):
        source = {"type": "base64", "media_type": draw(media_types), "data": draw(base64_data)}
    else:
        source = {"type": "url", "url": draw(http_urls)}
    return {"type": "image", "source": source}


anthropic_text_blocks = st.builds(lambda t: {"type": "text", "text": t}, texts)


@st.composite
def anthropic_conversations(draw: st.DrawFn) -> list[JsonDict]:
    messages: list[JsonDict] = []
    pending: list[str] = []
    used: set[str] = set()
    for turn in range(draw(st.integers(1, 3))):
        results: list[JsonDict] = []
        for tool_id in pending:
            block: JsonDict = {"type": "tool_result", "tool_use_id": tool_id}
            content = draw(st.none() | st.text(max_size=8)
                           | st.lists(anthropic_text_blocks, min_size=1, max_size=2))
            if content is not None:
                block["content"] = content
            results.append(block)
        rest = draw(st.lists(anthropic_text_blocks | anthropic_images(), max_size=2,
                             min_size=0 if results else 1))
        if not results and draw(st.booleans()):
            messages.append({"role": "user", "content": draw(texts)})
        else:
            messages.append({"role": "user", "content": results + rest})
        if turn and not draw(st.booleans()):
            break
        tool_ids = draw(st.lists(anthropic_ids.filter(lambda i: i not in used), max_size=2,
                                 unique=True))
        used.update(tool_ids)
        if not tool_ids and draw(st.booleans()):
            messages.append({"role": "assistant", "content": draw(texts)})
        else:
            blocks = draw(st.lists(anthropic_text_blocks, min_size=0 if tool_ids else 1,
                                   max_size=2))
            blocks += [{"type": "tool_use", "id": tool_id, "name": draw(names),
                        "input": draw(json_objects)} for tool_id in tool_ids]
            messages.append({"role": "assistant", "content": blocks})
        pending = tool_ids
    return messages


@st.composite
def anthropic_requests(draw: st.DrawFn) -> JsonDict:
    body: JsonDict = {
        "model": draw(names),
        "max_tokens": draw(st.integers(1, 100_000)),
        "messages": draw(anthropic_conversations()),
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "system": texts | st.lists(anthropic_text_blocks, min_size=1, max_size=3),
        "temperature": unit_floats,
        "top_p": unit_floats,
        "stop_sequences": st.lists(texts, min_size=1, max_size=4),
        "metadata": st.builds(lambda u: {"user_id": u}, texts),
        "stream": st.booleans(),
        "output_config": st.fixed_dictionaries(
            {},
            optional={
                "effort": st.sampled_from(["low", "medium", "high"]),
                "format": st.builds(lambda s: {"type": "json_schema", "schema": s}, schemas),
            },
        ),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    if draw(st.booleans()):
        tools = []
        for name in draw(st.lists(names, min_size=1, max_size=3, unique=True)):
            tool: JsonDict = {"name": name, "input_schema": draw(schemas)}
            if draw(st.booleans()):
                tool["description"] = draw(texts)
            if draw(st.booleans()):
                tool["strict"] = True
            tools.append(tool)
        body["tools"] = tools
        if draw(st.booleans()):
            choice: JsonDict = draw(st.sampled_from(
                [{"type": "auto"}, {"type": "any"}, {"type": "none"},
                 {"type": "tool", "name": tools[0]["name"]}]))
            if choice["type"] != "none" and draw(st.booleans()):
                choice = {**choice, "disable_parallel_tool_use": draw(st.booleans())}
            body["tool_choice"] = choice
    return body


# --- canonical forms ----------------------------------------------------------------------


def o_texts(content: Any) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content] if content else []
    return [part["text"] for part in content if part["text"]]


def o_user_parts(content: Any) -> list[tuple[str, str]]:
    if isinstance(content, str):
        return [("text", content)]
    return [("text", p["text"]) if p["type"] == "text" else ("image", p["image_url"]["url"])
            for p in content]


def canon_openai(body: JsonDict) -> JsonDict:
    """What a Chat request means, minus what the table maps approximately."""
    system: list[str] = []
    turns: list[Any] = []
    for message in body["messages"]:
        role = message["role"]
        if role in ("system", "developer"):
            system.extend(o_texts(message["content"]))
        elif role == "user":
            parts = o_user_parts(message["content"])
            if turns and turns[-1][0] == "user":
                turns[-1][1].extend(parts)
            else:
                turns.append(("user", parts))
        elif role == "assistant":
            calls = [(normalize_tool_call_id(c["id"]), c["function"]["name"],
                      json.loads(c["function"]["arguments"] or "{}"))
                     for c in message.get("tool_calls") or []]
            turns.append(("assistant", o_texts(message["content"]), calls))
        else:
            turns.append(("tool", normalize_tool_call_id(message["tool_call_id"]),
                          message["content"]))
    tools = body.get("tools")
    choice = body.get("tool_choice")
    # With tool_choice none no tool is called, so "not in parallel" says nothing.
    parallel_off = body.get("parallel_tool_calls") is False and bool(tools) and choice != "none"
    if choice is None and parallel_off:
        choice = "auto"
    fmt = body.get("response_format")
    stop = body.get("stop")
    return {
        "system": system,
        "turns": turns,
        "max_tokens": body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX)),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "stop": [stop] if isinstance(stop, str) else stop,
        "user": body.get("user"),
        "stream": body.get("stream") is True,
        "reasoning_effort": body.get("reasoning_effort"),
        "schema": fmt["json_schema"]["schema"] if fmt else None,
        "tools": [
            (t["function"]["name"], t["function"].get("description"),
             t["function"].get("parameters") or {"type": "object", "properties": {}},
             t["function"].get("strict") is True)
            for t in tools or []
        ],
        "tool_choice": choice,
        "parallel_off": parallel_off,
    }


def a_blocks(content: Any) -> list[JsonDict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def canon_anthropic(body: JsonDict) -> JsonDict:
    """What a Messages request means, minus what the table maps approximately."""
    system = body.get("system")
    turns: list[Any] = []
    for message in body["messages"]:
        blocks = a_blocks(message["content"])
        if message["role"] == "user":
            results = [(b["tool_use_id"], b.get("content") or "") for b in blocks
                       if b["type"] == "tool_result"]
            rest = [b for b in blocks if b["type"] != "tool_result"]
            turns.append(("user", results, rest))
        else:
            turns.append((
                "assistant",
                [b["text"] for b in blocks if b["type"] == "text"],
                [(b["id"], b["name"], b["input"]) for b in blocks if b["type"] == "tool_use"],
            ))
    choice = body.get("tool_choice")
    if choice is not None and not choice.get("disable_parallel_tool_use"):
        choice = {k: v for k, v in choice.items() if k != "disable_parallel_tool_use"}
    return {
        "system": [] if system is None else [b["text"] for b in a_blocks(system)],
        "turns": turns,
        **{key: body.get(key) for key in ("max_tokens", "temperature", "top_p",
                                           "stop_sequences", "metadata", "tools")},
        "output_config": body.get("output_config") or None,
        "stream": body.get("stream") is True,
        "tool_choice": choice,
    }


# --- request round trips ------------------------------------------------------------------


@PROPERTY
@given(openai_requests())
def test_openai_request_round_trip(body: JsonDict) -> None:
    there = openai_to_anthropic_request(
        body, default_max_tokens=DEFAULT_MAX, anthropic_version="2023-06-01", strict=True,
        target_model=None,
    )
    back = anthropic_to_openai_request(there.body, strict=True, target_model=None)
    assert there.dropped == back.dropped == []
    assert back.body["model"] == body["model"]
    assert canon_openai(back.body) == canon_openai(body)
    stream = body.get("stream") is True
    assert there.include_usage == (stream and body.get("stream_options") == {"include_usage": True})
    assert back.body.get("stream_options") == ({"include_usage": True} if stream else None)


@PROPERTY
@given(anthropic_requests())
def test_anthropic_request_round_trip(body: JsonDict) -> None:
    there = anthropic_to_openai_request(body, strict=True, target_model=None)
    back = openai_to_anthropic_request(
        there.body, default_max_tokens=1, anthropic_version="2023-06-01", strict=True,
        target_model=None,
    )
    assert there.dropped == back.dropped == []
    assert back.body["model"] == body["model"]
    assert canon_anthropic(back.body) == canon_anthropic(body)


@PROPERTY
@given(openai_requests())
def test_translated_anthropic_requests_alternate_with_tool_results_first(body: JsonDict) -> None:
    result = openai_to_anthropic_request(
        body, default_max_tokens=DEFAULT_MAX, anthropic_version="2023-06-01", strict=False,
        target_model="t",
    )
    roles = [m["role"] for m in result.body["messages"]]
    assert all(a != b for a, b in itertools.pairwise(roles))
    assert roles[0] == "user"
    for message in result.body["messages"]:
        kinds = [b["type"] for b in a_blocks(message["content"])]
        assert kinds == sorted(kinds, key=lambda kind: kind != "tool_result")
        for block in a_blocks(message["content"]):
            for key in ("id", "tool_use_id"):
                if key in block:
                    assert block[key] == normalize_tool_call_id(block[key])


# --- responses ----------------------------------------------------------------------------

usages = st.fixed_dictionaries({
    "input_tokens": st.integers(0, 10**6),
    "output_tokens": st.integers(0, 10**6),
    "cache_creation_input_tokens": st.integers(0, 10**6),
    "cache_read_input_tokens": st.integers(0, 10**6),
})


@st.composite
def anthropic_messages(draw: st.DrawFn) -> JsonDict:
    content: list[JsonDict] = draw(st.lists(anthropic_text_blocks, max_size=3))
    ids = draw(st.lists(anthropic_ids, max_size=3, unique=True))
    content += [{"type": "tool_use", "id": i, "name": draw(names), "input": draw(json_objects)}
                for i in ids]
    stop = "tool_use" if ids else draw(st.sampled_from(["end_turn", "max_tokens", "refusal"]))
    return {
        "id": "msg_" + draw(anthropic_ids),
        "type": "message",
        "role": "assistant",
        "model": "upstream-model",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": draw(usages),
    }


def canon_message(message: JsonDict) -> JsonDict:
    """An Anthropic message with its text blocks joined into one (OpenAI has one string)."""
    text = "".join(b["text"] for b in message["content"] if b["type"] == "text")
    tools = [b for b in message["content"] if b["type"] == "tool_use"]
    return {**message, "model": "client", "content": ([{"type": "text", "text": text}]
                                                      if text else []) + tools}


@PROPERTY
@given(anthropic_messages())
def test_anthropic_response_round_trip(message: JsonDict) -> None:
    openai = anthropic_to_openai_response(message, model="client")
    assert openai_to_anthropic_response(openai, model="client") == canon_message(message)


@PROPERTY
@given(anthropic_messages())
def test_openai_response_round_trip(message: JsonDict) -> None:
    openai = anthropic_to_openai_response(message, model="client")
    again = anthropic_to_openai_response(
        openai_to_anthropic_response(openai, model="client"), model="client"
    )
    assert again == openai


# --- streams ------------------------------------------------------------------------------


def sse(name: str, payload: JsonDict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()


@st.composite
def anthropic_streams(draw: st.DrawFn, message: JsonDict) -> bytes:
    """The SSE stream an Anthropic upstream would send for ``message``."""
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None,
             "usage": {**usage, "output_tokens": 1}}
    events = [sse("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(message["content"]):
        if draw(st.booleans()):
            events.append(sse("ping", {"type": "ping"}))
        if block["type"] == "text":
            opening: JsonDict = {"type": "text", "text": ""}
            whole, kind, field = block["text"], "text_delta", "text"
        else:
            opening = {**block, "input": {}}
            whole = json.dumps(block["input"], separators=(",", ":"), ensure_ascii=False)
            kind, field = "input_json_delta", "partial_json"
        events.append(sse("content_block_start", {"type": "content_block_start",
                                                  "index": index, "content_block": opening}))
        for piece in split_text(draw, whole):
            events.append(sse("content_block_delta", {"type": "content_block_delta",
                                                      "index": index,
                                                      "delta": {"type": kind, field: piece}}))
        events.append(sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(sse("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
        "usage": {"output_tokens": usage["output_tokens"]},
    }))
    events.append(sse("message_stop", {"type": "message_stop"}))
    return b"".join(events)


def split_text(draw: Draw, text: str) -> list[str]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=4))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def split_bytes(draw: Draw, data: bytes) -> list[bytes]:
    if draw(st.booleans()):
        return [data[i:i + 1] for i in range(len(data))]
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=30))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def accumulate_openai(stream: bytes) -> JsonDict:
    """Rebuild a chat.completion from chunks the way the OpenAI SDK does."""
    parser = SseParser()
    content: list[str] = []
    calls: dict[int, JsonDict] = {}
    result: JsonDict = {"finish_reason": None, "usage": None, "done": False}
    for event in parser.feed(stream):
        assert event.event is None and not result["done"]
        if event.data == b"[DONE]":
            result["done"] = True
            continue
        chunk = json.loads(event.data)
        result["id"] = chunk["id"]
        if chunk.get("usage"):
            result["usage"] = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if delta.get("content"):
                content.append(delta["content"])
            for call in delta.get("tool_calls", []):
                slot = calls.setdefault(call["index"], {"arguments": ""})
                if "id" in call:
                    slot.update(id=call["id"], name=call["function"]["name"])
                slot["arguments"] += call["function"]["arguments"]
            if choice["finish_reason"]:
                result["finish_reason"] = choice["finish_reason"]
    assert sorted(calls) == list(range(len(calls)))
    result["content"] = "".join(content) or None
    result["tool_calls"] = [calls[k] for k in sorted(calls)]
    return result


def accumulate_anthropic(stream: bytes) -> JsonDict:
    """Rebuild a message from events the way the Anthropic SDK does (``content[index]``)."""
    message: JsonDict = {}
    partial: dict[int, str] = {}
    done = False
    for event in SseParser().feed(stream):
        payload = json.loads(event.data)
        assert event.event is not None and event.event.decode() == payload["type"]
        assert not done
        kind = payload["type"]
        if kind == "message_start":
            message = payload["message"]
        elif kind == "content_block_start":
            assert payload["index"] == len(message["content"])
            message["content"].append(payload["content_block"])
        elif kind == "content_block_delta":
            block, delta = message["content"][payload["index"]], payload["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            else:
                partial[payload["index"]] = partial.get(payload["index"], "") + delta[
                    "partial_json"]
        elif kind == "content_block_stop":
            if payload["index"] in partial:
                message["content"][payload["index"]]["input"] = json.loads(
                    partial[payload["index"]])
        elif kind == "message_delta":
            message.update(payload["delta"])
            message["usage"].update(payload["usage"])
        elif kind == "message_stop":
            done = True
    assert done
    return message


@PROPERTY
@given(st.data(), anthropic_messages(), st.booleans())
def test_anthropic_stream_matches_the_json_translation(
    data: st.DataObject, message: JsonDict, include_usage: bool
) -> None:
    stream = data.draw(anthropic_streams(message))
    translator = AnthropicToOpenAIStream("client", include_usage)
    out = b"".join(translator.feed(p) for p in split_bytes(data.draw, stream))
    out += translator.finish()
    expected = anthropic_to_openai_response(message, model="client")
    choice = expected["choices"][0]
    rebuilt = accumulate_openai(out)
    assert rebuilt["done"]
    assert rebuilt["id"] == expected["id"]
    assert rebuilt["content"] == choice["message"]["content"]
    assert rebuilt["tool_calls"] == [
        {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for c in choice["message"].get("tool_calls", [])
    ]
    assert rebuilt["finish_reason"] == choice["finish_reason"]
    assert rebuilt["usage"] == (expected["usage"] if include_usage else None)
    assert openai_to_anthropic_response(expected, model="client")["usage"] == message["usage"]


@PROPERTY
@given(st.data(), anthropic_messages())
def test_stream_there_and_back_rebuilds_the_message(
    data: st.DataObject, message: JsonDict
) -> None:
    stream = data.draw(anthropic_streams(message))
    there = AnthropicToOpenAIStream("client", True)
    openai = b"".join(there.feed(p) for p in split_bytes(data.draw, stream)) + there.finish()
    back = OpenAIToAnthropicStream("client")
    anthropic = b"".join(back.feed(p) for p in split_bytes(data.draw, openai)) + back.finish()
    assert accumulate_anthropic(anthropic) == canon_message(message)
    assert there.usage == back.usage
    assert (there.complete, back.complete, there.failed, back.failed) == (True, True, False,
                                                                          False)
