"""OpenAI Embeddings: ``POST /v1/embeddings``, one deterministic vector per input.

``encoding_format=base64`` (the SDK's default) gets little-endian float32 in
base64; every value is exact in float32, so both forms decode to the same list.
"""

from __future__ import annotations

import base64
import struct
from functools import lru_cache
from typing import Final

from relayd.testing.fakeprovider.exchange import Exchange
from relayd.testing.fakeprovider.wire import dumps

#: Embedding width when the request has no ``dimensions``.
DEFAULT_DIMENSIONS: Final = 16


@lru_cache(maxsize=1024)
def _embedding(index: int, dims: int) -> tuple[float, ...]:
    """A deterministic vector; every value is exact in float32 so base64 round-trips."""
    return tuple(((index * 31 + j * 7) % 256 - 128) / 256 for j in range(dims))


@lru_cache(maxsize=1024)
def _embedding_b64(index: int, dims: int) -> str:
    """:func:`_embedding` as base64 of little-endian float32, like ``encoding_format=base64``."""
    packed = struct.pack(f"<{dims}f", *_embedding(index, dims))
    return base64.b64encode(packed).decode("ascii")


def handle_embeddings(ex: Exchange) -> None:
    """``POST /v1/embeddings``: one deterministic vector per input (float list or base64)."""
    parsed = ex.parse_body()
    if parsed is None:
        return
    req, model = parsed
    given = req.get("input")
    if isinstance(given, str):
        count = 1
    elif isinstance(given, list) and given:
        count = 1 if all(isinstance(x, int) for x in given) else len(given)
    else:
        ex.send_error(400, "input: a string or a non-empty array is required")
        return
    dims = req.get("dimensions")
    if not isinstance(dims, int) or isinstance(dims, bool) or not 0 < dims <= 8192:
        dims = DEFAULT_DIMENSIONS
    as_b64 = req.get("encoding_format") == "base64"
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _embedding_b64(i, dims) if as_b64 else _embedding(i, dims),
        }
        for i in range(count)
    ]
    usage = {"prompt_tokens": ex.base_input, "total_tokens": ex.base_input}
    ex.send_json(200, dumps({"object": "list", "data": data, "model": model, "usage": usage}))
