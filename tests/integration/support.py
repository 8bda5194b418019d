"""Shared values and config builders for the integration tests."""

from __future__ import annotations

import hashlib
from typing import Any

from relayd.testing.certs import TestCertificates
from relayd.testing.processes import FakeUpstreamProcess

CLIENT_KEY = "sk-relay-integration-client"
LIMITED_KEY = "sk-relay-integration-limited"
UPSTREAM_KEYS = {"a1": "sk-upstream-a1", "a2": "sk-upstream-a2", "o1": "sk-upstream-o1"}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def relay_config(
    certs: TestCertificates,
    anthropic_backends: list[dict[str, Any]],
    openai_backends: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """A config with a plain and a TLS listener, two clients and both providers."""
    config: dict[str, Any] = {
        "listen": [
            {"address": "127.0.0.1:0"},
            {"address": "127.0.0.1:0",
             "tls": {"certificate": str(certs.chain), "private_key": str(certs.key)}},
        ],
        "clients": [
            {"name": "team-a", "key_sha256": sha(CLIENT_KEY)},
            {"name": "team-b", "key_sha256": sha(LIMITED_KEY), "models": ["claude-*"]},
        ],
        "providers": [
            {"name": "anthropic", "type": "anthropic", "backends": anthropic_backends},
            {"name": "openai", "type": "openai", "backends": openai_backends},
        ],
        "routes": [
            {"api": "anthropic", "models": ["claude-*"], "provider": "anthropic"},
            {"api": "openai", "provider": "openai"},
        ],
    }
    config.update(extra)
    return config


def backend(name: str, upstream: FakeUpstreamProcess, **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": upstream.url, "api_key": UPSTREAM_KEYS[name], **extra}
