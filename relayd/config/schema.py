"""The configuration's schema, stated once: as metadata on the fields of the model.

A field of a :mod:`relayd.config.model` dataclass that a YAML key sets says so with
``field(metadata=...)`` made by one of:

- :func:`checked`: the key's value goes through a check of :mod:`relayd.config.checks`
  (which converts it, or reports it and gives None);
- :func:`nested`: the key holds a mapping, read as a section of its own and merged
  field by field over the default (so a level inherits what it leaves out);
- :func:`hooked`: the key (or keys) is read by a hook of the code reading the section,
  for a rule that reaches beyond one value (one listener per address, unique names,
  a provider a route names, exactly one API key source).

A field without metadata is no key: it is derived from one (a listener's ``host`` and
``port`` from its ``address``) or set by the program (``Config.source``).

:func:`read_section` reads any mapping of the file by that metadata: it reports
unknown keys and missing required ones, checks every value, keeps the default for a
key that is absent or rejected, checks the ``at_most`` ordering rules once the section
is otherwise sound, and builds the dataclass. Fields are read in the order they are
declared, which is therefore the order in which a section's problems are reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from relayd.config.checks import Check, Context, mapping
from relayd.config.errors import key_path

__all__ = [
    "Checked",
    "Hook",
    "Hooked",
    "Nested",
    "Section",
    "checked",
    "hooked",
    "nested",
    "read_section",
    "section_keys",
]

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_T = TypeVar("_T")
_S = TypeVar("_S", bound="DataclassInstance")  # a section: a model dataclass
_METADATA_KEY = "relayd.config.schema"


@dataclass(frozen=True, slots=True)
class Checked:
    """A key whose value ``check`` validates; ``at_most`` names a key it may not exceed."""

    check: Check[Any]
    at_most: str | None = None


@dataclass(frozen=True, slots=True)
class Nested:
    """A key holding a mapping read as section ``kind``.

    ``keep`` decides whether the section read means anything (a ``limits`` mapping that
    sets no limit is no limits, None); without it the section is always kept.
    """

    kind: type[DataclassInstance]
    keep: Callable[[Any], bool] | None = None


@dataclass(frozen=True, slots=True)
class Hooked:
    """Keys (the field's own name if none are given) read by a hook of the section's reader."""

    keys: tuple[str, ...] = ()


Spec = Checked | Nested | Hooked
# A hook reads what a check cannot: it sees the section, reads or cross-checks keys,
# and stores the field values it produced in ``section.values``.
Hook = Callable[["Section"], None]


def checked(check: Check[Any], *, at_most: str | None = None) -> dict[str, Spec]:
    """Field metadata: the key of this name, validated by ``check``."""
    return {_METADATA_KEY: Checked(check, at_most)}


def nested(
    kind: type[DataclassInstance], *, keep: Callable[[Any], bool] | None = None
) -> dict[str, Spec]:
    """Field metadata: the key of this name holds a section ``kind``."""
    return {_METADATA_KEY: Nested(kind, keep)}


def hooked(*keys: str) -> dict[str, Spec]:
    """Field metadata: ``keys`` (default: the field's name) are read by a hook."""
    return {_METADATA_KEY: Hooked(keys)}


def spec_of(item: dataclasses.Field[Any]) -> Spec | None:
    """The schema of one dataclass field; None if it is no key."""
    spec = item.metadata.get(_METADATA_KEY)
    return spec if isinstance(spec, Checked | Nested | Hooked) else None


def section_keys(kind: type[DataclassInstance]) -> tuple[str, ...]:
    """Every key a section ``kind`` allows, in field order."""
    keys: list[str] = []
    for item in dataclasses.fields(kind):
        spec = spec_of(item)
        if isinstance(spec, Hooked):
            keys.extend(spec.keys or (item.name,))
        elif spec is not None:
            keys.append(item.name)
    return tuple(keys)


def _required(item: dataclasses.Field[Any]) -> bool:
    """True for a field with no default: its key must be given."""
    return item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING


class Section:
    """One mapping of the file being read as a model dataclass: what hooks work on.

    ``fields`` holds the known keys present, ``values`` the field values read so far;
    :meth:`get` falls back to the default (``base``'s value, or the dataclass's).
    """

    def __init__(
        self,
        kind: type[DataclassInstance],
        fields: dict[str, object],
        path: str,
        context: Context,
        base: object | None,
    ) -> None:
        self.kind = kind
        self.fields = fields
        self.path = path
        self.context = context
        self.values: dict[str, object] = {}
        self._base = base

    def key_path(self, key: str) -> str:
        """The path of ``key`` in this section."""
        return key_path(self.path, key)

    def value(self, name: str) -> Any:
        """Field ``name`` as read from this section; None if absent or rejected (so far)."""
        return self.values.get(name)

    def get(self, name: str) -> Any:
        """Field ``name`` as read so far, else its default: ``base``'s value, or the
        dataclass's (None for a required field)."""
        if name in self.values:
            return self.values[name]
        if self._base is not None:
            return getattr(self._base, name)
        item = next(item for item in dataclasses.fields(self.kind) if item.name == name)
        if item.default_factory is not dataclasses.MISSING:
            return item.default_factory()
        return None if item.default is dataclasses.MISSING else item.default

    def check(self, key: str, check: Check[_T]) -> _T | None:
        """``check`` applied to the value of ``key``; None if it is absent or rejected."""
        if key not in self.fields:
            return None
        return check(self.fields[key], self.key_path(key), self.context)

    def require(self, key: str, check: Check[_T]) -> _T | None:
        """Like :meth:`check`, but an absent key is an error."""
        if key not in self.fields:
            self.context.error(self.key_path(key), "is required")
            return None
        return self.check(key, check)

    def merge(self, key: str, base: _S) -> _S:
        """The section at ``key`` read over ``base``; ``base`` if absent or unusable."""
        if key not in self.fields:
            return base
        merged = read_section(
            type(base), self.fields[key], self.key_path(key), self.context, base=base
        )
        return base if merged is None else merged

    def build(self) -> Any:
        """The dataclass from the values read; None if a required field has none."""
        arguments: dict[str, object] = {}
        for item in dataclasses.fields(self.kind):
            if item.name in self.values:
                arguments[item.name] = self.values[item.name]
            elif _required(item):
                return None
            elif self._base is not None:
                arguments[item.name] = getattr(self._base, item.name)
        return self.kind(**arguments)


def read_section(
    kind: type[_S],
    value: object,
    path: str,
    context: Context,
    *,
    base: _S | None = None,
    hooks: Mapping[str, Hook] | None = None,
) -> _S | None:
    """Read ``value`` (the YAML at ``path``) as the dataclass ``kind``.

    Absent and rejected keys keep their default: ``base``'s value when given (a level
    inheriting from the one above), else the dataclass's. ``hooks`` maps a field name
    to a hook run at that field's turn: after the field's own check, or in place of
    it for a :func:`hooked` field. Returns None if ``value`` is not a mapping or a
    required field could not be read; problems are recorded in ``context``.
    """
    hooks = hooks or {}
    _check_hooks(kind, hooks)
    errors_before = len(context.errors)
    fields = mapping(value, path, section_keys(kind), context)
    if fields is None:
        return None
    section = Section(kind, fields, path, context, base)
    for item in dataclasses.fields(kind):
        spec = spec_of(item)
        if isinstance(spec, Checked):
            read = section.require if _required(item) else section.check
            result = read(item.name, spec.check)
            if result is not None:
                section.values[item.name] = result
        elif isinstance(spec, Nested):
            _read_nested(section, item.name, spec)
        hook = hooks.get(item.name)
        if hook is not None:
            hook(section)
    if len(context.errors) == errors_before:  # a rejected value stands in by its default
        _check_order(section)
    built: _S | None = section.build()
    return built


def _check_hooks(kind: type[DataclassInstance], hooks: Mapping[str, Hook]) -> None:
    """Every hooked field of ``kind`` has a hook, and every hook a key field to run at.

    A mismatch is a programming error (a key would go unread), not a configuration one.
    """
    specs = {item.name: spec_of(item) for item in dataclasses.fields(kind)}
    unread = [name for name, spec in specs.items() if isinstance(spec, Hooked)]
    missing = [name for name in unread if name not in hooks]
    stray = [name for name in hooks if specs.get(name) is None]
    if missing or stray:
        raise TypeError(f"{kind.__name__} hooks: missing {missing}, not at a key {stray}")


def _read_nested(section: Section, name: str, spec: Nested) -> None:
    """Read the nested section ``name`` of ``section`` over its default."""
    if name not in section.fields:
        return
    default = section.get(name)
    merged = read_section(
        spec.kind,
        section.fields[name],
        section.key_path(name),
        section.context,
        base=default if isinstance(default, spec.kind) else None,
    )
    if merged is not None:
        section.values[name] = merged if spec.keep is None or spec.keep(merged) else None


def _check_order(section: Section) -> None:
    """The ``at_most`` rules, on the merged values of a section without other problems.

    The error is reported only if this section sets one of the two keys (at the lower
    one if it sets it), so a problem inherited from an upper level is reported once,
    up there.
    """
    for item in dataclasses.fields(section.kind):
        spec = spec_of(item)
        if not isinstance(spec, Checked) or spec.at_most is None:
            continue
        low_key, high_key = item.name, spec.at_most
        low, high = section.get(low_key), section.get(high_key)
        if low <= high:
            continue
        if low_key in section.fields:
            message = f"must not exceed {high_key} ({high!r})"
            section.context.error(section.key_path(low_key), message)
        elif high_key in section.fields:
            section.context.error(
                section.key_path(high_key), f"must not be below {low_key} ({low!r})"
            )
