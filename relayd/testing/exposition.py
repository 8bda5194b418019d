"""Reading a Prometheus text exposition (``/metrics``) in tests and load runs, with
prometheus-client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def metric_samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """The samples named ``name`` (``relayd_requests_total``, a histogram's
    ``..._bucket``) whose labels include ``labels``, in exposition order."""
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of those samples' values (0 when there is none)."""
    return sum(value for _, value in metric_samples(text, name, **labels))
