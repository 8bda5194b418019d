"""The ``routes`` section: which requests go to which providers, in fallback order.

A route names its targets by provider; every name must be one of the ``providers``
section (of either type: a request reaches the other API by translation), unless that
section is itself unusable, in which case the references are not checked.
"""

from __future__ import annotations

from collections.abc import Mapping

from relayd.config.checks import Context, items, string
from relayd.config.model import ApiFamily, RouteConfig, RouteTargetConfig
from relayd.config.schema import Section, read_section

__all__ = ["Routes"]


class Routes:
    """Reads the ordered ``routes`` list against the provider ``types`` read before it."""

    def __init__(self, context: Context, types: Mapping[str, ApiFamily | None] | None) -> None:
        self.context = context
        self.types = types

    def read(self, value: object, path: str) -> tuple[RouteConfig, ...]:
        """The routes at ``path`` (first match wins)."""
        result = []
        names: dict[str, str] = {}
        for each_path, item in items(value, path, self.context, empty=None):
            route = read_section(
                RouteConfig, item, each_path, self.context, hooks={"targets": self._targets}
            )
            if route is not None:
                result.append(route)
                if route.name is not None:
                    first = names.setdefault(route.name, each_path)
                    if first != each_path:
                        self.context.error(f"{each_path}.name", f"same name as {first}")
        return tuple(result)

    def _targets(self, section: Section) -> None:
        """``targets``, or ``provider: NAME`` (one target); exactly one of the two."""
        if ("provider" in section.fields) == ("targets" in section.fields):
            self.context.error(section.path, "needs exactly one of provider or targets")
            return
        if "provider" in section.fields:
            provider = section.check("provider", string)
            if provider is not None:
                self._check_provider(provider, section.key_path("provider"))
                section.values["targets"] = (RouteTargetConfig(provider),)
            return
        weighted = section.get("strategy") == "weighted"
        path = section.key_path("targets")
        targets = self._target_list(section.fields["targets"], path, weighted)
        if targets is not None:
            section.values["targets"] = targets

    def _target_list(
        self, value: object, path: str, weighted: bool
    ) -> tuple[RouteTargetConfig, ...] | None:
        """Providers, each with an optional model, in order; None unless all are valid."""
        errors_before = len(self.context.errors)
        pairs = items(value, path, self.context, empty="must list at least one target")
        seen: dict[tuple[str, str | None], str] = {}
        targets = [
            read_section(
                RouteTargetConfig,
                item,
                each_path,
                self.context,
                hooks={
                    "provider": self._target_provider,
                    "weight": lambda section: self._target_end(section, weighted, seen),
                },
            )
            for each_path, item in pairs
        ]
        valid = tuple(target for target in targets if target is not None)
        return valid if valid and len(self.context.errors) == errors_before else None

    def _target_provider(self, section: Section) -> None:
        """A target's provider must exist."""
        provider = section.value("provider")
        if provider is not None:
            self._check_provider(provider, section.key_path("provider"))

    def _target_end(
        self, section: Section, weighted: bool, seen: dict[tuple[str, str | None], str]
    ) -> None:
        """``weight`` needs ``strategy: weighted``; two targets may not be the same."""
        if "weight" in section.fields and not weighted:
            self.context.error(section.key_path("weight"), "is only used with strategy: weighted")
        provider, model = section.value("provider"), section.value("model")
        if provider is None or ("model" in section.fields and model is None):
            return
        first = seen.setdefault((provider, model), section.path)
        if first != section.path:
            self.context.error(section.path, f"same provider and model as {first}")

    def _check_provider(self, provider: str, path: str) -> None:
        """``provider`` must name a provider (unless the providers section is unusable)."""
        if self.types is not None and provider not in self.types:
            self.context.error(path, f"no provider named {provider!r}")
