"""Where the next try of a request goes: the route, its targets, and each attempt's
backend and key; whether a failed attempt may be retried.

:func:`choose_route` finds the route (batches follow the models inside them; a call on
an object goes wherever its object lives); :class:`AttemptPlanner` then hands out
:class:`Pick` s in the route's order, each holding a backend slot (and a half-open
trial, when it is one) until the attempt ends or :meth:`AttemptPlanner.unpick` gives it
back. It never sends anything: the exchange does, with what it picks.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relayd.affinity import SessionAffinity
from relayd.errors import Outcome, Refusal, Result
from relayd.geoip import Location
from relayd.http.headers import HeaderList
from relayd.http.intake import ClientCall
from relayd.http.translation import UpstreamCall, prepare_call, serves
from relayd.keyring import UpstreamKey
from relayd.metrics import RelayMetrics
from relayd.providers import Endpoint, IProvider
from relayd.routing import ProviderRoute, Route, RouteTarget, providers_of
from relayd.runtime import RelayRuntime
from relayd.translate import TranslationError
from relayd.upstream import Backend

log = Logger(namespace="relayd.relay")


class Pick:
    """One attempt's target, backend and key, with the upstream call for the target."""

    __slots__ = ("backend", "call", "key", "target")

    def __init__(
        self, target: RouteTarget, backend: Backend, key: UpstreamKey, call: UpstreamCall
    ) -> None:
        self.target = target
        self.backend = backend
        self.key = key
        self.call = call


def choose_route(
    runtime: RelayRuntime,
    family: IProvider,
    endpoint: Endpoint,
    call: ClientCall,
    pinned: bool,
) -> Route:
    """The route of a request; raises :class:`Refusal` when there is none.

    Message Batches live in the upstream account that created them and are relayed as
    they are (no model renamed, no translation): a batch create goes to the route of the
    models inside it, which must serve batches; calls that name no model (a batch's
    status, results, cancel, the list) go to the first route that serves batches, which
    is where those models' batches went. A call on an object that lives on a known
    backend (``pinned``) can take any route of the API.
    """
    router = runtime.router
    api = family.name
    model = call.model
    if pinned and model is None:
        route = router.first_for(api)
        if route is None:
            raise Refusal(404, f"no route on the {api} API")
        return route
    if model is not None or not endpoint.sticky:
        route = router.route(api, model)
        if route is None:
            what = f"model {model!r}" if model else "this request"
            raise Refusal(404, f"no route for {what} on the {api} API")
        return route

    def serves_batches(route: Route) -> bool:
        return any(serves(t, family, endpoint) for t in route.targets)

    if not call.batch_models:
        route = router.first_for(api, serves_batches)
        if route is None:
            raise Refusal(
                404,
                f"no route of the {api} API can serve Message Batches: batches are relayed "
                f"as they are, so they need a route with a target of type {api} that keeps "
                "the model name",
            )
        return route
    routes: dict[Route, str] = {}
    for batch_model in call.batch_models:
        route = router.route(api, batch_model)
        if route is None:
            raise Refusal(
                404, f"no route for model {batch_model!r} (in the batch) on the {api} API"
            )
        routes.setdefault(route, batch_model)
    if len(routes) > 1:
        where = "; ".join(f"{m!r} to {r.name}" for r, m in routes.items())
        raise Refusal(
            400,
            "the requests of a batch must all go to one route (one upstream account), "
            f"but they go to several: {where}",
        )
    ((route, batch_model),) = routes.items()
    if not serves_batches(route):
        raise Refusal(
            404,
            f"Message Batches for {batch_model!r} cannot be served by {route.name}: its "
            "targets rename the model or speak the other API, and batches are relayed "
            f"as they are; route these models through a route with a target of type "
            f"{api} that keeps the model name",
        )
    return route


class AttemptPlanner:
    """Hands out the attempts of one request: targets in the route's order, backends
    not tried yet, and the retry decision after a failure."""

    __slots__ = (
        "_calls", "_clock", "_first", "_headers", "_location", "_pinned", "_request_id",
        "_runtime", "_tried", "_uri", "call", "endpoint", "family", "metrics", "provider_name",
        "route", "targets", "translation_error",
    )

    def __init__(
        self,
        runtime: RelayRuntime,
        clock: IReactorTime,
        metrics: RelayMetrics,
        family: IProvider,
        endpoint: Endpoint,
        route: Route,
        call: ClientCall,
        *,
        uri: bytes,
        upstream_headers: HeaderList,
        pinned: tuple[ProviderRoute, Backend] | None,
        request_id: str,
        affinity: SessionAffinity | None = None,
        location: Location | None = None,
    ) -> None:
        self._runtime = runtime
        self._clock = clock
        self.metrics = metrics
        self.family = family
        self.endpoint = endpoint
        self.route = route
        self.call = call
        self._uri = call.upstream_uri or uri
        self._headers = upstream_headers
        self._pinned = pinned
        self._request_id = request_id
        self._calls: dict[RouteTarget, UpstreamCall | None] = {}  # None: cannot translate
        self._tried: list[tuple[RouteTarget, Backend]] = []
        self.translation_error: TranslationError | None = None
        self._location = location
        self._first: Pick | None = None  # the session's pinned backend, when it may serve
        if pinned is not None:
            provider = pinned[0]
            same = [t for t in route.targets if t.provider is provider and not t.translated]
            self.targets: tuple[RouteTarget, ...] = (
                same[0] if same else RouteTarget(provider, None, 1, False),
            )
        elif endpoint.sticky:
            # Batches live in the account that created them: always the first provider.
            self.targets = tuple(t for t in route.targets if serves(t, family, endpoint))[:1]
        elif affinity is not None and affinity.pin is not None and (
            first := self._session_pick(affinity)
        ) is not None:
            # Not route.order(): a session's request leaves the weighted shares alone.
            self._first = first
            self.targets = (first.target, *(
                t for t in route.targets if t is not first.target and serves(t, family, endpoint)
            ))
        else:
            self.targets = tuple(t for t in route.order() if serves(t, family, endpoint))
        if not self.targets:
            names = ", ".join(sorted({t.provider.type for t in route.targets}))
            raise Refusal(
                404,
                f"{endpoint.name} requests for {call.model or 'this route'!r} cannot be "
                f"served: the route reaches only providers of type {names} under other "
                "model names or APIs, and only chat completions and messages are translated",
            )
        self.provider_name = self.targets[0].provider.name

    # -- picks --------------------------------------------------------------------------------

    def next(self) -> Pick | None:
        """The next target, backend and key to try, skipping backends already tried.

        Targets are tried in the route's order; with several, each is asked for an
        actively healthy backend before any is asked for an unhealthy one, so a route
        falls back to a healthy provider rather than to a failing backend of the first.
        The pick holds the backend's slot (see :meth:`unpick`).
        """
        if self._pinned is not None:
            return self._next_pinned()
        first = self._first
        if first is not None:
            self._first = None
            return first
        sticky = self.endpoint.sticky
        location = self._location
        targets = self.targets
        passes: tuple[bool | None, ...] = (None,) if len(targets) == 1 else (True, False)
        excludes: dict[RouteTarget, list[Backend]] = {}
        for healthy in passes:
            for target in targets:
                call = self._call_for(target)
                if call is None:
                    continue
                exclude = excludes.get(target)
                if exclude is None:
                    exclude = excludes[target] = [b for t, b in self._tried if t is target]
                provider = target.provider
                balancer = provider.balancer
                region = None if location is None else (
                    location.region if provider.regions is None
                    else provider.regions.region_for(location)
                )
                while True:
                    backend = (
                        balancer.primary(exclude, healthy=healthy)
                        if sticky
                        else balancer.choose(exclude, healthy=healthy, region=region)
                    )
                    if backend is None:
                        break
                    if not backend.breaker.allow_request():  # half-open, trial slots taken
                        exclude.append(backend)
                        continue
                    key = backend.keys.choose()
                    if key is None:
                        backend.breaker.release_trial()
                        exclude.append(backend)
                        continue
                    backend.acquire()  # its slot is ours until the attempt ends or unpick
                    return Pick(target, backend, key, call)
        return None

    def _session_pick(self, affinity: SessionAffinity) -> Pick | None:
        """The pick of the backend and key the session is pinned to, if they may serve
        it now (else None, with the reason told to ``affinity``): a pin orders the
        candidates, it never stands in for them."""
        pin = affinity.pin
        assert pin is not None
        family, endpoint = self.family, self.endpoint
        targets = self.route.targets
        index = 0
        target: RouteTarget | None = None
        for index, candidate in enumerate(targets):  # noqa: B007 (used after the loop)
            if candidate.provider.name == pin.provider and serves(candidate, family, endpoint):
                target = candidate
                break
        backend = target.provider.backend_named(pin.backend) if target is not None else None
        if target is None or backend is None or not 0 <= pin.key < len(backend.keys.keys):
            affinity.moved("gone")
            return None
        reason = _unfit(backend, pin.key, self._clock.seconds())
        if reason is None and backend.priority > 0 and _any_serves(
            b for b in target.provider.balancer.backends if b.priority < backend.priority
        ):
            reason = "priority"
        if reason is None and index and not self.route.weighted and _any_serves(
            b for t in targets[:index] if serves(t, family, endpoint)
            for b in t.provider.balancer.backends
        ):
            reason = "order"  # an earlier target of an ordered route can serve
        call = self._call_for(target) if reason is None else None
        key = backend.keys.take(pin.key) if call is not None else None
        if call is None or key is None or not backend.breaker.allow_request():
            affinity.moved(reason or "gone")
            return None
        backend.acquire()
        affinity.hit()
        return Pick(target, backend, key, call)

    def _next_pinned(self) -> Pick | None:
        """The one backend that holds the addressed object (never another: no failover)."""
        assert self._pinned is not None
        backend = self._pinned[1]
        target = self.targets[0]
        call = self._call_for(target)
        if call is None or any(b is backend for _, b in self._tried):
            return None
        if not backend.is_available() or not backend.breaker.allow_request():
            return None
        key = backend.keys.choose()
        if key is None:
            backend.breaker.release_trial()
            return None
        backend.acquire()
        return Pick(target, backend, key, call)

    @staticmethod
    def unpick(pick: Pick) -> None:
        """Give back what :meth:`next` took for a pick that gets no attempt: its backend
        slot, and its half-open trial if it was one."""
        pick.backend.breaker.release_trial()
        pick.backend.release()

    def sent(self, pick: Pick) -> None:
        """An attempt went out on ``pick``: its backend is not picked again for its target."""
        self._tried.append((pick.target, pick.backend))
        self.provider_name = pick.backend.provider_name

    def _call_for(self, target: RouteTarget) -> UpstreamCall | None:
        """The upstream request for ``target`` (built once); None if it cannot be made."""
        try:
            return self._calls[target]
        except KeyError:
            pass
        client = self.call
        call: UpstreamCall | None
        try:
            call = prepare_call(
                self.route, target, self.family, self.endpoint,
                uri=self._uri, headers=self._headers, body=client.body,
                payload=client.payload, model=client.model,
            )
        except TranslationError as exc:
            self._untranslatable(exc)
            call = None
        except RecursionError:
            self._untranslatable(TranslationError(400, "request body is nested too deeply"))
            call = None
        except Exception:
            # A translator bug must not take the exchange down: this target is skipped.
            log.failure("{request_id}: translating for {provider} failed",
                        request_id=self._request_id, provider=target.provider.name)
            self._untranslatable(TranslationError(
                400, "the request could not be translated for the upstream's API"
            ))
            call = None
        self._calls[target] = call
        return call

    def _untranslatable(self, error: TranslationError) -> None:
        if self.translation_error is None:
            self.translation_error = error

    # -- when nothing can be picked -----------------------------------------------------------

    def untranslatable(self) -> Refusal | None:
        """The refusal when no target could take the request in its API at all."""
        error = self.translation_error
        if error is None or any(self._calls.get(t) for t in self.targets):
            return None
        return Refusal(error.status, str(error), outcome=Outcome.UNTRANSLATABLE)

    def _usable_backends(self) -> list[Backend]:
        """The backends this request may go to: the one that holds its object (pinned),
        else every backend of its targets' providers."""
        if self._pinned is not None:
            return [self._pinned[1]]
        return [b for provider in providers_of(self.targets) for b in provider.balancer.backends]

    def capacity_blocked(self) -> list[Backend]:
        """The backends this request could use but for their ``max_concurrent``."""
        return [b for b in self._usable_backends() if not b.has_capacity() and b.can_serve()]

    def no_backend(self) -> Refusal:
        return Refusal(
            503,
            f"no backend of {self.provider_names()} is available now "
            "(circuit-broken, or every key rate-limited or rejected)",
            outcome=Outcome.NO_BACKEND,
            retry_after=self.unavailable_for(),
        )

    def unavailable_for(self) -> float:
        """Seconds until some backend this request may use can take requests (>= 1)."""
        now = self._clock.seconds()
        soonest: float | None = None
        for backend in self._usable_backends():
            candidates = []
            breaker = backend.breaker
            if breaker.state == "open" and breaker.opened_until is not None:
                candidates.append(breaker.opened_until - now)
            key_time = backend.keys.next_available_at()
            if key_time is not None:
                candidates.append(key_time - now)
            wait = max(candidates) if candidates else 0.0
            soonest = wait if soonest is None else min(soonest, wait)
        return max(soonest or 0.0, 1.0)

    def provider_names(self) -> str:
        names = [repr(p.name) for p in providers_of(self.targets)]
        return ("provider " if len(names) == 1 else "providers ") + ", ".join(names)

    # -- retries ------------------------------------------------------------------------------

    def retry(self, reason: str, attempts: int, last: Backend | None) -> Pick | None:
        """Where a failed attempt may be retried, if anywhere; counts refusals."""
        failover = self._runtime.config.failover
        provider = self.provider_name or "-"
        if self.endpoint.sticky:
            # Batches live in the upstream account that created them: another backend
            # would answer for a different account.
            return None
        metrics = self.metrics
        if attempts >= failover.max_attempts:
            if failover.max_attempts > 1:
                metrics.retry_refused(provider, "attempts")
            return None
        if len(self.call.body) > failover.max_replay_bytes:
            metrics.retry_refused(provider, "body_too_large")
            return None
        pick = self.next()
        if pick is None:
            metrics.retry_refused(provider, "no_backend")
            return None
        if not self._runtime.retry_budget.try_acquire_retry():
            self.unpick(pick)
            metrics.retry_refused(provider, "budget")
            return None
        metrics.retry(provider, reason)
        if pick.backend is not last:
            metrics.failover(provider, reason)
        return pick

    def around_quota(self, pick: Pick, retry_after: float | None, attempts: int) -> Pick:
        """The next pick after ``pick``'s key was refused for its provider quota (the key
        is kept out meanwhile); raises the 429 when every key's quota is used up."""
        wait = max(retry_after or 1.0, 1.0)
        backend = pick.backend
        backend.keys.cool_down(pick.key, wait, "quota")
        self.metrics.quota_skip(backend.provider_name, backend.name)
        retry = self.next()
        if retry is not None:
            return retry
        raise Refusal(
            429,
            f"the upstream quota of every backend of {self.provider_names()} is used up "
            "for now",
            outcome=Outcome.UPSTREAM_QUOTA,
            retry_after=max(self.unavailable_for(), wait),
            headers=gave_up_headers(attempts) if attempts else (),
        )

    def gave_up(self, result: str, message: str, attempts: int, answered: bool) -> Refusal:
        """The answer when the last attempt failed and no retry is left: ``answered``,
        the upstream answered something that cannot be relayed (its head)."""
        if answered:
            return Refusal(502, f"the upstream's answer could not be relayed: its {message}",
                           outcome=Outcome.UPSTREAM_ERROR)
        timeout = result == Result.TIMEOUT
        return Refusal(
            504 if timeout else 502,
            f"upstream failed after {attempts} attempt(s); last: {message}",
            outcome=Outcome.UPSTREAM_TIMEOUT if timeout else Outcome.UPSTREAM_ERROR,
            retry_after=self.unavailable_for(),
            headers=gave_up_headers(attempts) if attempts > 1 else (),
        )


def _any_serves(backends: Iterable[Backend]) -> bool:
    """Whether the balancer's first pass could choose one of ``backends`` now."""
    return any(backend.is_available() and backend.health.healthy for backend in backends)


def _unfit(backend: Backend, key_index: int, now: float) -> str | None:
    """Why a session's pinned backend and key should not take its request now."""
    if not backend.health.healthy:
        return "unhealthy"
    if backend.breaker.state != "closed":
        return "breaker"
    if not backend.has_capacity():
        return "busy"
    if backend.keys.keys[key_index].cooldown_until > now:
        return "key"
    return None


def gave_up_headers(attempts: int) -> tuple[tuple[bytes, bytes], ...]:
    """relayd retried already: the SDK retrying through it will not help."""
    return ((b"x-should-retry", b"false"), (b"x-relayd-attempts", b"%d" % attempts))
