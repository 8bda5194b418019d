"""The one place that turns a validated :class:`~relayd.config.model.Config` into runtime objects.

A :class:`RelayRuntime` is what the request path reads: client lookup by key digest,
the router, the providers' balancers and backends, the retry budget. It is built once
per configuration; a request keeps the runtime it started with until it ends. A reload
builds the next runtime beside the current one, reusing the backends (pools, breakers,
health, key cooldowns) and the retry budget of the previous one where they still fit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.web.iweb import IAgent

from relayd.config.model import BackendConfig, Config
from relayd.health import RetryBudget
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
    """Everything the request path needs, built from one configuration snapshot.

    ``retired`` lists the backends of ``previous`` that this runtime does not use: the
    caller retires them once it has switched to this runtime.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        agent_factory: AgentFactory | None = None,
        previous: RelayRuntime | None = None,
    ) -> None:
        self.config = config
        self.max_body_bytes = config.max_body_bytes
        self.clients: dict[bytes, Client] = {
            c.key_sha256: Client(c.name, ModelMatcher(c.models)) for c in config.clients
        }
        failover = config.failover
        self.retry_budget: RetryBudget
        if previous is not None:
            self.retry_budget = previous.retry_budget
            self.retry_budget.reconfigure(
                failover.retry_budget_ratio, failover.retry_budget_min_per_second
            )
        else:
            self.retry_budget = RetryBudget(
                failover.retry_budget_ratio, failover.retry_budget_min_per_second, reactor
            )
        reusable = {(b.provider_name, b.name): b for b in previous.backends} if previous else {}
        self.backends: list[Backend] = []
        self.new_backends: list[Backend] = []
        self.providers: dict[str, ProviderRoute] = {}
        for provider_config in config.providers:
            family = PROVIDERS[provider_config.type]
            backends = []
            for backend_config in provider_config.backends:
                old = reusable.pop((provider_config.name, backend_config.name), None)
                if (
                    old is not None
                    and old.provider is family
                    and old.same_connection_settings(backend_config)
                ):
                    old.reconfigure(backend_config)
                    backend = old
                else:
                    if old is not None:
                        reusable[(provider_config.name, backend_config.name)] = old
                    backend = Backend(
                        backend_config,
                        family,
                        provider_config.name,
                        reactor,
                        agent=agent_factory(backend_config) if agent_factory else None,
                    )
                    self.new_backends.append(backend)
                backends.append(backend)
            self.backends.extend(backends)
            self.providers[provider_config.name] = ProviderRoute(
                provider_config.name, provider_config.type, WeightedBalancer(backends)
            )
        self.retired: list[Backend] = list(reusable.values())
        self.router = Router(
            [
                Route(r.api, ModelMatcher(r.models), self.providers[r.provider])
                for r in config.routes
            ]
        )

    def readiness(self) -> tuple[bool, list[str]]:
        """Ready when every routed provider has a backend that could take a request."""
        problems = []
        routed = {route.provider.name: route.provider for route in self.router.routes}
        for name, provider in routed.items():
            if not provider.balancer.usable():
                problems.append(f"provider {name!r} has no usable backend")
        return not problems, problems

    def close(self) -> Deferred[Any]:
        """Close every backend's idle pooled connections and stop its health checks."""
        return DeferredList([b.close() for b in self.backends], consumeErrors=True)
