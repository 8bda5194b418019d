"""The relay's use of :mod:`relayd.translate`: what one route target is sent, and how its
answer is turned back into what the client asked for.

A route target is reached in one of three ways:

* as is: same API family, same model name; the client's body, path and headers go out
  unchanged and the answer comes back byte for byte (the fast path);
* renamed: same family, but the target names another upstream model; the body's
  ``model`` is replaced, and the answer's ``model`` is put back to the client's name;
* translated: the other family (OpenAI Chat Completions <-> Anthropic Messages); body,
  path and headers are translated, and so are the answer's body, stream and errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

from relayd import jsonbody
from relayd.http.headers import HeaderList, replace_header
from relayd.providers import PROVIDERS, Endpoint, IProvider
from relayd.routing import Route, RouteTarget
from relayd.translate import (
    AnthropicToOpenAIStream,
    Family,
    OpenAIToAnthropicStream,
    TranslatedRequest,
    anthropic_to_openai_request,
    anthropic_to_openai_response,
    openai_to_anthropic_request,
    openai_to_anthropic_response,
    translate_error,
)
from relayd.translate.mapping import json_bytes
from relayd.translate.responses import rename_model
from relayd.translate.streams import ModelRenamingStream


def _endpoint(family: IProvider, name: str) -> Endpoint:
    for candidate in family.endpoints:
        if candidate.name == name:
            return candidate
    raise LookupError(f"{family.name} has no endpoint {name}")


class Translator:
    """How requests of one client (family, endpoint) reach the other family, and how the
    answers come back: the only place that knows which direction is which."""

    __slots__ = ("client_family", "errors", "request", "response", "stream", "upstream",
                 "upstream_endpoint")

    def __init__(
        self,
        client_family: str,
        upstream: IProvider,
        upstream_endpoint: Endpoint,
        request: Callable[[dict[str, Any], Route, str | None], TranslatedCall],
        response: Callable[[dict[str, Any], str, int], dict[str, Any]],
        stream: Callable[[str, bool, int], StreamRewriter],
    ) -> None:
        self.client_family = client_family
        self.upstream = upstream
        self.upstream_endpoint = upstream_endpoint
        self.request = request
        self.response = response
        self.stream = stream
        # translate_error's (from, to) names
        self.errors: tuple[Family, Family] = (
            cast(Family, upstream.name), cast(Family, client_family)
        )


class TranslatedCall:
    """A translated request body, the headers it needs, and what translation dropped."""

    __slots__ = ("body", "dropped", "headers", "include_usage")

    def __init__(self, translated: TranslatedRequest,
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self.body = translated.body
        self.dropped = tuple(translated.dropped)
        self.include_usage = translated.include_usage
        self.headers = headers


def _to_anthropic(payload: dict[str, Any], route: Route, model: str | None) -> TranslatedCall:
    translated = openai_to_anthropic_request(
        payload,
        default_max_tokens=route.default_max_tokens,
        anthropic_version=route.anthropic_version,
        strict=route.strict,
        target_model=model,
    )
    return TranslatedCall(translated, ((b"anthropic-version", route.anthropic_version.encode()),))


def _to_openai(payload: dict[str, Any], route: Route, model: str | None) -> TranslatedCall:
    return TranslatedCall(anthropic_to_openai_request(
        payload,
        strict=route.strict,
        target_model=model,
        default_max_tokens=route.default_max_tokens,
    ))


def _anthropic_answer(payload: dict[str, Any], model: str, created: int) -> dict[str, Any]:
    return anthropic_to_openai_response(payload, model=model, created=created)


def _openai_answer(payload: dict[str, Any], model: str, created: int) -> dict[str, Any]:
    return openai_to_anthropic_response(payload, model=model)


def _anthropic_stream(model: str, include_usage: bool, created: int) -> StreamRewriter:
    return AnthropicToOpenAIStream(model, include_usage, created=created)


def _openai_stream(model: str, include_usage: bool, created: int) -> StreamRewriter:
    return OpenAIToAnthropicStream(model)


_ANTHROPIC, _OPENAI = PROVIDERS["anthropic"], PROVIDERS["openai"]

# (client family, client endpoint) -> how it reaches the other family. Only Chat
# Completions and Messages translate.
TRANSLATORS: dict[tuple[str, str], Translator] = {
    ("openai", "chat.completions"): Translator(
        "openai", _ANTHROPIC, _endpoint(_ANTHROPIC, "messages"),
        _to_anthropic, _anthropic_answer, _anthropic_stream,
    ),
    ("anthropic", "messages"): Translator(
        "anthropic", _OPENAI, _endpoint(_OPENAI, "chat.completions"),
        _to_openai, _openai_answer, _openai_stream,
    ),
}

# Set by the translation itself, not taken from the client.
_REPLACED_HEADERS = frozenset({b"content-type", b"accept-encoding"})


class StreamRewriter(Protocol):
    """An incremental body rewriter: upstream bytes in, client bytes out."""

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class BadUpstreamBodyError(Exception):
    """A successful upstream answer that could not be read (not a JSON object)."""


class UpstreamCall:
    """What one target is sent for one exchange, and how its answer comes back.

    ``model`` is the client's model name when the answer must be rewritten to carry it
    (renamed and translated calls), else None. ``dropped`` names the features the
    request translation left out (for the ``x-relayd-dropped`` header).
    """

    __slots__ = (
        "body",
        "dropped",
        "endpoint",
        "family",
        "headers",
        "include_usage",
        "model",
        "path",
        "translator",
    )

    def __init__(
        self,
        family: IProvider,
        endpoint: Endpoint,
        path: bytes,
        headers: HeaderList,
        body: bytes,
        *,
        model: str | None = None,
        translator: Translator | None = None,
        dropped: tuple[str, ...] = (),
        include_usage: bool = False,
    ) -> None:
        self.family = family
        self.endpoint = endpoint
        self.path = path
        self.headers = headers
        self.body = body
        self.model = model
        self.translator = translator
        self.dropped = dropped
        self.include_usage = include_usage

    @property
    def translated(self) -> bool:
        """Whether the call goes to the other API family."""
        return self.translator is not None

    @property
    def rewrites(self) -> bool:
        """Whether the answer is rewritten on its way to the client."""
        return self.model is not None

    def stream_rewriter(self, created: int) -> StreamRewriter | None:
        """A fresh rewriter for one SSE answer of this call (None: relay it as is)."""
        model = self.model
        if model is None:
            return None
        if self.translator is None:
            return ModelRenamingStream(model)
        return self.translator.stream(model, self.include_usage, created)

    def rewrite_body(self, status: int, body: bytes, created: int) -> tuple[int, bytes]:
        """The client's status and body for a complete (decoded) upstream answer.

        Raises :class:`BadUpstreamBodyError` for a successful answer that is not a JSON
        object. Errors of a renamed call pass through; a translated call's errors are
        re-shaped (and their status mapped) for the client's family.
        """
        model = self.model
        assert model is not None
        translator = self.translator
        if status >= 300:
            if translator is None:
                return status, body
            return translate_error(status, body, *translator.errors)
        try:
            payload = jsonbody.loads(body)
        except ValueError as exc:
            raise BadUpstreamBodyError(f"not JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise BadUpstreamBodyError("not a JSON object")
        if translator is None:
            if not rename_model(payload, model):
                return status, body
            return status, json_bytes(payload)
        return status, json_bytes(translator.response(payload, model, created))


def serves(target: RouteTarget, family: IProvider, endpoint: Endpoint) -> bool:
    """Whether ``target`` can take requests of ``endpoint`` (of the client's ``family``).

    Only Chat Completions and Messages translate; a target with its own model name
    needs an endpoint whose body names the model.
    """
    if target.translated:
        return (family.name, endpoint.name) in TRANSLATORS
    return target.model is None or endpoint.needs_model


def prepare_call(
    route: Route,
    target: RouteTarget,
    family: IProvider,
    endpoint: Endpoint,
    *,
    uri: bytes,
    headers: HeaderList,
    body: bytes,
    payload: dict[str, Any] | None,
    model: str | None,
) -> UpstreamCall:
    """The upstream request for ``target``; raises :class:`TranslationError` (a 400)."""
    if not target.translated:
        if target.model is None or target.model == model or payload is None:
            return UpstreamCall(family, endpoint, uri, headers, body)
        renamed = dict(payload)
        renamed["model"] = target.model
        # The answer is read whole to be renamed: no compression to undo.
        renamed_headers = replace_header(headers, b"accept-encoding", b"identity")
        body = json_bytes(renamed)
        return UpstreamCall(family, endpoint, uri, renamed_headers, body, model=model)
    assert payload is not None and model is not None
    translator = TRANSLATORS[(family.name, endpoint.name)]
    translated = translator.request(payload, route, target.model)
    foreign = family.header_prefix
    replaced = _REPLACED_HEADERS.union(name for name, _ in translated.headers)
    out = [h for h in headers if not (h[0].startswith(foreign) or h[0] in replaced)]
    out.append((b"content-type", b"application/json"))
    # The body is rewritten whole or event by event: no compression to undo.
    out.append((b"accept-encoding", b"identity"))
    out += translated.headers
    upstream_endpoint = translator.upstream_endpoint
    return UpstreamCall(
        translator.upstream,
        upstream_endpoint,
        upstream_endpoint.path,
        out,
        json_bytes(translated.body),
        model=model,
        translator=translator,
        dropped=translated.dropped,
        include_usage=translated.include_usage,
    )
