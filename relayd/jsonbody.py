"""JSON from the network, parsed so that every malformed document is a ``ValueError``.

``json.loads`` raises ``RecursionError`` (not a ``ValueError``) for a document nested
deeper than Python's recursion limit, about a thousand levels: ``[[[[...]]]]`` in a
request body got a 500 with a critical traceback, and the same from an upstream could
break a usage parser. The C parser gives up at that depth, so the cost stays bounded.
"""

from __future__ import annotations

import json
from typing import Any, Final


def loads(data: bytes | str) -> Any:
    """``json.loads``; a document nested too deeply is a ``ValueError`` like any other."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


class _Missing:
    """No such trailing member: parse the document whole."""


MISSING: Final = _Missing()

_DECODER = json.JSONDecoder()
_WHITESPACE = b" \t\r\n"  # JSON's four, not every Unicode space str.strip knows
_TEXT_WHITESPACE = _WHITESPACE.decode()
_BEFORE_KEY = frozenset(b"{," + _WHITESPACE)


def trailing_member(data: bytes, key: bytes) -> Any:
    """The value of member ``key`` when it is the last member of the top-level object in
    ``data`` (Anthropic puts ``usage`` last), read without parsing what precedes it; else
    :data:`MISSING`, and the caller parses the document whole.

    Found as the last ``"key":`` in the text, after ``{``, ``,`` or whitespace (inside a
    string every quote is escaped, so this can only be a key), with nothing but ``}`` and
    whitespace after its value (so the object that holds it is the outermost). What
    precedes the member is not checked: a malformed document that ends this way still
    gives the value, where a whole parse would give nothing.
    """
    needle = b'"' + key + b'":'
    at = data.rfind(needle)
    if at <= 0 or data[at - 1] not in _BEFORE_KEY:
        return MISSING
    tail = data[at + len(needle):].lstrip(_WHITESPACE)
    try:
        text = tail.decode()
        value, end = _DECODER.raw_decode(text)
    except (ValueError, RecursionError):
        return MISSING
    if text[end:].strip(_TEXT_WHITESPACE) != "}":
        return MISSING
    return value
