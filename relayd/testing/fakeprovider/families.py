"""The two API families the fake speaks: which one a request is, its headers, its errors.

Every response of the Anthropic family carries ``request-id`` and the
``anthropic-ratelimit-*`` headers and its errors are ``{"type": "error", ...}``;
the OpenAI family carries ``x-request-id``, ``openai-*`` and ``x-ratelimit-*``
and its errors are ``{"error": {message, type, param, code}}``.  The values are
what the real APIs send, so relayd's header and error handling meets real shapes.
"""

from __future__ import annotations

from typing import Final

from twisted.web.http_headers import Headers

from relayd.testing.fakeprovider.wire import dumps, rfc3339

ANTHROPIC: Final = "anthropic"
OPENAI: Final = "openai"

_OPENAI_PATHS: Final = frozenset(
    {b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings", b"/v1/responses"}
)

_ANTHROPIC_STATIC_HEADERS: Final = (
    (b"anthropic-organization-id", b"00000000-0000-4000-8000-0000000fa4e0"),
    (b"anthropic-ratelimit-requests-limit", b"4000"),
    (b"anthropic-ratelimit-requests-remaining", b"3999"),
    (b"anthropic-ratelimit-tokens-limit", b"2000000"),
    (b"anthropic-ratelimit-tokens-remaining", b"1999000"),
    (b"anthropic-ratelimit-input-tokens-limit", b"2000000"),
    (b"anthropic-ratelimit-input-tokens-remaining", b"1999000"),
    (b"anthropic-ratelimit-output-tokens-limit", b"400000"),
    (b"anthropic-ratelimit-output-tokens-remaining", b"400000"),
)
_ANTHROPIC_RESET_HEADERS: Final = (
    b"anthropic-ratelimit-requests-reset",
    b"anthropic-ratelimit-tokens-reset",
    b"anthropic-ratelimit-input-tokens-reset",
    b"anthropic-ratelimit-output-tokens-reset",
)
_OPENAI_STATIC_HEADERS: Final = (
    (b"openai-organization", b"fake-upstream-org"),
    (b"openai-version", b"2020-10-01"),
    (b"x-ratelimit-limit-requests", b"10000"),
    (b"x-ratelimit-remaining-requests", b"9999"),
    (b"x-ratelimit-reset-requests", b"6ms"),
    (b"x-ratelimit-limit-tokens", b"30000000"),
    (b"x-ratelimit-remaining-tokens", b"29999000"),
    (b"x-ratelimit-reset-tokens", b"2ms"),
)

_ANTHROPIC_ERRORS: Final[dict[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "Invalid request"),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "Not found"),
    409: ("conflict_error", "Conflict"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: (
        "rate_limit_error",
        "This request would exceed the rate limit for your organization of 4,000 requests "
        "per minute.",
    ),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timeout"),
    529: ("overloaded_error", "Overloaded"),
}
_OPENAI_ERRORS: Final[dict[int, tuple[str, str | None, str]]] = {
    400: ("invalid_request_error", None, "Invalid request"),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    403: (
        "request_forbidden",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: ("invalid_request_error", None, "The requested resource does not exist."),
    409: ("invalid_request_error", None, "Conflict"),
    422: ("invalid_request_error", None, "Unprocessable entity"),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    503: ("server_error", "server_is_overloaded", "The server is overloaded or not ready yet."),
}


def family_for(path: bytes, headers: Headers) -> str:
    """The family of a request: by path, and for shared paths (``/v1/models``) by header.

    A shared path is Anthropic's when the request carries ``anthropic-version``,
    as the Anthropic SDKs always send it.
    """
    if path.startswith(b"/v1/messages"):
        return ANTHROPIC
    if path in _OPENAI_PATHS:
        return OPENAI
    return ANTHROPIC if headers.hasHeader(b"anthropic-version") else OPENAI


def set_anthropic_headers(headers: Headers, request_id: bytes, reset_stamp: bytes) -> None:
    """``request-id`` and the rate-limit headers; ``reset_stamp`` is an RFC 3339 time."""
    headers.setRawHeaders(b"request-id", [request_id])
    for name, value in _ANTHROPIC_STATIC_HEADERS:
        headers.setRawHeaders(name, [value])
    reset = [reset_stamp]
    for name in _ANTHROPIC_RESET_HEADERS:
        headers.setRawHeaders(name, reset)


def set_openai_headers(headers: Headers, request_id: bytes, latency: float) -> None:
    """``x-request-id``, ``openai-processing-ms`` (from the latency knob) and rate limits."""
    headers.setRawHeaders(b"x-request-id", [request_id])
    headers.setRawHeaders(b"openai-processing-ms", [b"%d" % int(latency * 1000 + 1)])
    for name, value in _OPENAI_STATIC_HEADERS:
        headers.setRawHeaders(name, [value])


def anthropic_error(status: int, message: str | None, request_id: str) -> bytes:
    """An Anthropic error body for ``status`` (the default message when ``None``)."""
    kind, default = _ANTHROPIC_ERRORS.get(
        status, ("api_error" if status >= 500 else "invalid_request_error", "Error")
    )
    return dumps(
        {
            "type": "error",
            "error": {"type": kind, "message": message or default},
            "request_id": request_id,
        }
    )


def openai_error(status: int, message: str | None) -> bytes:
    """An OpenAI error body for ``status`` (the default message when ``None``)."""
    kind, code, default = _OPENAI_ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None, "Error")
    )
    return dumps(
        {"error": {"message": message or default, "type": kind, "param": None, "code": code}}
    )


class ResetStamp:
    """RFC 3339 time a minute ahead, for ``anthropic-ratelimit-*-reset``, cached per second.

    Formatting a date for every response is measurable in the benchmarks; the
    stamp only changes once a second.
    """

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: tuple[int, bytes] = (-1, b"")

    def at(self, seconds: float) -> bytes:
        """The stamp for a response sent at ``seconds`` (the fake's clock)."""
        now = int(seconds)
        if self._cache[0] != now:
            self._cache = (now, rfc3339(now + 60).encode("ascii"))
        return self._cache[1]
