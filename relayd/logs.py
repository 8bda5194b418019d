"""The access log: one logfmt line per request, with values quoted so no client-supplied
text (a model name, say) can forge or break a log line. Secrets are never passed in."""

from __future__ import annotations

import json
import re
import sys
from typing import TextIO

from twisted.logger import ILogObserver, LogEvent, Logger, eventAsText
from zope.interface import implementer

_PLAIN = re.compile(r"^[A-Za-z0-9_.:/@*+\-]{1,200}$")

access_log = Logger(namespace="relayd.access")


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


def format_access_line(fields: dict[str, object]) -> str:
    """``key=value`` pairs in the given order."""
    return " ".join(f"{key}={logfmt_value(value)}" for key, value in fields.items())


def log_access(fields: dict[str, object]) -> None:
    """Emit one access-log event; ``fields`` stay on the event for structured observers."""
    access_log.info("access {line}", line=format_access_line(fields), access=fields)


def journal_observer() -> ILogObserver:
    """A twistd ``--logger`` for systemd: one line per event on stdout, no timestamp.

    journald stamps every line itself, so twistd's own timestamps would be duplicates.
    Lines look like ``[relayd.access#info] access request_id=...``; tracebacks follow on
    their own lines. Use: ``twistd -n --logger=relayd.logs.journal_observer relayd``.
    """
    return _JournalObserver(sys.stdout)


@implementer(ILogObserver)
class _JournalObserver:
    """Writes each event as one line and flushes, so journald sees it at once."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, event: LogEvent) -> None:
        text = eventAsText(event, includeTimestamp=False, includeSystem=True)
        if text:
            self._stream.write(text + "\n")
            self._stream.flush()
