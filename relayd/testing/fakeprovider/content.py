"""The fake upstream's deterministic content: reply text, token counts, limits, padding.

Replies are the same for the same request: the text is :func:`reply_chunks` (one
chunk per output token) and the input count is derived from the raw body
(:func:`input_tokens_for`), so the JSON and the streamed form of a request report
identical usage and tests can compute what relayd should have counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Final

_REPLY_WORDS: Final = ("Hello", "from", "fake-upstream.", "Deterministic", "reply.")


def input_tokens_for(body: bytes) -> int:
    """The fake's uncached input-token count for a raw request body.

    Anthropic reports it as ``input_tokens``; OpenAI endpoints report
    ``prompt_tokens``/``input_tokens`` = this + ``cache_read_input_tokens``
    (OpenAI's prompt count includes cached tokens), except embeddings which
    report exactly this.
    """
    return len(body) // 4 + 1


@lru_cache(maxsize=256)
def reply_chunks(n: int, pad: int = 0) -> tuple[str, ...]:
    """The ``n`` text chunks of a reply, with ``pad`` extra ``x`` spread over them.

    Chunks cycle through "Hello from fake-upstream. Deterministic reply."; each
    chunk counts as one output token.
    """
    words = [(" " if i else "") + _REPLY_WORDS[i % len(_REPLY_WORDS)] for i in range(n)]
    if pad > 0 and n > 0:
        each, extra = divmod(pad, n)
        words = [w + "x" * (each + (i < extra)) for i, w in enumerate(words)]
    return tuple(words)


def reply_text(n: int, pad: int = 0) -> str:
    """The full reply text, i.e. the concatenation of :func:`reply_chunks`."""
    return "".join(reply_chunks(n, pad))


def token_limit(chunks: int, max_tokens: object) -> tuple[int, bool]:
    """Chunks to emit, and whether the request's token limit cut the reply short."""
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
        if 0 <= max_tokens < chunks:
            return max_tokens, True
    return chunks, False


def padded_chunks(
    n: int, body_bytes: int, build: Callable[[Sequence[str]], bytes]
) -> tuple[str, ...]:
    """Chunks padded so that ``build(chunks)`` is ``body_bytes`` long (when it can grow)."""
    pieces = reply_chunks(n)
    if body_bytes > 0 and n > 0:
        missing = body_bytes - len(build(pieces))
        if missing > 0:
            pieces = reply_chunks(n, missing)
    return pieces
