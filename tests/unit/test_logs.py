"""Access-log formatting and the journald observer."""

from __future__ import annotations

import io

from twisted.logger import Logger

from relayd.logs import _JournalObserver, format_access_line, logfmt_value


def test_logfmt_quotes_what_could_break_a_line() -> None:
    assert logfmt_value("claude-x") == "claude-x"
    assert logfmt_value(None) == "-"
    assert logfmt_value(3) == "3"
    assert logfmt_value('evil" model\nstatus=200') == '"evil\\" model\\nstatus=200"'
    assert format_access_line({"a": 1, "b": "x y"}) == 'a=1 b="x y"'


def test_journal_observer_writes_one_flushed_line_without_timestamp() -> None:
    stream = io.StringIO()
    log = Logger(namespace="relayd.test", observer=_JournalObserver(stream))
    log.info("hello {who}", who="world")
    assert stream.getvalue() == "[relayd.test#info] hello world\n"
