"""The signed-request stage of intake (``clients[].signing``; see :mod:`relayd.signing`
for the scheme and docs/security.md for what it protects).

After the relay key identified the client: a client with ``signing`` must send a valid
signature with a fresh timestamp and a nonce not seen before. Each failure is a 401 in
the caller's error shape naming the failed check, with ``x-should-retry: false`` (the
SDK would resend the same nonce); a nonce that cannot be recorded (Redis away, or the
memory table full) is a 503: replay protection fails closed.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http import Request

from relayd.errors import Outcome, Refusal
from relayd.http.intake import ClientCall
from relayd.limits.redis import StoreUnavailableError
from relayd.metrics import RelayMetrics
from relayd.nonces import NonceStore, NonceStoreFullError
from relayd.signing import NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, SignatureError, verify

__all__ = ["check_signed"]

_NO_RETRY = ((b"x-should-retry", b"false"),)
_HEADERS = (TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER)


def check_signed(
    request: Request, call: ClientCall, nonces: NonceStore, clock: IReactorTime,
    metrics: RelayMetrics,
) -> Deferred[None] | None:
    """Check the signature of a signing client's request: None when done (it holds, or
    the client does not sign), a Deferred while the nonce is recorded in Redis; raises
    (or errbacks with) :class:`Refusal`."""
    signing = call.client.signing
    if signing is None:
        return None
    raw = request.requestHeaders
    headers: dict[bytes, bytes | None] = {}
    for name in _HEADERS:
        values = raw.getRawHeaders(name)
        headers[name] = values[0] if values else None
    if not signing.required and not any(headers.values()):
        return None
    try:
        nonce = verify(signing.secret.encode(), request.method, request.uri, call.body,
                       headers, clock.seconds(), signing.window, signing.future)
    except SignatureError as error:
        metrics.edge_rejected(f"signature_{error.check}")
        raise Refusal(401, str(error), headers=_NO_RETRY) from None
    try:
        claimed = nonces.claim(call.client.name, nonce, signing.window + signing.future)
    except NonceStoreFullError:
        metrics.edge_rejected("signature_store")
        raise Refusal(503, "signed request: too many nonces are live to record this one; "
                           "retry later", outcome=Outcome.STORE_UNAVAILABLE,
                      retry_after=1.0) from None
    if isinstance(claimed, Deferred):
        return claimed.addCallbacks(_claimed, _unrecorded, callbackArgs=(metrics,),
                                    errbackArgs=(metrics,))
    _claimed(claimed, metrics)
    return None


def _claimed(new: bool, metrics: RelayMetrics) -> None:
    if not new:
        metrics.edge_rejected("signature_reused_nonce")
        raise Refusal(401, "signed request: this nonce was used before (a replay?)",
                      headers=_NO_RETRY)


def _unrecorded(failure: Failure, metrics: RelayMetrics) -> None:
    failure.trap(StoreUnavailableError)
    metrics.edge_rejected("signature_store")
    raise Refusal(503, "signed request: the state store that records nonces is unreachable; "
                       "retry", outcome=Outcome.STORE_UNAVAILABLE, retry_after=1.0)
