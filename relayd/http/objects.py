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

:class:`ObjectKeeper` is that stage of an exchange; the functions below it read and
rewrite answers.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.web.http import Request

from relayd import jsonbody
from relayd.errors import Outcome, Refusal
from relayd.limits import LimitStore, ObjectRecord
from relayd.limits.redis import StoreUnavailableError
from relayd.providers import Endpoint
from relayd.routing import ProviderRoute
from relayd.runtime import RelayRuntime
from relayd.translate.mapping import json_bytes
from relayd.upstream import Backend


class ObjectKeeper:
    """Keeps one object call (``create``, ``list`` or ``item``) to its client's objects."""

    __slots__ = ("_claimed", "_store", "client", "endpoint", "kind", "role")

    def __init__(self, store: LimitStore, endpoint: Endpoint, role: str, client: str) -> None:
        assert endpoint.objects is not None
        self._store = store
        self.endpoint = endpoint
        self.kind = endpoint.objects
        self.role = role
        self.client = client
        self._claimed = False  # a streamed create call's object is recorded

    def reference(self, path: bytes, payload: dict[str, Any] | None) -> str | None:
        """The id of an existing object this call addresses, if any."""
        if self.role == "item":
            found = self.endpoint.pattern.match(path)
            return found.group("id").decode("ascii") if found is not None else None
        field = self.endpoint.reference_field
        previous = payload.get(field) if payload and field else None
        if previous is None:
            return None
        return previous if isinstance(previous, str) else ""

    def locate(
        self, object_id: str, runtime: RelayRuntime
    ) -> Deferred[tuple[ProviderRoute, Backend]]:
        """Where the caller's object lives; fails with a :class:`Refusal` (a 404) unless
        the caller created it, the same whether it exists for another client or not."""

        def found(records: list[ObjectRecord | None]) -> tuple[ProviderRoute, Backend]:
            record = records[0] if records else None
            what = self.kind.rsplit(".", 1)[-1]
            if record is None or record.client != self.client:
                raise Refusal(404, f"no such {what}: {object_id[:200]!r}")
            where = runtime.backend(record.provider, record.backend)
            if where is None:
                raise Refusal(
                    404,
                    f"{what} {object_id!r} lives on backend {record.backend!r} of provider "
                    f"{record.provider!r}, which the configuration no longer has",
                )
            return where

        d = self._store.owners(self.kind, [object_id])
        return d.addCallbacks(found, _store_unreachable)

    def claim_streamed(self, object_id: str, backend: Backend) -> None:
        """Record the object a streamed create call made, once its id went by (before
        the client has it: the id reaches the client in the same event)."""
        if self._claimed or self.role != "create":
            return
        self._claimed = True
        self._store.claim(self.kind, object_id,
                          ObjectRecord(self.client, backend.provider_name, backend.name))

    def answer(self, body: bytes, backend: Backend, request: Request) -> Deferred[bytes]:
        """The answer to an object call, after recording the created object (create) or
        dropping other clients' objects (list), with batches' results URLs rewritten."""
        try:
            payload = jsonbody.loads(body)
        except ValueError:
            return succeed(body)
        if not isinstance(payload, dict):
            return succeed(body)
        host = request.getHost()
        base = public_base(request.getHeader(b"host"), request.isSecure(),
                           f"{host.host}:{host.port}")
        rewrites = self.endpoint.results_url

        def rewritten(_: object = None) -> bytes:
            if rewrites:
                for entry in payload.get("data") or [payload]:
                    if isinstance(entry, dict):
                        rewrite_results_url(entry, base)
            return json_bytes(payload)

        if self.role == "create":
            object_id = created_id(payload)
            if object_id is None:
                return succeed(rewritten())
            record = ObjectRecord(self.client, backend.provider_name, backend.name)
            return self._store.claim(self.kind, object_id, record).addCallback(rewritten)
        if self.role == "list":
            ids = listed_ids(payload)

            def filtered(records: list[ObjectRecord | None]) -> bytes:
                keep_owned(payload, dict(zip(ids, records, strict=True)), self.client)
                return rewritten()

            d = self._store.owners(self.kind, ids).addCallback(filtered)
            return d.addErrback(_store_unreachable)
        return succeed(rewritten())


def _store_unreachable(failure: Failure) -> Any:
    failure.trap(StoreUnavailableError)
    raise Refusal(503, "the state store is unreachable: who owns this object cannot be "
                       "checked now; retry", outcome=Outcome.STORE_UNAVAILABLE, retry_after=1.0)

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
