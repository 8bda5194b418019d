"""Token accounting: what each client used, per model and backend, since start.

One :class:`UsageLedger` per process (it outlives reloads). The relay records every
request's usage as read from the upstream response (JSON bodies, or SSE streams parsed
as they pass, including streams the client cut off: whatever usage had arrived by then
counts). ``/admin/usage`` shows the totals. This ledger is per instance and in memory;
sharing it across instances is the job of a state store.
"""

from __future__ import annotations

from typing import Any

from relayd.providers.base import Usage

_KINDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")


class UsageLedger:
    """Totals keyed by (client, model, provider, backend): requests and tokens by kind."""

    __slots__ = ("_totals",)

    def __init__(self) -> None:
        self._totals: dict[tuple[str, str, str, str], list[int]] = {}

    def record(
        self, client: str, model: str, provider: str, backend: str, usage: Usage | None
    ) -> None:
        """Count one relayed request and its tokens (``None`` counts are zero)."""
        key = (client, model, provider, backend)
        row = self._totals.get(key)
        if row is None:
            row = self._totals[key] = [0, 0, 0, 0, 0]
        row[0] += 1
        if usage is not None:
            row[1] += usage.input_tokens or 0
            row[2] += usage.output_tokens or 0
            row[3] += usage.cache_read_tokens or 0
            row[4] += usage.cache_write_tokens or 0

    def snapshot(self) -> dict[str, Any]:
        """JSON-able totals: one entry per key, plus a per-client sum."""
        entries = []
        clients: dict[str, dict[str, int]] = {}
        for (client, model, provider, backend), row in sorted(self._totals.items()):
            counts = dict(zip(_KINDS, row[1:], strict=True))
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
            total = clients.setdefault(client, {"requests": 0, **dict.fromkeys(_KINDS, 0)})
            total["requests"] += row[0]
            for kind, value in counts.items():
                total[kind] += value
        return {"clients": clients, "entries": entries}
