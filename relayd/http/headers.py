"""Which headers cross the relay: an allow list for requests, drop lists for answers.

**Upstream**, a request carries only the client headers an API defines for callers
(content negotiation, API version and betas, the SDKs' ``x-stainless-*``, idempotency),
plus the names an operator adds with ``forward_headers``. Everything else stays behind:
the client's relay key (both places it can be), cookies, ``Origin`` (Anthropic refuses
CORS requests), proxy credentials, hop-by-hop headers, and headers that choose or
describe the upstream account or the client (``OpenAI-Organization`` and
``OpenAI-Project`` would let a client bill another organisation of relayd's key: a
backend sets them itself with ``organization``/``project``; ``X-Forwarded-For`` and
``Forwarded`` are not passed on, and relayd adds no address of the client: providers
are told nothing about who is behind the relay).

**Back to the client**, an answer's headers pass except cookies, hop-by-hop headers and
upstream identity details (see :data:`DROP_RESPONSE_HEADERS`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from twisted.web.http import Request
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from relayd.providers import IProvider, LimitState

if TYPE_CHECKING:
    from relayd.http.translation import UpstreamCall
from relayd.retry_after import parse_retry_after

# Hop-by-hop headers (RFC 9110 7.6.1), never relayed in either direction; the headers
# named by a request's Connection header are dropped too.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
    }
)

# Never relayed back: cookies and upstream identity details.
DROP_RESPONSE_HEADERS = HOP_BY_HOP | {
    b"set-cookie",
    b"server",
    b"date",
    b"cf-ray",
    b"cf-cache-status",
    b"anthropic-organization-id",
    b"openai-organization",
    b"alt-svc",
    b"via",
}

# Never forwarded, whatever ``forward_headers`` says: the client's relay credential (both
# places it can be), browser and proxy credentials, and headers that are the relay's to
# set or that would let a client pick the upstream account.
NEVER_FORWARDED = HOP_BY_HOP | {
    b"authorization",
    b"x-api-key",
    b"proxy-authorization",
    b"cookie",
    b"host",
    b"content-length",
    b"expect",
    b"openai-organization",
    b"openai-project",
}

# Client request headers forwarded to every upstream; each family adds its own
# (``IProvider.forwarded_headers``).
_COMMON = frozenset(
    {b"content-type", b"accept", b"accept-encoding", b"user-agent", b"idempotency-key"}
)
_COMMON_PREFIXES = (b"x-stainless-",)  # the official SDKs' own (language, retry count...)

#: Upstream request headers: (lower-case name, value) pairs, in order.
HeaderList = list[tuple[bytes, bytes]]

# Rate-limit headers of an upstream response describe relayd's upstream key, not the
# client: they are replaced by the client's own when it has limits.
UPSTREAM_LIMIT_PREFIXES = (b"x-ratelimit-", b"anthropic-ratelimit-")


class RequestHeaderPolicy:
    """Builds a request's upstream headers from the client's: the allow list of its API
    family, plus the ``extra`` globs of the configuration (``forward_headers``)."""

    __slots__ = ("_allowed", "_extra")

    def __init__(self, families: Iterable[IProvider], extra: Sequence[str] = ()) -> None:
        self._allowed = {f.name: _COMMON | f.forwarded_headers for f in families}
        self._extra = (
            re.compile(
                "|".join(f"(?:{fnmatch.translate(glob.lower())})" for glob in extra).encode()
            )
            if extra
            else None
        )

    def upstream_headers(self, family: str, client: Headers) -> HeaderList:
        """The headers of ``client`` that may go upstream for a call of ``family``, as
        (lower-case name, value) pairs."""
        allowed = self._allowed[family]
        extra = self._extra
        out: HeaderList = []
        named: frozenset[bytes] | tuple[()] = ()
        connection = client.getRawHeaders(b"connection")
        if connection:
            named = frozenset(
                token.strip().lower()
                for value in connection
                for token in value.split(b",")
                if token.strip()
            )
        for name, values in client.getAllRawHeaders():
            lower = name.lower()
            if lower in named or lower in NEVER_FORWARDED:
                continue
            if (
                lower in allowed
                or lower.startswith(_COMMON_PREFIXES)
                or (extra is not None and extra.fullmatch(lower) is not None)
            ):
                out += [(lower, value) for value in values]
        return out


def replace_header(headers: HeaderList, name: bytes, value: bytes) -> HeaderList:
    """``headers`` with ``name`` (lower-case) set to ``value`` alone."""
    return [h for h in headers if h[0] != name] + [(name, value)]


def write_answer_head(
    request: Request,
    response: IResponse,
    call: UpstreamCall,
    *,
    streaming: bool,
    rewritten: tuple[int, bytes] | None,
    family: IProvider,
    limit_states: Sequence[LimitState],
    retried: int,
    now: float,
    max_retry_after: float,
) -> None:
    """Set the client's status and headers for an upstream answer relayed to it.

    ``rewritten``: the status and body the client gets instead of the upstream's: its
    length replaces the upstream's. ``limit_states``: the client's own rate-limit
    standing, in its family's header names. ``retried``: the number of attempts when
    relayd retried (0 if it did not): a retryable answer then says the SDK should not.
    """
    if rewritten is not None:
        request.setResponseCode(rewritten[0])
    else:
        request.setResponseCode(response.code, response.phrase)
    out = request.responseHeaders
    out.removeHeader(b"content-type")
    translated = call.translated
    copy_response_headers(
        response.headers, out, now=now, max_retry_after=max_retry_after,
        drop_limits=bool(limit_states) or translated, translated=translated,
        rewritten=rewritten is not None,
    )
    if limit_states:
        for name, value in family.rate_limit_headers(limit_states, now):
            out.setRawHeaders(name, [value])
    if call.dropped:
        out.setRawHeaders(b"x-relayd-dropped", [", ".join(call.dropped).encode()])
    if retried:
        out.setRawHeaders(b"x-relayd-attempts", [b"%d" % retried])
        if call.family.is_retryable(response.code):
            # relayd already retried elsewhere: the SDK retrying through us won't help.
            out.setRawHeaders(b"x-should-retry", [b"false"])
    if streaming:
        if translated:
            out.setRawHeaders(b"content-type", [b"text/event-stream; charset=utf-8"])
        out.setRawHeaders(b"cache-control", [b"no-cache"])
        out.setRawHeaders(b"x-accel-buffering", [b"no"])
    elif rewritten is not None:
        if translated:
            out.setRawHeaders(b"content-type", [b"application/json"])
        out.setRawHeaders(b"content-length", [b"%d" % len(rewritten[1])])
    elif response.length is not UNKNOWN_LENGTH:
        # Agent keeps Content-Length out of response.headers; relay it so the client
        # gets a length-delimited body rather than chunked encoding.
        out.setRawHeaders(b"content-length", [b"%d" % response.length])


def copy_response_headers(
    upstream: Headers,
    out: Headers,
    *,
    now: float,
    max_retry_after: float,
    drop_limits: bool,
    translated: bool,
    rewritten: bool,
) -> None:
    """Copy an upstream answer's headers that may reach the client into ``out``.

    ``drop_limits``: leave out the upstream's rate-limit headers (they describe relayd's
    key; the client's own replace them, or they are in names the client's SDK does not
    read). ``translated``: the content type is the relay's to set. ``rewritten``: the
    body is re-encoded, so the upstream's encoding no longer applies. ``Retry-After``
    (and ``retry-after-ms``) are capped at ``max_retry_after`` seconds.
    """
    for name, values in upstream.getAllRawHeaders():
        lower = name.lower()
        if lower in DROP_RESPONSE_HEADERS:
            continue
        if drop_limits and lower.startswith(UPSTREAM_LIMIT_PREFIXES):
            continue
        if translated and lower == b"content-type":
            continue
        if rewritten and lower == b"content-encoding":
            continue
        if lower == b"retry-after":
            seconds = parse_retry_after(values[0], now)
            if seconds is not None and seconds > max_retry_after:
                values = [b"%d" % max_retry_after]
        elif lower == b"retry-after-ms":
            try:
                if float(values[0]) > max_retry_after * 1000:
                    values = [b"%d" % (max_retry_after * 1000)]
            except ValueError:
                continue
        out.setRawHeaders(name, values)
