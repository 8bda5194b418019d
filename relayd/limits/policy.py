"""Client and upstream limits compiled from the configuration into ready-made checks.

Built once per configuration (key names included), so a request only fills in its
amounts. Store keys share one hash tag, ``{<key_prefix>}``: an admission touches a
client's counters and an upstream key's counters in one atomic script, which Redis
Cluster allows only within one slot.

Key layout (prefix ``relayd``)::

    {relayd}:client:<name>:rpm | :tpm        rolling-window hashes
    {relayd}:client:<name>:day | :month      budget hashes
    {relayd}:client:<name>:inflight          concurrency leases (sorted set)
    {relayd}:key:<sha256(key)[:16]>:rpm|:tpm upstream key quota (per: key)
    {relayd}:backend:<provider>:<backend>:rpm|:tpm   (per: backend)
    {relayd}:usage                           usage counters (hash)
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from relayd.config.model import ClientLimitsConfig, UpstreamLimitsConfig
from relayd.limits.checks import DAY, MONTH, Check, ConcurrencyCheck, PeriodCheck, WindowCheck
from relayd.providers.base import Usage

# What an image or a document page is reserved at when estimating a prompt.
IMAGE_TOKENS = 1600


class ClientPolicy:
    """One client's limits, as the checks to run for each of its requests."""

    __slots__ = ("_budgets", "_concurrency", "_windows", "config", "name", "reserve_output")

    def __init__(
        self, name: str, config: ClientLimitsConfig, prefix: str, lease_ttl: float
    ) -> None:
        self.name = name
        self.config = config
        self.reserve_output = config.reserve_output_tokens
        base = f"{{{prefix}}}:client:{name}"
        self._windows: list[tuple[str, int, str]] = []
        if config.requests_per_minute is not None:
            self._windows.append((f"{base}:rpm", config.requests_per_minute, "requests_per_minute"))
        if config.tokens_per_minute is not None:
            self._windows.append((f"{base}:tpm", config.tokens_per_minute, "tokens_per_minute"))
        self._budgets: list[tuple[str, int, str, str]] = []
        if config.tokens_per_day is not None:
            self._budgets.append((f"{base}:day", config.tokens_per_day, "tokens_per_day", DAY))
        if config.tokens_per_month is not None:
            self._budgets.append(
                (f"{base}:month", config.tokens_per_month, "tokens_per_month", MONTH)
            )
        self._concurrency: tuple[str, int, float] | None = None
        if config.max_concurrent is not None:
            self._concurrency = (f"{base}:inflight", config.max_concurrent, lease_ttl)

    @property
    def counts_tokens(self) -> bool:
        return self.config.tokens_per_minute is not None or bool(self._budgets)

    def checks(self, tokens: int, lease: str) -> list[Check]:
        """The checks of one request reserving ``tokens`` (each capped at its limit, so a
        request larger than a limit is still possible on an untouched counter)."""
        checks: list[Check] = []
        for key, limit, name in self._windows:
            amount = 1 if name == "requests_per_minute" else min(tokens, limit)
            checks.append(WindowCheck(key, limit, amount, name, "client"))
        for key, limit, name, period in self._budgets:
            checks.append(PeriodCheck(key, limit, min(tokens, limit), name, "client", period))
        if self._concurrency is not None:
            key, limit, ttl = self._concurrency
            checks.append(ConcurrencyCheck(key, limit, lease, ttl, "max_concurrent", "client"))
        return checks


class UpstreamPolicy:
    """A backend's provider quota: the checks for one attempt with one of its keys."""

    __slots__ = ("_keys", "config")

    def __init__(
        self,
        config: UpstreamLimitsConfig,
        prefix: str,
        provider: str,
        backend: str,
        secrets: tuple[str, ...],
    ) -> None:
        self.config = config
        if config.per == "backend":
            shared = f"{{{prefix}}}:backend:{provider}:{backend}"
            self._keys = [shared] * len(secrets)
        else:
            self._keys = [f"{{{prefix}}}:key:{upstream_key_id(s)}" for s in secrets]

    def checks(self, key_index: int, tokens: int) -> list[Check]:
        base = self._keys[key_index]
        checks: list[Check] = []
        rpm, tpm = self.config.requests_per_minute, self.config.tokens_per_minute
        if rpm is not None:
            checks.append(WindowCheck(f"{base}:rpm", rpm, 1, "requests_per_minute", "upstream"))
        if tpm is not None:
            amount = min(tokens, tpm)
            checks.append(WindowCheck(f"{base}:tpm", tpm, amount, "tokens_per_minute", "upstream"))
        return checks


def upstream_key_id(secret: str) -> str:
    """A stable, non-reversible name for an upstream key: every backend and instance that
    uses the same key shares its counters."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


def estimate_tokens(payload: dict[str, Any], reserve_output: int) -> int:
    """What a request may use: its prompt (about 4 characters per token; images and
    documents at a flat rate) plus its output cap (``max_tokens`` and its aliases, else
    ``reserve_output``)."""
    output = reserve_output
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            output = value
            break
    chars, media = _prompt_size(payload)
    return math.ceil(chars / 4) + media * IMAGE_TOKENS + output


def _prompt_size(value: Any) -> tuple[int, int]:
    """(characters of text, number of images/documents) in a request body."""
    chars = 0
    media = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if item.startswith("data:"):
                media += 1
            else:
                chars += len(item)
        elif isinstance(item, dict):
            if item.get("type") == "base64" and isinstance(item.get("data"), str):
                media += 1
                continue
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return chars, media


def usage_tokens(usage: Usage | None) -> int:
    """Tokens a request counts against token limits: input (cache reads and writes
    included) plus output."""
    if usage is None:
        return 0
    return (
        (usage.input_tokens or 0)
        + (usage.output_tokens or 0)
        + (usage.cache_read_tokens or 0)
        + (usage.cache_write_tokens or 0)
    )
