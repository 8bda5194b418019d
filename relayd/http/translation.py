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

from typing import Any, Protocol

from twisted.web.http_headers import Headers

from relayd import jsonbody
from relayd.providers import PROVIDERS, Endpoint, IProvider
from relayd.routing import Route, RouteTarget
from relayd.translate import (
    AnthropicToOpenAIStream,
    Family,
    OpenAIToAnthropicStream,
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


# (client family, client endpoint) -> the other family and its endpoint, found once.
_TRANSLATED_ENDPOINTS: dict[tuple[str, str], tuple[IProvider, Endpoint]] = {
    ("openai", "chat.completions"): (
        PROVIDERS["anthropic"],
        _endpoint(PROVIDERS["anthropic"], "messages"),
    ),
    ("anthropic", "messages"): (
        PROVIDERS["openai"],
        _endpoint(PROVIDERS["openai"], "chat.completions"),
    ),
}

# Request headers of one family that mean nothing to the other (API versions, betas,
# organisations): not sent to a translated target.
_FAMILY_HEADER_PREFIXES = {"anthropic": b"anthropic-", "openai": b"openai-"}

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
        "translated",
    )

    def __init__(
        self,
        family: IProvider,
        endpoint: Endpoint,
        path: bytes,
        headers: Headers,
        body: bytes,
        *,
        model: str | None = None,
        translated: bool = False,
        dropped: tuple[str, ...] = (),
        include_usage: bool = False,
    ) -> None:
        self.family = family
        self.endpoint = endpoint
        self.path = path
        self.headers = headers
        self.body = body
        self.model = model
        self.translated = translated
        self.dropped = dropped
        self.include_usage = include_usage

    @property
    def rewrites(self) -> bool:
        """Whether the answer is rewritten on its way to the client."""
        return self.model is not None

    def stream_rewriter(self, created: int) -> StreamRewriter | None:
        """A fresh rewriter for one SSE answer of this call (None: relay it as is)."""
        model = self.model
        if model is None:
            return None
        if not self.translated:
            return ModelRenamingStream(model)
        if self.family.name == "anthropic":
            return AnthropicToOpenAIStream(model, self.include_usage, created=created)
        return OpenAIToAnthropicStream(model)

    def rewrite_body(self, status: int, body: bytes, created: int) -> tuple[int, bytes]:
        """The client's status and body for a complete (decoded) upstream answer.

        Raises :class:`BadUpstreamBodyError` for a successful answer that is not a JSON
        object. Errors of a renamed call pass through; a translated call's errors are
        re-shaped (and their status mapped) for the client's family.
        """
        model = self.model
        assert model is not None
        if status >= 300:
            if not self.translated:
                return status, body
            upstream: Family = "anthropic" if self.family.name == "anthropic" else "openai"
            client: Family = "openai" if upstream == "anthropic" else "anthropic"
            return translate_error(status, body, upstream, client)
        try:
            payload = jsonbody.loads(body)
        except ValueError as exc:
            raise BadUpstreamBodyError(f"not JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise BadUpstreamBodyError("not a JSON object")
        out: dict[str, Any]
        if not self.translated:
            if not rename_model(payload, model):
                return status, body
            out = payload
        elif self.family.name == "anthropic":
            out = anthropic_to_openai_response(payload, model=model, created=created)
        else:
            out = openai_to_anthropic_response(payload, model=model)
        return status, json_bytes(out)


def serves(target: RouteTarget, family: IProvider, endpoint: Endpoint) -> bool:
    """Whether ``target`` can take requests of ``endpoint`` (of the client's ``family``).

    Only Chat Completions and Messages translate; a target with its own model name
    needs an endpoint whose body names the model.
    """
    if target.translated:
        return (family.name, endpoint.name) in _TRANSLATED_ENDPOINTS
    return target.model is None or endpoint.needs_model


def prepare_call(
    route: Route,
    target: RouteTarget,
    family: IProvider,
    endpoint: Endpoint,
    *,
    uri: bytes,
    headers: Headers,
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
        renamed_headers = headers.copy()
        renamed_headers.setRawHeaders(b"accept-encoding", [b"identity"])
        body = json_bytes(renamed)
        return UpstreamCall(family, endpoint, uri, renamed_headers, body, model=model)
    assert payload is not None and model is not None
    upstream, upstream_endpoint = _TRANSLATED_ENDPOINTS[(family.name, endpoint.name)]
    if upstream.name == "anthropic":
        translated = openai_to_anthropic_request(
            payload,
            default_max_tokens=route.default_max_tokens,
            anthropic_version=route.anthropic_version,
            strict=route.strict,
            target_model=target.model,
        )
    else:
        translated = anthropic_to_openai_request(
            payload,
            strict=route.strict,
            target_model=target.model,
            default_max_tokens=route.default_max_tokens,
        )
    out = Headers()
    foreign = _FAMILY_HEADER_PREFIXES[family.name]
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower.startswith(foreign) or lower in _REPLACED_HEADERS:
            continue
        out.setRawHeaders(name, values)
    out.setRawHeaders(b"content-type", [b"application/json"])
    # The body is rewritten whole or event by event: no compression to undo.
    out.setRawHeaders(b"accept-encoding", [b"identity"])
    if upstream.name == "anthropic":
        out.setRawHeaders(b"anthropic-version", [route.anthropic_version.encode()])
    return UpstreamCall(
        upstream,
        upstream_endpoint,
        upstream_endpoint.path,
        out,
        json_bytes(translated.body),
        model=model,
        translated=True,
        dropped=tuple(translated.dropped),
        include_usage=translated.include_usage,
    )
