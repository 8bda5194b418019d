"""The access log: one logfmt line per request, with values quoted so no client-supplied
text (a model name, say) can forge or break a log line. Secrets are never passed in."""

from __future__ import annotations

import json
import re
import sys
from typing import Any, TextIO

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogEvent, Logger, eventAsText
from zope.interface import implementer

_PLAIN = re.compile(r"^[A-Za-z0-9_.:/@*+\-]{1,200}$")

_ACCESS_NAMESPACE = "relayd.access"
access_log = Logger(namespace=_ACCESS_NAMESPACE)
_log = Logger(namespace="relayd.logs")


def logfmt_value(value: object) -> str:
    """Render one value: bare when safe, else JSON-quoted and capped at 200 characters."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    text = str(value)
    if _PLAIN.match(text):
        return text
    return json.dumps(text[:200])


# Rendered text values: most repeat from line to line (names of clients, backends,
# models, outcomes, paths), so each is checked once. Bounded: past the bound (a client
# sending a new model name every time), values are rendered but not kept.
_RENDERED: dict[str, str] = {}
_MAX_RENDERED = 4096

# Fields whose values relayd makes itself, always plain (a request id is new every time:
# caching it would only fill the cache).
_PLAIN_FIELDS = frozenset({"request_id", "api", "endpoint", "upstream_api", "outcome"})


def format_access_line(fields: dict[str, object]) -> str:
    """``key=value`` pairs in the given order (values as :func:`logfmt_value` has them)."""
    parts = []
    rendered = _RENDERED
    for key, value in fields.items():
        kind = type(value)
        if value is None:
            text = "-"
        elif key in _PLAIN_FIELDS and kind is str:
            text = value  # type: ignore[assignment]
        elif kind is str:
            found = rendered.get(value)  # type: ignore[call-overload]
            if found is None:
                found = logfmt_value(value)
                if len(rendered) < _MAX_RENDERED:
                    rendered[value] = found  # type: ignore[index]
            text = found
        elif kind is int or kind is float:
            text = str(value)
        else:
            text = logfmt_value(value)
        parts.append(key + "=" + text)
    return " ".join(parts)


def log_access(fields: dict[str, object]) -> None:
    """Emit one access-log event; ``fields`` stay on the event for structured observers.

    Once :func:`batch_access_lines` has run with twistd's journal observer, the line goes
    to that observer directly (the same text, without an event through twisted.logger).
    """
    line = format_access_line(fields)
    direct = _direct_observers
    if direct:
        for observer in direct:
            observer.access_line(line)
        return
    access_log.info("access {line}", line=line, access=fields)


def journal_observer() -> ILogObserver:
    """A twistd ``--logger`` for systemd: one line per event on stdout, no timestamp.

    journald stamps every line itself, so twistd's own timestamps would be duplicates.
    Lines look like ``[relayd.access#info] access request_id=...``; tracebacks follow on
    their own lines. Use: ``twistd -n --logger=relayd.logs.journal_observer relayd``.
    Once :func:`batch_access_lines` gave it the reactor, access lines are written in
    batches: at most :data:`ACCESS_FLUSH_SECONDS` late, or at once when
    :data:`ACCESS_BATCH_LINES` are pending.
    """
    observer = JournalObserver(sys.stdout)
    _journal_observers.append(observer)
    return observer


_journal_observers: list[JournalObserver] = []
# The journal observers that take access lines straight from log_access.
_direct_observers: list[JournalObserver] = []


def journal_in_use() -> bool:
    """Whether twistd was given :func:`journal_observer` (workers then log alike)."""
    return bool(_journal_observers)


def batch_access_lines(reactor: Any) -> None:
    """Let the journal observers made so far batch their access lines on ``reactor``
    (called once they exist: under twistd, when the reactor runs; everything is flushed
    at shutdown).

    From then on :func:`log_access` hands them the lines directly: a journal observer is
    made by twistd's ``--logger`` (or a worker's logging, which passes access events
    through untouched), so it is the one observer of every event, and an access event
    through twisted.logger (event dict, publisher, observer wrappers) would only carry
    the same line to it at more cost.
    """
    for observer in _journal_observers:
        if observer in _direct_observers:
            continue
        observer.batch_on(reactor)
        reactor.addSystemEventTrigger("after", "shutdown", observer.flush)
        _direct_observers.append(observer)
        _log.info(
            "access lines are written in batches: at most {seconds:g} s late, or every "
            "{lines} lines", seconds=ACCESS_FLUSH_SECONDS, lines=ACCESS_BATCH_LINES,
        )


@implementer(ILogObserver)
class JournalObserver:
    """Writes each event as one line to ``stream``.

    Every event but an access line is written and flushed at once, after any access
    lines still pending (the order is kept). Access lines are written at once too until
    :meth:`batch_on` gives the observer a clock; then the first pending line arms one
    flush :data:`ACCESS_FLUSH_SECONDS` later, and the lines of that window go out in one
    write (sooner when :data:`ACCESS_BATCH_LINES` are pending). A write and flush per
    line cost a third of the relay's CPU per request; one per reactor turn still cost a
    system call per request under load, as a turn ends about one request.
    """

    __slots__ = ("_clock", "_pending", "_stream")

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._pending: list[str] = []
        self._clock: IReactorTime | None = None

    def batch_on(self, clock: IReactorTime) -> None:
        self._clock = clock

    def __call__(self, event: LogEvent) -> None:
        if "access" in event and event.get("log_namespace") == _ACCESS_NAMESPACE and (
            "log_system" not in event
        ):
            # The line is made already: skip formatting the event (same text).
            self.access_line(event["line"])
            return
        text = eventAsText(event, includeTimestamp=False, includeSystem=True)
        if text:
            self._pending.append(text + "\n")
            self.flush()

    def access_line(self, line: str) -> None:
        """Write one access line (``line``: what follows ``access``), or keep it for the
        batch."""
        pending = self._pending
        pending.append(_ACCESS_PREFIX + line + "\n")
        if self._clock is None or len(pending) >= ACCESS_BATCH_LINES:
            self.flush()
        elif len(pending) == 1:
            self._clock.callLater(ACCESS_FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Write (and flush) every pending line."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        stream = self._stream
        stream.write("".join(pending))
        stream.flush()


_ACCESS_PREFIX = "[relayd.access#info] access "

# How late a batched access line may reach the journal, and how many lines make a batch
# be written at once (about 40 KB).
ACCESS_FLUSH_SECONDS = 0.05
ACCESS_BATCH_LINES = 128
