"""The one place that turns a validated :class:`~relayd.config.model.Config` into runtime objects.

A :class:`RelayRuntime` is what the request path reads: client lookup by key digest,
the router, the providers' balancers and backends. It is built once per configuration;
a request keeps the runtime it started with until it ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.web.iweb import IAgent

from relayd.config.model import BackendConfig, Config
from relayd.providers import PROVIDERS
from relayd.routing import ModelMatcher, ProviderRoute, Route, Router, WeightedBalancer
from relayd.upstream import Backend

AgentFactory = Callable[[BackendConfig], IAgent]


class Client:
    """A relay client at run time: its name and its compiled model allowlist."""

    __slots__ = ("allows", "name")

    def __init__(self, name: str, allows: ModelMatcher) -> None:
        self.name = name
        self.allows = allows


class RelayRuntime:
    """Everything the request path needs, built from one configuration snapshot."""

    def __init__(self, config: Config, reactor: Any, agent_factory: AgentFactory | None = None):
        self.config = config
        self.max_body_bytes = config.max_body_bytes
        self.clients: dict[bytes, Client] = {
            c.key_sha256: Client(c.name, ModelMatcher(c.models)) for c in config.clients
        }
        self.backends: list[Backend] = []
        self.providers: dict[str, ProviderRoute] = {}
        for provider_config in config.providers:
            family = PROVIDERS[provider_config.type]
            backends = [
                Backend(
                    backend_config,
                    family,
                    provider_config.name,
                    reactor,
                    agent=agent_factory(backend_config) if agent_factory else None,
                )
                for backend_config in provider_config.backends
            ]
            self.backends.extend(backends)
            self.providers[provider_config.name] = ProviderRoute(
                provider_config.name, provider_config.type, WeightedBalancer(backends)
            )
        self.router = Router(
            [
                Route(r.api, ModelMatcher(r.models), self.providers[r.provider])
                for r in config.routes
            ]
        )

    def close(self) -> Deferred[Any]:
        """Close every backend's idle pooled connections."""
        return DeferredList([b.close() for b in self.backends], consumeErrors=True)
