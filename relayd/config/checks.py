"""Value checks: each takes a YAML value and its key path, and gives back the value the
model holds, or None after reporting what is wrong.

A check never raises for a bad value: it records the problem in the :class:`Context`
and returns None, so the reader carries on and one run reports every problem. Booleans
are never numbers here (YAML ``true`` is not ``1``), ``null`` is never a value, and a
check shows a rejected value only when it cannot be a secret (numbers, names of
choices), otherwise only its type.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TypeGuard, TypeVar

from relayd.config.errors import ROOT_PATH, ConfigError, item_path, key_path
from relayd.providers import PROVIDERS

_T = TypeVar("_T")

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
UNSAFE_CHAR_RE = re.compile(r"[\x00-\x20\x7f]")  # whitespace and control characters
_HEADER_GLOB_RE = re.compile(r"[A-Za-z0-9*?_.-]+")
_KEY_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:-]+")
_ANTHROPIC_VERSION_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


class Context:
    """What the checks of one document share: where problems go, and what relative
    paths (``base_dir``) and ``api_key_env`` references (``environ``) resolve against."""

    def __init__(self, *, environ: Mapping[str, str], base_dir: str) -> None:
        self.environ = environ
        self.base_dir = base_dir
        self.errors: list[ConfigError] = []

    def error(self, path: str, message: str) -> None:
        """Record one problem at ``path`` ("" is the document itself)."""
        self.errors.append(ConfigError(path or ROOT_PATH, message))


# A check: (value, key path, context) -> the model's value, or None once reported (or,
# for a value that asks for the default such as ``connections.max: auto``, unreported).
Check = Callable[[object, str, Context], _T | None]


# -- describing values --------------------------------------------------------------


def type_name(value: object) -> str:
    """A YAML-flavoured name for the type of ``value``, used in type errors."""
    if value is None:
        return "null"
    names: tuple[tuple[type, str], ...] = (
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        (list, "list"),
        (dict, "mapping"),
    )
    for kind, name in names:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def describe_number(value: object) -> str:
    """Numbers are not secret, so show them; anything else only by type."""
    return repr(value) if _is_number(value) else type_name(value)


def _is_integer(value: object) -> TypeGuard[int]:
    """True for ints; bools are ints to Python but never numbers here."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    """True for ints and floats, booleans excepted."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_float(value: object) -> float | None:
    """``value`` as a float if it is a plain number (an overflowing int becomes inf)."""
    if not _is_number(value):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


# -- structure ----------------------------------------------------------------------


def mapping(
    value: object, path: str, allowed: Sequence[str], context: Context
) -> dict[str, object] | None:
    """``value`` as a mapping whose keys are all in ``allowed``; unknown keys are errors."""
    if not isinstance(value, dict):
        context.error(path, f"must be a mapping, got {type_name(value)}")
        return None
    fields: dict[str, object] = {}
    for key, item in value.items():
        if isinstance(key, str) and key in allowed:
            fields[key] = item
        else:
            context.error(key_path(path, key), "unknown key")
    return fields


def items(
    value: object, path: str, context: Context, *, empty: str | None
) -> list[tuple[str, object]]:
    """The ``(path, item)`` pairs of a list; ``empty`` is the error for an empty list."""
    if not isinstance(value, list):
        context.error(path, f"must be a list, got {type_name(value)}")
        return []
    if not value and empty is not None:
        context.error(path, empty)
    return [(item_path(path, index), item) for index, item in enumerate(value)]


def check_unique(
    name: str | None, path: str, seen: dict[str, str], what: str, context: Context
) -> None:
    """Record ``name`` at ``path``; a name already in ``seen`` is an error at this path."""
    if name is None:
        return
    if name in seen:
        context.error(path, f"duplicate {what} name {name!r} (first used at {seen[name]})")
    else:
        seen[name] = path


# -- numbers ------------------------------------------------------------------------


def _integer_check(what: str, accept: Callable[[int], bool]) -> Check[int]:
    """A check for an integer that ``accept`` takes; ``what`` describes it in errors."""

    def check(value: object, path: str, context: Context) -> int | None:
        if not _is_integer(value) or not accept(value):
            context.error(path, f"must be {what}, got {describe_number(value)}")
            return None
        return value

    return check


def _number_check(what: str, accept: Callable[[float], bool]) -> Check[float]:
    """A check for an int or float that ``accept`` takes, given back as a float."""

    def check(value: object, path: str, context: Context) -> float | None:
        number = _as_float(value)
        if number is None or not accept(number):
            context.error(path, f"must be {what}, got {describe_number(value)}")
            return None
        return number

    return check


def int_between(low: int, high: int) -> Check[int]:
    """A check for an integer from ``low`` to ``high`` inclusive."""
    return _integer_check(f"an integer from {low} to {high}", lambda n: low <= n <= high)


positive_int = _integer_check("a positive integer", lambda n: n > 0)
non_negative_int = _integer_check("a non-negative integer", lambda n: n >= 0)
# Numbers of seconds and the like: finite, so ``.inf`` is refused.
positive_number = _number_check("a positive number", lambda n: 0 < n < math.inf)
non_negative_number = _number_check("a non-negative number", lambda n: 0 <= n < math.inf)
fraction = _number_check("a number from 0 to 1", lambda n: 0 <= n <= 1)


def connection_limit(value: object, path: str, context: Context) -> int | None:
    """``auto`` (None: the default, derived from the open-file limit) or a positive integer."""
    if value == "auto":
        return None
    if not _is_integer(value) or value <= 0:
        context.error(path, f"must be auto or a positive integer, got {describe_number(value)}")
        return None
    return value


#: The most worker processes ``workers`` may ask for.
MAX_WORKERS = 64


def worker_count(value: object, path: str, context: Context) -> int | None:
    """``auto`` (0: as many as the CPUs the process may use) or 1 to :data:`MAX_WORKERS`."""
    if value == "auto":
        return 0
    if not _is_integer(value) or not 1 <= value <= MAX_WORKERS:
        got = describe_number(value)
        context.error(path, f"must be auto or an integer from 1 to {MAX_WORKERS}, got {got}")
        return None
    return value


# -- words --------------------------------------------------------------------------


def boolean(value: object, path: str, context: Context) -> bool | None:
    """A YAML boolean (``true``/``false``); strings and numbers are refused."""
    if not isinstance(value, bool):
        context.error(path, f"must be true or false, got {type_name(value)}")
        return None
    return value


def choice(*options: str) -> Check[str]:
    """A check for one of ``options``."""

    def check(value: object, path: str, context: Context) -> str | None:
        if not isinstance(value, str) or value not in options:
            shown = repr(value) if isinstance(value, str) else type_name(value)
            context.error(path, f"must be one of {', '.join(options)}; got {shown}")
            return None
        return value

    return check


def api_family(value: object, path: str, context: Context) -> str | None:
    """The name of a registered provider module (``relayd.providers.PROVIDERS``)."""
    if isinstance(value, str) and value in PROVIDERS:
        return value
    shown = repr(value) if isinstance(value, str) else type_name(value)
    context.error(path, f"must be one of {', '.join(PROVIDERS)}, got {shown}")
    return None


def string(value: object, path: str, context: Context) -> str | None:
    """A non-empty string."""
    if not isinstance(value, str):
        context.error(path, f"must be a string, got {type_name(value)}")
        return None
    if not value.strip():
        context.error(path, "must not be empty")
        return None
    return value


def _string_matching(pattern: re.Pattern[str], message: str) -> Check[str]:
    """A check for a non-empty string that ``pattern`` matches in full."""

    def check(value: object, path: str, context: Context) -> str | None:
        text = string(value, path, context)
        if text is not None and not pattern.fullmatch(text):
            context.error(path, message)
            return None
        return text

    return check


# An identifier (client, provider and backend names).
name = _string_matching(NAME_RE, "must contain only letters, digits, '_', '.' and '-'")
# The Redis hash tag of every key: braces would break it.
key_prefix = _string_matching(
    _KEY_PREFIX_RE, "must contain only letters, digits, '_', '.', ':' and '-'"
)


def header_value(value: object, path: str, context: Context) -> str | None:
    """A non-empty string usable as an HTTP header value (no whitespace or controls)."""
    text = string(value, path, context)
    if text is not None and UNSAFE_CHAR_RE.search(text):
        context.error(path, "must not contain whitespace or control characters")
        return None
    return text


def probe_path(value: object, path: str, context: Context) -> str | None:
    """An HTTP request path for health probes: starts with ``/``, no whitespace."""
    text = string(value, path, context)
    if text is None:
        return None
    if not text.startswith("/"):
        context.error(path, "must start with '/'")
        return None
    if UNSAFE_CHAR_RE.search(text):
        context.error(path, "must not contain whitespace or control characters")
        return None
    return text


def anthropic_version(value: object, path: str, context: Context) -> str | None:
    """An ``anthropic-version`` date such as ``2023-06-01``."""
    text = string(value, path, context)
    if text is not None and not _ANTHROPIC_VERSION_RE.fullmatch(text):
        context.error(path, f"must be a date like 2023-06-01, got {text!r}")
        return None
    return text


def local_path(value: object, path: str, context: Context) -> str | None:
    """A filesystem path, made absolute against the configuration's directory."""
    text = string(value, path, context)
    if text is None:
        return None
    return os.path.normpath(os.path.join(context.base_dir, text))


# -- lists --------------------------------------------------------------------------


def globs(value: object, path: str, context: Context) -> tuple[str, ...] | None:
    """A non-empty list of non-empty model names or fnmatch globs."""
    pairs = items(
        value,
        path,
        context,
        empty="must list at least one model name or glob (leave the key out for all)",
    )
    if not pairs:
        return None
    patterns = [string(item, each_path, context) for each_path, item in pairs]
    valid = [pattern for pattern in patterns if pattern is not None]
    return tuple(valid) if len(valid) == len(patterns) else None


def names(value: object, path: str, context: Context) -> tuple[str, ...] | None:
    """A non-empty list of names (letters, digits, ``_ . -``; ``[`` ``]`` for the
    default ``routes[INDEX]`` names)."""
    pairs = items(value, path, context, empty="must list at least one name (leave it out "
                                               "for all)")
    found = []
    for each_path, item in pairs:
        text = string(item, each_path, context)
        if text is not None and not re.fullmatch(r"[A-Za-z0-9_.\[\]-]+", text):
            context.error(each_path, "must be a name (letters, digits, '_', '.', '-')")
            text = None
        if text is not None:
            found.append(text)
    return tuple(found) if pairs and len(found) == len(pairs) else None


def header_globs(value: object, path: str, context: Context) -> tuple[str, ...] | None:
    """A list of header names or globs (``x-fake-*``), lower-cased."""
    result = []
    for each_path, item in items(value, path, context, empty=None):
        glob = string(item, each_path, context)
        if glob is None:
            continue
        if not _HEADER_GLOB_RE.fullmatch(glob):
            context.error(
                each_path,
                "must be a header name or a glob of one (letters, digits, - _ . and the"
                " wildcards * ?)",
            )
            continue
        result.append(glob.lower())
    return tuple(result)
