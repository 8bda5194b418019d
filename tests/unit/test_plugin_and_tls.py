"""twistd plugin discovery, command-line options, TLS setup errors, the body limit."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage

from relayd.config.model import TlsConfig
from relayd.http.body import BoundedBody
from relayd.tap import Options
from relayd.testing.certs import make_certificates
from relayd.tls import ALPN_PROTOCOLS, TlsSetupError, certificate_options


def test_twistd_finds_the_relayd_plugin() -> None:
    import twisted.plugins

    makers = {p.tapname: p for p in getPlugins(IServiceMaker, twisted.plugins)}
    assert "relayd" in makers
    assert makers["relayd"].options is Options


def test_options_default_config_path_and_errors(tmp_path: Path) -> None:
    assert Options()["config"] == "/etc/relayd.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [{address: '127.0.0.1:80', tls: {certificate: a}}]\nbogus: 1\n")
    with pytest.raises(usage.UsageError) as info:
        Options().parseOptions(["-c", str(bad)])
    text = str(info.value)
    assert "listen[0].tls.private_key: is required" in text
    assert "bogus: unknown key" in text


def test_options_load_a_valid_file(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("listen: [{address: '127.0.0.1:0'}]\n")
    options = Options()
    options.parseOptions(["-c", str(good)])
    assert options.config.listen[0].port == 0


def test_certificate_options_accepts_matching_pair(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    options = certificate_options(TlsConfig(str(certs.chain), str(certs.key)))
    assert options._acceptableProtocols == ALPN_PROTOCOLS


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("mismatch", "does not match certificate"),
        ("missing-cert", "cannot read certificate"),
        ("missing-key", "cannot read private key"),
        ("not-pem", "no PEM certificate"),
    ],
)
def test_certificate_options_errors(tmp_path: Path, which: str, message: str) -> None:
    certs = make_certificates(tmp_path)
    cert, key = str(certs.chain), str(certs.key)
    if which == "mismatch":
        key = str(certs.other_key)
    elif which == "missing-cert":
        cert = str(tmp_path / "nope.pem")
    elif which == "missing-key":
        key = str(tmp_path / "nope.pem")
    else:
        (tmp_path / "junk.pem").write_text("junk")
        cert = str(tmp_path / "junk.pem")
    with pytest.raises(TlsSetupError, match=message):
        certificate_options(TlsConfig(cert, key))


def test_bounded_body_drops_bytes_past_the_limit() -> None:
    body = BoundedBody(10)
    body.write(b"12345")
    body.write(b"67890")
    assert not body.overflowed and body.getvalue() == b"1234567890"
    body.write(b"x")
    assert body.overflowed and body.getvalue() == b""
    body.write(b"more")
    assert body.tell() == 15


def test_session_resumption_is_on_and_ticket_keys_rotate_daily(tmp_path: Path) -> None:
    from OpenSSL import SSL
    from twisted.internet.task import Clock

    from relayd.tls import TICKET_KEY_LIFETIME, ReloadableServerContext

    certs = make_certificates(tmp_path)
    clock = Clock()
    context = ReloadableServerContext(
        TlsConfig(str(certs.chain), str(certs.key), session_timeout=600), clock
    )
    first = context.getContext()
    assert first.get_timeout() == 600
    assert first.get_session_cache_mode() & SSL.SESS_CACHE_SERVER
    assert not first.set_options(0) & SSL.OP_NO_TICKET  # set_options(0) reads them
    clock.advance(TICKET_KEY_LIFETIME - 1)
    assert context.getContext() is first
    clock.advance(1)
    second = context.getContext()
    assert second is not first  # a new context: new ticket keys
    # Files gone bad by the next rotation: the running context stays in service.
    certs.key.write_text("not a key")
    clock.advance(TICKET_KEY_LIFETIME)
    assert context.getContext() is second
