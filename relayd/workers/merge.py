"""One view of several workers: their metrics and admin answers, merged by the daemon.

Metrics: each worker sends its registry's families as plain tuples
(:func:`registry_families`), the daemon merges them (:func:`merge_families`):

* counters, histograms and most gauges (requests in flight, open streams, connections,
  pooled connections, cache entries) are summed: the daemon's figure is what one
  process serving all the traffic would show;
* a few gauges describe one worker's own view and keep a ``worker`` label (bounded by
  the worker count): backend health and breaker state (each worker probes and trips
  its own), key cooldowns, the state store's reachability, and accepted connections
  (how evenly the workers share the listening sockets);
* configuration facts every worker shares (build info, backend weight and priority)
  are shown once;
* reload figures are the daemon's: it validates and reports each reload once.

Nothing is written to disk: a scrape asks the workers over their control channels.
Counters must not go backwards when a worker misses a scrape or exits, or Prometheus
would count a reset: :class:`WorkerFamilies` keeps each worker's last answer (used when
it does not answer in time) and, once it exits, its counters and histograms as they
last were, added to the sums from then on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

#: (name, type, documentation, unit, samples) with samples as (name, labels, value).
Family = tuple[str, str, str, str, list[tuple[str, dict[str, str], float]]]

#: Families only the daemon reports.
DAEMON_OWNED = frozenset({
    "relayd_config_reloads", "relayd_config_last_reload_success_timestamp_seconds",
})
#: Families kept per worker, with a ``worker`` label.
PER_WORKER = frozenset({
    "relayd_backend_healthy", "relayd_backend_breaker_state",
    "relayd_upstream_key_cooldown_seconds", "relayd_state_store_up",
    "relayd_client_connections_accepted",
})
#: Families every worker reports alike (from the shared configuration): shown once.
SHARED = frozenset({"relayd_build_info", "relayd_backend_weight", "relayd_backend_priority"})


def registry_families(registry: CollectorRegistry) -> list[Family]:
    """The registry's current samples, as plain data for the control channel."""
    return as_families(f for f in registry.collect() if f.name not in DAEMON_OWNED)


#: Families whose samples only grow: kept after their worker exits.
CUMULATIVE = frozenset({"counter", "histogram", "summary"})


def merge_families(workers: Iterable[tuple[int, Sequence[Family]]]) -> list[Metric]:
    """The workers' families (``(index, families)`` pairs, an index may come more than
    once) merged into one set (see the module's rules)."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for index, families in sorted(workers, key=lambda pair: pair[0]):
        for name, kind, documentation, unit, samples in families:
            if name in DAEMON_OWNED:
                continue
            if name not in merged:
                merged[name] = Metric(name, documentation, kind, unit)
                values[name] = {}
            table = values[name]
            per_worker, shared = name in PER_WORKER, name in SHARED
            for sample_name, labels, value in samples:
                if per_worker:
                    labels = {**labels, "worker": str(index)}
                key = (sample_name, tuple(sorted(labels.items())))
                if key not in table:
                    table[key] = value
                elif shared:
                    table[key] = max(table[key], value)
                elif sample_name.endswith("_created"):
                    table[key] = min(table[key], value)
                else:
                    table[key] += value
    for name, metric in merged.items():
        for (sample_name, pairs), value in values[name].items():
            metric.add_sample(sample_name, dict(pairs), value)
    return list(merged.values())


def as_families(metrics: Iterable[Metric]) -> list[Family]:
    """Merged metrics back as plain families (to be merged again)."""
    return [
        (m.name, m.type, m.documentation, m.unit,
         [(s.name, dict(s.labels), float(s.value)) for s in m.samples])
        for m in metrics
    ]


class WorkerFamilies:
    """Each live worker's last families (by its serial number, as an index is reused by
    the next worker started under it), and the cumulative ones of exited workers (by
    index, the label they keep)."""

    def __init__(self) -> None:
        self.last: dict[int, tuple[int, list[Family]]] = {}  # serial -> (index, families)
        self.retired: dict[int, list[Family]] = {}  # index -> families

    def merged(self, answers: Mapping[int, tuple[int, list[Family]]]) -> list[Metric]:
        """The merge of this scrape's answers (serial -> (index, families)), the last
        answer of each live worker that did not answer, and what exited ones counted."""
        self.last.update(answers)
        pairs = list(self.last.values()) + list(self.retired.items())
        return merge_families(pairs)

    def worker_gone(self, serial: int) -> None:
        """Worker ``serial`` exited: keep its counters and histograms as they last were
        (its index's label for per-worker ones), folded into what earlier ones counted."""
        found = self.last.pop(serial, None)
        if found is None:
            return
        index, families = found
        kept = [family for family in families if family[1] in CUMULATIVE]
        earlier = self.retired.get(index)
        pairs = [(index, kept)] + ([(index, earlier)] if earlier else [])
        self.retired[index] = as_families(merge_families(pairs))


class Exposition(Collector):
    """The daemon's own registry followed by the workers' merged families, for
    ``generate_latest`` (which only needs ``collect``)."""

    def __init__(self, own: CollectorRegistry, merged: Iterable[Metric]) -> None:
        self.own = own
        self.merged = list(merged)

    def collect(self) -> Iterator[Metric]:
        yield from self.own.collect()
        yield from self.merged


def sum_documents(documents: Sequence[Any]) -> Any:
    """Numbers summed leaf by leaf; anything else as the first document has it. For the
    admin answers that count (cache figures, memory-store usage, purges)."""
    first = documents[0]
    if isinstance(first, bool) or not isinstance(first, (int, float, dict)):
        return first
    if isinstance(first, dict):
        keys: dict[Any, None] = {}
        for document in documents:
            if isinstance(document, dict):
                keys.update(dict.fromkeys(document))
        return {
            key: sum_documents([d[key] for d in documents if isinstance(d, dict) and key in d])
            for key in keys
        }
    return sum(d for d in documents if isinstance(d, (int, float)) and not isinstance(d, bool))
