"""``GET /v1/models`` and ``GET /v1/models/{id}`` in either family's shape.

The path is shared by both APIs; the family (Anthropic when the request has an
``anthropic-version`` header) picks the list shape.  The lists are precomputed.
"""

from __future__ import annotations

from typing import Final

from relayd.testing.fakeprovider.exchange import Exchange
from relayd.testing.fakeprovider.families import ANTHROPIC
from relayd.testing.fakeprovider.wire import dumps

_ANTHROPIC_MODELS: Final = (
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-01T00:00:00Z"),
    ("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
)
_OPENAI_MODELS: Final = (
    ("gpt-4o", 1715367049, "system"),
    ("gpt-4o-mini", 1721172741, "system"),
    ("text-embedding-3-small", 1705948997, "system"),
)


def _anthropic_model(
    model_id: str, name: str | None = None, created: str | None = None
) -> dict[str, object]:
    return {
        "type": "model",
        "id": model_id,
        "display_name": name or model_id,
        "created_at": created or "2025-01-01T00:00:00Z",
    }


def _openai_model(
    model_id: str, created: int = 1700000000, owner: str = "system"
) -> dict[str, object]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owner}


_ANTHROPIC_MODEL_LIST: Final = dumps(
    {
        "data": [_anthropic_model(*m) for m in _ANTHROPIC_MODELS],
        "has_more": False,
        "first_id": _ANTHROPIC_MODELS[0][0],
        "last_id": _ANTHROPIC_MODELS[-1][0],
    }
)
_OPENAI_MODEL_LIST: Final = dumps(
    {"object": "list", "data": [_openai_model(*m) for m in _OPENAI_MODELS]}
)


def handle_models(ex: Exchange) -> None:
    """``GET /v1/models`` in the family's list shape (precomputed)."""
    if ex.family == ANTHROPIC:
        ex.send_json(200, _ANTHROPIC_MODEL_LIST)
    else:
        ex.send_json(200, _OPENAI_MODEL_LIST)


def handle_model(ex: Exchange) -> None:
    """``GET /v1/models/{id}``: any id is answered (echoed if unknown)."""
    if ex.request.method != b"GET":
        ex.send_error(405, "Method not allowed")
        return
    model_id = ex.request.path[len(b"/v1/models/") :].decode("utf-8", "replace")
    if ex.family == ANTHROPIC:
        known = {m[0]: m for m in _ANTHROPIC_MODELS}
        ex.send_json(200, dumps(_anthropic_model(*known.get(model_id, (model_id,)))))
    else:
        oknown = {m[0]: m for m in _OPENAI_MODELS}
        found = oknown.get(model_id)
        ex.send_json(200, dumps(_openai_model(*found) if found else _openai_model(model_id)))
