"""Request bodies: OpenAI Chat Completions <-> Anthropic Messages.

Both translators are pure: a decoded JSON body in, a :class:`TranslatedRequest` out.
Features the target API cannot express are handled per the lossy table in
:mod:`relayd.translate.mapping`: mapped, dropped (named in ``dropped``, which the relay
sends back in ``x-relayd-dropped``) or rejected with a :class:`TranslationError`. In
strict mode every drop becomes a rejection that lists all of them at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

from relayd import jsonbody
from relayd.translate.mapping import (
    OTHER_FIELDS,
    Scope,
    TranslationError,
    compact_json,
    is_legacy_anthropic_version,
    lossy_feature,
    normalize_tool_call_id,
)

JsonDict = dict[str, Any]

_DATA_URL: Final = re.compile(r"data:([^;,]+);base64,(.*)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class TranslatedRequest:
    """A translated body and what was lost on the way.

    ``dropped`` lists lossy-table names in the order they were met, each once.
    ``stream`` says whether the body asks for SSE; ``include_usage`` whether an OpenAI
    caller asked for the final usage chunk (give it to the stream translator).
    """

    body: JsonDict
    dropped: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


class _Losses:
    """Collects dropped features; raises for rejected ones and, when strict, for drops."""

    def __init__(self, scope: Scope, strict: bool) -> None:
        self.scope: Scope = scope
        self.strict = strict
        self.dropped: list[str] = []

    def drop(self, name: str) -> None:
        """Record that ``name`` (a dropped row of the lossy table, or any other field) is lost."""
        row = lossy_feature(self.scope, name)
        if row.policy != "dropped":
            raise AssertionError(f"{name!r} is not a dropped feature in {self.scope}")
        if name not in self.dropped:
            self.dropped.append(name)

    def drop_field(self, key: str) -> None:
        """Record that a field the table does not name (an ``(other fields)`` row) is lost."""
        if lossy_feature(self.scope, OTHER_FIELDS).policy != "dropped":
            raise AssertionError(f"other fields are not dropped in {self.scope}")
        if key not in self.dropped:
            self.dropped.append(key)

    def finish(self) -> list[str]:
        """The dropped names; in strict mode any drop fails the request."""
        if self.strict and self.dropped:
            raise TranslationError(
                400,
                "strict translation: cannot translate "
                + ", ".join(self.dropped)
                + " to the upstream API",
            )
        return self.dropped


def _reject(message: str) -> TranslationError:
    return TranslationError(400, message)


def _present(value: object, *neutral: object) -> bool:
    """Whether a field asks for something: not null and not one of its neutral values.

    ``False == 0`` in Python, so neutral values are compared with their type too.
    """
    if value is None:
        return False
    return not any(type(value) is type(n) and value == n for n in neutral)


def _as_dict(value: object, where: str) -> JsonDict:
    if not isinstance(value, dict):
        raise _reject(f"{where} must be an object")
    return value


def _as_list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _reject(f"{where} must be an array")
    return value


def _as_str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _reject(f"{where} must be a string")
    return value


def _as_int(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _reject(f"{where} must be an integer")
    return value


# =========================================================================================
# OpenAI -> Anthropic
# =========================================================================================

_O2A_KNOWN: Final = frozenset(
    {
        "model", "messages", "max_tokens", "max_completion_tokens", "stop", "temperature",
        "top_p", "user", "stream", "stream_options", "tools", "tool_choice",
        "parallel_tool_calls", "response_format", "reasoning_effort", "n", "logprobs",
        "top_logprobs", "logit_bias", "seed", "presence_penalty", "frequency_penalty",
        "audio", "modalities",
    }
)

_EFFORT_FOR_REASONING_EFFORT: Final = {
    "minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high",
}


def openai_to_anthropic_request(
    body: JsonDict,
    *,
    default_max_tokens: int,
    anthropic_version: str,
    strict: bool,
    target_model: str | None,
) -> TranslatedRequest:
    """Translate a Chat Completions request into a Messages request.

    ``anthropic_version`` decides what sampling knobs survive (2023-06-01 takes
    ``temperature`` clamped to 0-1 and ``top_p``; later versions reject both, so they are
    dropped) and where mid-conversation system messages go. ``target_model`` replaces the
    client's model name when given. ``default_max_tokens`` fills Anthropic's required
    ``max_tokens`` when the client set no limit.
    """
    body = _as_dict(body, "request body")
    losses = _Losses("request O->A", strict)
    legacy = is_legacy_anthropic_version(anthropic_version)
    out: JsonDict = {"model": target_model if target_model is not None else body.get("model")}

    system, messages = _o2a_messages(body.get("messages"), legacy, losses)
    if system is not None:
        out["system"] = system
    out["messages"] = messages
    out["max_tokens"] = _o2a_max_tokens(body, default_max_tokens)
    _o2a_sampling(body, out, legacy, losses)
    _o2a_tools_and_choice(body, out)
    _o2a_output_config(body, out, losses)
    _o2a_unsupported(body, losses)

    stream = body.get("stream") is True
    include_usage = False
    if stream:
        out["stream"] = True
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
    if body.get("user") is not None:
        out["metadata"] = {"user_id": _as_str(body["user"], "user")}
    for key, value in body.items():
        if key not in _O2A_KNOWN and value is not None:
            losses.drop_field(key)
    return TranslatedRequest(out, losses.finish(), stream, include_usage)


def _o2a_max_tokens(body: JsonDict, default: int) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            return _as_int(body[key], key)
    return default


def _o2a_sampling(body: JsonDict, out: JsonDict, legacy: bool, losses: _Losses) -> None:
    """temperature, top_p and stop."""
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _reject(f"{key} must be a number")
        if not legacy:
            losses.drop(key)
        elif key == "temperature":
            out[key] = min(max(value, 0), 1)
        else:
            out[key] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif stop is not None:
        out["stop_sequences"] = [_as_str(s, "stop[]") for s in _as_list(stop, "stop")]


def _o2a_unsupported(body: JsonDict, losses: _Losses) -> None:
    """The request fields Anthropic has no equivalent for."""
    n = body.get("n")
    if n is not None and n != 1:
        raise _reject("n > 1 is not supported: the upstream returns one choice")
    checks: tuple[tuple[str, tuple[object, ...]], ...] = (
        ("logprobs", (False,)),
        ("top_logprobs", (0,)),
        ("logit_bias", ({},)),
        ("seed", ()),
        ("presence_penalty", (0, 0.0)),
        ("frequency_penalty", (0, 0.0)),
        ("audio", ()),
        ("modalities", (["text"],)),
    )
    for key, neutral in checks:
        if _present(body.get(key), *neutral):
            losses.drop(key)


def _o2a_output_config(body: JsonDict, out: JsonDict, losses: _Losses) -> None:
    """response_format and reasoning_effort, which share Anthropic's ``output_config``."""
    config: JsonDict = {}
    fmt = body.get("response_format")
    if fmt is not None:
        fmt = _as_dict(fmt, "response_format")
        kind = fmt.get("type")
        if kind == "json_object":
            losses.drop("response_format.json_object")
        elif kind == "json_schema":
            spec = _as_dict(fmt.get("json_schema"), "response_format.json_schema")
            schema = _as_dict(spec.get("schema"), "response_format.json_schema.schema")
            config["format"] = {"type": "json_schema", "schema": schema}
        elif kind != "text":
            raise _reject(f"response_format type {kind!r} is not supported")
    effort = body.get("reasoning_effort")
    if effort is not None and effort != "none":
        if not isinstance(effort, str) or effort not in _EFFORT_FOR_REASONING_EFFORT:
            raise _reject(f"reasoning_effort {effort!r} is not supported")
        config["effort"] = _EFFORT_FOR_REASONING_EFFORT[effort]
    if config:
        out["output_config"] = config


# --- O->A tools ---------------------------------------------------------------------------


def _o2a_tools_and_choice(body: JsonDict, out: JsonDict) -> None:
    tools = body.get("tools")
    if tools is not None:
        out["tools"] = [_o2a_tool(t, i) for i, t in enumerate(_as_list(tools, "tools"))]
    choice = _o2a_tool_choice(body.get("tool_choice"))
    if body.get("parallel_tool_calls") is False and tools:
        if choice is None:
            choice = {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    if choice is not None:
        out["tool_choice"] = choice


def _o2a_tool(raw: object, i: int) -> JsonDict:
    tool = _as_dict(raw, f"tools[{i}]")
    if tool.get("type") != "function":
        raise _reject(f"tools[{i}]: only function tools can be translated")
    fn = _as_dict(tool.get("function"), f"tools[{i}].function")
    parameters = fn.get("parameters")
    out: JsonDict = {
        "name": _as_str(fn.get("name"), f"tools[{i}].function.name"),
        "input_schema": (
            _as_dict(parameters, f"tools[{i}].function.parameters")
            if parameters is not None
            else {"type": "object", "properties": {}}
        ),
    }
    if fn.get("description") is not None:
        out["description"] = _as_str(fn["description"], f"tools[{i}].function.description")
    if fn.get("strict") is True:
        out["strict"] = True
    return out


def _o2a_tool_choice(raw: object) -> JsonDict | None:
    if raw is None:
        return None
    simple = {"auto": "auto", "none": "none", "required": "any"}
    if isinstance(raw, str) and raw in simple:
        return {"type": simple[raw]}
    if isinstance(raw, dict) and raw.get("type") == "function":
        fn = _as_dict(raw.get("function"), "tool_choice.function")
        return {"type": "tool", "name": _as_str(fn.get("name"), "tool_choice.function.name")}
    raise _reject(f"tool_choice {compact_json(raw)} cannot be translated")


# --- O->A messages ------------------------------------------------------------------------


def _o2a_messages(
    raw: object, legacy: bool, losses: _Losses
) -> tuple[str | list[JsonDict] | None, list[JsonDict]]:
    """The top-level ``system`` and the alternating ``messages``.

    Leading system/developer messages become the system prompt; later ones are hoisted
    there too on legacy versions and kept in place as ``role:"system"`` otherwise.
    """
    items = _as_list(raw, "messages")
    system_texts: list[str] = []
    turns: list[JsonDict] = []
    for i, item in enumerate(items):
        message = _as_dict(item, f"messages[{i}]")
        if message.get("name") is not None:
            losses.drop("messages.name")
        if message.get("function_call") is not None:
            raise _reject(f"messages[{i}]: legacy function_call cannot be translated")
        role = message.get("role")
        where = f"messages[{i}]"
        if role in ("system", "developer"):
            texts = _o2a_text_parts(message.get("content"), where)
            if legacy or not turns:
                system_texts.extend(texts)
            else:
                turns.append({"role": "system", "content": _text_content(texts)})
            continue
        if role == "user":
            _append_turn(turns, "user", _o2a_user_content(message.get("content"), where, losses))
        elif role == "assistant":
            _append_turn(turns, "assistant", _o2a_assistant_content(message, where))
        elif role == "tool":
            _append_turn(turns, "user", [_o2a_tool_result(message, where)])
        else:
            raise _reject(f"{where}: role {role!r} cannot be translated")
    system = _text_content(system_texts) if system_texts else None
    return system, turns


def _append_turn(turns: list[JsonDict], role: str, content: str | list[JsonDict]) -> None:
    """Append a turn, merging it into the previous one of the same role.

    In a merged user turn the ``tool_result`` blocks go first, as Anthropic requires them
    right after the assistant's ``tool_use``.
    """
    if not turns or turns[-1]["role"] != role:
        turns.append({"role": role, "content": content})
        return
    blocks = _as_blocks(turns[-1]["content"]) + _as_blocks(content)
    if role == "user":
        results = [b for b in blocks if b.get("type") == "tool_result"]
        blocks = results + [b for b in blocks if b.get("type") != "tool_result"]
    turns[-1]["content"] = blocks


def _text_content(texts: list[str]) -> str | list[JsonDict]:
    """One text as a string, several as text blocks (so their boundaries survive)."""
    if len(texts) == 1:
        return texts[0]
    return [{"type": "text", "text": text} for text in texts]


def _as_blocks(content: str | list[JsonDict]) -> list[JsonDict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return list(content)


def _o2a_text_parts(content: object, where: str) -> list[str]:
    """The texts of a content that may hold only text (system, developer, tool)."""
    if isinstance(content, str):
        return [content]
    texts = []
    for j, part in enumerate(_as_list(content, f"{where}.content")):
        part = _as_dict(part, f"{where}.content[{j}]")
        if part.get("type") != "text":
            raise _reject(f"{where}.content[{j}]: only text parts are allowed here")
        texts.append(_as_str(part.get("text"), f"{where}.content[{j}].text"))
    return texts


def _o2a_user_content(content: object, where: str, losses: _Losses) -> str | list[JsonDict]:
    if isinstance(content, str):
        return content
    blocks = []
    for j, part in enumerate(_as_list(content, f"{where}.content")):
        part_where = f"{where}.content[{j}]"
        part = _as_dict(part, part_where)
        kind = part.get("type")
        if kind == "text":
            blocks.append({"type": "text", "text": _as_str(part.get("text"), part_where)})
        elif kind == "image_url":
            blocks.append(_o2a_image(part.get("image_url"), part_where, losses))
        else:
            raise _reject(f"{part_where}: content part type {kind!r} cannot be translated")
    return blocks


def _o2a_image(raw: object, where: str, losses: _Losses) -> JsonDict:
    image = _as_dict(raw, f"{where}.image_url")
    url = _as_str(image.get("url"), f"{where}.image_url.url")
    if _present(image.get("detail"), "auto"):
        losses.drop("image_url.detail")
    match = _DATA_URL.fullmatch(url)
    if match is not None:
        source = {"type": "base64", "media_type": match.group(1), "data": match.group(2)}
    elif url.startswith(("http://", "https://")):
        source = {"type": "url", "url": url}
    else:
        raise _reject(f"{where}: image URLs must be base64 data: URLs or http(s) URLs")
    return {"type": "image", "source": source}


def _o2a_assistant_content(message: JsonDict, where: str) -> str | list[JsonDict]:
    content = message.get("content")
    calls = message.get("tool_calls")
    refusal = message.get("refusal")
    if isinstance(content, str) and not calls and refusal is None:
        return content
    blocks: list[JsonDict] = []
    if isinstance(content, str):
        blocks.extend(_as_blocks(content))
    elif content is not None:
        for j, part in enumerate(_as_list(content, f"{where}.content")):
            part = _as_dict(part, f"{where}.content[{j}]")
            kind = part.get("type")
            if kind not in ("text", "refusal"):
                raise _reject(f"{where}.content[{j}]: part type {kind!r} cannot be translated")
            text = _as_str(part.get(kind), f"{where}.content[{j}].{kind}")
            blocks.extend(_as_blocks(text))
    if isinstance(refusal, str):
        blocks.extend(_as_blocks(refusal))
    if calls is not None:
        for k, call in enumerate(_as_list(calls, f"{where}.tool_calls")):
            blocks.append(_o2a_tool_use(call, f"{where}.tool_calls[{k}]"))
    return blocks if blocks else ""


def _o2a_tool_use(raw: object, where: str) -> JsonDict:
    call = _as_dict(raw, where)
    if call.get("type", "function") != "function":
        raise _reject(f"{where}: only function tool calls can be translated")
    fn = _as_dict(call.get("function"), f"{where}.function")
    return {
        "type": "tool_use",
        "id": normalize_tool_call_id(_as_str(call.get("id"), f"{where}.id")),
        "name": _as_str(fn.get("name"), f"{where}.function.name"),
        "input": parse_tool_arguments(fn.get("arguments"), f"{where}.function.arguments"),
    }


def parse_tool_arguments(raw: object, where: str) -> JsonDict:
    """A tool call's ``arguments`` (a JSON string, empty meaning none) as an object."""
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        value = jsonbody.loads(_as_str(raw, where))
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise _reject(f"{where} must be a JSON object")
    return value


def _o2a_tool_result(message: JsonDict, where: str) -> JsonDict:
    call_id = _as_str(message.get("tool_call_id"), f"{where}.tool_call_id")
    content = message.get("content")
    result: JsonDict = {"type": "tool_result", "tool_use_id": normalize_tool_call_id(call_id)}
    if isinstance(content, str):
        result["content"] = content
    elif content is None:
        result["content"] = ""
    else:
        texts = _o2a_text_parts(content, where)
        result["content"] = [{"type": "text", "text": text} for text in texts]
    return result


# =========================================================================================
# Anthropic -> OpenAI
# =========================================================================================

_A2O_KNOWN: Final = frozenset(
    {
        "model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p",
        "top_k", "metadata", "stream", "tools", "tool_choice", "thinking", "output_config",
        "cache_control",
    }
)

_REASONING_EFFORT_FOR_EFFORT: Final = {
    "low": "low", "medium": "medium", "high": "high", "max": "high",
}


def anthropic_to_openai_request(
    body: JsonDict,
    *,
    strict: bool,
    target_model: str | None,
    default_max_tokens: int | None = None,
) -> TranslatedRequest:
    """Translate a Messages request into a Chat Completions request.

    ``max_tokens`` is required by Anthropic, so ``default_max_tokens`` only matters for
    bodies that lack it; None leaves the limit to the upstream. A streaming request always
    asks the upstream for ``include_usage`` so the relay can account for it
    (``TranslatedRequest.include_usage`` stays False: Anthropic callers get usage in
    ``message_delta`` anyway).
    """
    body = _as_dict(body, "request body")
    losses = _Losses("request A->O", strict)
    out: JsonDict = {"model": target_model if target_model is not None else body.get("model")}
    out["messages"] = _a2o_system(body.get("system"), losses) + _a2o_messages(
        body.get("messages"), losses
    )
    if body.get("max_tokens") is not None:
        out["max_completion_tokens"] = _as_int(body["max_tokens"], "max_tokens")
    elif default_max_tokens is not None:
        out["max_completion_tokens"] = default_max_tokens
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("top_k") is not None:
        losses.drop("top_k")
    if body.get("cache_control") is not None:
        losses.drop("cache_control")
    if body.get("stop_sequences") is not None:
        sequences = _as_list(body["stop_sequences"], "stop_sequences")
        out["stop"] = [_as_str(s, "stop_sequences[]") for s in sequences]
    _a2o_metadata(body.get("metadata"), out, losses)
    _a2o_tools_and_choice(body, out, losses)
    _a2o_reasoning_and_format(body, out, losses)
    stream = body.get("stream") is True
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    for key, value in body.items():
        if key not in _A2O_KNOWN and value is not None:
            losses.drop_field(key)
    return TranslatedRequest(out, losses.finish(), stream, False)


def _a2o_metadata(raw: object, out: JsonDict, losses: _Losses) -> None:
    if raw is None:
        return
    for key, value in _as_dict(raw, "metadata").items():
        if key == "user_id":
            if value is not None:
                out["user"] = _as_str(value, "metadata.user_id")
        elif value is not None:
            losses.drop_field(f"metadata.{key}")


def _a2o_reasoning_and_format(body: JsonDict, out: JsonDict, losses: _Losses) -> None:
    """thinking and output_config (effort, format)."""
    effort = _a2o_thinking(body.get("thinking"))
    config = body.get("output_config")
    if config is not None:
        for key, value in _as_dict(config, "output_config").items():
            if value is None:
                continue
            if key == "effort":
                if not isinstance(value, str) or value not in _REASONING_EFFORT_FOR_EFFORT:
                    raise _reject(f"output_config.effort {value!r} is not supported")
                effort = _REASONING_EFFORT_FOR_EFFORT[value]
            elif key == "format":
                out["response_format"] = _a2o_format(value)
            else:
                losses.drop_field(f"output_config.{key}")
    if effort is not None:
        out["reasoning_effort"] = effort


def _a2o_thinking(raw: object) -> str | None:
    if raw is None:
        return None
    thinking = _as_dict(raw, "thinking")
    kind = thinking.get("type")
    if kind == "disabled":
        return None
    if kind == "adaptive":
        return "medium"
    if kind == "enabled":
        budget = _as_int(thinking.get("budget_tokens"), "thinking.budget_tokens")
        return "low" if budget < 4096 else "medium" if budget < 16384 else "high"
    raise _reject(f"thinking type {kind!r} is not supported")


def _a2o_format(raw: object) -> JsonDict:
    fmt = _as_dict(raw, "output_config.format")
    if fmt.get("type") != "json_schema":
        raise _reject(f"output_config.format type {fmt.get('type')!r} is not supported")
    schema = _as_dict(fmt.get("schema"), "output_config.format.schema")
    return {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": schema, "strict": True},
    }


# --- A->O tools ---------------------------------------------------------------------------


def _a2o_tools_and_choice(body: JsonDict, out: JsonDict, losses: _Losses) -> None:
    tools = body.get("tools")
    if tools is not None:
        out["tools"] = [_a2o_tool(t, i, losses) for i, t in enumerate(_as_list(tools, "tools"))]
    raw = body.get("tool_choice")
    if raw is None:
        return
    choice = _as_dict(raw, "tool_choice")
    kind = choice.get("type")
    simple = {"auto": "auto", "any": "required", "none": "none"}
    if isinstance(kind, str) and kind in simple:
        out["tool_choice"] = simple[kind]
    elif kind == "tool":
        name = _as_str(choice.get("name"), "tool_choice.name")
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise _reject(f"tool_choice type {kind!r} cannot be translated")
    if choice.get("disable_parallel_tool_use") is True and tools:
        out["parallel_tool_calls"] = False


def _a2o_tool(raw: object, i: int, losses: _Losses) -> JsonDict:
    tool = _as_dict(raw, f"tools[{i}]")
    if tool.get("type") not in (None, "custom"):
        raise _reject(f"tools[{i}]: server tool {tool.get('type')!r} cannot be translated")
    if tool.get("cache_control") is not None:
        losses.drop("cache_control")
    fn: JsonDict = {"name": _as_str(tool.get("name"), f"tools[{i}].name")}
    if tool.get("description") is not None:
        fn["description"] = _as_str(tool["description"], f"tools[{i}].description")
    fn["parameters"] = _as_dict(tool.get("input_schema"), f"tools[{i}].input_schema")
    if tool.get("strict") is True:
        fn["strict"] = True
    return {"type": "function", "function": fn}


# --- A->O messages ------------------------------------------------------------------------


def _a2o_system(raw: object, losses: _Losses) -> list[JsonDict]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [{"role": "system", "content": raw}]
    parts = []
    for j, block in enumerate(_as_list(raw, "system")):
        block = _as_dict(block, f"system[{j}]")
        if block.get("type") != "text":
            raise _reject(f"system[{j}]: only text blocks can be translated")
        if block.get("cache_control") is not None:
            losses.drop("cache_control")
        parts.append({"type": "text", "text": _as_str(block.get("text"), f"system[{j}].text")})
    return [{"role": "system", "content": parts}] if parts else []


def _a2o_messages(raw: object, losses: _Losses) -> list[JsonDict]:
    out: list[JsonDict] = []
    for i, item in enumerate(_as_list(raw, "messages")):
        where = f"messages[{i}]"
        message = _as_dict(item, where)
        role = message.get("role")
        content = message.get("content")
        if role == "user":
            out.extend(_a2o_user(content, where, losses))
        elif role == "assistant":
            out.append(_a2o_assistant(content, where, losses))
        elif role == "system":
            out.append({"role": "system", "content": _a2o_text_only(content, where, losses)})
        else:
            raise _reject(f"{where}: role {role!r} cannot be translated")
    return out


def _blocks_of(content: object, where: str) -> list[JsonDict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [
        _as_dict(block, f"{where}.content[{j}]")
        for j, block in enumerate(_as_list(content, f"{where}.content"))
    ]


def _a2o_text_block(block: JsonDict, where: str, losses: _Losses) -> str:
    if block.get("cache_control") is not None:
        losses.drop("cache_control")
    if block.get("citations"):
        losses.drop("citations")
    return _as_str(block.get("text"), f"{where}.text")


def _a2o_text_only(content: object, where: str, losses: _Losses) -> str | list[JsonDict]:
    if isinstance(content, str):
        return content
    parts = []
    for j, block in enumerate(_blocks_of(content, where)):
        if block.get("type") != "text":
            raise _reject(f"{where}.content[{j}]: only text blocks are allowed here")
        parts.append({"type": "text", "text": _a2o_text_block(block, where, losses)})
    return parts


def _a2o_user(content: object, where: str, losses: _Losses) -> list[JsonDict]:
    """A user turn: its ``tool_result`` blocks as tool messages, then the rest as one user."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tool_messages: list[JsonDict] = []
    parts: list[JsonDict] = []
    for j, block in enumerate(_blocks_of(content, where)):
        block_where = f"{where}.content[{j}]"
        kind = block.get("type")
        if kind == "tool_result":
            tool_messages.append(_a2o_tool_result(block, block_where, losses))
        elif kind == "text":
            parts.append({"type": "text", "text": _a2o_text_block(block, block_where, losses)})
        elif kind == "image":
            parts.append(_a2o_image(block, block_where, losses))
        else:
            raise _reject(f"{block_where}: block type {kind!r} cannot be translated")
    if parts or not tool_messages:
        return [*tool_messages, {"role": "user", "content": parts}]
    return tool_messages


def _a2o_image(block: JsonDict, where: str, losses: _Losses) -> JsonDict:
    if block.get("cache_control") is not None:
        losses.drop("cache_control")
    source = _as_dict(block.get("source"), f"{where}.source")
    kind = source.get("type")
    if kind == "base64":
        media_type = _as_str(source.get("media_type"), f"{where}.source.media_type")
        data = _as_str(source.get("data"), f"{where}.source.data")
        url = f"data:{media_type};base64,{data}"
    elif kind == "url":
        url = _as_str(source.get("url"), f"{where}.source.url")
    else:
        raise _reject(f"{where}: image source type {kind!r} cannot be translated")
    return {"type": "image_url", "image_url": {"url": url}}


def _a2o_tool_result(block: JsonDict, where: str, losses: _Losses) -> JsonDict:
    if block.get("cache_control") is not None:
        losses.drop("cache_control")
    if block.get("is_error") is True:
        losses.drop("tool_result.is_error")
    content = block.get("content")
    message: JsonDict = {
        "role": "tool",
        "tool_call_id": _as_str(block.get("tool_use_id"), f"{where}.tool_use_id"),
    }
    if content is None or isinstance(content, str):
        message["content"] = content or ""
        return message
    parts = []
    for j, inner in enumerate(_blocks_of(content, where)):
        kind = inner.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _a2o_text_block(inner, where, losses)})
        elif kind == "image":
            losses.drop("tool_result.image")
        else:
            raise _reject(f"{where}.content[{j}]: block type {kind!r} cannot be translated")
    message["content"] = parts
    return message


def _a2o_assistant(content: object, where: str, losses: _Losses) -> JsonDict:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[JsonDict] = []
    for j, block in enumerate(_blocks_of(content, where)):
        block_where = f"{where}.content[{j}]"
        kind = block.get("type")
        if kind == "text":
            texts.append(_a2o_text_block(block, block_where, losses))
        elif kind == "tool_use":
            calls.append(_a2o_tool_call(block, block_where, losses))
        elif kind in ("thinking", "redacted_thinking"):
            losses.drop("thinking_blocks")
        else:
            raise _reject(f"{block_where}: block type {kind!r} cannot be translated")
    message: JsonDict = {"role": "assistant"}
    if len(texts) == 1:
        message["content"] = texts[0]
    elif texts:
        message["content"] = [{"type": "text", "text": text} for text in texts]
    else:
        message["content"] = None if calls else ""
    if calls:
        message["tool_calls"] = calls
    return message


def _a2o_tool_call(block: JsonDict, where: str, losses: _Losses) -> JsonDict:
    if block.get("cache_control") is not None:
        losses.drop("cache_control")
    return {
        "id": _as_str(block.get("id"), f"{where}.id"),
        "type": "function",
        "function": {
            "name": _as_str(block.get("name"), f"{where}.name"),
            "arguments": compact_json(_as_dict(block.get("input", {}), f"{where}.input")),
        },
    }
