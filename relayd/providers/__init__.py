"""Provider modules, one per upstream API family, registered by name."""

from __future__ import annotations

from relayd.providers.anthropic import AnthropicProvider
from relayd.providers.base import Endpoint, IProvider, IStreamWatcher, Usage
from relayd.providers.openai import OpenAIProvider

PROVIDERS: dict[str, IProvider] = {
    "anthropic": AnthropicProvider(),
    "openai": OpenAIProvider(),
}

__all__ = ["PROVIDERS", "Endpoint", "IProvider", "IStreamWatcher", "Usage"]
