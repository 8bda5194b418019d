"""relayd.metric_series against prometheus-client: the same updates give the same
exposition, line for line."""

from __future__ import annotations

import math
import random
import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from relayd.metric_series import CounterFamily, GaugeFamily, HistogramFamily

BUCKETS = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0)
AMOUNTS = (0.0, 0.0001, 0.00011, 0.001, 0.5, 1.0, 10.0, 10.5, 1e9, -1.0, math.inf, math.nan)


def exposition(registry: CollectorRegistry) -> str:
    text = generate_latest(registry).decode()
    return re.sub(r"^(\S+_created\S*) \S+$", r"\1 T", text, flags=re.M)


def test_the_same_updates_give_the_same_exposition() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    labels = ["api", "status"]
    counter = (CounterFamily("x_requests_total", "Requests.", labels, registry=ours),
               Counter("x_requests_total", "Requests.", labels, registry=theirs))
    plain = (CounterFamily("x_accepted_total", "Accepted.", registry=ours).child(()),
             Counter("x_accepted_total", "Accepted.", registry=theirs))
    gauge = (GaugeFamily("x_up", "Up.", ["store"], registry=ours),
             Gauge("x_up", "Up.", ["store"], registry=theirs))
    in_flight = (GaugeFamily("x_in_flight", "In flight.", registry=ours).child(()),
                 Gauge("x_in_flight", "In flight.", registry=theirs))
    histogram = (HistogramFamily("x_seconds", "Seconds.", ["api"], buckets=BUCKETS, registry=ours),
                 Histogram("x_seconds", "Seconds.", ["api"], buckets=BUCKETS, registry=theirs))
    waits = (HistogramFamily("x_wait_seconds", "Wait.", buckets=BUCKETS, registry=ours).child(()),
             Histogram("x_wait_seconds", "Wait.", buckets=BUCKETS, registry=theirs))
    rng = random.Random(7)
    for _ in range(2000):
        api, status = rng.choice(["anthropic", "openai", 'a"b\\c\n']), rng.choice([200, 429])
        amount = rng.choice(AMOUNTS)
        step = rng.randrange(8)
        if step == 0:
            counter[0].child((api, status)).inc(2)
            counter[1].labels(api, str(status)).inc(2)
        elif step == 1:
            plain[0].inc()
            plain[1].inc()
        elif step == 2:
            gauge[0].child((api,)).set(amount)
            gauge[1].labels(api).set(amount)
        elif step == 3:
            in_flight[0].inc()
            in_flight[1].inc()
        elif step == 4:
            in_flight[0].dec(2)
            in_flight[1].dec(2)
        elif step in (5, 6):
            histogram[0].child((api,)).observe(amount)
            histogram[1].labels(api).observe(amount)
        else:
            waits[0].observe(amount)
            waits[1].observe(amount)
    assert exposition(ours) == exposition(theirs)
    assert "x_seconds_bucket{api=\"openai\",le=\"+Inf\"}" in exposition(ours)


def test_empty_families_are_announced_as_prometheus_client_announces_them() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    CounterFamily("y_total", "Y.", ["a"], registry=ours)
    Counter("y_total", "Y.", ["a"], registry=theirs)
    HistogramFamily("z_seconds", "Z.", ["a"], buckets=BUCKETS, registry=ours)
    Histogram("z_seconds", "Z.", ["a"], buckets=BUCKETS, registry=theirs)
    assert exposition(ours) == exposition(theirs)


def test_raw_values_with_the_same_text_are_one_series() -> None:
    registry = CollectorRegistry()
    family = CounterFamily("s_total", "S.", ["status"], registry=registry)
    family.child((200,)).inc()
    family.child(("200",)).inc()
    assert family.child((200,)) is family.child(("200",))
    assert registry.get_sample_value("s_total", {"status": "200"}) == 2.0


def test_misuse_is_refused_as_prometheus_client_refuses_it() -> None:
    registry = CollectorRegistry()
    family = CounterFamily("m_total", "M.", ["a", "b"], registry=registry)
    with pytest.raises(ValueError):
        family.child(("only one",))
    with pytest.raises(ValueError):
        family.child(("a", "b")).inc(-1)
    with pytest.raises(ValueError):  # the same name twice in one registry
        CounterFamily("m_total", "M.", registry=registry)
    with pytest.raises(ValueError):
        HistogramFamily("h", "H.", buckets=(1.0, 0.5), registry=registry)
