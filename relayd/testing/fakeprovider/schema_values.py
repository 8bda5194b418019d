"""Values that satisfy a JSON Schema: the inputs of the tool calls the fake upstream invents.

Clients check a tool call against the schema they offered before they run the
tool (Claude Code validates every input and answers a bad one with an error
instead of running it), so a fake call must be valid, not a placeholder.
:func:`tool_input` builds one deterministic value from the subset of JSON
Schema that tool definitions use:

* objects: every ``required`` property (in ``properties`` order), more only to
  reach ``minProperties``;
* arrays: ``max(minItems, 1)`` items (none when ``maxItems`` is 0; only
  ``minItems`` deep down, so recursive schemas end), distinct ones under
  ``uniqueItems``, ``prefixItems`` / tuple ``items`` honoured;
* ``const``, then the first ``enum`` value, then the type: ``anyOf`` /
  ``oneOf`` take the first branch that is not ``null``, ``allOf`` is merged,
  ``$ref`` to ``#/...`` (``$defs``, ``definitions``) is followed;
* strings: a value for the ``format`` (``date-time``, ``email``, ``uri``,
  ``uuid``, ...), else one suggested by the property name (an absolute path for
  ``file_path``, a URL for ``url``, a shell command for ``command``), else
  ``"fake"``; then fitted to ``minLength`` / ``maxLength``, and when it does
  not match ``pattern``, a string made from the pattern
  (:mod:`~relayd.testing.fakeprovider.regex_examples`) or a few candidates;
* numbers and integers: ``1`` moved into ``minimum`` / ``maximum`` (exclusive
  forms too) and onto ``multipleOf``; booleans ``false``; a schema that allows
  anything gets ``null``.

An unsatisfiable schema (or a ``pattern`` beyond what is modelled) gets a best
effort rather than an error: the fake has to answer something.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Final

from relayd.testing.fakeprovider.regex_examples import regex_example

#: How deep nested schemas (and ``$ref`` chains) are followed before giving up with ``null``.
_MAX_DEPTH: Final = 24
#: From this depth on an array gets only its ``minItems``: a recursive schema (a tree of
#: nodes with ``children``) then ends in empty lists instead of running into the limit.
_LEAN_DEPTH: Final = 6

_FORMATS: Final[dict[str, str]] = {
    "date-time": "2025-01-01T00:00:00Z",
    "date": "2025-01-01",
    "time": "00:00:00Z",
    "duration": "PT1M",
    "email": "user@example.com",
    "idn-email": "user@example.com",
    "hostname": "example.com",
    "idn-hostname": "example.com",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "uri": "https://example.com/",
    "iri": "https://example.com/",
    "url": "https://example.com/",
    "uri-reference": "https://example.com/",
    "iri-reference": "https://example.com/",
    "uri-template": "https://example.com/{id}",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "json-pointer": "/fake",
    "relative-json-pointer": "0",
    "regex": "fake",
    "byte": "ZmFrZQ==",
}
_DIRECTORY: Final = "/tmp"
_FILE: Final = "/tmp/fake-upstream.txt"
_NAMED: Final[dict[str, str]] = {
    "path": _DIRECTORY,
    "cwd": _DIRECTORY,
    "dir": _DIRECTORY,
    "directory": _DIRECTORY,
    "url": "https://example.com/",
    "uri": "https://example.com/",
    "email": "user@example.com",
    "command": "echo fake-upstream",
    "cmd": "echo fake-upstream",
}
#: Tried in order when the first choice does not match a ``pattern``.
_PATTERN_CANDIDATES: Final = (
    "a", "A", "0", "1", "abc", "ABC", "a1", "fake-upstream", "fake_upstream", "a-b", "a.b",
    "a/b", "/a", "x@y.z", "https://example.com/", "2025-01-01",
    "00000000-0000-4000-8000-000000000000",
)  # fmt: skip


def tool_input(schema: object) -> dict[str, object]:
    """An input object for a tool whose ``input_schema`` (or ``parameters``) is ``schema``.

    Always an object, ``{}`` when the schema gives nothing to build from.
    """
    value = schema_value(schema)
    return value if isinstance(value, dict) else {}


def schema_value(schema: object, *, name: str = "", root: object = None) -> object:
    """A value valid against ``schema``; ``name`` is the property it is for (a hint)."""
    return _Builder(schema if root is None else root).value(schema, name, 0, 0)


class _Builder:
    """One :func:`schema_value` run: the root schema that ``$ref`` points into."""

    __slots__ = ("_root",)

    def __init__(self, root: object) -> None:
        self._root = root

    def value(self, schema: object, name: str, depth: int, variant: int) -> object:
        """A value for ``schema``; ``variant`` > 0 asks for a different one (unique items)."""
        if depth > _MAX_DEPTH or not isinstance(schema, dict):
            return None  # ``true``, ``{}``-like or garbage: null is as good as anything
        schema = self._flatten(schema, depth)
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return enum[variant % len(enum)]
        match _type_of(schema):
            case "object":
                return self._object(schema, depth)
            case "array":
                return self._array(schema, name, depth)
            case "string":
                return _string(schema, name, variant)
            case "integer":
                return _number(schema, True, variant)
            case "number":
                return _number(schema, False, variant)
            case "boolean":
                return variant % 2 == 1
        return None

    def _flatten(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        """``schema`` with ``$ref`` resolved, ``allOf`` merged, an ``anyOf``/``oneOf`` chosen."""
        for _ in range(_MAX_DEPTH - depth + 1):
            rest = dict(schema)
            if isinstance(ref := rest.pop("$ref", None), str):
                target = _resolve(self._root, ref)
                schema = {**target, **rest} if isinstance(target, dict) else rest
            elif isinstance(parts := rest.pop("allOf", None), list):
                for part in parts:
                    if isinstance(part, dict):
                        rest = _merge(rest, part)
                schema = rest
            elif isinstance(rest.get("anyOf"), list) or isinstance(rest.get("oneOf"), list):
                key = "anyOf" if isinstance(rest.get("anyOf"), list) else "oneOf"
                branch = _first_non_null(rest.pop(key))
                schema = _merge(rest, branch) if isinstance(branch, dict) else rest
            else:
                return schema
        return schema

    def _object(self, schema: Mapping[str, Any], depth: int) -> dict[str, object]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        wanted = [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
        names = [n for n in properties if n in wanted]
        names += [n for n in dict.fromkeys(wanted) if n not in properties]
        least = schema.get("minProperties")
        if isinstance(least, int) and len(names) < least:
            names += [n for n in properties if n not in names][: least - len(names)]
        extra = schema.get("additionalProperties")
        return {name: self.value(properties.get(name, extra), name, depth + 1, 0) for name in names}

    def _array(self, schema: Mapping[str, Any], name: str, depth: int) -> list[object]:
        prefix = schema.get("prefixItems")
        items = schema.get("items")
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, schema.get("additionalItems")
        prefix = prefix if isinstance(prefix, list) else []
        least, most = schema.get("minItems"), schema.get("maxItems")
        count = max(least if isinstance(least, int) else 0, 1 if depth < _LEAN_DEPTH else 0)
        if prefix and items is False:  # no items beyond the tuple
            count = min(count, len(prefix))
        if isinstance(most, int):
            count = min(count, max(most, 0))
        unique = schema.get("uniqueItems") is True
        singular = name[:-1] if name.endswith("s") else name
        return [
            self.value(
                prefix[i] if i < len(prefix) else items, singular, depth + 1, i if unique else 0
            )
            for i in range(count)
        ]


def _type_of(schema: Mapping[str, Any]) -> str | None:
    """The JSON type to build: ``type`` (a list's first non-null entry), else inferred."""
    kind = schema.get("type")
    if isinstance(kind, list):
        named = [k for k in kind if isinstance(k, str)]
        kind = next((k for k in named if k != "null"), named[0] if named else None)
    if isinstance(kind, str):
        return kind
    keys = schema.keys()
    if keys & {"properties", "required", "additionalProperties", "minProperties"}:
        return "object"
    if keys & {"items", "prefixItems", "minItems", "maxItems", "uniqueItems"}:
        return "array"
    if keys & {"minLength", "maxLength", "pattern", "format"}:
        return "string"
    if keys & {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}:
        return "number"
    return None


def _resolve(root: object, ref: str) -> object:
    """The schema a local ``$ref`` (``#/$defs/Name``) points to, or ``None``."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _first_non_null(branches: list[object]) -> object:
    for branch in branches:
        if isinstance(branch, dict) and branch.get("type") != "null":
            return branch
    return branches[0] if branches else None


def _merge(base: Mapping[str, Any], part: Mapping[str, Any]) -> dict[str, Any]:
    """Two schemas as one (``allOf``): properties joined, required lists added up."""
    merged = {**base, **part}
    for key in ("properties", "$defs", "definitions"):
        if isinstance(base.get(key), dict) and isinstance(part.get(key), dict):
            merged[key] = {**base[key], **part[key]}
    if isinstance(base.get("required"), list) and isinstance(part.get("required"), list):
        merged["required"] = [*base["required"], *part["required"]]
    return merged


def _named_string(name: str) -> str | None:
    """A value the property name suggests (Claude Code wants absolute paths, for one)."""
    lower = name.lower()
    if lower in _NAMED:
        return _NAMED[lower]
    if lower in ("file", "filename") or lower.endswith(("_path", "_file", "_filename")):
        return _FILE
    if name.endswith(("Path", "File", "FileName", "Filename")):  # camelCase
        return _FILE
    if lower.endswith(("_url", "_uri")) or name.endswith(("Url", "URL", "Uri", "URI")):
        return _NAMED["url"]
    return None


def _string(schema: Mapping[str, Any], name: str, variant: int) -> str:
    fmt = schema.get("format")
    text = _FORMATS.get(fmt) if isinstance(fmt, str) else None
    if text is None:
        text = _named_string(name) or "fake"
        if variant:
            text = f"{text}-{variant}"
    text = _fit_length(text, schema)
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and not _matches(pattern, text):
        example = regex_example(pattern)
        if example is not None:
            fitted = _fit_length(example, schema, example[-1:] or "x")
            if _matches(pattern, fitted):
                return fitted
        for candidate in (_fit_length(c, schema) for c in _PATTERN_CANDIDATES):
            if _matches(pattern, candidate):
                return candidate
    return text


def _fit_length(text: str, schema: Mapping[str, Any], pad: str = "x") -> str:
    """``text`` padded with ``pad`` to ``minLength`` and cut to ``maxLength``."""
    least, most = schema.get("minLength"), schema.get("maxLength")
    if isinstance(least, int) and len(text) < least:
        text += pad * (least - len(text))
    if isinstance(most, int) and len(text) > most:
        text = text[: max(most, 0)]
    return text


def _matches(pattern: str, text: str) -> bool:
    """JSON Schema ``pattern`` semantics: an unanchored search (a bad regex never matches)."""
    try:
        return re.search(pattern, text) is not None
    except re.error:
        return False


def _bound(schema: Mapping[str, Any], inclusive: str, exclusive: str) -> tuple[float | None, bool]:
    """A numeric bound and whether it is exclusive (draft 6+ numbers and draft 4 booleans)."""
    strict = _as_number(schema.get(exclusive))
    if strict is not None:
        return strict, True
    value = _as_number(schema.get(inclusive))
    return value, value is not None and schema.get(exclusive) is True


def _as_number(value: object) -> float | None:
    """``value`` as a float if it is a JSON number (not a boolean), else ``None``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _number(schema: Mapping[str, Any], integer: bool, variant: int) -> int | float:
    """``1 + variant`` moved into the bounds and onto ``multipleOf``."""
    low, low_strict = _bound(schema, "minimum", "exclusiveMinimum")
    high, high_strict = _bound(schema, "maximum", "exclusiveMaximum")
    step = _as_number(schema.get("multipleOf"))
    if step is None or step <= 0:
        step = 1.0 if integer else None
    value = float(1 + variant)
    if low is not None and (value < low or (low_strict and value <= low)):
        value = low  # a step (integers have 1) moves it off a strict bound below
        if low_strict and step is None:
            value = low + 1.0 if high is None else (low + high) / 2
    if high is not None and (value > high or (high_strict and value >= high)):
        value = high
        if high_strict:
            value = high - (step or 1.0) if low is None else (low + high) / 2
    if step is not None:
        value = _on_step(value, step, low, low_strict)
    return int(value) if integer or value.is_integer() else value


def _on_step(value: float, step: float, low: float | None, low_strict: bool) -> float:
    """The nearest multiple of ``step`` at or above ``value`` that the lower bound allows."""
    multiple = math.ceil(value / step - 1e-9) * step
    if low is not None and (multiple < low or (low_strict and multiple <= low)):
        multiple += step
    return multiple
