"""JSON from the network, parsed so that every malformed document is a ``ValueError``.

``json.loads`` raises ``RecursionError`` (not a ``ValueError``) for a document nested
deeper than Python's recursion limit, about a thousand levels: ``[[[[...]]]]`` in a
request body got a 500 with a critical traceback, and the same from an upstream could
break a usage parser. The C parser gives up at that depth, so the cost stays bounded.
"""

from __future__ import annotations

import json
from typing import Any


def loads(data: bytes | str) -> Any:
    """``json.loads``; a document nested too deeply is a ``ValueError`` like any other."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
