"""Upstream objects that outlive a request, kept to the client that created them.

Anthropic Message Batches and OpenAI stored Responses live in the upstream account that
created them, and relayd's clients share that account. Without care, client B could read
client A's batch results or continue A's conversation by id, and listings showed every
batch of the account. So:

* creating one (``POST /v1/messages/batches``, ``POST /v1/responses``) records, in the
  state store (shared by every instance with Redis), the object's id with the client
  that created it and the backend it lives on;
* addressing one by id (a batch's status, results, cancel, delete; a stored response's
  get, input items, cancel, delete; ``previous_response_id``) is refused with a 404 unless
  the caller created it, and otherwise goes to the backend that holds it;
* a listing (``GET /v1/messages/batches``) keeps only the caller's batches;
* a batch's ``results_url``, which names the upstream host (the SDK would fetch it there
  with the relay key), is rewritten to relayd's own results endpoint.

This module holds the pieces that read and rewrite answers; the exchange wires them in.
"""

from __future__ import annotations

import re
from typing import Any

from relayd.limits import ObjectRecord

_HOST = re.compile(rb"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def public_base(host_header: bytes | None, secure: bool, fallback: str) -> str:
    """relayd's base URL as the client reached it (for ``results_url``)."""
    if host_header and _HOST.fullmatch(host_header):
        host = host_header.decode("ascii")
    else:
        host = fallback
    return ("https://" if secure else "http://") + host


def rewrite_results_url(entry: dict[str, Any], base: str) -> None:
    """Point a batch object's ``results_url`` at relayd instead of the upstream."""
    batch_id = entry.get("id")
    if isinstance(batch_id, str) and isinstance(entry.get("results_url"), str):
        entry["results_url"] = f"{base}/v1/messages/batches/{batch_id}/results"


def created_id(payload: dict[str, Any]) -> str | None:
    """The id of the object an answer to a create call describes."""
    object_id = payload.get("id")
    return object_id if isinstance(object_id, str) and object_id else None


def listed_ids(payload: dict[str, Any]) -> list[str]:
    """The ids of the objects a listing answer holds, in order."""
    data = payload.get("data")
    if not isinstance(data, list):
        return []
    return [entry["id"] for entry in data if isinstance(entry, dict)
            and isinstance(entry.get("id"), str)]


def keep_owned(payload: dict[str, Any], owners: dict[str, ObjectRecord | None],
               client: str) -> None:
    """Drop every listed object the client did not create; fix the page's ends."""
    data = payload.get("data")
    if not isinstance(data, list):
        return
    kept = []
    for entry in data:
        object_id = entry.get("id") if isinstance(entry, dict) else None
        record = owners.get(object_id) if isinstance(object_id, str) else None
        if record is not None and record.client == client:
            kept.append(entry)
    payload["data"] = kept
    if "first_id" in payload:
        payload["first_id"] = kept[0]["id"] if kept else None
    if "last_id" in payload:
        payload["last_id"] = kept[-1]["id"] if kept else None
