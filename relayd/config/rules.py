"""Checks of ``rules[]`` (content rules): a pattern that compiles, is not too long and
shows no nested quantifier (the shape of catastrophic backtracking), and references to
clients and routes that exist."""

from __future__ import annotations

import re

from relayd.config.checks import Context, string

__all__ = ["MAX_PATTERN_LENGTH", "rule_pattern"]

#: Longest pattern a rule may have.
MAX_PATTERN_LENGTH = 1000
# A group holding a quantifier, itself quantified: (a+)+, (a*)*, (\w+\s?)*, (x{2,})+ ...
_NESTED_QUANTIFIER = re.compile(
    r"\((?:[^()\\]|\\.)*?(?:[+*]|\{\d*,\d*\})(?:[^()\\]|\\.)*\)\s*(?:[+*]|\{\d*,\d*\})"
)


def rule_pattern(value: object, path: str, context: Context) -> str | None:
    """A Python regular expression fit to scan client text with."""
    text = string(value, path, context)
    if text is None:
        return None
    if len(text) > MAX_PATTERN_LENGTH:
        context.error(path, f"must be at most {MAX_PATTERN_LENGTH} characters long")
        return None
    try:
        re.compile(text)
    except re.error as exc:
        context.error(path, f"is not a valid regular expression: {exc.msg} at position "
                            f"{exc.pos}")
        return None
    if _NESTED_QUANTIFIER.search(text):
        context.error(path, "has a quantified group that itself repeats (like (a+)+): such "
                            "patterns can take exponential time on hostile text; rewrite it")
        return None
    return text
