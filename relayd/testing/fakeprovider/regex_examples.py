"""A string that a regular expression matches: for JSON Schema ``pattern`` in tool inputs.

Tool schemas constrain strings with patterns such as ``^[A-Z]{3}-\\d+$`` or
``^\\d{5}$``; a fake tool input has to match them.  :func:`regex_example` walks
the parsed expression (Python's own regex parser, so the syntax is exactly what
``re`` accepts) and takes, at every choice, the first alternative, the first
member of a class and the smallest repetition of at least one.  Back-references
and look-arounds are not modelled: the caller checks the result with
``re.search`` and falls back to something else when it does not match.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Final

_regex_parser: Any
_ops: Any
try:  # Python's own regex parser (``sre_parse`` before 3.11), which typeshed does not cover
    _regex_parser = importlib.import_module("re._parser")
    _ops = importlib.import_module("re._constants")
except ImportError:  # pragma: no cover - a Python without it: callers fall back
    _regex_parser = None

#: Characters tried, in order, for ``.`` and negated classes.
_PLAIN: Final = "a0A-_ .x"
_CATEGORY_CHARS: Final[dict[str, str]] = {
    "CATEGORY_DIGIT": "0",
    "CATEGORY_NOT_DIGIT": "a",
    "CATEGORY_WORD": "a",
    "CATEGORY_NOT_WORD": "-",
    "CATEGORY_SPACE": " ",
    "CATEGORY_NOT_SPACE": "a",
}
_CATEGORY_TESTS: Final[dict[str, re.Pattern[str]]] = {
    "CATEGORY_DIGIT": re.compile(r"\d"),
    "CATEGORY_NOT_DIGIT": re.compile(r"\D"),
    "CATEGORY_WORD": re.compile(r"\w"),
    "CATEGORY_NOT_WORD": re.compile(r"\W"),
    "CATEGORY_SPACE": re.compile(r"\s"),
    "CATEGORY_NOT_SPACE": re.compile(r"\S"),
}


class _UnsupportedError(Exception):
    """The expression uses something this walk does not model."""


def regex_example(pattern: str) -> str | None:
    """A string that ``re.search(pattern, ...)`` finds, or ``None`` when none was made."""
    if _regex_parser is None:
        return None
    try:
        text = _emit(list(_regex_parser.parse(pattern)))
        return text if re.search(pattern, text) else None
    except (re.error, _UnsupportedError, RecursionError, ValueError, OverflowError):
        return None


def _emit(items: list[tuple[Any, Any]]) -> str:
    out: list[str] = []
    for op, arg in items:
        if op is _ops.LITERAL:
            out.append(chr(arg))
        elif op is _ops.NOT_LITERAL:
            out.append(next(c for c in _PLAIN if ord(c) != arg))
        elif op is _ops.ANY:
            out.append(_PLAIN[0])
        elif op is _ops.IN:
            out.append(_class_member(arg))
        elif op in (_ops.MAX_REPEAT, _ops.MIN_REPEAT, _ops.POSSESSIVE_REPEAT):
            least, most, body = arg
            out.append(_emit(list(body)) * min(max(least, 1), most))
        elif op is _ops.SUBPATTERN:
            out.append(_emit(list(arg[-1])))
        elif op is _ops.ATOMIC_GROUP:
            out.append(_emit(list(arg)))
        elif op is _ops.BRANCH:
            out.append(_emit(list(arg[1][0])))
        elif op is _ops.AT or op is _ops.ASSERT_NOT:
            continue  # anchors take no characters; a negative look-around is checked later
        else:
            raise _UnsupportedError(str(op))
    return "".join(out)


def _class_member(members: list[tuple[Any, Any]]) -> str:
    """The first character a ``[...]`` class (or ``\\d``-like category) accepts."""
    if members and members[0][0] is _ops.NEGATE:
        rest = members[1:]
        for char in _PLAIN:
            if not any(_in_member(char, op, arg) for op, arg in rest):
                return char
        raise _UnsupportedError("negated class")
    op, arg = members[0]
    if op is _ops.LITERAL:
        return chr(arg)
    if op is _ops.RANGE:
        return chr(arg[0])
    if op is _ops.CATEGORY and str(arg) in _CATEGORY_CHARS:
        return _CATEGORY_CHARS[str(arg)]
    raise _UnsupportedError(str(op))


def _in_member(char: str, op: Any, arg: Any) -> bool:
    if op is _ops.LITERAL:
        return ord(char) == arg
    if op is _ops.RANGE:
        return bool(arg[0] <= ord(char) <= arg[1])
    if op is _ops.CATEGORY and str(arg) in _CATEGORY_TESTS:
        return _CATEGORY_TESTS[str(arg)].match(char) is not None
    raise _UnsupportedError(str(op))
