"""The SSE parser and the providers' stream watchers, fed in arbitrary splits."""

from __future__ import annotations

import pytest

from relayd.providers import PROVIDERS, IStreamWatcher
from relayd.providers.base import endpoint
from relayd.sse import SseEvent, SseParser, SseTooLargeError

STREAM = (
    b"event: message_start\r\ndata: {\"a\":1}\r\n\r\n"
    b": comment\n"
    b"event: ping\ndata: {}\n\n"
    b"data: line1\ndata: line2\n\n"
    b"event: caf\xc3\xa9\rdata:no-space\r\r"
)
EXPECTED = [
    SseEvent(b"message_start", b'{"a":1}'),
    SseEvent(b"ping", b"{}"),
    SseEvent(None, b"line1\nline2"),
    SseEvent("café".encode(), b"no-space"),
]


def feed_in_pieces(data: bytes, size: int) -> list[SseEvent]:
    parser = SseParser()
    events: list[SseEvent] = []
    for start in range(0, len(data), size):
        events.extend(parser.feed(data[start:start + size]))
    return events


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16, 1000])
def test_parser_gives_same_events_for_any_split(size: int) -> None:
    assert feed_in_pieces(STREAM, size) == EXPECTED


def test_crlf_split_between_reads_is_one_line_end() -> None:
    parser = SseParser()
    assert parser.feed(b"data: x\r") == []
    # "\r" + "\n" across reads end the data line once; the next "\r" is the blank line.
    assert parser.feed(b"\n\r") == [SseEvent(None, b"x")]
    # ...and a "\n" right after that "\r" belongs to it: no second blank line, no event.
    assert parser.feed(b"\n") == []
    assert parser.feed(b"data: y\n\n") == [SseEvent(None, b"y")]


def test_incomplete_event_is_held() -> None:
    parser = SseParser()
    assert parser.feed(b"event: x\ndata: 1\n") == []
    assert parser.feed(b"\n") == [SseEvent(b"x", b"1")]


ANTHROPIC = (
    b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":'
    b'12,"cache_creation_input_tokens":3,"cache_read_input_tokens":4,"output_tokens":1}}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
    b'{"type":"text_delta","text":"\xe2\x82\xac"}}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":20}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)

OPENAI = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}],"usage":null}\n\n'
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":7,'
    b'"prompt_tokens_details":{"cached_tokens":10}}}\n\n'
    b"data: [DONE]\n\n"
)

RESPONSES = (
    b'event: response.created\ndata: {"type":"response.created","sequence_number":0}\n\n'
    b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":'
    b'{"input_tokens":9,"input_tokens_details":{"cached_tokens":2},"output_tokens":5}}}\n\n'
)

EP = endpoint("x", "/x", ["POST"])


@pytest.mark.parametrize("size", [1, 4, 64, 10000])
def test_anthropic_watcher_reads_usage_and_end(size: int) -> None:
    watcher = PROVIDERS["anthropic"].stream_watcher(EP)
    for start in range(0, len(ANTHROPIC), size):
        watcher.feed(ANTHROPIC[start:start + size])
    usage = watcher.usage
    assert (usage.input_tokens, usage.output_tokens) == (12, 20)
    assert (usage.cache_write_tokens, usage.cache_read_tokens) == (3, 4)
    assert watcher.complete and not watcher.error_seen


def test_anthropic_watcher_takes_cumulative_input_counts_of_message_delta() -> None:
    """The real API repeats the input and cache counts in ``message_delta.usage``:
    they are cumulative totals, so the watcher must end with them, not their sum."""
    stream = (
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":'
        b'12,"cache_creation_input_tokens":3,"cache_read_input_tokens":4,"output_tokens":1}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
        b'"usage":{"input_tokens":12,"cache_creation_input_tokens":3,'
        b'"cache_read_input_tokens":4,"output_tokens":20}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"input_tokens":15,'
        b'"output_tokens":21}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    watcher = PROVIDERS["anthropic"].stream_watcher(EP)
    watcher.feed(stream)
    usage = watcher.usage
    assert (usage.input_tokens, usage.output_tokens) == (15, 21)  # the last totals
    assert (usage.cache_write_tokens, usage.cache_read_tokens) == (3, 4)
    assert watcher.complete


def test_anthropic_watcher_without_stop_is_incomplete() -> None:
    watcher = PROVIDERS["anthropic"].stream_watcher(EP)
    watcher.feed(ANTHROPIC.split(b"event: message_stop")[0])
    assert not watcher.complete
    watcher.feed(b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n')
    assert watcher.error_seen


@pytest.mark.parametrize("size", [1, 3, 10000])
def test_openai_watcher_reads_usage_and_done(size: int) -> None:
    watcher = PROVIDERS["openai"].stream_watcher(EP)
    for start in range(0, len(OPENAI), size):
        watcher.feed(OPENAI[start:start + size])
    usage = watcher.usage
    assert (usage.input_tokens, usage.cache_read_tokens, usage.output_tokens) == (20, 10, 7)
    assert watcher.complete


def test_openai_watcher_responses_stream() -> None:
    watcher = PROVIDERS["openai"].stream_watcher(EP)
    watcher.feed(RESPONSES)
    assert watcher.complete
    assert (watcher.usage.input_tokens, watcher.usage.output_tokens) == (7, 5)


def test_openai_watcher_sees_error_chunk() -> None:
    watcher = PROVIDERS["openai"].stream_watcher(EP)
    watcher.feed(b'data: {"error":{"message":"boom","type":"server_error"}}\n\n')
    assert watcher.error_seen and not watcher.complete


def test_providers_provide_the_interface() -> None:
    from zope.interface.verify import verifyObject

    from relayd.providers.base import IProvider

    for provider in PROVIDERS.values():
        assert verifyObject(IProvider, provider)
        assert verifyObject(IStreamWatcher, provider.stream_watcher(EP))


def test_openai_role_chunk_is_not_content_but_text_is() -> None:
    """An error after only the role chunk can still be failed over."""
    watcher = PROVIDERS["openai"].stream_watcher(EP)
    watcher.feed(OPENAI.split(b"\n\n")[0] + b"\n\n")  # role + empty content
    assert not watcher.content_started
    watcher.feed(b'data: {"error":{"message":"boom"}}\n\n')
    assert watcher.error_seen and not watcher.content_started
    other = PROVIDERS["openai"].stream_watcher(EP)
    other.feed(b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n')
    assert other.content_started


def test_responses_preamble_is_not_content() -> None:
    watcher = PROVIDERS["openai"].stream_watcher(EP)
    watcher.feed(RESPONSES.split(b"\n\n")[0] + b"\n\n")
    assert not watcher.content_started
    watcher.feed(b'event: response.output_text.delta\ndata: {"delta":"x"}\n\n')
    assert watcher.content_started


def test_a_line_without_end_is_bounded() -> None:
    """The campaign: 100 MB without a newline used 90 s of CPU and +253 MB: the line was
    re-joined at every read. Now pieces are joined once, and past the bound it fails."""
    parser = SseParser(max_line=100_000)
    with pytest.raises(SseTooLargeError):
        for _ in range(200):
            parser.feed(b"x" * 1000)
    ok = SseParser(max_line=100_000)
    for _ in range(99):
        assert ok.feed(b"d" * 1000 if _ else b"data: ") == []
    assert ok.feed(b"\n\n") == [SseEvent(None, b"d" * 98_000)]


def test_an_event_of_many_data_lines_is_bounded() -> None:
    parser = SseParser(max_event=10_000)
    with pytest.raises(SseTooLargeError):
        for _ in range(100):
            parser.feed(b"data: " + b"y" * 500 + b"\n")


def test_one_huge_line_in_one_read_is_bounded() -> None:
    with pytest.raises(SseTooLargeError):
        SseParser(max_line=1000).feed(b"data: " + b"z" * 2000 + b"\n\n")
