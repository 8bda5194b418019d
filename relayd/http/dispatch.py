"""Before the first attempt: which endpoint was called, by whom, and where it goes.

The first stages of an :class:`~relayd.http.exchange.Exchange`, in order:

* intake: the endpoint, the caller's key, body and model (:mod:`relayd.http.intake`),
  and a signing client's signature (:mod:`relayd.http.signed`; its nonce may wait for
  Redis); the model list is answered here (:mod:`relayd.http.models`);
* objects: a call on an upstream object goes where the object lives
  (:mod:`relayd.http.objects`; the lookup may wait for the state store);
* route: the route (:func:`~relayd.http.planner.choose_route`), a model alias answered
  by relayd itself, the client's limits gate, and the response cache stage, which may
  answer or hand the request back (``cache_missed``);
* plan: the session's pin (:mod:`relayd.affinity`; may wait for Redis), the client's
  location for region routing, and the :class:`~relayd.http.planner.AttemptPlanner`,
  handed to :meth:`Exchange.first_attempt`.

Each stage records what it found on the exchange (the access record reads it there) and
raises :class:`~relayd.errors.Refusal` when the request cannot go on; the exchange
renders it. A stage resumed after a wait does nothing once the exchange is done (its
client left meanwhile).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from relayd.affinity import SessionAffinity
from relayd.errors import Outcome, Refusal
from relayd.geoip import NOWHERE, Location
from relayd.http.caching import CacheStage
from relayd.http.headers import replace_header
from relayd.http.intake import parse_client_call, printable
from relayd.http.models import ModelCatalog
from relayd.http.objects import ObjectKeeper
from relayd.http.planner import AttemptPlanner, choose_route
from relayd.http.signed import check_signed
from relayd.limits.gate import LimitGate
from relayd.providers import Endpoint, ModelIn, family_of
from relayd.routing import ProviderRoute
from relayd.rules import RuleVerdict
from relayd.upstream import Backend

if TYPE_CHECKING:
    from relayd.http.exchange import Exchange

__all__ = ["intake", "plan"]

# An origin-form request target: what relayd can pass on (relayd.pool.PoolSender).
_TARGET = re.compile(rb"/[\x21-\x7e]*")


def intake(exchange: Exchange) -> None:
    """Identify the call; answer the model list, or go on to the object's owner and the
    route."""
    unknown: Refusal | None = None
    try:
        exchange.endpoint = _endpoint(exchange)
    except Refusal as refusal:  # answered after the address rules: floods of 404s count
        unknown = refusal
    rules = exchange.runtime.address_rules
    if rules.active:  # before authentication: a flood of bad keys is cut cheaply
        verdict = rules.admit(exchange.client_ip)
        if isinstance(verdict, Deferred):  # the bucket is in Redis
            verdict.addCallback(_address_checked, exchange, unknown)
            verdict.addErrback(exchange.on_unexpected)
            return
        _check_address(verdict, exchange)
    if unknown is not None:
        raise unknown
    _authenticate(exchange)


def _address_checked(
    verdict: tuple[str, float] | None, exchange: Exchange, unknown: Refusal | None
) -> None:
    if not exchange.done:
        _check_address(verdict, exchange)
        if unknown is not None:
            raise unknown
        _authenticate(exchange)


def _check_address(verdict: tuple[str, float] | None, exchange: Exchange) -> None:
    if verdict is None:
        return
    reason, wait = verdict
    exchange.metrics.edge_rejected(reason)
    what = ("requests" if reason == "per_address" else "failed authentications")
    raise Refusal(429, f"too many {what} from this address; retry after the "
                       "retry-after header's seconds", outcome=Outcome.RATE_LIMITED,
                  retry_after=wait)


def _authenticate(exchange: Exchange) -> None:
    request, runtime = exchange.request, exchange.runtime
    endpoint = exchange.endpoint
    assert endpoint is not None
    try:
        call = exchange.call = parse_client_call(
            request, endpoint, runtime.clients, runtime.max_body_bytes
        )
    except Refusal as refusal:
        if refusal.status == 401:
            runtime.address_rules.auth_failed(exchange.client_ip)
        raise
    allowed = call.client.allow_from
    if allowed is not None and exchange.client_ip not in allowed:
        exchange.metrics.edge_rejected("allow_from")
        raise Refusal(403, f"client {call.client.name!r} may not call from this address",
                      code="address_not_allowed")
    signed = check_signed(request, call, runtime.nonces, exchange.clock, exchange.metrics)
    if signed is not None:  # the nonce goes to Redis
        _resume(signed, exchange, _identified)
        return
    _identified(exchange)


def _identified(exchange: Exchange) -> None:
    """The caller is who it says: answer the model list, or find where the call goes."""
    request, runtime = exchange.request, exchange.runtime
    endpoint, call = exchange.endpoint, exchange.call
    assert endpoint is not None and call is not None
    if endpoint.local:
        catalog = ModelCatalog(runtime, exchange.family, call.client, exchange.clock,
                               exchange.request_id)
        d = catalog.model_list(request.requestHeaders)
        d.addCallback(exchange.answered).addErrback(exchange.on_unexpected)
        return
    role = endpoint.object_role(request.method)
    if role is not None:
        keeper = exchange.objects = ObjectKeeper(runtime.store, endpoint, role,
                                                 call.client.name)
        reference = keeper.reference(request.path, call.payload)
        if reference is not None:
            located = keeper.locate(reference, runtime)
            located.addCallback(_located, exchange).addErrback(exchange.on_unexpected)
            return
    route(exchange)


def _resume(waited: Deferred[Any], exchange: Exchange, step: Callable[[Exchange], None]) -> None:
    """Go on with ``step`` once the state store answered ``waited``, unless the exchange
    ended meanwhile (its client left); a refusal or a bug goes to the exchange."""

    def resumed(_: object) -> None:
        if not exchange.done:
            step(exchange)

    waited.addCallback(resumed).addErrback(exchange.on_unexpected)


def _endpoint(exchange: Exchange) -> Endpoint:
    request = exchange.request
    if _TARGET.fullmatch(request.uri) is None:
        raise Refusal(400, "request target must be an absolute path (visible ASCII)")
    path = request.path
    found = exchange.resource.endpoints.lookup(request, path)
    if found is None:
        exchange.family = family_of(request.requestHeaders)
        raise Refusal(404, f"no such endpoint: {printable(path)}")
    exchange.family, endpoint = found
    return endpoint


def _located(where: tuple[ProviderRoute, Backend], exchange: Exchange) -> None:
    if not exchange.done:
        exchange.pinned = where
        route(exchange)


def route(exchange: Exchange) -> None:
    """The route; a model alias, the limits gate and the response cache on it."""
    runtime = exchange.runtime
    endpoint, call, family = exchange.endpoint, exchange.call, exchange.family
    assert endpoint is not None and call is not None
    found = exchange.route = choose_route(
        runtime, family, endpoint, call, exchange.pinned is not None
    )
    if call.model is not None and endpoint.model_in == ModelIn.PATH:
        catalog = ModelCatalog(runtime, family, call.client, exchange.clock,
                               exchange.request_id)
        alias = catalog.alias(found, call.model)
        if alias is not None:
            exchange.reply(200, alias)
            return
    rules = runtime.content_rules
    if rules and call.payload is not None:
        _check_content(exchange, rules.check(family, call.payload, call.client.name,
                                             found.label))
    gate = exchange.gate = LimitGate.for_request(
        runtime, call.client, call.payload, family, exchange.clock, exchange.metrics,
        exchange.request_id,
    )
    stage = CacheStage.for_request(
        runtime.response_cache, found, endpoint, family, call, exchange.request
    )
    if stage is None:
        plan(exchange)
        return
    exchange.cache = stage
    stage.start(exchange, gate)  # answers from the cache, or calls cache_missed


def _check_content(exchange: Exchange, verdict: RuleVerdict | None) -> None:
    """Refuse a request a ``deny`` rule matched; mark one a ``flag`` rule matched."""
    if verdict is None:
        return
    metrics = exchange.metrics
    if verdict.denied is not None:
        metrics.rule_matched(verdict.denied, "deny")
        raise Refusal(403, f"the request was refused by the relay's content rule "
                           f"{verdict.denied!r}", code="content_rule",
                      headers=((b"x-should-retry", b"false"),))
    if verdict.flagged:
        for name in verdict.flagged:
            metrics.rule_matched(name, "flag")
        exchange.flagged = ",".join(verdict.flagged)
        exchange.request.setHeader(b"x-relayd-flagged", exchange.flagged.encode())


def plan(exchange: Exchange) -> None:
    """Find the session's pin (when it has one), then plan the attempts."""
    call, found = exchange.call, exchange.route
    assert exchange.endpoint is not None and call is not None and found is not None
    if exchange.pinned is None:
        affinity = exchange.affinity = SessionAffinity.for_request(
            exchange.runtime.pins, found.affinity, exchange.endpoint, exchange.family,
            call.client.name, found.label, exchange.request.requestHeaders, call.payload,
        )
        looked_up = affinity.find() if affinity is not None else None
        if looked_up is not None:  # in Redis
            _resume(looked_up, exchange, _planned)
            return
    _planned(exchange)


def _planned(exchange: Exchange) -> None:
    runtime = exchange.runtime
    endpoint, call, found = exchange.endpoint, exchange.call, exchange.route
    assert endpoint is not None and call is not None and found is not None
    family = exchange.family
    request = exchange.request
    headers = runtime.header_policy.upstream_headers(family.name, request.requestHeaders)
    if call.stream:
        headers = replace_header(headers, b"accept-encoding", b"identity")
    exchange.first_attempt(AttemptPlanner(
        runtime, exchange.clock, exchange.metrics, family, endpoint, found, call,
        uri=request.uri, upstream_headers=headers, pinned=exchange.pinned,
        request_id=exchange.request_id, affinity=exchange.affinity,
        location=location(exchange),
    ))


def location(exchange: Exchange) -> Location | None:
    """Where the client is, for region routing (None: no backend has a region)."""
    runtime = exchange.runtime
    if not runtime.regional:
        return None
    assert exchange.call is not None
    region = exchange.call.client.region
    if region is not None:
        return Location(None, None, region)
    geoip = runtime.geoip
    return geoip.locate(exchange.client_ip) if geoip is not None else NOWHERE
