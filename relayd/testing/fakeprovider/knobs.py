"""The fake upstream's *knobs*: the misbehaviour and shape settings of one request.

An instance has a config (``POST /_fake/config``, or ``--config`` at start-up);
a request may override any knob with an ``x-fake-<knob>`` header, which wins.
Values arrive as JSON values or header strings and are parsed and range-checked
here, so the handlers only ever see a typed, valid :class:`Knobs`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, cast


class KnobError(ValueError):
    """An unknown knob name or a value of the wrong type/range."""


@dataclasses.dataclass(frozen=True, slots=True)
class Knobs:
    """Fault and shape settings for one request.

    ``None`` on an optional knob means "off".  Names are the same in
    ``POST /_fake/config`` bodies and in ``x-fake-<knob>`` request headers
    (where ``-`` may stand for ``_``).
    """

    #: Answer with this HTTP status (400-599) and an error body in the API's shape.
    status: int | None = None
    #: With ``status``: value of the ``retry-after`` header, in seconds.
    retry_after: float | None = None
    #: Seconds to wait before the response headers are sent.
    latency: float = 0.0
    #: Seconds between SSE events (0: the whole stream is written at once).
    chunk_delay: float = 0.0
    #: Number of text chunks (= output tokens) in a reply.
    chunks: int = 5
    #: Streams: close the connection mid-stream after this many events.  JSON:
    #: send the content-length header and half of the body, then close.
    drop_after: int | None = None
    #: Streams: finish the response cleanly after this many events.
    truncate_after: int | None = None
    #: Accept the request and never answer it.
    hang: bool = False
    #: Streams: send an in-stream error after the first event, then finish.
    stream_error: bool = False
    #: gzip-encode JSON bodies (``content-encoding: gzip``).
    gzip: bool = False
    #: Pad the reply text so the JSON body is this many bytes (0: no padding).
    body_bytes: int = 0
    #: Anthropic streams: send a ``ping`` event after ``content_block_start``.
    ping: bool = False
    #: Anthropic ``cache_creation_input_tokens`` reported in usage.
    cache_creation_input_tokens: int = 7
    #: Anthropic ``cache_read_input_tokens`` / OpenAI ``cached_tokens``.
    cache_read_input_tokens: int = 11
    #: Anthropic: act as a prompt cache instead of the two counts above: the prompt's
    #: prefix (system, tools, first message) is written on its first request to this
    #: upstream (``PROMPT_PREFIX_TOKENS`` cache creation tokens) and read on later ones.
    prompt_cache: bool = False
    #: Hostile answers: this many extra ``x-flood-N`` response headers.
    flood_headers: int = 0
    #: Hostile answers: JSON bodies replaced by gzip of this many MiB of zeros (a bomb).
    gzip_bomb_mib: int = 0

    def updated(self, values: Mapping[str, object]) -> Knobs:
        """Return a copy with ``values`` (raw JSON or header strings) applied.

        Raises :class:`KnobError` for unknown names and bad values.
        """
        if not values:
            return self
        parsed = {name: parse_knob(name, raw) for name, raw in values.items()}
        return dataclasses.replace(self, **cast(dict[str, Any], parsed))

    def as_dict(self) -> dict[str, object]:
        """The knobs as a JSON-ready mapping."""
        return dataclasses.asdict(self)


BUILTIN_KNOBS: Final = Knobs()

# name -> (kind, optional, minimum, maximum)
_KNOB_SPECS: Final[dict[str, tuple[type, bool, float, float]]] = {
    "status": (int, True, 400, 599),
    "retry_after": (float, True, 0, math.inf),
    "latency": (float, False, 0, math.inf),
    "chunk_delay": (float, False, 0, math.inf),
    "chunks": (int, False, 0, 1_000_000),
    "drop_after": (int, True, 0, math.inf),
    "truncate_after": (int, True, 0, math.inf),
    "hang": (bool, False, 0, 1),
    "stream_error": (bool, False, 0, 1),
    "gzip": (bool, False, 0, 1),
    "body_bytes": (int, False, 0, 1 << 31),
    "ping": (bool, False, 0, 1),
    "cache_creation_input_tokens": (int, False, 0, math.inf),
    "cache_read_input_tokens": (int, False, 0, math.inf),
    "prompt_cache": (bool, False, 0, 1),
    "flood_headers": (int, False, 0, 100_000),
    "gzip_bomb_mib": (int, False, 0, 4096),
}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_NULL: Final = frozenset({"", "none", "null"})


def parse_knob(name: str, raw: object) -> object:
    """Convert a JSON value or header string to the knob's type, or raise."""
    spec = _KNOB_SPECS.get(name)
    if spec is None:
        raise KnobError(f"unknown knob {name!r}")
    kind, optional, low, high = spec
    if isinstance(raw, str):
        raw = raw.strip()
        if raw.lower() in _NULL:
            raw = None
    if raw is None:
        return None if optional else getattr(BUILTIN_KNOBS, name)
    value: object
    try:
        if kind is bool:
            if isinstance(raw, bool):
                value = raw
            elif isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
                value = raw.lower() in _TRUE
            elif isinstance(raw, int) and raw in (0, 1):
                value = bool(raw)
            else:
                raise ValueError(raw)
            return value
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ValueError(raw)
        number = float(raw)
        if kind is int:
            if not number.is_integer():
                raise ValueError(raw)
            value = int(number)
        else:
            value = number
    except (ValueError, OverflowError):
        raise KnobError(f"bad value for knob {name!r}: {raw!r}") from None
    if not (low <= number <= high):
        raise KnobError(f"knob {name!r} out of range [{low:g}, {high:g}]: {raw!r}")
    return value


_HEADER_PREFIX: Final = b"x-fake-"


def header_overrides(
    headers: Iterable[tuple[bytes, Sequence[bytes]]],
) -> dict[str, object] | None:
    """The knobs that ``x-fake-<knob>`` request headers set (last value wins), or ``None``.

    ``-`` in a header name stands for ``_`` in the knob name.  The values are
    left raw: :meth:`Knobs.updated` parses them.
    """
    overrides: dict[str, object] | None = None
    for name, values in headers:
        lower = name.lower()
        if lower.startswith(_HEADER_PREFIX) and values:
            if overrides is None:
                overrides = {}
            key = lower[len(_HEADER_PREFIX) :].decode("latin-1").replace("-", "_")
            overrides[key] = values[-1].decode("latin-1")
    return overrides
