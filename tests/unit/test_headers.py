"""What goes upstream of a client's request headers: an allow list per API family."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from relay_harness import CLIENT_KEY, Harness, base_config

from relayd.config import ConfigErrors, parse_config

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
MESSAGE = {"model": "claude-x", "max_tokens": 5, "messages": []}
HOSTILE = {
    "x-forwarded-for": "10.9.8.7",
    "forwarded": "for=10.9.8.7",
    "x-real-ip": "10.9.8.7",
    "openai-organization": "org-victim",
    "openai-project": "proj-victim",
    "x-internal-admin": "1",
    "anthropic-dangerous-direct-browser-access": "true",
    "origin": "https://evil.example",
}


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def sent(h: Harness, backend: str) -> dict[bytes, list[bytes]]:
    return h.upstreams[backend].seen[-1].headers


def test_openai_calls_carry_only_the_allow_list(harness: Harness) -> None:
    """The campaign: OpenAI-Organization/Project went upstream with relayd's key, and a
    client's X-Forwarded-For passed through unchanged."""
    harness.call("POST", "/v1/chat/completions", CHAT, api="openai", headers={
        **HOSTILE, "openai-beta": "assistants=v2", "idempotency-key": "k1",
        "x-stainless-retry-count": "0", "user-agent": "OpenAI/Python 3.54.0",
    })
    headers = sent(harness, "main")
    for name in HOSTILE:
        assert name.encode() not in headers, name
    assert headers[b"openai-beta"] == [b"assistants=v2"]
    assert headers[b"idempotency-key"] == [b"k1"]
    assert headers[b"x-stainless-retry-count"] == [b"0"]
    assert headers[b"user-agent"] == [b"OpenAI/Python 3.54.0"]


def test_anthropic_calls_keep_version_betas_and_claude_code_headers(harness: Harness) -> None:
    harness.call("POST", "/v1/messages", MESSAGE, headers={
        **HOSTILE, "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
        "x-app": "cli", "x-claude-code-session-id": "s-1",
    })
    (backend,) = [name for name in ("us", "eu") if harness.upstreams[name].seen]
    headers = sent(harness, backend)
    for name in HOSTILE:
        assert name.encode() not in headers, name
    assert headers[b"anthropic-version"] == [b"2023-06-01"]
    assert headers[b"anthropic-beta"] == [b"claude-code-20250219,interleaved-thinking-2025-05-14"]
    assert headers[b"x-app"] == [b"cli"] and headers[b"x-claude-code-session-id"] == [b"s-1"]


def test_forward_headers_adds_names_but_never_credentials() -> None:
    h = Harness(base_config(forward_headers=["x-gateway-*", "*"]))
    try:
        h.call("POST", "/v1/chat/completions", CHAT, api="openai", headers={
            "x-gateway-tenant": "t1", "cookie": "a=b", "openai-organization": "org-victim",
        })
        headers = sent(h, "main")
        assert headers[b"x-gateway-tenant"] == [b"t1"]
        assert headers[b"authorization"] == [b"Bearer sk-up-oai"]  # relayd's key, not the client's
        assert CLIENT_KEY.encode() not in b"".join(v for vs in headers.values() for v in vs)
        assert b"cookie" not in headers and b"openai-organization" not in headers
    finally:
        h.close()


def test_a_backend_chooses_its_own_organization_and_project() -> None:
    config = base_config()
    config["providers"][1]["backends"][0].update(organization="org-relay", project="proj-1")
    h = Harness(config)
    try:
        h.call("POST", "/v1/chat/completions", CHAT, api="openai",
               headers={"openai-organization": "org-victim"})
        headers = sent(h, "main")
        assert headers[b"openai-organization"] == [b"org-relay"]
        assert headers[b"openai-project"] == [b"proj-1"]
    finally:
        h.close()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda c: c["providers"][0]["backends"][0].update(organization="org-x"),
         "providers[0].backends[0].organization: only backends of providers of type openai "
         "have an organization"),
        (lambda c: c["providers"][1]["backends"][0].update(project="a b"),
         "providers[1].backends[0].project: must not contain whitespace or control characters"),
        (lambda c: c.update(forward_headers=["x fake"]),
         "forward_headers[0]: must be a header name or a glob of one (letters, digits, - _ . "
         "and the wildcards * ?)"),
    ],
)
def test_header_settings_are_checked(change: Any, error: str) -> None:
    config = base_config()
    change(config)
    with pytest.raises(ConfigErrors) as raised:
        parse_config(config)
    assert [str(e) for e in raised.value.errors] == [error]
