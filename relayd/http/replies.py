"""Answers relayd makes itself: a refusal in the caller's API error shape, JSON bodies."""

from __future__ import annotations

import math

from twisted.web.http import Request

from relayd.errors import Refusal
from relayd.providers import IProvider

# Statuses the Anthropic and OpenAI SDKs retry by themselves (besides 5xx): a relay-made
# 4xx outside this set is final and says so with x-should-retry: false.
SDK_RETRIED = frozenset({408, 409, 429})


def refusal_body(
    request: Request,
    refusal: Refusal,
    family: IProvider,
    request_id: str,
    max_retry_after: float,
) -> bytes:
    """Set a refusal's headers on ``request`` and return its error body.

    ``Retry-After`` is capped at ``max_retry_after`` seconds; a 4xx that asking again
    cannot fix (a bad key, a forbidden model, an unknown route) says so with
    ``x-should-retry: false``, since clients (Claude Code) otherwise retry a 401 for
    minutes.
    """
    status = refusal.status
    for name, value in refusal.headers:
        request.setHeader(name, value)
    if refusal.retry_after is not None:
        clamped = min(refusal.retry_after, max_retry_after)
        request.setHeader(b"retry-after", b"%d" % math.ceil(clamped))
    if status < 500 and status not in SDK_RETRIED:
        request.setHeader(b"x-should-retry", b"false")
    return family.render_error(status, refusal.message, request_id, refusal.code)


def send_json(request: Request, status: int, body: bytes) -> None:
    """Answer with a whole JSON body and finish the request."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()
