"""What a reload carries over from the running runtime: decided here, before anything changes.

:func:`plan_reload` compares the running :class:`~relayd.runtime.RelayRuntime` with a new,
validated configuration and returns a :class:`RuntimeChange`. Planning touches nothing:
no backend is reconfigured, no store opened or closed, so a reload that is refused later
(a listener that cannot bind, say) leaves the running runtime exactly as it was. The
change is then handed to :class:`~relayd.runtime.RelayRuntime`, the one place that builds
runtime objects from configuration, which applies the new settings to what it keeps.

What is kept, and why:

* A backend whose provider (name and type), backend name and connection settings (URL,
  pool settings, connect timeout: :meth:`~relayd.upstream.Backend.same_connection_settings`)
  are unchanged: its pool, breaker, active health and key cooldowns live on. It is
  *reused* when its whole configuration is unchanged, *reconfigured* when only other
  settings (weight, keys, breaker thresholds, ...) changed.
* Any other backend of the new configuration is built anew: *new* when no backend of
  that provider and name ran before, *rebuilt* when one did with other connection
  settings (the old one is then retired).
* The state store, while the ``state`` section is unchanged (counters and usage live on);
  otherwise the running store is *replaced* and closed once the new runtime serves.
* The retry budget, the model names learned from upstream answers and the response
  cache (with its flights in progress), always; the cache applies the new ``cache``
  section itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relayd.affinity import SessionPins
from relayd.cache import ResponseCache
from relayd.config.model import Config
from relayd.edge import AddressRules
from relayd.labels import ModelLabels
from relayd.limits import LimitStore
from relayd.nonces import NonceStore
from relayd.providers import PROVIDERS
from relayd.retry_budget import RetryBudget
from relayd.upstream import Backend

if TYPE_CHECKING:
    from relayd.runtime import RelayRuntime

__all__ = ["BackendKey", "RuntimeChange", "plan_reload"]

BackendKey = tuple[str, str]  # (provider name, backend name)


@dataclass(frozen=True)
class RuntimeChange:
    """The carry-over from a running runtime to the one built for :attr:`config`.

    ``kept`` maps each carried-over backend to the key it has in the new configuration;
    it is the union of ``reused`` and ``reconfigured``. ``new`` and ``rebuilt`` name the
    backends to build. ``retired`` are the running backends the new runtime does not
    use (removed by the reload, or rebuilt): the caller retires them once it has switched.
    ``store`` is the running store when it is kept, else None, and ``replaced_store`` the
    running store the caller closes once it has switched.
    """

    config: Config
    kept: Mapping[BackendKey, Backend]
    reused: tuple[Backend, ...]
    reconfigured: tuple[Backend, ...]
    new: tuple[BackendKey, ...]
    rebuilt: tuple[BackendKey, ...]
    retired: tuple[Backend, ...]
    store: LimitStore | None
    replaced_store: LimitStore | None
    retry_budget: RetryBudget
    model_labels: ModelLabels
    response_cache: ResponseCache
    pins: SessionPins
    nonces: NonceStore
    address_rules: AddressRules

    def built_anew(self, runtime: RelayRuntime) -> list[Backend]:
        """The backends of ``runtime`` (built from this change) that were not carried over:
        they have no health checks running yet."""
        kept = set(self.kept.values())
        return [backend for backend in runtime.backends if backend not in kept]


def plan_reload(old: RelayRuntime, config: Config) -> RuntimeChange:
    """What the runtime built for ``config`` takes over from ``old``; changes nothing."""
    running: dict[BackendKey, Backend] = {(b.provider_name, b.name): b for b in old.backends}
    kept: dict[BackendKey, Backend] = {}
    reused: list[Backend] = []
    reconfigured: list[Backend] = []
    new: list[BackendKey] = []
    rebuilt: list[BackendKey] = []
    for provider_config in config.providers:
        family = PROVIDERS[provider_config.type]
        for backend_config in provider_config.backends:
            key = (provider_config.name, backend_config.name)
            backend = running.get(key)
            if backend is None or key in kept:
                new.append(key)
            elif backend.provider is family and backend.same_connection_settings(backend_config):
                kept[key] = backend
                (reused if backend.config == backend_config else reconfigured).append(backend)
            else:
                rebuilt.append(key)
    carried = set(kept.values())
    store_kept = old.config.state == config.state
    return RuntimeChange(
        config=config,
        kept=kept,
        reused=tuple(reused),
        reconfigured=tuple(reconfigured),
        new=tuple(new),
        rebuilt=tuple(rebuilt),
        retired=tuple(b for b in old.backends if b not in carried),
        store=old.store if store_kept else None,
        replaced_store=None if store_kept else old.store,
        retry_budget=old.retry_budget,
        model_labels=old.model_labels,
        response_cache=old.response_cache,
        pins=old.pins,
        nonces=old.nonces,
        address_rules=old.address_rules,
    )
