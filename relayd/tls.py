"""TLS contexts for listeners: PEM chain + key, TLS 1.2 minimum, ALPN h2 and http/1.1,
and session resumption.

A client reconnecting within ``tls.session_timeout`` resumes its session instead of a
full handshake: TLS 1.3 and 1.2 clients by session ticket (RFC 5077/8446), TLS 1.2
clients also by session id from a server cache (OpenSSL's, bounded at 20,480 sessions).
The ticket keys are OpenSSL's, made at random for each TLS context and held only in this
process's memory; a context is made anew on every reload and every
:data:`TICKET_KEY_LIFETIME` seconds, which rotates the keys (tickets issued under the
old ones then get a full handshake, once).
"""

from __future__ import annotations

import re

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLContextFactory, IReactorTime
from twisted.internet.ssl import Certificate, CertificateOptions, KeyPair, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

from relayd.config.model import TlsConfig

ALPN_PROTOCOLS = [b"h2", b"http/1.1"]
log = Logger(namespace="relayd.tls")

#: Seconds a TLS context (and so its session ticket keys) serves new handshakes.
TICKET_KEY_LIFETIME = 24 * 3600.0

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


class TlsSetupError(Exception):
    """A listener's certificate or key cannot be used; the message says why."""


def certificate_options(tls: TlsConfig) -> CertificateOptions:
    """Load and check a PEM chain and key, and build server options from them.

    Raises :class:`TlsSetupError` for unreadable files, bad PEM, or a key that does not
    match the certificate, so the problem shows at startup rather than at the first
    handshake.
    """
    try:
        with open(tls.certificate, "rb") as handle:
            chain_pem = handle.read()
    except OSError as exc:
        raise TlsSetupError(f"cannot read certificate {tls.certificate}: {exc.strerror}") from exc
    try:
        with open(tls.private_key, "rb") as handle:
            key_pem = handle.read()
    except OSError as exc:
        raise TlsSetupError(f"cannot read private key {tls.private_key}: {exc.strerror}") from exc
    blocks = _PEM_CERT.findall(chain_pem)
    if not blocks:
        raise TlsSetupError(f"no PEM certificate found in {tls.certificate}")
    try:
        leaf = Certificate.loadPEM(blocks[0])
        chain = [Certificate.loadPEM(block).original for block in blocks[1:]]
    except (crypto.Error, ValueError) as exc:
        raise TlsSetupError(f"invalid certificate in {tls.certificate}: {exc}") from exc
    try:
        key = KeyPair.load(key_pem, crypto.FILETYPE_PEM)
    except (crypto.Error, ValueError) as exc:
        raise TlsSetupError(f"invalid private key in {tls.private_key}") from exc
    options = server_options(key, leaf, chain)
    try:
        context = options.getContext()  # checks that the key matches the certificate
    except SSL.Error as exc:
        raise TlsSetupError(
            f"private key {tls.private_key} does not match certificate {tls.certificate}"
        ) from exc
    context.set_timeout(max(int(tls.session_timeout), 1))  # sessions and tickets
    return options


def server_options(key: KeyPair, leaf: Certificate, chain: list[crypto.X509]) -> CertificateOptions:
    """Server options for loaded material, with session resumption on."""
    options = CertificateOptions(
        privateKey=key.original,
        certificate=leaf.original,
        extraCertChain=chain,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableProtocols=ALPN_PROTOCOLS,
        enableSessions=True,
        enableSessionTickets=True,
    )
    return options


@implementer(IOpenSSLContextFactory)
class ReloadableServerContext:
    """The TLS context of a listener, swappable on reload.

    ``TLSMemoryBIOFactory`` asks ``getContext()`` for every new connection, so after
    :meth:`replace` new handshakes get the new certificate while established
    connections keep theirs. With a ``clock``, a context older than
    :data:`TICKET_KEY_LIFETIME` is replaced by a fresh one of the same files (new
    session ticket keys) at the next handshake.
    """

    def __init__(self, tls: TlsConfig, clock: IReactorTime | None = None) -> None:
        self.tls = tls
        self._clock = clock
        self._options = certificate_options(tls)
        self._made_at = clock.seconds() if clock is not None else 0.0

    def getContext(self) -> SSL.Context:
        clock = self._clock
        if clock is not None and clock.seconds() - self._made_at >= TICKET_KEY_LIFETIME:
            self._rotate(clock.seconds())
        return self._options.getContext()

    def _rotate(self, now: float) -> None:
        self._made_at = now
        try:
            self._options = certificate_options(self.tls)
        except TlsSetupError as exc:  # the files went bad since: keep serving the old ones
            log.warn("TLS session ticket keys not rotated: {error}", error=str(exc))

    def replace(self, options: CertificateOptions, tls: TlsConfig) -> None:
        self._options = options
        self.tls = tls
        if self._clock is not None:
            self._made_at = self._clock.seconds()
