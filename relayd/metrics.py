"""Prometheus metrics of a relayd process.

Every metric lives in one :class:`~prometheus_client.CollectorRegistry` owned by a
:class:`RelayMetrics`, which is created once per process and survives configuration
reloads: counters must keep counting across a reload, and a second registration of the
same names would fail. The global default registry is never touched, so tests and
embedding code can build as many independent instances as they like.

Two kinds of metrics live here:

* Request-path metrics (counters, histograms, gauges) updated by the relay as requests
  go by. Those calls sit on the hot path, so they are :mod:`relayd.metric_series`
  families: after the first request with a given label set, an update is one tuple, one
  dict hit and an attribute change, with no string building and none of
  prometheus-client's label validation or locking; the exposition is the same.
* Backend state (health, breaker, load, weights, key cooldowns, idle pooled connections)
  read by :class:`RuntimeCollector` from the *current* runtime at scrape time. Nothing is
  recorded per request for these, and nothing goes stale when a reload swaps the runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

import relayd
from relayd.metric_series import CounterFamily, GaugeFamily, HistogramFamily
from relayd.providers.base import Usage

log = Logger()

#: Whole-request durations: LLM calls run from tens of milliseconds to many minutes.
DURATION_BUCKETS: tuple[float, ...] = (
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)
#: Time to the first response byte: model latency, mostly under a few seconds.
TTFB_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0,
)
#: Time the relay itself adds: should be well under a millisecond, so fine at the low end.
OVERHEAD_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)

#: Time spent waiting for a backend slot: from nothing to the default 30 s timeout.
QUEUE_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
)
#: Circuit breaker states, each exported as its own 0/1 series.
BREAKER_STATES: tuple[str, ...] = ("closed", "open", "half_open")
#: Results of a configuration reload.
RELOAD_RESULTS: tuple[str, ...] = ("ok", "invalid", "refused")


class ReloadMetrics:
    """The reload figures: one process's, or with workers the daemon's alone."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._reloads = Counter(
            "relayd_config_reloads_total", "Configuration reloads, by result.", ["result"],
            registry=registry,
        )
        for result in RELOAD_RESULTS:
            self._reloads.labels(result)
        self._last_reload = Gauge(
            "relayd_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration reload.", registry=registry,
        )

    def count(self, result: str) -> None:
        """Count a reload; on ``ok`` also stamp the last-success time."""
        self._reloads.labels(result).inc()
        if result == "ok":
            self._last_reload.set_to_current_time()


class RelayMetrics:
    """Every relayd metric, registered once in ``registry``.

    Create one per process and keep it across configuration reloads. Label values passed
    to the methods must come from bounded sets (configured clients, providers, backends
    and models, HTTP status codes, fixed reason words): each new combination is a new
    time series.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        self._build_info = GaugeFamily(
            "relayd_build_info", "relayd build information; always 1.", ["version"], registry=r
        )
        self._build_info.child((relayd.__version__,)).set(1)

        self._in_flight = GaugeFamily(
            "relayd_requests_in_flight", "Client requests being served right now.", registry=r
        ).child(())
        self._streams_open = GaugeFamily(
            "relayd_streams_open", "Streamed (SSE) responses being relayed right now.",
            registry=r,
        ).child(())
        self._requests_total = CounterFamily(
            "relayd_requests_total",
            "Finished client requests, by the status code sent to the client.",
            ["client", "api", "provider", "backend", "model", "status"],
            registry=r,
        )
        self._duration = HistogramFamily(
            "relayd_request_duration_seconds",
            "Client request duration, from the request to the last response byte.",
            ["api", "provider"], buckets=DURATION_BUCKETS, registry=r,
        )
        self._ttfb = HistogramFamily(
            "relayd_time_to_first_byte_seconds",
            "Time from the client request to the first response byte sent to the client.",
            ["api", "provider"], buckets=TTFB_BUCKETS, registry=r,
        )
        self._overhead = HistogramFamily(
            "relayd_relay_overhead_seconds",
            "Request duration not spent waiting for an upstream: the relay's own cost.",
            ["api"], buckets=OVERHEAD_BUCKETS, registry=r,
        )
        self._tokens = CounterFamily(
            "relayd_tokens_total",
            "Tokens reported by upstreams, by kind (input, output, cache_read, cache_write).",
            ["client", "provider", "model", "kind"], registry=r,
        )
        self._attempts = CounterFamily(
            "relayd_upstream_attempts_total",
            "Upstream attempts, by result (ok, connect_error, timeout, status_429, ...).",
            ["provider", "backend", "result"], registry=r,
        )
        self._retries = CounterFamily(
            "relayd_upstream_retries_total", "Upstream retries, by the reason for the retry.",
            ["provider", "reason"], registry=r,
        )
        self._failovers = CounterFamily(
            "relayd_failovers_total",
            "Retries that moved to another backend or priority tier, by reason.",
            ["provider", "reason"], registry=r,
        )
        self._refused = CounterFamily(
            "relayd_retries_refused_total",
            "Retries that were warranted but not made (budget, attempts, body_too_large).",
            ["provider", "reason"], registry=r,
        )
        self._limit_rejections = CounterFamily(
            "relayd_limit_rejections_total",
            "Client requests refused by one of the client's limits, by the limit's name.",
            ["client", "limit"], registry=r,
        )
        self._quota_skips = CounterFamily(
            "relayd_upstream_quota_skips_total",
            "Upstream keys passed over because relayd's view of their quota was used up.",
            ["provider", "backend"], registry=r,
        )
        self._queued = GaugeFamily(
            "relayd_queued_requests",
            "Requests waiting for a free slot (every backend they may use at max_concurrent).",
            registry=r,
        ).child(())
        self._queue_wait = HistogramFamily(
            "relayd_queue_wait_seconds",
            "Time requests waited for a free backend slot (however the wait ended).",
            buckets=QUEUE_BUCKETS, registry=r,
        ).child(())
        self._queue_refusals = CounterFamily(
            "relayd_queue_refusals_total",
            "Requests answered 503 for want of a backend slot: queue full, or wait timed out.",
            ["reason"], registry=r,
        )
        self._client_connections = GaugeFamily(
            "relayd_client_connections",
            "Client connections open on the relay listeners.", registry=r,
        ).child(())
        self._connections_accepted = CounterFamily(
            "relayd_client_connections_accepted_total",
            "Client connections accepted on the relay listeners (with workers, per worker: "
            "how evenly they share the listening sockets).", registry=r,
        ).child(())
        self._connections_closed = CounterFamily(
            "relayd_client_connections_closed_total",
            "Client connections relayd closed or refused itself, by reason (head_timeout, "
            "body_timeout, evicted, refused, refused_per_address).",
            ["reason"], registry=r,
        )
        self._client_disconnects = CounterFamily(
            "relayd_client_disconnects_total",
            "Clients that hung up before their answer was complete, by API and by whether "
            "any of the answer had been sent (before_response, during_response).",
            ["api", "stage"], registry=r,
        )
        self._store_errors = CounterFamily(
            "relayd_state_store_errors_total",
            "State store calls that failed or timed out, by operation.",
            ["store", "operation"], registry=r,
        )
        self._store_up = GaugeFamily(
            "relayd_state_store_up",
            "1 while the shared state store answers; 0 while relayd decides without it.",
            ["store"], registry=r,
        )
        self._edge_rejections = CounterFamily(
            "relayd_edge_rejections_total",
            "Requests refused at the edge, before any upstream contact, by reason "
            "(signature_*, allow_from, per_address, auth_failures).",
            ["reason"], registry=r,
        )
        self._rule_matches = CounterFamily(
            "relayd_rule_matches_total",
            "Requests a content rule matched, by rule and action (deny, flag).",
            ["rule", "action"], registry=r,
        )
        self.reloads = ReloadMetrics(r)

        self._runtime_collector = RuntimeCollector()
        r.register(self._runtime_collector)

    # -- the request path ---------------------------------------------------------------

    def request_started(self, stream: bool = False) -> None:
        """Count a client request as in flight.

        ``stream`` is accepted for the caller's convenience and not used: open streams
        are counted by :meth:`stream_opened` once a streamed response actually starts.
        """
        self._in_flight.inc()

    def stream_opened(self) -> None:
        """A streamed response started flowing to the client."""
        self._streams_open.inc()

    def stream_closed(self) -> None:
        """A streamed response ended (completed, failed or abandoned by the client)."""
        self._streams_open.dec()

    def request_finished(
        self,
        *,
        client: str,
        api: str,
        provider: str,
        backend: str,
        model: str,
        status: int,
        outcome: str,
        total: float,
        ttfb: float | None,
        upstream_wait: float,
        usage: Usage | None,
    ) -> None:
        """Record a finished client request; call once per :meth:`request_started`.

        ``outcome`` is accepted but not a label (the status code already splits requests,
        and the access log carries the detail). ``upstream_wait`` is the time spent
        waiting on upstreams, so ``total - upstream_wait`` is what the relay added.
        """
        self._in_flight.dec()
        self._requests_total.child((client, api, provider, backend, model, status)).inc()
        api_provider = (api, provider)
        self._duration.child(api_provider).observe(total)
        if ttfb is not None:
            self._ttfb.child(api_provider).observe(ttfb)
        overhead = total - upstream_wait
        self._overhead.child((api,)).observe(overhead if overhead > 0.0 else 0.0)
        if usage is not None:
            if usage.input_tokens:
                self._tokens.child((client, provider, model, "input")).inc(usage.input_tokens)
            if usage.output_tokens:
                self._tokens.child((client, provider, model, "output")).inc(usage.output_tokens)
            if usage.cache_read_tokens:
                self._tokens.child((client, provider, model, "cache_read")).inc(
                    usage.cache_read_tokens
                )
            if usage.cache_write_tokens:
                self._tokens.child((client, provider, model, "cache_write")).inc(
                    usage.cache_write_tokens
                )

    def upstream_attempt(self, provider: str, backend: str, result: str) -> None:
        """Count one upstream attempt and how it ended (``ok``, ``timeout``, ...)."""
        self._attempts.child((provider, backend, result)).inc()

    def retry(self, provider: str, reason: str) -> None:
        """Count a retry of an upstream attempt."""
        self._retries.child((provider, reason)).inc()

    def failover(self, provider: str, reason: str) -> None:
        """Count a retry that moved to another backend or priority tier."""
        self._failovers.child((provider, reason)).inc()

    def retry_refused(self, provider: str, reason: str) -> None:
        """Count a retry that was warranted but not made (``budget``, ``attempts``, ...)."""
        self._refused.child((provider, reason)).inc()

    def limit_rejected(self, client: str, limit: str) -> None:
        """Count a request refused by the client's ``limit`` (e.g. requests_per_minute)."""
        self._limit_rejections.child((client, limit)).inc()

    def edge_rejected(self, reason: str) -> None:
        """Count a request refused by an edge check (a signature, an address rule)."""
        self._edge_rejections.child((reason,)).inc()

    def rule_matched(self, rule: str, action: str) -> None:
        """Count a request a content rule matched (rule names come from the config)."""
        self._rule_matches.child((rule, action)).inc()

    def quota_skip(self, provider: str, backend: str) -> None:
        """Count an upstream key skipped because its quota was used up."""
        self._quota_skips.child((provider, backend)).inc()

    def client_connections(self, count: int) -> None:
        """The number of open client connections changed."""
        self._client_connections.set(count)

    def client_connection_opened(self, count: int) -> None:
        """A client connection was accepted; ``count`` are open now."""
        self._connections_accepted.inc()
        self._client_connections.set(count)

    def client_connection_closed(self, reason: str) -> None:
        """relayd closed or refused a client connection itself."""
        self._connections_closed.child((reason,)).inc()

    def queue_entered(self) -> None:
        """A request began waiting for a backend slot."""
        self._queued.inc()

    def queue_left(self, waited: float) -> None:
        """A request stopped waiting (got a slot, timed out, gave up) after ``waited`` s."""
        self._queued.dec()
        self._queue_wait.observe(waited)

    def queue_refused(self, reason: str) -> None:
        """A request was refused for want of a slot (``full`` or ``timeout``)."""
        self._queue_refusals.child((reason,)).inc()

    def client_disconnected(self, api: str, stage: str) -> None:
        """A client hung up first (``before_response`` or ``during_response``)."""
        self._client_disconnects.child((api, stage)).inc()

    def store_event(self, store: str, what: str) -> None:
        """A state store event: ``error:<operation>``, ``up`` or ``down``."""
        if what.startswith("error:"):
            self._store_errors.child((store, what[6:])).inc()
        else:
            self._store_up.child((store,)).set(1 if what == "up" else 0)

    # -- the process --------------------------------------------------------------------

    def config_reload(self, result: str) -> None:
        """Count a configuration reload; on ``ok`` also stamp the last-success time."""
        self.reloads.count(result)

    def set_runtime_source(self, get_runtime: Callable[[], Any], clock: IReactorTime) -> None:
        """Export backend state read from ``get_runtime()`` at each scrape.

        ``get_runtime`` must return the runtime currently serving requests, so a reload
        is reflected at the next scrape; ``clock`` gives "now" for key cooldowns.
        """
        self._runtime_collector.set_source(get_runtime, clock)


class RuntimeCollector:
    """A custom collector of per-backend state, read from the current runtime at scrape.

    The runtime is duck-typed: ``runtime.backends`` is a list of objects with
    ``provider_name``, ``name``, ``weight``, ``priority``, ``in_flight``,
    ``health.healthy``, ``breaker.state``, ``keys.keys`` (objects with ``index`` and
    ``cooldown_until``, a clock time, 0.0 when usable) and ``pool`` (a
    :class:`~relayd.pool.ConnectionPool` or ``None``). Keys are labelled by index only: a
    key's value never reaches a label. With no source set, nothing is collected.
    """

    def __init__(self) -> None:
        self._get_runtime: Callable[[], Any] | None = None
        self._clock: IReactorTime | None = None

    def set_source(self, get_runtime: Callable[[], Any], clock: IReactorTime) -> None:
        """Read from ``get_runtime()`` from the next scrape on."""
        self._get_runtime = get_runtime
        self._clock = clock

    def describe(self) -> list[Metric]:
        """The families this collector exports (without samples), for name checks."""
        return list(_families())

    def collect(self) -> Iterator[Metric]:
        """Yield the backend families of the current runtime, or nothing.

        A failure while reading the runtime is logged and yields nothing rather than
        failing the whole scrape: the request-path metrics are still worth having.
        """
        if self._get_runtime is None or self._clock is None:
            return iter(())
        try:
            runtime = self._get_runtime()
            families: list[Metric] = list(_families())
            _fill(families, runtime.backends, self._clock.seconds())
            cache = getattr(runtime, "response_cache", None)
            if cache is not None:
                families += _cache_families(cache.stats())
            pins = getattr(runtime, "pins", None)
            if pins is not None:
                families += _affinity_families(pins.stats())
        except Exception:
            log.failure("relayd: could not collect backend metrics")
            return iter(())
        return iter(families)


def _families() -> list[GaugeMetricFamily | CounterMetricFamily]:
    """Fresh, empty backend metric families in exposition order."""
    pb = ["provider", "backend"]
    return [
        GaugeMetricFamily(
            "relayd_backend_healthy", "1 if the backend passes health checks, else 0.",
            labels=pb,
        ),
        GaugeMetricFamily(
            "relayd_backend_breaker_state",
            "Circuit breaker state of the backend: 1 for the current state, 0 for others.",
            labels=[*pb, "state"],
        ),
        GaugeMetricFamily(
            "relayd_backend_in_flight", "Requests in flight to the backend.", labels=pb
        ),
        GaugeMetricFamily(
            "relayd_backend_weight", "Configured balancing weight of the backend.", labels=pb
        ),
        GaugeMetricFamily(
            "relayd_backend_priority", "Configured priority tier of the backend.", labels=pb
        ),
        GaugeMetricFamily(
            "relayd_upstream_key_cooldown_seconds",
            "Seconds until the upstream key (by index) is usable again; 0 when usable.",
            labels=[*pb, "key"],
        ),
        GaugeMetricFamily(
            "relayd_pool_connections", "Pooled upstream connections of the backend, by state.",
            labels=[*pb, "state"],
        ),
        CounterMetricFamily(
            "relayd_upstream_connections_opened",
            "Upstream connections the backend's pool opened (the rest were reused).",
            labels=pb,
        ),
        CounterMetricFamily(
            "relayd_upstream_stale_connection_retries",
            "Requests sent again on a fresh connection because the reused one had been "
            "closed by the upstream before any answer (not a backend failure).",
            labels=pb,
        ),
    ]


def _cache_families(stats: dict[str, Any]) -> list[Metric]:
    """The response cache's figures (:meth:`relayd.cache.ResponseCache.stats`)."""
    lookups = CounterMetricFamily(
        "relayd_cache_lookups",
        "Requests on caching routes, by what the cache did (the x-relayd-cache value).",
        labels=["result"],
    )
    for result, count in stats["lookups"].items():
        lookups.add_metric([result], float(count))
    memory = stats["memory"]
    shared = stats["shared"]
    return [
        lookups,
        CounterMetricFamily("relayd_cache_shared_hits",
                            "Hits found in the shared cache (Redis), not in memory.",
                            value=float(stats["shared_hits"])),
        CounterMetricFamily("relayd_cache_coalesced",
                            "Requests that waited for an identical one in flight.",
                            value=float(stats["coalesced"])),
        CounterMetricFamily("relayd_cache_stores", "Answers stored in the cache.",
                            value=float(stats["stores"])),
        CounterMetricFamily("relayd_cache_evictions",
                            "Memory cache entries pushed out for room.",
                            value=float(memory["evictions"])),
        GaugeMetricFamily("relayd_cache_memory_entries", "Entries in the memory cache.",
                          value=float(memory["entries"])),
        GaugeMetricFamily("relayd_cache_memory_bytes", "Bytes held by the memory cache.",
                          value=float(memory["bytes"])),
        CounterMetricFamily("relayd_cache_shared_errors",
                            "Shared cache (Redis) calls that failed; the memory cache served.",
                            value=float(shared["errors"] if shared else 0)),
    ]


def _affinity_families(stats: dict[str, Any]) -> list[Metric]:
    """Session affinity's figures (:meth:`relayd.affinity.SessionPins.stats`)."""
    repins = CounterMetricFamily(
        "relayd_affinity_repins",
        "Sessions whose pin moved to another backend, by why (gone, unhealthy, breaker, "
        "busy, key, priority, order, failed).",
        labels=["reason"],
    )
    for reason, count in stats["repins"].items():
        repins.add_metric([reason], float(count))
    return [
        CounterMetricFamily("relayd_affinity_hits",
                            "Requests of a pinned session sent first to its pinned backend.",
                            value=float(stats["hits"])),
        CounterMetricFamily("relayd_affinity_misses",
                            "Requests of a session that had no pin (new, or expired).",
                            value=float(stats["misses"])),
        repins,
        GaugeMetricFamily("relayd_affinity_pins", "Session pins held in this instance's memory.",
                          value=float(stats["pins"])),
        CounterMetricFamily("relayd_affinity_store_errors",
                            "Pin reads or writes in Redis that failed (memory served).",
                            value=float(stats["errors"])),
    ]


def _fill(
    families: Sequence[Any],
    backends: Iterable[Any],
    now: float,
) -> None:
    """Add one sample set per backend to ``families`` (as made by :func:`_families`)."""
    healthy, breaker, in_flight, weight, priority, cooldown, idle, opened, stale = families
    for backend in backends:
        pb = [backend.provider_name, backend.name]
        healthy.add_metric(pb, 1.0 if backend.health.healthy else 0.0)
        current = backend.breaker.state
        states = BREAKER_STATES if current in BREAKER_STATES else (*BREAKER_STATES, current)
        for state in states:
            breaker.add_metric([*pb, state], 1.0 if state == current else 0.0)
        in_flight.add_metric(pb, float(backend.in_flight))
        weight.add_metric(pb, float(backend.weight))
        priority.add_metric(pb, float(backend.priority))
        keyset = getattr(backend, "keys", None)
        for key in getattr(keyset, "keys", ()):
            remaining = key.cooldown_until - now
            cooldown.add_metric([*pb, str(key.index)], remaining if remaining > 0.0 else 0.0)
        pool = backend.pool
        idle.add_metric([*pb, "idle"], float(pool.idle_connections() if pool else 0))
        opened.add_metric(pb, float(pool.opened if pool else 0))
        stale.add_metric(pb, float(pool.stale_retries if pool else 0))
