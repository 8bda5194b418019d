"""Model names in labels and usage keys: configured or upstream-confirmed, bounded, and
never a value that breaks the exposition format."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import generate_latest
from relay_harness import Harness, base_config, json_reply
from twisted.web.server import Request

from relayd.config import parse_config
from relayd.labels import MAX_LEARNED_MODELS, OTHER, ModelLabels
from relayd.runtime import RelayRuntime
from relayd.runtime_diff import plan_reload

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def catch_all() -> Harness:
    config = base_config()
    config["routes"] = [
        {"api": "openai", "models": ["gpt-4o"], "provider": "openai"},
        {"api": "openai", "provider": "openai"},  # every other name, too
    ]
    return Harness(config)


def model_labels(h: Harness) -> set[str]:
    registry = h.resource.metrics.registry
    return {
        sample.labels["model"]
        for family in registry.collect() if family.name == "relayd_requests"
        for sample in family.samples if "model" in sample.labels
    }


def usage_models(h: Harness) -> set[str]:
    found: list[dict[str, Any]] = []
    h.runtime.store.usage_snapshot().addCallback(found.append)
    return {entry["model"] for entry in found[0]["entries"]}


def test_distinct_model_names_do_not_grow_labels_or_usage_without_bound() -> None:
    """The campaign: 20,000 distinct names through a catch-all route grew /metrics from
    11.5 KB to 33 MB and the usage hash forever."""
    h = catch_all()
    try:
        for i in range(MAX_LEARNED_MODELS + 300):
            status, _, _ = h.call("POST", "/v1/chat/completions",
                                  {**CHAT, "model": f"m-{i}"}, api="openai")
            assert status == 200
        labels = model_labels(h)
        assert len(labels) == MAX_LEARNED_MODELS + 1 and OTHER in labels
        assert usage_models(h) == labels
        size = len(generate_latest(h.resource.metrics.registry))
        h.call("POST", "/v1/chat/completions", {**CHAT, "model": "m-new"}, api="openai")
        assert len(generate_latest(h.resource.metrics.registry)) == size  # counted as other
        # The access log still says what was asked.
        assert h.logs.access()[-1]["model"] == "m-new"
    finally:
        h.close()


def test_a_lone_surrogate_in_a_model_name_cannot_break_metrics() -> None:
    """The campaign: {"model": "gpt-\\udfff"} made every later scrape a 500."""
    h = catch_all()
    try:
        status, _, _ = h.call("POST", "/v1/chat/completions", api="openai",
                              raw=b'{"model": "gpt-\\udfff", "messages": []}')
        assert status == 200
        text = generate_latest(h.resource.metrics.registry).decode()
        assert 'model="other"' in text
        assert json.dumps(sorted(usage_models(h))) == json.dumps([OTHER])  # usage renders too
    finally:
        h.close()


def test_configured_names_always_count_and_refused_ones_are_not_learned() -> None:
    h = catch_all()
    try:
        def not_found(request: Request, body: bytes) -> bytes:
            return json_reply(request, {"error": {"message": "no such model"}}, 404)

        h.upstreams["main"].handler = not_found
        h.call("POST", "/v1/chat/completions", {**CHAT, "model": "gpt-4o"}, api="openai")
        h.call("POST", "/v1/chat/completions", {**CHAT, "model": "made-up"}, api="openai")
        assert model_labels(h) == {"gpt-4o", OTHER}
        assert h.runtime.model_labels.learned == set()
    finally:
        h.close()


def test_learned_names_survive_a_reload() -> None:
    h = Harness()
    try:
        first = h.runtime
        assert first.model_labels.label("claude-new", confirmed=True) == "claude-new"
        config = parse_config(base_config())
        second = RelayRuntime(config, h.clock, carry=plan_reload(first, config))
        assert second.model_labels.label("claude-new") == "claude-new"
    finally:
        h.close()


def test_what_a_learned_name_may_look_like() -> None:
    labels = ModelLabels(["smart"])
    assert labels.label("smart") == "smart"
    for good in ("claude-sonnet-4-5-20250929", "ft:gpt-4o:org:x:1", "anthropic.claude-3",
                 "openai/gpt-4o"):
        assert labels.label(good, confirmed=True) == good
    for bad in ("x" * 200, "gpt 4", "gpt\n4", "-leading", "gpt-\udfff", ""):
        assert labels.label(bad, confirmed=True) == OTHER
    assert labels.label(None) == "-"
