"""Refusals and the names of outcomes: the values every stage of the request path shares.

A stage that cannot go on raises :class:`Refusal`; the exchange renders it once, in the
caller's API error shape. Outcome names (the access log's ``outcome``) and attempt results
(the ``result`` label of ``relayd_upstream_attempts_total``) are constants, since both are
label values that dashboards and alerts depend on. This module sits below ``relayd.http``
and ``relayd.limits``, so both can raise a :class:`Refusal`.
"""

from __future__ import annotations

from collections.abc import Sequence


class Refusal(Exception):  # noqa: N818 (not an error of relayd: an answer it gives)
    """A request relayd answers itself with an error: the status, the message, OpenAI's
    error ``code`` where one applies, extra response headers, the access log's outcome
    (default: ``rejected`` below 500, ``relay_error`` from 500), and ``retry_after``
    seconds (clamped to ``failover.max_retry_after`` when rendered)."""

    __slots__ = ("code", "headers", "message", "outcome", "retry_after", "status")

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
        outcome: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers
        self.outcome = outcome
        self.retry_after = retry_after


class Outcome:
    """How a request ended, as the access log says it (``outcome=``)."""

    OK = "ok"
    REJECTED = "rejected"
    RELAY_ERROR = "relay_error"
    NO_BACKEND = "no_backend"
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_BROKEN = "upstream_broken"
    UPSTREAM_TRUNCATED = "upstream_truncated"
    UPSTREAM_BAD_BODY = "upstream_bad_body"
    UPSTREAM_QUOTA = "upstream_quota"
    UNTRANSLATABLE = "untranslatable"
    TIMEOUT_IDLE = "timeout_idle"
    TIMEOUT_TOTAL = "timeout_total"
    RATE_LIMITED = "rate_limited"
    BUDGET_EXHAUSTED = "budget_exhausted"
    STORE_UNAVAILABLE = "store_unavailable"
    CLIENT_GONE = "client_gone"
    ABORTED = "aborted"


class Result:
    """How one upstream attempt ended (``relayd_upstream_attempts_total{result}``).

    Besides these, ``status_<code>`` for 401, 403, 429 and 5xx answers.
    """

    OK = "ok"
    CLIENT_ERROR = "client_error"
    CONNECT_ERROR = "connect_error"
    TIMEOUT = "timeout"
    NO_RESPONSE = "no_response"
    BAD_HEADERS = "bad_headers"
    STREAM_ERROR = "stream_error"
    STREAM_BROKEN = "stream_broken"
    STREAM_TRUNCATED = "stream_truncated"
    BODY_BROKEN = "body_broken"
    BAD_BODY = "bad_body"
    BAD_STREAM = "bad_stream"
    CLIENT_GONE = "client_gone"
    SHUTDOWN = "shutdown"
    RELAY_ERROR = "relay_error"
