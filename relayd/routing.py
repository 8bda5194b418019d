"""Choosing where a request goes: model globs, routes, and smooth weighted round-robin."""

from __future__ import annotations

import fnmatch
import os
import random
import re
from collections.abc import Callable, Collection, Sequence

from relayd.config.model import (
    DEFAULT_ANTHROPIC_VERSION,
    DEFAULT_MAX_TOKENS,
    RouteAffinityConfig,
    RouteCacheConfig,
)
from relayd.geoip import RegionMap
from relayd.upstream import Backend


class ModelMatcher:
    """Matches model names against a set of globs, with one compiled regex.

    ``None`` globs match everything, including requests that name no model.
    Results are memoised: the set of model names in use is small.
    """

    __slots__ = ("_cache", "_regex", "literals")

    _CACHE_LIMIT = 4096

    def __init__(self, globs: Sequence[str] | None) -> None:
        self._regex = (
            None
            if globs is None
            else re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))
        )
        self._cache: dict[str, bool] = {}
        # The names among the globs that are plain model names (no wildcard).
        self.literals = tuple(g for g in globs or () if not any(c in g for c in "*?["))

    @property
    def matches_all(self) -> bool:
        return self._regex is None

    def __call__(self, model: str | None) -> bool:
        if self._regex is None:
            return True
        if model is None:
            return False
        found = self._cache.get(model)
        if found is None:
            found = self._regex.match(model) is not None
            if len(self._cache) < self._CACHE_LIMIT:
                self._cache[model] = found
        return found


class _Tier:
    """Smooth weighted round-robin (as in nginx) over the backends of one priority."""

    __slots__ = ("backends", "current")

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.backends = tuple(backends)
        self.current = [0] * len(self.backends)

    def choose(
        self, exclude: Collection[Backend], need_healthy: bool, region: str | None = None
    ) -> Backend | None:
        """The next eligible backend (of ``region`` only, when given)."""
        best = -1
        best_score = 0
        total = 0
        current = self.current
        for index, backend in enumerate(self.backends):
            if (
                backend in exclude
                or (region is not None and backend.region != region)
                or not backend.is_available()
                or (need_healthy and not backend.health.healthy)
            ):
                continue
            weight = backend.weight
            score = current[index] + weight
            current[index] = score
            total += weight
            if best < 0 or score > best_score:
                best = index
                best_score = score
        if best < 0:
            return None
        current[best] -= total
        return self.backends[best]


# Which health passes a balancer makes for choose(healthy=...).
_PASSES: dict[bool | None, tuple[bool, ...]] = {None: (True, False), True: (True,), False: (False,)}


class WeightedBalancer:
    """Picks a backend: best priority tier first, weighted round-robin within a tier.

    Deterministic: weights 3:1 give exactly three picks of the first and one of the
    second in every four consecutive choices, interleaved (a, a, b, a), not in bursts.
    A backend is eligible when it is available (capacity, breaker not open, a usable
    key) and actively healthy; only when no backend in any tier is healthy are
    unhealthy ones tried (a failing probe should not turn a working provider off).
    """

    __slots__ = ("_backends", "_tiers")

    def __init__(self, backends: Sequence[Backend]) -> None:
        self._backends = tuple(backends)
        priorities = sorted({b.priority for b in self._backends})
        self._tiers = [_Tier([b for b in self._backends if b.priority == p]) for p in priorities]

    @property
    def backends(self) -> tuple[Backend, ...]:
        return self._backends

    def choose(
        self,
        exclude: Collection[Backend] = (),
        *,
        healthy: bool | None = None,
        region: str | None = None,
    ) -> Backend | None:
        """The next backend, or ``None`` when none is eligible.

        ``healthy=True`` considers only actively healthy backends, ``False`` only the
        fallback pass over all of them; ``None`` (the default) does both, in that order.
        A route with several targets asks each for a healthy backend before settling for
        an unhealthy one anywhere. ``region``: the client's region; within a priority
        tier its backends go first (a preference, never a filter).
        """
        for need_healthy in _PASSES[healthy]:
            for tier in self._tiers:
                if region is not None:
                    chosen = tier.choose(exclude, need_healthy, region)
                    if chosen is not None:
                        return chosen
                chosen = tier.choose(exclude, need_healthy)
                if chosen is not None:
                    return chosen
        return None

    def primary(
        self, exclude: Collection[Backend] = (), *, healthy: bool | None = None
    ) -> Backend | None:
        """The first eligible backend in config order, for stateful calls that must stick."""
        for need_healthy in _PASSES[healthy]:
            for backend in self._backends:
                if backend in exclude or not backend.is_available():
                    continue
                if need_healthy and not backend.health.healthy:
                    continue
                return backend
        return None

    def usable(self) -> bool:
        """Whether some backend can serve requests (for readiness): a backend busy up to
        its concurrency cap still serves, its requests wait for a slot."""
        return any(b.can_serve() for b in self._backends)


class LeastLatencyBalancer(WeightedBalancer):
    """``balance: least_latency``: power of two choices by peak-EWMA cost.

    Within the best priority tier that has an eligible backend (the same eligibility and
    health passes as :class:`WeightedBalancer`), two eligible backends are drawn at
    random and the cheaper one serves: cost = the backend's expected time to response
    headers (:class:`relayd.latency.PeakEwma`) x (requests in flight + 1) / weight. A
    slow or busy backend loses share at once and wins it back as its samples fade.
    """

    __slots__ = ("_random",)

    def __init__(self, backends: Sequence[Backend], rng: random.Random | None = None) -> None:
        super().__init__(backends)
        self._random = rng if rng is not None else random.Random(os.urandom(16))

    def choose(
        self,
        exclude: Collection[Backend] = (),
        *,
        healthy: bool | None = None,
        region: str | None = None,
    ) -> Backend | None:
        for need_healthy in _PASSES[healthy]:
            for tier in self._tiers:
                eligible = [
                    backend for backend in tier.backends
                    if backend not in exclude and backend.is_available()
                    and (not need_healthy or backend.health.healthy)
                ]
                if region is not None:
                    eligible = [b for b in eligible if b.region == region] or eligible
                if not eligible:
                    continue
                if len(eligible) == 1:
                    return eligible[0]
                first, second = self._random.sample(eligible, 2)
                now = first.clock.seconds()
                return first if _cost(first, now) <= _cost(second, now) else second
        return None


def _cost(backend: Backend, now: float) -> float:
    return backend.latency.estimate(now) * (backend.in_flight + 1) / backend.weight


class ProviderRoute:
    """A provider's backends and their balancer, as the router hands them out, and
    its ``regions`` map (None without one)."""

    __slots__ = ("balancer", "name", "regions", "type")

    def __init__(
        self, name: str, type_: str, balancer: WeightedBalancer, regions: RegionMap | None = None
    ) -> None:
        self.name = name
        self.type = type_
        self.balancer = balancer
        self.regions = regions

    def backend_named(self, name: str) -> Backend | None:
        for backend in self.balancer.backends:
            if backend.name == name:
                return backend
        return None


class RouteTarget:
    """One target of a route: a provider, the model to ask it for, and how to reach it.

    ``translated`` is true when the provider speaks the other API family than the
    route's clients, so requests and responses go through :mod:`relayd.translate`.
    """

    __slots__ = ("model", "provider", "translated", "weight")

    def __init__(
        self, provider: ProviderRoute, model: str | None, weight: int, translated: bool
    ) -> None:
        self.provider = provider
        self.model = model
        self.weight = weight
        self.translated = translated


def providers_of(targets: Sequence[RouteTarget]) -> list[ProviderRoute]:
    """The distinct providers of ``targets``, in order."""
    seen: list[ProviderRoute] = []
    for target in targets:
        if target.provider not in seen:
            seen.append(target.provider)
    return seen


class Route:
    """A compiled ``routes`` entry: which requests it takes and the targets serving them.

    ``order()`` gives the targets in the order a request tries them: as configured, or,
    with ``weighted``, the first chosen by smooth weighted round-robin and the others
    after it in configured order (the fallback).
    """

    __slots__ = (
        "_current",
        "affinity",
        "anthropic_version",
        "api",
        "cache",
        "default_max_tokens",
        "label",
        "matcher",
        "name",
        "strict",
        "targets",
        "weighted",
    )

    def __init__(
        self,
        api: str,
        matcher: ModelMatcher,
        targets: Sequence[RouteTarget],
        *,
        weighted: bool = False,
        strict: bool = False,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        anthropic_version: str = DEFAULT_ANTHROPIC_VERSION,
        name: str = "route",
        label: str | None = None,
        cache: RouteCacheConfig | None = None,
        affinity: RouteAffinityConfig | None = None,
    ) -> None:
        self.api = api
        self.name = name  # how messages name it, e.g. "routes[0] (models: smart)"
        # How the cache (and its purge) names it: its ``name``, else "routes[INDEX]".
        self.label = label if label is not None else name
        self.cache = cache  # its response cache settings, if it caches
        # Its session affinity, None when off (``key: none``).
        self.affinity = affinity if affinity is not None and affinity.key != "none" else None
        self.matcher = matcher
        self.targets = tuple(targets)
        self.weighted = weighted and len(self.targets) > 1
        self.strict = strict
        self.default_max_tokens = default_max_tokens
        self.anthropic_version = anthropic_version
        self._current = [0] * len(self.targets)

    @property
    def providers(self) -> list[ProviderRoute]:
        """The distinct providers of the targets, in target order."""
        return providers_of(self.targets)

    def order(self) -> tuple[RouteTarget, ...]:
        """The targets in the order this request should try them."""
        if not self.weighted:
            return self.targets
        current = self._current
        total = 0
        best = 0
        for index, target in enumerate(self.targets):
            current[index] += target.weight
            total += target.weight
            if current[index] > current[best]:
                best = index
        current[best] -= total
        first = self.targets[best]
        return (first, *(t for t in self.targets if t is not first))


class Router:
    """First-match routing of (client API, model) to a route."""

    __slots__ = ("_routes",)

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = tuple(routes)

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._routes

    def route(self, api: str, model: str | None) -> Route | None:
        for route in self._routes:
            if route.api == api and route.matcher(model):
                return route
        return None

    def first_for(
        self, api: str, accepts: Callable[[Route], bool] = lambda route: True
    ) -> Route | None:
        """The first route for ``api`` that ``accepts`` (for calls that name no model)."""
        for route in self._routes:
            if route.api == api and accepts(route):
                return route
        return None

    def routes_for(self, api: str) -> list[Route]:
        """The routes of ``api``, in order."""
        return [route for route in self._routes if route.api == api]
