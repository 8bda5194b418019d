"""The model catalog: relayd's own answers about models.

``GET /v1/models`` asks each provider the API routes to (under the client's own model
names) for its list and keeps what the client may use and the route sends there; a
route's model names that its targets map to other upstream models (aliases) are listed
as relayd's own entries, as is ``GET /v1/models/{alias}``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from relayd.errors import Refusal
from relayd.providers import IProvider
from relayd.providers.base import model_entries
from relayd.routing import ProviderRoute, Route
from relayd.runtime import Client, RelayRuntime
from relayd.upstream import Backend

log = Logger(namespace="relayd.relay")


class ModelCatalog:
    """The models one client sees on one API family."""

    __slots__ = ("_clock", "_request_id", "client", "family", "runtime")

    def __init__(
        self,
        runtime: RelayRuntime,
        family: IProvider,
        client: Client,
        clock: IReactorTime,
        request_id: str,
    ) -> None:
        self.runtime = runtime
        self.family = family
        self.client = client
        self._clock = clock
        self._request_id = request_id

    def alias(self, route: Route, model: str) -> bytes | None:
        """relayd's own answer to ``GET /v1/models/{model}`` when ``route`` gives that
        name other upstream names (as in the model list), else None (ask upstream)."""
        if model in route.matcher.literals and any(t.model is not None for t in route.targets):
            return self.family.render_model(self.family.model_entry(model))
        return None

    def model_list(self, client_headers: Headers) -> Deferred[bytes]:
        """The client's model list; fails with a :class:`Refusal` when no provider can
        list models now."""
        asked: list[ProviderRoute] = []
        fetches: list[Deferred[list[dict[str, Any]]]] = []
        routes = self.runtime.router.routes_for(self.family.name)
        for route in routes:
            for target in route.targets:
                if target.model is not None or target.provider in asked:
                    continue
                backend = target.provider.balancer.choose()
                if backend is None:
                    continue
                asked.append(target.provider)
                fetches.append(self._fetch(backend, client_headers))
        aliases = self._aliases()
        if not fetches and not aliases:
            raise Refusal(502 if routes else 404, "no provider can list models now")
        d = DeferredList(fetches, consumeErrors=True)
        return d.addCallback(self._merge, asked, aliases)

    def _aliases(self) -> list[dict[str, Any]]:
        """Entries for the literal model names of routes that rename the model upstream."""
        router = self.runtime.router
        api = self.family.name
        entries = []
        for route in router.routes_for(api):
            if all(target.model is None for target in route.targets):
                continue
            for name in route.matcher.literals:
                if self.client.allows(name) and router.route(api, name) is route:
                    entries.append(self.family.model_entry(name))
        return entries

    def _fetch(self, backend: Backend, client_headers: Headers) -> Deferred[list[dict[str, Any]]]:
        """The provider's model list: kept by the response cache ``cache.model_list_ttl``
        seconds (per provider and the client headers the request carries upstream; the
        client's own filter applies after)."""
        provider = backend.provider
        cache = self.runtime.response_cache
        key = (backend.provider_name, *(
            tuple(client_headers.getRawHeaders(name) or ()) for name in provider.model_list_headers
        ))
        kept = cache.model_list(key)
        if kept is not None:
            return succeed(kept)
        entries = self._ask(backend, client_headers)

        def keep(result: list[dict[str, Any]]) -> list[dict[str, Any]]:
            cache.keep_model_list(key, result)
            return result

        return entries.addCallback(keep)

    def _ask(self, backend: Backend, client_headers: Headers) -> Deferred[list[dict[str, Any]]]:
        provider = backend.provider
        headers = backend.service_headers()
        for name in provider.model_list_headers:
            values = client_headers.getRawHeaders(name)
            if values:
                headers.setRawHeaders(name, values)
        backend.acquire()
        d = backend.agent.request(b"GET", backend.base_url + provider.model_list_path, headers)

        def read(response: IResponse) -> Deferred[bytes]:
            if response.code != 200:
                raise RuntimeError(f"model list answered {response.code}")
            return readBody(response)

        def release(result: object) -> object:
            backend.release()
            return result

        entries: Deferred[list[dict[str, Any]]] = d.addCallback(read).addCallback(model_entries)
        entries.addBoth(release)
        entries.addTimeout(backend.timeouts.first_byte, self._clock)
        return entries

    def _merge(
        self,
        results: list[tuple[bool, Any]],
        providers: list[ProviderRoute],
        aliases: list[dict[str, Any]],
    ) -> bytes:
        router = self.runtime.router
        api = self.family.name
        merged: dict[str, dict[str, Any]] = {entry["id"]: entry for entry in aliases}
        ok = 0
        for provider, (success, entries) in zip(providers, results, strict=False):
            if not success:
                log.warn("{request_id}: model list from {provider} failed: {error}",
                         request_id=self._request_id, provider=provider.name,
                         error=entries.getErrorMessage())
                continue
            ok += 1
            for entry in entries:
                model_id = entry["id"]
                if model_id in merged or not self.client.allows(model_id):
                    continue
                route = router.route(api, model_id)
                if route is not None and any(
                    t.provider is provider and t.model is None for t in route.targets
                ):
                    merged[model_id] = entry
        if not ok and not aliases:
            raise Refusal(502, "no provider answered the model list")
        return self.family.render_model_list(list(merged.values()))
