"""Provider modules, one per upstream API family, registered by name."""

from __future__ import annotations

from twisted.web.http_headers import Headers

from relayd.providers.anthropic import AnthropicProvider
from relayd.providers.base import (
    MODEL_ID,
    Endpoint,
    IProvider,
    IStreamWatcher,
    LimitState,
    ModelIn,
    Usage,
)
from relayd.providers.openai import OpenAIProvider

PROVIDERS: dict[str, IProvider] = {
    "anthropic": AnthropicProvider(),
    "openai": OpenAIProvider(),
}

# The family of a request on a shared path (/v1/models) that no other family claims.
DEFAULT_FAMILY = "openai"


def family_of(request_headers: Headers) -> IProvider:
    """The family that claims a request by its headers, else :data:`DEFAULT_FAMILY`."""
    for provider in PROVIDERS.values():
        if provider.claims(request_headers):
            return provider
    return PROVIDERS[DEFAULT_FAMILY]


__all__ = [
    "DEFAULT_FAMILY",
    "MODEL_ID",
    "PROVIDERS",
    "Endpoint",
    "IProvider",
    "IStreamWatcher",
    "LimitState",
    "ModelIn",
    "Usage",
    "family_of",
]
