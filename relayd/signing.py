"""Signed requests: an HMAC-SHA256 over what a request says, with replay protection.

A client with ``signing`` in its configuration sends, besides its relay key:

* ``x-relayd-timestamp``: Unix seconds (an integer);
* ``x-relayd-nonce``: 16 to 128 URL-safe characters (``A-Z a-z 0-9 - _``), new for
  every request;
* ``x-relayd-signature``: ``v1=`` and the lower-case hex HMAC-SHA256, keyed with the
  client's signing secret, of the canonical string: five lines joined by ``\\n`` (no
  trailing newline)::

      METHOD
      PATH[?QUERY]            (exactly as on the request line)
      TIMESTAMP
      NONCE
      hex(SHA-256(raw body))  (of the empty string for a request without a body)

relayd accepts ``now - window <= timestamp <= now + future`` (asymmetric: a
future-stamped request cannot stretch the replay window), compares the signature in
constant time, and then records the (client, nonce) pair for ``window + future``
seconds: a second request with the same nonce is refused. :func:`sign_headers` is the
client's side, for SDK users (``default_headers`` cannot hold a per-request nonce: use
an httpx event hook, see docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from urllib.parse import urlsplit

__all__ = [
    "NONCE_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "SignatureError",
    "canonical_string",
    "sign",
    "sign_headers",
    "verify",
]

TIMESTAMP_HEADER = b"x-relayd-timestamp"
NONCE_HEADER = b"x-relayd-nonce"
SIGNATURE_HEADER = b"x-relayd-signature"
_NONCE = re.compile(rb"[A-Za-z0-9_-]{16,128}")
_TIMESTAMP = re.compile(rb"[0-9]{1,12}")
_SIGNATURE = re.compile(rb"v1=([0-9a-f]{64})")


class SignatureError(Exception):
    """Why a request's signature is refused: ``check`` names the failed check
    (``missing``, ``malformed``, ``stale``, ``future``, ``bad_signature``,
    ``reused_nonce``), the message says it to the client."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check


def canonical_string(
    method: bytes, target: bytes, timestamp: bytes, nonce: bytes, body: bytes
) -> bytes:
    """The bytes a request's signature covers (see the module's docstring)."""
    digest = hashlib.sha256(body).hexdigest().encode("ascii")
    return b"\n".join((method, target, timestamp, nonce, digest))


def sign(secret: bytes, canonical: bytes) -> str:
    """The ``x-relayd-signature`` value for ``canonical``."""
    return "v1=" + hmac.new(secret, canonical, hashlib.sha256).hexdigest()


def sign_headers(
    secret: str | bytes,
    method: str,
    url: str,
    body: bytes = b"",
    *,
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The three headers that sign one request (a client-side helper).

    ``url`` is the full URL or the path and query, exactly as the request will send
    them (``/v1/messages``, ``/v1/models?limit=5``).
    """
    key = secret.encode() if isinstance(secret, str) else secret
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    stamp = str(int(time.time() if now is None else now))
    chosen = nonce if nonce is not None else os.urandom(18).hex()
    canonical = canonical_string(
        method.upper().encode(), target.encode(), stamp.encode(), chosen.encode(), body
    )
    return {
        "x-relayd-timestamp": stamp,
        "x-relayd-nonce": chosen,
        "x-relayd-signature": sign(key, canonical),
    }


def verify(
    secret: bytes,
    method: bytes,
    target: bytes,
    body: bytes,
    headers: dict[bytes, bytes | None],
    now: float,
    window: float,
    future: float,
) -> bytes:
    """Check a request's signature headers; the nonce (to record) when they hold.

    Raises :class:`SignatureError` naming the first check that failed. The nonce is not
    recorded here: the caller stores it and refuses a reused one.
    """
    timestamp = headers.get(TIMESTAMP_HEADER)
    nonce = headers.get(NONCE_HEADER)
    signature = headers.get(SIGNATURE_HEADER)
    missing = [
        name.decode() for name, value in
        ((TIMESTAMP_HEADER, timestamp), (NONCE_HEADER, nonce), (SIGNATURE_HEADER, signature))
        if not value
    ]
    if missing:
        raise SignatureError("missing", f"signed request: missing {', '.join(missing)}")
    assert timestamp is not None and nonce is not None and signature is not None
    if _TIMESTAMP.fullmatch(timestamp) is None:
        raise SignatureError("malformed", "signed request: x-relayd-timestamp must be "
                                          "Unix seconds (an integer)")
    if _NONCE.fullmatch(nonce) is None:
        raise SignatureError("malformed", "signed request: x-relayd-nonce must be 16 to "
                                          "128 characters of A-Z a-z 0-9 - _")
    found = _SIGNATURE.fullmatch(signature)
    if found is None:
        raise SignatureError("malformed", "signed request: x-relayd-signature must be "
                                          "v1=<64 lower-case hex digits>")
    stamp = int(timestamp)
    if stamp < now - window:
        raise SignatureError("stale", f"signed request: the timestamp is more than "
                                      f"{window:g} s old")
    if stamp > now + future:
        raise SignatureError("future", f"signed request: the timestamp is more than "
                                       f"{future:g} s in the future")
    expected = hmac.new(secret, canonical_string(method, target, timestamp, nonce, body),
                        hashlib.sha256).hexdigest().encode("ascii")
    if not hmac.compare_digest(expected, found.group(1)):
        raise SignatureError("bad_signature", "signed request: the signature does not match "
                                              "(see docs/security.md for what it covers)")
    return nonce
