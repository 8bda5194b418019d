"""The tool call the fake makes when a request offers tools (both API families).

Which tool: the one the request's ``tool_choice`` names, else the first offered.
Its input has one placeholder per property of the tool's schema (``"fake"``,
``1``, ``1.5``, ``true``, ``[]``, ``{}`` or ``null`` by JSON type).  Streams send
the input JSON in fragments of at most :data:`TOOL_FRAGMENT` characters, as the
real APIs split it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NamedTuple

from relayd.testing.fakeprovider.wire import compact

#: Longest ``partial_json`` / ``arguments`` fragment of a streamed tool call.
TOOL_FRAGMENT: Final = 8


class ToolCall(NamedTuple):
    """The tool the fake calls and the input it made up for it."""

    name: str
    input: dict[str, object]

    @property
    def arguments(self) -> str:
        """The input as compact JSON (OpenAI ``arguments``, Anthropic ``partial_json``)."""
        return compact(self.input)


def _placeholder(kind: object) -> object:
    """The fake value of a JSON-schema ``type``."""
    match kind:
        case "string":
            return "fake"
        case "integer":
            return 1
        case "number":
            return 1.5
        case "boolean":
            return True
        case "array":
            return []
        case "object":
            return {}
    return None


def tool_input(schema: object) -> dict[str, object]:
    """One placeholder per entry of the schema's ``properties``, in order."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return {}
    return {
        str(name): _placeholder(prop.get("type") if isinstance(prop, dict) else None)
        for name, prop in properties.items()
    }


def choose_tool(declared: Sequence[tuple[str, object]], wanted: object) -> ToolCall | None:
    """The call of the tool named ``wanted`` if it is declared, else of the first one.

    ``declared`` holds (name, JSON schema of the input) pairs in request order.
    """
    if not declared:
        return None
    name, schema = next((tool for tool in declared if tool[0] == wanted), declared[0])
    return ToolCall(name, tool_input(schema))


def fragments(text: str) -> list[str]:
    """``text`` in pieces of at most :data:`TOOL_FRAGMENT` characters."""
    return [text[i : i + TOOL_FRAGMENT] for i in range(0, len(text), TOOL_FRAGMENT)]
