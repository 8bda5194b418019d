"""The record of a finished exchange: its usage and limit settlement, its metrics and
its access-log line.

All of it is done once the exchange's answer is sent
(:meth:`relayd.http.relay.RelayResource.exchange_done`), but the settlement of an
exchange that a limit applies to: that is made when it finishes.

Labels and usage keys never take arbitrary client-supplied names: only routed requests
name a model, and only configured or upstream-confirmed ones
(:mod:`relayd.labels`); the log line carries the client's model as sent, quoted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from relayd.cache import CACHE_PROVIDER
from relayd.http.intake import printable
from relayd.limits import UsageRecord
from relayd.limits.policy import usage_tokens
from relayd.logs import log_access

if TYPE_CHECKING:
    from relayd.http.exchange import Exchange


def settle_exchange(exchange: Exchange) -> str:
    """Hand a finished exchange's usage and limit reservations over; returns its
    ``model`` label."""
    read_usage(exchange)
    model = model_label(exchange)
    settle(exchange, model)
    return model


def record_exchange(exchange: Exchange, model: str | None, now: float) -> None:
    """Settle a finished exchange unless ``model`` (its label) says it is, count it and
    write its access line (``now``: when it finished)."""
    if model is None:
        model = settle_exchange(exchange)
    # A client that left before any byte was written got no status at all.
    status = 499 if exchange.client_gone and not exchange.request.startedWriting else (
        exchange.status
    )
    report(exchange, status, model, now)


def read_usage(exchange: Exchange) -> None:
    """Read the usage its sink left to be read later, if none is known yet."""
    sink = exchange.sink
    if exchange.usage is None and sink is not None:
        exchange.usage = sink.final_usage()


def model_label(exchange: Exchange) -> str:
    """The ``model`` label of the exchange's metrics and usage record."""
    if exchange.route is None:
        return "-"
    call = exchange.call
    response = exchange.response
    return exchange.runtime.model_labels.label(
        call.model if call is not None else None,
        response is not None and response.code < 400,
    )


def settle(exchange: Exchange, model: str) -> None:
    """Hand the request's usage and its limit reservations to the state store."""
    record = None
    call = exchange.call
    backend = exchange.backend
    stage = exchange.cache
    if exchange.first_sent_at is not None and call is not None and backend is not None:
        record = UsageRecord(
            call.client.name, model, backend.provider_name, backend.name, exchange.usage
        )
    if stage is not None and call is not None and exchange.provider_name == CACHE_PROVIDER:
        # Answered from the cache: no upstream tokens, counted apart (backend: hit, stale).
        record = UsageRecord(call.client.name, model, CACHE_PROVIDER, stage.state, exchange.usage)
    gate = exchange.gate
    if gate is None:
        if record is not None:
            exchange.runtime.store.settle((), (), record)
        return
    outcome = None
    status = exchange.status
    if (
        exchange.response is not None and status is not None and status < 400
        and exchange.provider_name != CACHE_PROVIDER
    ):
        sink = exchange.sink
        final = (
            sink.complete if sink is not None and sink.streaming
            else exchange.upstream_done_at is not None
        )
        outcome = (usage_tokens(exchange.usage), final)
    gate.settle(record, outcome, exchange.attempt)


def report(exchange: Exchange, status: int | None, model: str, now: float) -> None:
    """Count the finished exchange and write its access line."""
    started = exchange.started
    total = now - started
    first_byte_at = exchange.first_byte_at
    ttfb = first_byte_at - started if first_byte_at is not None else None
    upstream_wait = 0.0
    if exchange.first_sent_at is not None:
        upstream_wait = (exchange.upstream_done_at or now) - exchange.first_sent_at
    call = exchange.call
    client = call.client.name if call is not None else None
    backend = exchange.backend
    provider = exchange.provider_name
    usage = exchange.usage
    attempt = exchange.attempt
    sink = exchange.sink
    exchange.metrics.request_finished(
        client=client or "-",
        api=exchange.family.name,
        provider=provider or "-",
        backend=backend.name if backend else "-",
        model=model,
        status=status or 0,
        outcome=exchange.outcome,
        total=total,
        ttfb=ttfb,
        upstream_wait=upstream_wait,
        usage=usage,
    )
    request = exchange.request
    endpoint = exchange.endpoint
    client_model = call.model if call is not None else None
    log_access(
        {
            "request_id": exchange.request_id,
            "client": client,
            "client_ip": exchange.client_ip or None,
            "api": exchange.family.name,
            "method": printable(request.method),
            "path": printable(request.path),
            "endpoint": endpoint.name if endpoint else None,
            "provider": provider,
            "backend": backend.name if backend else None,
            "cache": exchange.cache.state if exchange.cache is not None else None,
            "affinity": exchange.affinity.state if exchange.affinity is not None else None,
            "flagged": exchange.flagged,
            "model": client_model,
            "upstream_api": attempt.call.family.name if attempt else None,
            "upstream_model": (attempt.target.model or client_model) if attempt else None,
            "dropped": ",".join(attempt.call.dropped) or None if attempt else None,
            "stream": (sink is not None and sink.streaming) or (
                exchange.cache is not None and call is not None and call.stream
            ),
            "status": status,
            "outcome": exchange.outcome,
            "attempts": exchange.attempts,
            "total_ms": round(total * 1000, 1),
            "ttfb_ms": round(ttfb * 1000, 1) if ttfb is not None else None,
            "input_tokens": usage.input_tokens if usage else None,
            "output_tokens": usage.output_tokens if usage else None,
            "cache_read_tokens": usage.cache_read_tokens if usage else None,
            "cache_write_tokens": usage.cache_write_tokens if usage else None,
        }
    )
