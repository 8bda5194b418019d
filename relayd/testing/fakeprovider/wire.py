"""Wire helpers of the fake upstream: compact JSON, SSE framing, timestamps, bombs.

Everything here is a pure function of its arguments; the literals that repeat
across requests (reply chunks, gzip bombs) are cached, because the fake is the
upstream of the benchmarks and must stay cheap.
"""

from __future__ import annotations

import json
import zlib
from datetime import UTC, datetime
from functools import lru_cache
from typing import Final

JSON_CT: Final = b"application/json"
JSONL_CT: Final = b"application/x-jsonl"
SSE_CT: Final = b"text/event-stream; charset=utf-8"

#: The end of an OpenAI ``data:`` stream.
DONE: Final = b"data: [DONE]\n\n"

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def compact(obj: object) -> str:
    """Compact JSON text, as the real APIs write it (and tool-call arguments)."""
    return _encoder.encode(obj)


def dumps(obj: object) -> bytes:
    """Compact JSON bytes, as the real APIs send them."""
    return _encoder.encode(obj).encode("utf-8")


@lru_cache(maxsize=4096)
def json_str(text: str) -> bytes:
    """A JSON string literal, cached since reply chunks repeat across requests."""
    return dumps(text)


def rfc3339(seconds: float) -> str:
    """UTC timestamp as the Anthropic API writes them (``2025-01-01T00:00:00Z``)."""
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sse(event: str, data: bytes) -> bytes:
    """One named SSE event (Anthropic style and OpenAI Responses style)."""
    return b"event: " + event.encode("ascii") + b"\ndata: " + data + b"\n\n"


def sse_data(data: bytes) -> bytes:
    """One unnamed SSE event (OpenAI chat/completions style)."""
    return b"data: " + data + b"\n\n"


@lru_cache(maxsize=4)
def gzip_bomb(mib: int) -> bytes:
    """gzip of ``mib`` MiB of zeros: about a thousandth of that on the wire."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1024 * 1024)
    return b"".join(packer.compress(block) for _ in range(mib)) + packer.flush()
