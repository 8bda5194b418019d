"""Anthropic Message Batches: ``POST /v1/messages/batches``, ``GET .../{id}[/results]``.

Batches are remembered by the provider (the last :data:`MAX_BATCHES`) and "end"
as soon as they are fetched: ``GET`` reports them ended and ``/results`` answers
one succeeded message per request, in the JSON Lines shape of the real API.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final, cast

from relayd.testing.fakeprovider.anthropic_messages import anthropic_message
from relayd.testing.fakeprovider.content import input_tokens_for, reply_text, token_limit
from relayd.testing.fakeprovider.exchange import Exchange
from relayd.testing.fakeprovider.wire import JSONL_CT, dumps, rfc3339

#: How many message batches are remembered for ``GET``.
MAX_BATCHES: Final = 1000


class BatchStore:
    """The batches created so far: id -> (creation time, the request items), oldest first."""

    __slots__ = ("_batches",)

    def __init__(self) -> None:
        self._batches: OrderedDict[str, tuple[float, list[dict[str, Any]]]] = OrderedDict()

    def store(self, batch_id: str, created: float, requests: list[dict[str, Any]]) -> None:
        """Remember a batch, forgetting the oldest beyond :data:`MAX_BATCHES`."""
        self._batches[batch_id] = (created, requests)
        while len(self._batches) > MAX_BATCHES:
            self._batches.popitem(last=False)

    def get(self, batch_id: str) -> tuple[float, list[dict[str, Any]]] | None:
        """The creation time and request items of a batch, or ``None``."""
        return self._batches.get(batch_id)


def _batch_object(
    ex: Exchange, batch_id: str, created: float, count: int, ended: bool
) -> dict[str, object]:
    results_url = None
    if ended:
        host = (ex.request.getHeader(b"host") or b"127.0.0.1").decode("latin-1")
        scheme = "https" if ex.request.isSecure() else "http"
        results_url = f"{scheme}://{host}/v1/messages/batches/{batch_id}/results"
    return {
        "id": batch_id,
        "type": "message_batch",
        "processing_status": "ended" if ended else "in_progress",
        "request_counts": {
            "processing": 0 if ended else count,
            "succeeded": count if ended else 0,
            "errored": 0,
            "canceled": 0,
            "expired": 0,
        },
        "ended_at": rfc3339(created) if ended else None,
        "created_at": rfc3339(created),
        "expires_at": rfc3339(created + 86400),
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": results_url,
    }


def handle_batch_create(ex: Exchange) -> None:
    """``POST /v1/messages/batches``: remember the batch and report it in progress."""
    parsed = ex.parse_body(require_model=False)
    if parsed is None:
        return
    requests = parsed[0].get("requests")
    if (
        not isinstance(requests, list)
        or not requests
        or not all(isinstance(r, dict) and isinstance(r.get("custom_id"), str) for r in requests)
    ):
        ex.send_error(400, "requests: a non-empty list of {custom_id, params} is required")
        return
    batch_id = f"msgbatch_fake{ex.record.id:016d}"
    created = ex.provider.clock.seconds()
    ex.provider.batches.store(batch_id, created, requests)
    ex.send_json(200, dumps(_batch_object(ex, batch_id, created, len(requests), False)))


def handle_batch_get(ex: Exchange) -> None:
    """``GET /v1/messages/batches/{id}[/results]``: batches "end" instantly."""
    if ex.request.method != b"GET":
        ex.send_error(405, "Method not allowed")
        return
    rest = ex.request.path[len(b"/v1/messages/batches/") :].decode("utf-8", "replace")
    batch_id, _, tail = rest.partition("/")
    batch = ex.provider.batches.get(batch_id)
    if batch is None or tail not in ("", "results"):
        ex.send_error(404, f"Batch {batch_id!r} not found")
        return
    created, requests = batch
    if not tail:
        ex.send_json(200, dumps(_batch_object(ex, batch_id, created, len(requests), True)))
        return
    lines = []
    for i, item in enumerate(requests):
        params = item.get("params")
        params = params if isinstance(params, dict) else {}
        model = params.get("model")
        model = model if isinstance(model, str) else "unknown"
        n, cut = token_limit(ex.knobs.chunks, params.get("max_tokens"))
        message = anthropic_message(
            ex,
            model,
            f"msg_fake{ex.record.id:08d}{i:08d}",
            reply_text(n),
            "max_tokens" if cut else "end_turn",
            n,
        )
        message["usage"] = dict(
            cast(dict[str, object], message["usage"]),
            input_tokens=input_tokens_for(dumps(params)),
        )
        result = {"type": "succeeded", "message": message}
        lines.append(dumps({"custom_id": item["custom_id"], "result": result}))
    ex.send_json(200, b"\n".join(lines) + b"\n", content_type=JSONL_CT)
