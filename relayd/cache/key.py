"""The cache key of a request: what makes two requests ask for the same answer.

A SHA-256 digest over, each part length-prefixed so no two lists of parts collide:

* the client's API family and endpoint;
* the route's targets as sent upstream (provider, and model after renaming), in order;
* the client's name, unless the route shares its entries (``scope: shared``);
* the request headers of the client's family that change an answer (the API version,
  beta features: ``IProvider.answer_headers``) and ``accept-encoding``;
* the canonical JSON of the body without its ``model`` (the targets name it): keys
  sorted, no whitespace, so key order and formatting do not matter.

Neither the relay key nor any upstream key is part of it: the client is named, never
its secret.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.web.http_headers import Headers

__all__ = ["cache_key", "canonical_body", "samples"]

_VERSION = b"relayd-cache-1"


def canonical_body(payload: dict[str, Any]) -> bytes:
    """The body's fields but ``model``, as canonical JSON."""
    fields = {name: value for name, value in payload.items() if name != "model"}
    return json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def cache_key(
    *,
    family: str,
    endpoint: str,
    targets: Sequence[tuple[str, str]],
    client: str | None,
    headers: Headers,
    answer_headers: Iterable[bytes],
    payload: dict[str, Any],
) -> str:
    """The hex digest naming the answer to this request (``client`` None: shared)."""
    digest = hashlib.sha256()

    def part(value: bytes) -> None:
        digest.update(len(value).to_bytes(8, "big"))
        digest.update(value)

    part(_VERSION)
    part(family.encode())
    part(endpoint.encode())
    part(b"%d" % len(targets))
    for provider, model in targets:
        part(provider.encode())
        part(model.encode())
    part(b"-" if client is None else b"client:" + client.encode())
    for name in (*answer_headers, b"accept-encoding"):
        values = headers.getRawHeaders(name) or ()
        part(name)
        part(b",".join(value.strip() for value in values))
    part(canonical_body(payload))
    return digest.hexdigest()


def samples(payload: dict[str, Any]) -> bool:
    """Whether a generation samples: ``temperature`` above 0, or absent (the APIs'
    default is 1). Only ``temperature: 0`` asks for the most likely answer."""
    temperature = payload.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        return True
    return temperature > 0
