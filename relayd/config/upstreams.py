"""The ``providers`` section: named groups of backends, and what each backend inherits.

``timeouts``, ``pool``, ``health`` and ``breaker`` are merged field by field over three
levels, top level < provider < backend. What a level hands down is carried as a
template :class:`BackendConfig` (empty name and URL) holding the effective settings
so far; a backend is read over it, so its own partial sections merge over them.
"""

from __future__ import annotations

import dataclasses

from relayd.config.checks import Context, check_unique, items
from relayd.config.errors import item_path, key_path
from relayd.config.model import ApiFamily, BackendConfig, ProviderConfig
from relayd.config.schema import Section, read_section
from relayd.config.secrets import read_api_keys

__all__ = ["INHERITED", "Providers", "inherited_from"]

# The sections each level may override for the levels below it.
INHERITED = ("timeouts", "pool", "health", "breaker")
# Keys of a backend that only providers of type openai may set.
_OPENAI_ONLY = ("organization", "project")


def inherited_from(section: Section, template: BackendConfig) -> BackendConfig:
    """``template`` with the :data:`INHERITED` sections ``section`` sets merged in."""
    merged = {key: section.merge(key, getattr(template, key)) for key in INHERITED}
    return dataclasses.replace(template, **merged)


class Providers:
    """Reads the ``providers`` list, and remembers each provider's type for routes.

    ``types`` maps each provider name to its type (None if the type is invalid); it is
    None itself when the section is unusable, so route references are not checked.
    """

    def __init__(self, context: Context) -> None:
        self.context = context
        self.types: dict[str, ApiFamily | None] | None = {}

    def read(self, value: object, path: str, top: BackendConfig) -> tuple[ProviderConfig, ...]:
        """The providers at ``path``; ``top`` carries the top level's settings."""
        if not isinstance(value, list):
            self.types = None
        names: dict[str, str] = {}
        result = []
        for each_path, item in items(value, path, self.context, empty=None):
            provider = read_section(
                ProviderConfig,
                item,
                each_path,
                self.context,
                hooks={
                    "name": lambda section: self._unique(section, names, "provider"),
                    "type": self._register,
                    "backends": lambda section: self._backends(section, top),
                },
            )
            if provider is not None:
                result.append(provider)
        return tuple(result)

    def _unique(self, section: Section, names: dict[str, str], what: str) -> None:
        """The name just read must not repeat one of ``names``."""
        check_unique(section.value("name"), section.key_path("name"), names, what, self.context)

    def _register(self, section: Section) -> None:
        """Remember the provider's type (None if invalid): routes may name it."""
        name = section.value("name")
        if name is not None and self.types is not None:
            self.types.setdefault(name, section.value("type"))

    def _backends(self, section: Section, top: BackendConfig) -> None:
        """The provider's overrides, then its backends read over them."""
        template = inherited_from(section, top)
        backends = section.require(
            "backends", lambda value, path, _: self._backend_list(value, path, template)
        )
        family = section.value("type")
        listed = section.fields.get("backends")
        if family is not None and family != "openai" and isinstance(listed, list):
            for index, item in enumerate(listed):
                for key in _OPENAI_ONLY:
                    if isinstance(item, dict) and key in item:
                        self.context.error(
                            key_path(item_path(section.key_path("backends"), index), key),
                            f"only backends of providers of type openai have an {key}",
                        )
        if backends:
            section.values["backends"] = backends

    def _backend_list(
        self, value: object, path: str, template: BackendConfig
    ) -> tuple[BackendConfig, ...] | None:
        """A non-empty backend list, names unique within it; None unless all are valid."""
        pairs = items(value, path, self.context, empty="must contain at least one backend")
        names: dict[str, str] = {}
        backends = [
            read_section(
                BackendConfig,
                item,
                each_path,
                self.context,
                base=template,
                hooks={
                    "name": lambda section: self._unique(section, names, "backend"),
                    "api_keys": read_api_keys,
                },
            )
            for each_path, item in pairs
        ]
        valid = [backend for backend in backends if backend is not None]
        return tuple(valid) if valid and len(valid) == len(backends) else None
