"""The reload plan (:func:`relayd.runtime_diff.plan_reload`) on its own, and the runtime
built from it: which backends are reused, reconfigured, rebuilt, new or retired, whether
the state store is kept or replaced, and that planning changes nothing."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from relay_harness import base_config
from twisted.internet.testing import MemoryReactorClock

from relayd.config import parse_config
from relayd.runtime import RelayRuntime
from relayd.runtime_diff import RuntimeChange, plan_reload
from relayd.upstream import Backend


class Running:
    """A runtime built from ``base_config()`` on a fake reactor."""

    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.runtime = RelayRuntime(parse_config(base_config()), self.clock)

    def backend(self, name: str) -> Backend:
        return next(b for b in self.runtime.backends if b.name == name)

    def plan(self, edit: Any = None) -> tuple[RuntimeChange, RelayRuntime]:
        """Plan a reload to ``base_config()`` changed by ``edit(config)``, then build it."""
        raw = copy.deepcopy(base_config())
        if edit is not None:
            edit(raw)
        config = parse_config(raw)
        change = plan_reload(self.runtime, config)
        return change, RelayRuntime(config, self.clock, carry=change)


def names(backends: Any) -> set[str]:
    return {b.name for b in backends}


def test_an_unchanged_configuration_reuses_everything() -> None:
    running = Running()
    old = running.runtime
    change, new = running.plan()
    assert names(change.reused) == {"us", "eu", "main"}
    assert change.reconfigured == () and change.new == () and change.rebuilt == ()
    assert change.retired == ()
    assert new.backends == old.backends  # the same objects, in the same order
    assert change.built_anew(new) == []
    assert change.store is old.store and change.replaced_store is None
    assert new.store is old.store
    assert new.retry_budget is old.retry_budget


def test_settings_other_than_the_connection_reconfigure_the_running_backend() -> None:
    running = Running()
    us = running.backend("us")

    def edit(raw: dict[str, Any]) -> None:
        raw["providers"][0]["backends"][0]["weight"] = 7
        raw["providers"][0]["backends"][0]["timeouts"] = {"total": 33}

    change, new = running.plan(edit)
    assert change.reconfigured == (us,)
    assert names(change.reused) == {"eu", "main"}
    assert change.kept[("anthropic", "us")] is us
    assert new.backends[0] is us
    assert us.weight == 7 and us.timeouts.total == 33  # applied by the build


def test_planning_changes_nothing() -> None:
    running = Running()
    old = running.runtime
    us = running.backend("us")
    raw = base_config()
    raw["providers"][0]["backends"][0]["weight"] = 7
    raw["failover"] = {"retry_budget_ratio": 0.5}
    raw["state"] = {"key_prefix": "other"}
    change = plan_reload(old, parse_config(raw))
    assert change.reconfigured == (us,) and change.replaced_store is old.store
    assert us.weight == 3  # the running backend keeps its settings until the build
    assert old.retry_budget.ratio != 0.5
    assert not us.retired


def test_new_connection_settings_rebuild_the_backend_and_retire_the_old_one() -> None:
    running = Running()
    eu, main = running.backend("eu"), running.backend("main")

    def edit(raw: dict[str, Any]) -> None:
        raw["providers"][0]["backends"][1]["url"] = "http://elsewhere.test"
        raw["providers"][1]["backends"][0]["pool"] = {"max_idle_connections": 3}

    change, new = running.plan(edit)
    assert change.rebuilt == (("anthropic", "eu"), ("openai", "main"))
    assert set(change.retired) == {eu, main}
    assert names(change.reused) == {"us"}
    rebuilt = [b for b in new.backends if b.name in ("eu", "main")]
    assert all(b is not eu and b is not main for b in rebuilt)
    assert change.built_anew(new) == rebuilt
    assert rebuilt[0].url == "http://elsewhere.test"


def test_a_new_connect_timeout_rebuilds_but_a_new_total_timeout_does_not() -> None:
    running = Running()

    def edit(raw: dict[str, Any]) -> None:
        raw["providers"][0]["backends"][0]["timeouts"] = {"connect": 2}
        raw["providers"][0]["backends"][1]["timeouts"] = {"total": 40}

    change, _ = running.plan(edit)
    assert change.rebuilt == (("anthropic", "us"),)
    assert names(change.reconfigured) == {"eu"}


def test_removed_backends_and_providers_are_retired_and_new_ones_built() -> None:
    running = Running()
    us, main = running.backend("us"), running.backend("main")

    def edit(raw: dict[str, Any]) -> None:
        raw["providers"][0]["backends"][0] = {
            "name": "ap", "url": "http://up-ap.test", "api_key": "sk-up-ap"
        }
        del raw["providers"][1]
        raw["routes"] = raw["routes"][:1]

    change, new = running.plan(edit)
    assert change.new == (("anthropic", "ap"),)
    assert set(change.retired) == {us, main}
    assert names(change.reused) == {"eu"}
    assert names(change.built_anew(new)) == {"ap"}
    assert names(new.backends) == {"ap", "eu"}


def test_a_provider_that_changes_type_gets_new_backends() -> None:
    running = Running()
    main = running.backend("main")

    def edit(raw: dict[str, Any]) -> None:
        raw["providers"][1]["type"] = "anthropic"
        raw["routes"][1] = {"api": "openai", "provider": "openai"}

    change, new = running.plan(edit)
    assert change.rebuilt == (("openai", "main"),)
    assert change.retired == (main,)
    assert new.backend("openai", "main") is not None
    assert new.backend("openai", "main")[1] is not main  # type: ignore[index]


def test_a_changed_state_section_replaces_the_store() -> None:
    running = Running()
    old = running.runtime
    change, new = running.plan(lambda raw: raw.update(state={"key_prefix": "other"}))
    assert change.store is None and change.replaced_store is old.store
    assert new.store is not old.store
    assert names(change.reused) == {"us", "eu", "main"}  # backends are not affected


def test_the_retry_budget_is_carried_and_given_the_new_settings() -> None:
    running = Running()
    old = running.runtime
    old.retry_budget.record_request()
    change, new = running.plan(
        lambda raw: raw.update(failover={"retry_budget_ratio": 0.5})
    )
    assert change.retry_budget is old.retry_budget is new.retry_budget
    assert new.retry_budget.ratio == 0.5
    assert new.retry_budget.requests_in_window == 1


def test_a_change_planned_for_another_configuration_is_refused() -> None:
    running = Running()
    change = plan_reload(running.runtime, parse_config(base_config()))
    with pytest.raises(ValueError, match="another configuration"):
        RelayRuntime(parse_config(base_config()), running.clock, carry=change)
