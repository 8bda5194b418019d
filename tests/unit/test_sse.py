"""The SSE parser and the providers' stream watchers, fed in arbitrary splits."""

from __future__ import annotations

import pytest

from relayd.providers import PROVIDERS, IStreamWatcher
from relayd.providers.base import StreamWatcherBase, endpoint
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


def _content_events(family: str, texts: list[str]) -> list[bytes]:
    import json

    if family == "anthropic":
        return [
            b"event: content_block_delta\ndata: " + json.dumps(
                {"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": text}}
            ).encode() + b"\n\n"
            for text in texts
        ]
    return [
        b"data: " + json.dumps(
            {"choices": [{"index": 0, "delta": {"content": text}}], "usage": None}
        ).encode().replace(b'"usage": null', b'"usage":null') + b"\n\n"
        for text in texts
    ]


# Content texts that name what the watchers look for: the read is then parsed, no harm.
TEXTS = ["Hello", " message_delta", " error", " [DONE]", ' "usage"', " event: x", " plain"]
LONG_ANTHROPIC = ANTHROPIC.replace(
    b"event: message_delta", b"".join(_content_events("anthropic", TEXTS)) + b"event: message_delta"
)
OPENAI_ERROR_LATE = (
    b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{"content":" there"}}]}\n\n'
    b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n'
)
LONG_RESPONSES = RESPONSES.replace(
    b"event: response.completed",
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
    b'"delta":"Hi"}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
    b'"delta":" there"}\n\n'
    b"event: response.completed",
)
LONG_OPENAI = OPENAI.replace(
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason"',
    b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
    + b"".join(_content_events("openai", TEXTS))
    + b'data: {"choices":[{"index":0,"delta":{},"finish_reason"',
)


def _slow_twin(watcher: IStreamWatcher) -> IStreamWatcher:
    """The same watcher that parses every read."""
    cls = type(watcher)
    slow = type("Slow" + cls.__name__, (cls,), {"__slots__": (), "passes_by": lambda s, d: False})
    return slow()


def _state(watcher: IStreamWatcher) -> tuple[object, ...]:
    usage = watcher.usage
    return (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens,
            usage.cache_write_tokens, watcher.complete, watcher.error_seen,
            watcher.content_started, watcher.created_id, watcher.at_event_boundary())


@pytest.mark.parametrize(("family", "stream"), [
    ("anthropic", LONG_ANTHROPIC), ("anthropic", LONG_ANTHROPIC.replace(b"\n", b"\r\n")),
    ("anthropic", ANTHROPIC), ("openai", LONG_OPENAI), ("openai", OPENAI),
    ("openai", RESPONSES), ("openai", LONG_OPENAI.replace(b"\n", b"\r\n")),
    ("openai", LONG_RESPONSES), ("openai", OPENAI_ERROR_LATE),
])
def test_a_watcher_that_lets_content_reads_pass_by_sees_what_a_parsing_one_sees(
    family: str, stream: bytes
) -> None:
    import random

    rnd = random.Random(7)
    sep = b"\r\n\r\n" if b"\r" in stream else b"\n\n"
    events = [e + sep for e in stream.split(sep) if e]
    splits = [events, [stream]]
    for _ in range(300):  # random reads, some of them whole events
        cuts = sorted(rnd.sample(range(1, len(stream)), rnd.randint(1, 20)))
        splits.append([stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)])
    for reads in splits:
        fast = PROVIDERS[family].stream_watcher(EP)
        slow = _slow_twin(fast)
        for read in reads:
            fast.feed(read)
            slow.feed(read)
            assert _state(fast) == _state(slow)
    assert fast.complete or fast.error_seen


def test_whole_content_events_pass_by_once_content_started() -> None:
    watcher = PROVIDERS["anthropic"].stream_watcher(EP)
    assert isinstance(watcher, StreamWatcherBase)
    plain, named = _content_events("anthropic", ["Hello", " message_stop"])
    assert not watcher.passes_by(plain)  # content has not started: every read is parsed
    watcher.feed(plain)
    assert watcher.content_started
    assert watcher.passes_by(plain)
    assert not watcher.passes_by(named)  # a marker: parsed (and found to be content)
    assert not watcher.passes_by(plain[:-1])  # not the end of an event
    watcher.feed(plain[:10])
    assert not watcher.passes_by(plain)  # the parser is inside an event
    watcher.feed(plain[10:])
    assert watcher.passes_by(plain) and watcher.at_event_boundary()


def test_openai_content_chunks_with_a_null_usage_pass_by() -> None:
    """With ``stream_options.include_usage`` every chunk says ``"usage":null``; only the
    last one's usage has a value."""
    watcher = PROVIDERS["openai"].stream_watcher(EP)
    assert isinstance(watcher, StreamWatcherBase)
    first, content = _content_events("openai", ["Hi", " there"])
    watcher.feed(first)
    assert watcher.content_started and b'"usage":null' in content
    parsed: list[bytes] = []
    parser = watcher._parser

    class Spy:
        max_line = parser.max_line
        max_event = parser.max_event

        @property
        def at_boundary(self) -> bool:
            return parser.at_boundary

        def feed(self, data: bytes) -> list[SseEvent]:
            parsed.append(data)
            return parser.feed(data)

    watcher._parser = Spy()  # type: ignore[assignment]
    watcher.feed(content)
    assert parsed == []  # not parsed at all
    last = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    watcher.feed(last + b"data: [DONE]\n\n")
    assert len(parsed) == 1
    assert (watcher.usage.input_tokens, watcher.usage.output_tokens) == (3, 2)
    assert watcher.complete


def test_an_error_after_content_is_seen_in_a_read_of_its_own() -> None:
    watcher = PROVIDERS["openai"].stream_watcher(EP)
    for event in OPENAI_ERROR_LATE.split(b"\n\n")[:-1]:
        watcher.feed(event + b"\n\n")
    assert watcher.content_started and watcher.error_seen


def test_a_responses_stream_s_terminal_event_is_read_after_its_content() -> None:
    watcher = PROVIDERS["openai"].stream_watcher(EP)
    for event in LONG_RESPONSES.split(b"\n\n")[:-1]:
        watcher.feed(event + b"\n\n")
    assert watcher.content_started and watcher.complete
    assert (watcher.usage.input_tokens, watcher.usage.output_tokens) == (7, 5)
    # A terminal event is read for its name alone, usage or not.
    watcher = PROVIDERS["openai"].stream_watcher(EP)
    bare_end = LONG_RESPONSES.split(b"event: response.completed")[0] + (
        b'event: response.completed\ndata: {"type":"response.completed","response":{}}\n\n'
    )
    for event in bare_end.split(b"\n\n")[:-1]:
        watcher.feed(event + b"\n\n")
    assert watcher.content_started and watcher.complete


@pytest.mark.parametrize("bounds", [{"max_line": 64}, {"max_event": 64}])
def test_a_read_past_the_parser_s_bounds_is_parsed_and_refused(bounds: dict[str, int]) -> None:
    watcher = PROVIDERS["anthropic"].stream_watcher(EP)
    assert isinstance(watcher, StreamWatcherBase)
    short, long = _content_events("anthropic", ["Hi", "x" * 100])
    watcher._parser = SseParser()
    watcher.feed(short)
    watcher._parser = SseParser(**bounds)
    assert watcher.content_started and not watcher.passes_by(long)
    with pytest.raises(SseTooLargeError):
        watcher.feed(long)


def test_an_event_past_its_bound_stays_past_it() -> None:
    parser = SseParser(max_event=10)
    with pytest.raises(SseTooLargeError):
        parser.feed(b"data: 12345678901\n")
    with pytest.raises(SseTooLargeError):
        parser.feed(b"data: a\n\n")
