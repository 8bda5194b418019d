"""Intake: who is calling, with what body, for which model.

The first stage of an exchange after the endpoint is known. It reads the client's relay
key, the request body (within the relay's limit) and the model the request names (from
the body, the path, or every request of a batch, as the endpoint says), and checks the
model against the client's allowlist. What it finds is a :class:`ClientCall`; what it
refuses is a :class:`~relayd.errors.Refusal` in the caller's error shape.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import unquote

from twisted.web.http import Request
from twisted.web.http_headers import Headers

from relayd import jsonbody
from relayd.errors import Refusal
from relayd.http.body import BoundedBody
from relayd.providers import MODEL_ID, Endpoint, ModelIn
from relayd.runtime import Client


class ClientCall:
    """What the client asked for: its identity, body and model.

    ``payload`` is the parsed JSON body where the endpoint names the model there;
    ``batch_models`` the models inside a batch create; ``upstream_uri`` the path the
    upstream gets when it is not the client's verbatim (a model id made canonical).
    """

    __slots__ = ("batch_models", "body", "client", "model", "payload", "stream", "upstream_uri")

    def __init__(self, client: Client, body: bytes) -> None:
        self.client = client
        self.body = body
        self.model: str | None = None
        self.payload: dict[str, Any] | None = None
        self.stream = False
        self.batch_models: list[str] | None = None
        self.upstream_uri: bytes | None = None


def parse_client_call(
    request: Request,
    endpoint: Endpoint,
    clients: dict[bytes, Client],
    max_body_bytes: int,
) -> ClientCall:
    """Authenticate the caller, read its body and find its model; raises :class:`Refusal`."""
    if request.method not in endpoint.methods:
        allowed = b", ".join(sorted(endpoint.methods))
        raise Refusal(
            405,
            f"method {printable(request.method)} not allowed on {printable(request.path)}; "
            f"use {allowed.decode()}",
            headers=((b"allow", allowed),),
        )
    call = ClientCall(authenticate(request.requestHeaders, clients),
                      read_body(request, max_body_bytes))
    source = endpoint.model_in
    if source == ModelIn.BODY:
        _model_from_body(call)
    elif source == ModelIn.PATH:
        _model_from_path(call, request)
    elif source == ModelIn.BATCH and endpoint.object_role(request.method) == "create":
        call.batch_models = _batch_models(call.body)
        if call.batch_models is None:
            raise Refusal(400, "requests: expected a list of {custom_id, params} objects")
        for model in call.batch_models:
            _check_allowed(call.client, model)
    if call.model is not None:
        _check_allowed(call.client, call.model)
    return call


def authenticate(headers: Headers, clients: dict[bytes, Client]) -> Client:
    """The client whose relay key the request carries (``x-api-key`` or a bearer token)."""
    key = None
    raw = headers.getRawHeaders(b"x-api-key")
    if raw:
        key = raw[0].strip()
    else:
        raw = headers.getRawHeaders(b"authorization")
        if raw and raw[0][:7].lower() == b"bearer ":
            key = raw[0][7:].strip()
    if not key:
        raise Refusal(401, "missing relay key: send it as x-api-key or Authorization: Bearer")
    # The table is keyed by SHA-256 digests: lookup time depends on the digest of what
    # the caller sent, never on how much of a real key it guessed.
    client = clients.get(hashlib.sha256(key).digest())
    if client is None:
        raise Refusal(401, "invalid relay key")
    return client


def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The request body, refused with a 413 past the relay's limit."""
    content = request.content
    if isinstance(content, BoundedBody):
        if content.overflowed:
            raise Refusal(413, f"request body exceeds the relay's limit of {content.limit} bytes")
        return content.getvalue()
    if content is None:
        return b""
    content.seek(0)
    data: bytes = content.read()
    if len(data) > max_body_bytes:
        raise Refusal(413, f"request body exceeds the relay's limit of {max_body_bytes} bytes")
    return data


def _model_from_body(call: ClientCall) -> None:
    try:
        payload = jsonbody.loads(call.body)
    except ValueError as exc:
        raise Refusal(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise Refusal(400, "request body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise Refusal(400, "model: field required (a non-empty string)")
    call.model = model
    call.payload = payload
    call.stream = payload.get("stream") is True


def _model_from_path(call: ClientCall, request: Request) -> None:
    head, _, last = request.path.rpartition(b"/")
    model = unquote(last.decode("utf-8", "replace"))
    if not MODEL_ID.fullmatch(model):
        # e.g. ..%2F..%2Fadmin: never forwarded with relayd's key
        raise Refusal(400, f"not a model id: {model[:200]!r}")
    call.model = model
    # Upstream, the id goes as the canonical path (nothing left to decode there).
    query = request.uri.partition(b"?")[2]
    call.upstream_uri = head + b"/" + model.encode() + (b"?" + query if query else b"")


def _check_allowed(client: Client, model: str) -> None:
    if not client.allows(model):
        raise Refusal(403, f"client {client.name!r} may not use model {model!r}")


def _batch_models(body: bytes) -> list[str] | None:
    """The models of a Message Batches create body, or None when it is malformed."""
    try:
        payload = jsonbody.loads(body)
    except ValueError:
        return None
    requests = payload.get("requests") if isinstance(payload, dict) else None
    if not isinstance(requests, list):
        return None
    models: list[str] = []
    for item in requests:
        params = item.get("params") if isinstance(item, dict) else None
        model = params.get("model") if isinstance(params, dict) else None
        if not isinstance(model, str):
            return None
        models.append(model)
    return models


def printable(raw: bytes) -> str:
    """Client-supplied bytes, safe to echo in an error message or the access log."""
    return raw[:200].decode("ascii", "backslashreplace")
