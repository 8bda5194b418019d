"""Client policies, upstream quotas and usage counters, kept in a state store.

:mod:`.checks` defines the counters, :mod:`.policy` compiles the configuration into
checks, :mod:`.memory` and :mod:`.redis` are the two stores (one interface,
:mod:`.store`), and :func:`build_store` picks one for a ``state`` configuration.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

from relayd.config.model import StateConfig
from relayd.limits.memory import MemoryStore
from relayd.limits.redis import RedisStore, StoreEvent
from relayd.limits.store import LimitStore, ObjectRecord, UsageRecord

__all__ = [
    "LimitStore",
    "MemoryStore",
    "ObjectRecord",
    "RedisStore",
    "StoreEvent",
    "StoreFactory",
    "UsageRecord",
    "build_store",
]


#: What builds a runtime's store: :func:`build_store`, or a worker's (relayd.workers).
StoreFactory = Callable[[StateConfig, IReactorTime, "StoreEvent | None"], LimitStore]


def build_store(
    config: StateConfig, clock: IReactorTime, on_event: StoreEvent | None = None
) -> LimitStore:
    """The store a ``state`` section asks for (Redis connects in the background)."""
    if config.store == "redis":
        return RedisStore(config, clock, on_event=on_event)
    return MemoryStore(clock)
