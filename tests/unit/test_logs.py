"""Access-log formatting and the journald observer."""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, globalLogPublisher

import relayd.logs
from relayd.logs import JournalObserver, format_access_line, log_access, logfmt_value


def test_logfmt_quotes_what_could_break_a_line() -> None:
    assert logfmt_value("claude-x") == "claude-x"
    assert logfmt_value(None) == "-"
    assert logfmt_value(3) == "3"
    assert logfmt_value('evil" model\nstatus=200') == '"evil\\" model\\nstatus=200"'
    assert format_access_line({"a": 1, "b": "x y"}) == 'a=1 b="x y"'


def test_journal_observer_writes_one_flushed_line_without_timestamp() -> None:
    stream = io.StringIO()
    log = Logger(namespace="relayd.test", observer=JournalObserver(stream))
    log.info("hello {who}", who="world")
    assert stream.getvalue() == "[relayd.test#info] hello world\n"


def test_access_lines_are_the_formatted_event_text() -> None:
    """The shortcut for access lines writes what formatting the event would."""
    from twisted.logger import eventAsText

    events: list[dict[str, object]] = []
    record: Any = events.append
    stream = io.StringIO()
    observer = JournalObserver(stream)
    globalLogPublisher.addObserver(record)
    globalLogPublisher.addObserver(observer)
    try:
        log_access({"request_id": "req_1", "model": "a b", "status": 200})
    finally:
        globalLogPublisher.removeObserver(record)
        globalLogPublisher.removeObserver(observer)
    (event,) = [e for e in events if "access" in e]
    expected = eventAsText(event, includeTimestamp=False, includeSystem=True) + "\n"
    assert stream.getvalue() == expected
    assert expected == '[relayd.access#info] access request_id=req_1 model="a b" status=200\n'


def test_batched_access_lines_wait_for_the_window_and_keep_their_order() -> None:
    stream = io.StringIO()
    observer = JournalObserver(stream)
    clock = MemoryReactorClock()
    observer.batch_on(clock)
    access = Logger(namespace="relayd.access", observer=observer)
    other = Logger(namespace="relayd.relay", observer=observer)
    access.info("access {line}", line="request_id=1", access={})
    access.info("access {line}", line="request_id=2", access={})
    assert stream.getvalue() == ""  # not before the window ends
    (flush,) = clock.getDelayedCalls()  # one flush per window, not per line
    assert flush.getTime() == relayd.logs.ACCESS_FLUSH_SECONDS
    other.warn("backend {name} is down", name="a")  # written at once, after lines before it
    assert stream.getvalue().splitlines() == [
        "[relayd.access#info] access request_id=1",
        "[relayd.access#info] access request_id=2",
        "[relayd.relay#warn] backend a is down",
    ]
    clock.advance(relayd.logs.ACCESS_FLUSH_SECONDS)  # the armed flush finds nothing left
    assert len(stream.getvalue().splitlines()) == 3
    access.info("access {line}", line="request_id=3", access={})
    clock.advance(relayd.logs.ACCESS_FLUSH_SECONDS / 2)
    assert len(stream.getvalue().splitlines()) == 3
    clock.advance(relayd.logs.ACCESS_FLUSH_SECONDS / 2)
    assert stream.getvalue().splitlines()[-1] == "[relayd.access#info] access request_id=3"
    assert not clock.getDelayedCalls()


def test_a_full_batch_of_access_lines_is_written_at_once() -> None:
    stream = io.StringIO()
    observer = JournalObserver(stream)
    clock = MemoryReactorClock()
    observer.batch_on(clock)
    access = Logger(namespace="relayd.access", observer=observer)
    for n in range(relayd.logs.ACCESS_BATCH_LINES - 1):
        access.info("access {line}", line=f"request_id={n}", access={})
    assert stream.getvalue() == ""
    access.info("access {line}", line="request_id=last", access={})
    lines = stream.getvalue().splitlines()
    assert len(lines) == relayd.logs.ACCESS_BATCH_LINES
    assert lines[-1] == "[relayd.access#info] access request_id=last"


def test_batch_access_lines_flushes_at_shutdown() -> None:
    stream = io.StringIO()
    observer = JournalObserver(stream)
    reactor = MemoryReactorClock()
    relayd.logs._journal_observers.append(observer)
    try:
        relayd.logs.batch_access_lines(reactor)
    finally:
        relayd.logs._journal_observers.remove(observer)
        relayd.logs._direct_observers.remove(observer)
    Logger(namespace="relayd.access", observer=observer).info(
        "access {line}", line="request_id=9", access={}
    )
    assert stream.getvalue() == ""
    ((trigger, _, _),) = reactor.triggers["after"]["shutdown"]
    assert trigger == observer.flush
    trigger()
    assert stream.getvalue() == "[relayd.access#info] access request_id=9\n"


def test_access_lines_render_each_value_as_logfmt_value_does() -> None:
    """The cache of rendered text values changes nothing, and cannot grow without end."""
    values: list[object] = ["claude-x", 'a "quoted"\nline', "x" * 300, 7, 2.5, True, None, "", "é"]
    for _ in range(2):  # the second time from the cache
        for value in values:
            assert format_access_line({"k": value}) == f"k={logfmt_value(value)}"
    for n in range(relayd.logs._MAX_RENDERED + 10):
        format_access_line({"model": f"m-{n}"})
    assert len(relayd.logs._RENDERED) <= relayd.logs._MAX_RENDERED
    assert format_access_line({"model": "fresh one"}) == 'model="fresh one"'


def test_request_ids_do_not_fill_the_cache() -> None:
    before = len(relayd.logs._RENDERED)
    format_access_line({"request_id": "req_00ff", "outcome": "ok"})
    assert len(relayd.logs._RENDERED) == before


def test_once_batching_access_lines_go_straight_to_the_journal_observer() -> None:
    """After batch_access_lines, log_access hands the journal observer the same line it
    would have got as an event, and twisted.logger's publisher sees none."""
    events: list[dict[str, object]] = []
    record: Any = events.append
    stream = io.StringIO()
    observer = JournalObserver(stream)
    reactor = MemoryReactorClock()
    globalLogPublisher.addObserver(record)
    relayd.logs._journal_observers.append(observer)
    try:
        log_access({"request_id": "req_1", "status": 200})  # not batching yet: an event
        relayd.logs.batch_access_lines(reactor)
        log_access({"request_id": "req_2", "model": "a b", "status": 200})
    finally:
        globalLogPublisher.removeObserver(record)
        relayd.logs._journal_observers.remove(observer)
        relayd.logs._direct_observers.remove(observer)
    assert [e["line"] for e in events if "access" in e] == ["request_id=req_1 status=200"]
    assert stream.getvalue() == ""  # batched
    reactor.advance(relayd.logs.ACCESS_FLUSH_SECONDS)
    assert stream.getvalue() == (
        '[relayd.access#info] access request_id=req_2 model="a b" status=200\n'
    )
