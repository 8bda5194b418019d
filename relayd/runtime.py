"""The one place that turns a validated :class:`~relayd.config.model.Config` into runtime objects.

A :class:`RelayRuntime` is what the request path reads: client lookup by key digest,
the router, the providers' balancers and backends, the retry budget. It is built once
per configuration; a request keeps the runtime it started with until it ends. A reload
builds the next runtime beside the current one; what it takes over from the running one
(backends with their pools, breakers, health and key cooldowns, the store, the retry
budget) is decided beforehand by :mod:`relayd.runtime_diff`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.web.iweb import IAgent

from relayd.affinity import SessionPins
from relayd.cache import ResponseCache
from relayd.client_address import Networks, TrustedProxies
from relayd.config.model import BackendConfig, ClientSigningConfig, Config
from relayd.edge import AddressRules
from relayd.geoip import GeoDatabase, RegionMap
from relayd.http.headers import RequestHeaderPolicy
from relayd.labels import ModelLabels
from relayd.limits import LimitStore, StoreEvent, StoreFactory, build_store
from relayd.limits.policy import ClientPolicy, UpstreamPolicy
from relayd.nonces import NonceStore
from relayd.providers import PROVIDERS
from relayd.retry_budget import RetryBudget
from relayd.routing import (
    LeastLatencyBalancer,
    ModelMatcher,
    ProviderRoute,
    Route,
    Router,
    RouteTarget,
    WeightedBalancer,
)
from relayd.rules import ContentRules
from relayd.runtime_diff import BackendKey, RuntimeChange
from relayd.upstream import Backend

AgentFactory = Callable[[BackendConfig], IAgent]


def _route_name(index: int, models: tuple[str, ...] | None) -> str:
    """How errors name a route: its place in the file and what it matches."""
    matches = f"models: {', '.join(models)}" if models is not None else "every model"
    return f"routes[{index}] ({matches})"


class Client:
    """A relay client at run time: its name, compiled model allowlist and limits, and
    the region it pins (None: its address decides)."""

    __slots__ = ("allow_from", "allows", "name", "policy", "region", "signing")

    def __init__(
        self,
        name: str,
        allows: ModelMatcher,
        policy: ClientPolicy | None = None,
        region: str | None = None,
        signing: ClientSigningConfig | None = None,
        allow_from: Networks | None = None,
    ) -> None:
        self.name = name
        self.allows = allows
        self.policy = policy
        self.region = region
        self.signing = signing
        self.allow_from = allow_from


class RelayRuntime:
    """Everything the request path needs, built from one configuration snapshot.

    This is the one place that turns configuration into runtime objects. Built on its
    own (at start) everything is new. Built for a reload, it is given the
    :class:`~relayd.runtime_diff.RuntimeChange` that :func:`~relayd.runtime_diff.plan_reload`
    worked out for ``config``: it then takes over the backends, store, retry budget and
    learned model names the change carries, applies the new settings to them, and builds
    the rest. Retiring what the change leaves behind is the caller's, once it has
    switched to this runtime.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        agent_factory: AgentFactory | None = None,
        on_store_event: StoreEvent | None = None,
        store_factory: StoreFactory | None = None,
        carry: RuntimeChange | None = None,
    ) -> None:
        if carry is not None and carry.config is not config:
            raise ValueError("the runtime change was planned for another configuration")
        self.config = config
        self.max_body_bytes = config.max_body_bytes
        # What can fail comes first (the geoip database, a new store, new backends and
        # their agents), so a failure leaves everything the change carries as it was.
        self.geoip = GeoDatabase.open(config.geoip.database) if config.geoip else None
        carried_store = carry.store if carry is not None else None
        self.store: LimitStore = (
            carried_store
            if carried_store is not None
            else (store_factory or build_store)(config.state, reactor, on_store_event)
        )
        kept = carry.kept if carry is not None else {}
        try:
            built = self._new_backends(config, reactor, agent_factory, kept)
        except Exception:
            if carried_store is None:
                self.store.close()
            raise
        prefix = config.state.key_prefix
        lease_ttl = self._lease_ttl(config)
        self.clients: dict[bytes, Client] = {
            c.key_sha256: Client(
                c.name,
                ModelMatcher(c.models),
                ClientPolicy(c.name, c.limits, prefix, lease_ttl) if c.limits else None,
                c.region,
                c.signing,
                Networks(c.allow_from) if c.allow_from is not None else None,
            )
            for c in config.clients
        }
        failover = config.failover
        self.retry_budget: RetryBudget
        if carry is not None:
            self.retry_budget = carry.retry_budget
            self.retry_budget.reconfigure(
                failover.retry_budget_ratio, failover.retry_budget_min_per_second
            )
        else:
            self.retry_budget = RetryBudget(
                failover.retry_budget_ratio, failover.retry_budget_min_per_second, reactor
            )
        self.backends: list[Backend] = []
        self.providers: dict[str, ProviderRoute] = {}
        self.upstream_policies: dict[Backend, UpstreamPolicy] = {}
        for provider_config in config.providers:
            backends = []
            for backend_config in provider_config.backends:
                key = (provider_config.name, backend_config.name)
                backend = built.get(key)
                if backend is None:
                    backend = kept[key]
                    backend.reconfigure(backend_config)
                backends.append(backend)
                if backend_config.limits is not None:
                    self.upstream_policies[backend] = UpstreamPolicy(
                        backend_config.limits,
                        prefix,
                        provider_config.name,
                        backend_config.name,
                        backend_config.api_keys,
                    )
            self.backends.extend(backends)
            balancer: WeightedBalancer
            if provider_config.balance == "least_latency":
                tuning = provider_config.least_latency
                for backend in backends:
                    backend.latency.configure(tuning.decay, tuning.default_rtt)
                balancer = LeastLatencyBalancer(backends)
            else:
                balancer = WeightedBalancer(backends)
            self.providers[provider_config.name] = ProviderRoute(
                provider_config.name, provider_config.type, balancer,
                RegionMap(provider_config.regions) if provider_config.regions else None,
            )
        known_models = [name for r in config.routes for name in ModelMatcher(r.models).literals]
        known_models += [t.model for r in config.routes for t in r.targets if t.model]
        self.model_labels: ModelLabels = ModelLabels(
            known_models, carry.model_labels.learned if carry is not None else None
        )
        self.response_cache: ResponseCache
        if carry is not None:
            self.response_cache = carry.response_cache
            self.response_cache.reconfigure(config.cache, self.store)
        else:
            self.response_cache = ResponseCache(config.cache, self.store, reactor)
        # State that outlives a configuration: session pins, nonces seen, address buckets.
        self.pins: SessionPins
        self.nonces: NonceStore
        self.address_rules: AddressRules
        if carry is not None:
            self.pins, self.nonces = carry.pins, carry.nonces
            self.address_rules = carry.address_rules
            self.pins.bind(self.store)
            self.nonces.bind(self.store)
            self.address_rules.reconfigure(config.edge, self.store)
        else:
            self.pins = SessionPins(reactor, self.store)
            self.nonces = NonceStore(reactor, self.store)
            self.address_rules = AddressRules(reactor, self.store, config.edge)
        self.content_rules = ContentRules(config.rules)
        self.trusted_proxies = TrustedProxies(config.trusted_proxies)
        # Region routing is on when some backend has a region: a request's location is
        # then worked out (its client's region, else its address in the geoip database).
        self.regional = any(b.region is not None for b in self.backends)
        self.header_policy = RequestHeaderPolicy(PROVIDERS.values(), config.forward_headers)
        self.router = Router(
            [
                Route(
                    r.api,
                    ModelMatcher(r.models),
                    [
                        RouteTarget(
                            self.providers[t.provider],
                            t.model,
                            t.weight,
                            translated=self.providers[t.provider].type != r.api,
                        )
                        for t in r.targets
                    ],
                    weighted=r.strategy == "weighted",
                    strict=r.strict,
                    default_max_tokens=r.default_max_tokens,
                    anthropic_version=r.anthropic_version,
                    name=_route_name(index, r.models),
                    label=r.name if r.name is not None else f"routes[{index}]",
                    cache=r.cache,
                    affinity=r.affinity,
                )
                for index, r in enumerate(config.routes)
            ]
        )

    @staticmethod
    def _new_backends(
        config: Config,
        reactor: Any,
        agent_factory: AgentFactory | None,
        kept: Mapping[BackendKey, Backend],
    ) -> dict[BackendKey, Backend]:
        """The backends of ``config`` not in ``kept``, built anew."""
        built: dict[BackendKey, Backend] = {}
        for provider_config in config.providers:
            family = PROVIDERS[provider_config.type]
            for backend_config in provider_config.backends:
                key = (provider_config.name, backend_config.name)
                if key not in kept and key not in built:
                    built[key] = Backend(
                        backend_config,
                        family,
                        provider_config.name,
                        reactor,
                        agent=agent_factory(backend_config) if agent_factory else None,
                    )
        return built

    def backend(self, provider: str, name: str) -> tuple[ProviderRoute, Backend] | None:
        """The provider and backend of these names in this configuration, if any."""
        route = self.providers.get(provider)
        if route is None:
            return None
        for backend in route.balancer.backends:
            if backend.name == name:
                return route, backend
        return None

    @staticmethod
    def _lease_ttl(config: Config) -> float:
        """How long a concurrency lease outlives an instance that died holding it: the
        longest total deadline any request can have, plus a minute."""
        totals = [config.timeouts.total]
        totals += [b.timeouts.total for p in config.providers for b in p.backends]
        return max(totals) + 60.0

    def readiness(self) -> tuple[bool, list[str]]:
        """Ready when every route has a target with a backend that could take a request
        (a route that can fall back to another provider is still served when one is
        down) and the state store has been reached (or found unreachable, with
        fail-open)."""
        problems = []
        store = self.store.describe()
        if store.get("state") == "connecting":
            problems.append("state store: still connecting to Redis")
        elif store.get("state") == "down" and store.get("on_store_failure") == "closed":
            problems.append("state store: Redis unreachable and on_store_failure is closed")
        for route in self.router.routes:
            providers = route.providers
            if any(provider.balancer.usable() for provider in providers):
                continue
            if len(providers) == 1:
                problem = f"provider {providers[0].name!r} has no usable backend"
            else:
                names = ", ".join(repr(p.name) for p in providers)
                problem = f"none of the providers {names} has a usable backend"
            if problem not in problems:
                problems.append(problem)
        return not problems, problems

    def close(self) -> Deferred[Any]:
        """Close every backend's idle pooled connections, stop its health checks, and
        close the state store."""
        closing = [b.close() for b in self.backends]
        closing.append(self.store.close())
        return DeferredList(closing, consumeErrors=True)
