"""The tool call the fake makes when a request offers tools (both API families).

Which tool: the one the request's ``tool_choice`` names, else the first offered.
Its input is built from the tool's schema by
:func:`~relayd.testing.fakeprovider.schema_values.tool_input` (every required
property, with a value of the right type and within the constraints), so
clients that validate tool inputs, as Claude Code does, accept it.  Streams send
the input JSON in fragments of at most :data:`TOOL_FRAGMENT` characters, as the
real APIs split it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NamedTuple

from relayd.testing.fakeprovider.schema_values import tool_input
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
