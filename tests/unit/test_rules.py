"""Content rules (relayd.rules): compiled once, matched on both API families' text,
before any upstream contact; the matched text never shows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from relay_harness import OTHER_KEY, Harness, base_config

from relayd.config import ConfigErrors, parse_config
from relayd.providers import PROVIDERS
from relayd.rules import ContentRules

ANTHROPIC = PROVIDERS["anthropic"]
OPENAI = PROVIDERS["openai"]


@pytest.mark.parametrize("pattern", ["(a+)+$", r"(\w+\s?)*x", "(x{2,})+", "(a|b*)*"])
def test_catastrophic_patterns_are_refused_at_load(pattern: str) -> None:
    with pytest.raises(ConfigErrors) as raised:
        parse_config({"rules": [{"name": "r", "match": {"pattern": pattern}}]})
    assert "rules[0].match.pattern: has a quantified group" in str(raised.value)


def test_bad_rules_name_their_key() -> None:
    with pytest.raises(ConfigErrors) as raised:
        parse_config({"rules": [
            {"name": "a", "match": {"pattern": "("}},
            {"name": "b", "match": {"pattern": "x" * 1001}},
            {"name": "c", "match": {"pattern": "x"}, "action": "drop", "clients": ["nobody"]},
        ]})
    text = str(raised.value)
    assert "rules[0].match.pattern: is not a valid regular expression" in text
    assert "rules[1].match.pattern: must be at most 1000 characters" in text
    assert "rules[2].action: must be one of deny, flag" in text


def test_references_must_exist() -> None:
    config = base_config(rules=[{"name": "r", "match": {"pattern": "x"},
                                 "clients": ["team-z"], "routes": ["routes[7]"]}])
    with pytest.raises(ConfigErrors) as raised:
        parse_config(config)
    assert "rules[0].clients[0]: no client is named 'team-z'" in str(raised.value)
    assert "rules[0].routes[0]: no route is named 'routes[7]'" in str(raised.value)


def compiled(*rules: dict[str, Any]) -> ContentRules:
    return ContentRules(parse_config({"rules": list(rules)}).rules)


def test_where_and_case() -> None:
    rules = compiled({"name": "sys", "match": {"pattern": "jailbreak", "where": "system"}},
                     {"name": "exact", "match": {"pattern": "Secret", "case": "sensitive"},
                      "action": "flag"})
    in_system = {"system": "JAILBREAK mode", "messages": [{"role": "user", "content": "hi"}]}
    verdict = rules.check(ANTHROPIC, in_system, "c", "r")
    assert verdict is not None and verdict.denied == "sys"
    in_prompt = {"messages": [{"role": "user", "content": "jailbreak please, a secret"}]}
    verdict = rules.check(ANTHROPIC, in_prompt, "c", "r")
    assert verdict is not None and verdict.denied is None and verdict.flagged == []
    verdict = rules.check(ANTHROPIC, {"messages": [{"role": "user", "content": "my Secret"}]},
                          "c", "r")
    assert verdict is not None and verdict.flagged == ["exact"]


@pytest.mark.parametrize(("family", "payload"), [
    (ANTHROPIC, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "intro"},
        {"type": "tool_result", "tool_use_id": "t", "content": [
            {"type": "text", "text": "AKIAABCDEFGHIJKLMNOP"}]}]}]}),
    (ANTHROPIC, {"system": [{"type": "text", "text": "AKIAABCDEFGHIJKLMNOP"}], "messages": []}),
    (OPENAI, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "AKIAABCDEFGHIJKLMNOP"}]}]}),
    (OPENAI, {"messages": [{"role": "developer", "content": "AKIAABCDEFGHIJKLMNOP"}]}),
    (OPENAI, {"input": "AKIAABCDEFGHIJKLMNOP"}),  # Responses / Embeddings
    (OPENAI, {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "AKIAABCDEFGHIJKLMNOP"}]}]}),
    (OPENAI, {"prompt": ["a", "AKIAABCDEFGHIJKLMNOP"]}),  # Completions
])
def test_both_families_text_is_found(family: Any, payload: dict[str, Any]) -> None:
    rules = compiled({"name": "aws-key", "match": {"pattern": r"AKIA[0-9A-Z]{16}"}})
    verdict = rules.check(family, payload, "c", "r")
    assert verdict is not None and verdict.denied == "aws-key"


def test_rules_apply_to_their_clients_and_routes_only() -> None:
    rules = ContentRules(parse_config(base_config(rules=[
        {"name": "r", "match": {"pattern": "x"}, "clients": ["team-a"],
         "routes": ["routes[0]"]}])).rules)
    payload = {"messages": [{"role": "user", "content": "x"}]}
    assert rules.check(ANTHROPIC, payload, "team-b", "routes[0]") is None
    assert rules.check(ANTHROPIC, payload, "team-a", "routes[1]") is None
    verdict = rules.check(ANTHROPIC, payload, "team-a", "routes[0]")
    assert verdict is not None and verdict.denied == "r"


# -- in the relay ---------------------------------------------------------------------------


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness(base_config(rules=[
        {"name": "no-keys", "match": {"pattern": r"sk-[A-Za-z0-9]{20}"}},
        {"name": "legal", "match": {"pattern": "lawsuit"}, "action": "flag"},
        {"name": "team-b-only", "match": {"pattern": "forbidden"}, "clients": ["team-b"]},
    ]))
    yield h
    h.close()


def upstream_requests(h: Harness) -> int:
    return sum(len(u.seen) for u in h.upstreams.values())


def test_a_denied_prompt_never_reaches_the_upstream(harness: Harness) -> None:
    secret = "sk-" + "Q" * 24
    for stream in (False, True):
        body = {"model": "claude-x", "max_tokens": 5, "stream": stream,
                "messages": [{"role": "user", "content": f"here is my key {secret}"}]}
        status, headers, answer = harness.call("POST", "/v1/messages", body)
        assert status == 403 and headers["x-should-retry"] == ["false"]
        error = json.loads(answer)
        assert error["type"] == "error" and "'no-keys'" in error["error"]["message"]
        assert secret.encode() not in answer
    # The OpenAI API, served by the same rules, in its own error shape.
    status, _, answer = harness.call("POST", "/v1/chat/completions", {
        "model": "gpt-x", "messages": [{"role": "user", "content": secret}]}, api="openai")
    assert (status == 403 and json.loads(answer)["error"]["type"] == "permission_error") \
        or json.loads(answer)["error"]["code"] is not None or status == 403
    assert upstream_requests(harness) == 0
    assert secret not in "".join(json.dumps(e) for e in harness.logs.access())
    registry = harness.resource.metrics.registry
    assert registry.get_sample_value(
        "relayd_rule_matches_total", {"rule": "no-keys", "action": "deny"}) == 3.0


def test_a_flagged_request_goes_through_marked(harness: Harness) -> None:
    body = {"model": "claude-x", "max_tokens": 5,
            "messages": [{"role": "user", "content": "about the lawsuit"}]}
    status, headers, _ = harness.call("POST", "/v1/messages", body)
    assert status == 200 and headers["x-relayd-flagged"] == ["legal"]
    assert harness.logs.access()[-1]["flagged"] == "legal"
    assert upstream_requests(harness) == 1


def test_a_rule_for_one_client_spares_the_others(harness: Harness) -> None:
    body = {"model": "claude-x", "max_tokens": 5,
            "messages": [{"role": "user", "content": "forbidden topic"}]}
    assert harness.call("POST", "/v1/messages", body)[0] == 200
    assert harness.call("POST", "/v1/messages", body, key=OTHER_KEY)[0] == 403
