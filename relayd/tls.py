"""TLS contexts for listeners: PEM chain + key, TLS 1.2 minimum, ALPN h2 and http/1.1."""

from __future__ import annotations

import re

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.ssl import Certificate, CertificateOptions, KeyPair, TLSVersion
from zope.interface import implementer

from relayd.config.model import TlsConfig

ALPN_PROTOCOLS = [b"h2", b"http/1.1"]

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
    options = CertificateOptions(
        privateKey=key.original,
        certificate=leaf.original,
        extraCertChain=chain,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableProtocols=ALPN_PROTOCOLS,
    )
    try:
        options.getContext()  # checks that the key matches the certificate
    except SSL.Error as exc:
        raise TlsSetupError(
            f"private key {tls.private_key} does not match certificate {tls.certificate}"
        ) from exc
    return options


@implementer(IOpenSSLContextFactory)
class ReloadableServerContext:
    """The TLS context of a listener, swappable on reload.

    ``TLSMemoryBIOFactory`` asks ``getContext()`` for every new connection, so after
    :meth:`replace` new handshakes get the new certificate while established
    connections keep theirs.
    """

    def __init__(self, tls: TlsConfig) -> None:
        self.tls = tls
        self._options = certificate_options(tls)

    def getContext(self) -> SSL.Context:
        return self._options.getContext()

    def replace(self, options: CertificateOptions, tls: TlsConfig) -> None:
        self._options = options
        self.tls = tls
