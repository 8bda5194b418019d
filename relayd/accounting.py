"""Token accounting: what each client used, per model and backend.

The relay hands every request's usage, as read from the upstream response (JSON bodies,
or SSE streams parsed as they pass, including streams the client cut off: whatever usage
had arrived by then counts), to the state store. The memory store keeps a
:class:`UsageLedger`; the Redis store keeps the same counters in a Redis hash shared by
every instance, and builds a ledger from it for ``/admin/usage``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from relayd.providers.base import Usage

#: The ``provider`` of answers served from the response cache (relayd.cache): their
#: tokens were not spent upstream, so client totals count them apart, as ``cached``.
CACHE_PROVIDER = "(cache)"
USAGE_KINDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
_COLUMNS = ("requests", *USAGE_KINDS)

UsageKey = tuple[str, str, str, str]  # (client, model, provider, backend)


class UsageLedger:
    """Totals keyed by (client, model, provider, backend): requests and tokens by kind."""

    __slots__ = ("_totals",)

    def __init__(self) -> None:
        self._totals: dict[UsageKey, list[int]] = {}

    @staticmethod
    def counts(usage: Usage | None) -> list[int]:
        """The token counts of ``usage`` in :data:`USAGE_KINDS` order (``None`` is 0)."""
        if usage is None:
            return [0, 0, 0, 0]
        return [
            usage.input_tokens or 0,
            usage.output_tokens or 0,
            usage.cache_read_tokens or 0,
            usage.cache_write_tokens or 0,
        ]

    def record(
        self, client: str, model: str, provider: str, backend: str, usage: Usage | None
    ) -> None:
        """Count one relayed request and its tokens."""
        self.add_row((client, model, provider, backend), [1, *self.counts(usage)])

    def add_row(self, key: UsageKey, row: list[int]) -> None:
        """Add a row of (requests, *token kinds) to ``key``'s totals."""
        totals = self._totals.get(key)
        if totals is None:
            self._totals[key] = list(row)
        else:
            for i, value in enumerate(row):
                totals[i] += value

    def add(self, key: UsageKey, column: str, amount: int) -> None:
        """Add ``amount`` to one column (``requests`` or a token kind) of ``key``."""
        if column not in _COLUMNS:
            return
        totals = self._totals.setdefault(key, [0] * len(_COLUMNS))
        totals[_COLUMNS.index(column)] += amount

    def merge(self, other: UsageLedger) -> None:
        for key, row in other.rows():
            self.add_row(key, row)

    def rows(self) -> Iterator[tuple[UsageKey, list[int]]]:
        return iter(self._totals.items())

    def snapshot(self) -> dict[str, Any]:
        """JSON-able totals: one entry per key, plus a per-client sum (answers from the
        response cache in its ``cached`` part, not in the upstream totals)."""
        entries = []
        clients: dict[str, dict[str, Any]] = {}
        for (client, model, provider, backend), row in sorted(self._totals.items()):
            counts = dict(zip(USAGE_KINDS, row[1:], strict=True))
            entries.append(
                {
                    "client": client,
                    "model": model,
                    "provider": provider,
                    "backend": backend,
                    "requests": row[0],
                    **counts,
                }
            )
            total = clients.setdefault(client, {"requests": 0, **dict.fromkeys(USAGE_KINDS, 0)})
            if provider == CACHE_PROVIDER:
                total = total.setdefault(
                    "cached", {"requests": 0, **dict.fromkeys(USAGE_KINDS, 0)}
                )
            total["requests"] += row[0]
            for kind, value in counts.items():
                total[kind] += value
        return {"clients": clients, "backends": backend_shares(entries), "entries": entries}


def backend_shares(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per backend (``provider/backend``): requests, tokens, and the share of prompt
    tokens read from the upstream's prompt cache (``cache_read_share``: cache reads over
    all prompt tokens, None before any), which session affinity keeps high."""
    backends: dict[str, dict[str, Any]] = {}
    for entry in entries:
        provider = entry["provider"]
        if provider == CACHE_PROVIDER:
            continue
        total = backends.setdefault(f"{provider}/{entry['backend']}", {
            "provider": provider, "backend": entry["backend"], "requests": 0,
            **dict.fromkeys(USAGE_KINDS, 0),
        })
        total["requests"] += entry["requests"]
        for kind in USAGE_KINDS:
            total[kind] += entry[kind]
    for total in backends.values():
        prompt = total["input_tokens"] + total["cache_read_tokens"] + total["cache_write_tokens"]
        share = total["cache_read_tokens"] / prompt if prompt else None
        total["cache_read_share"] = round(share, 4) if share is not None else None
    return backends
