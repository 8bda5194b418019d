"""``relayd-fake-upstream`` / ``python -m relayd.testing.fakeprovider``: the fake as a process.

It listens on ``--listen`` (port 0 picks one; ``--port-file`` tells which),
optionally with TLS, prints ``fake-upstream listening on URL`` and serves until
SIGINT/SIGTERM.  ``--config`` sets the baseline knobs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, cast

from relayd.testing.fakeprovider.knobs import BUILTIN_KNOBS, KnobError
from relayd.testing.fakeprovider.site import make_site


def _parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) to an interface and a port number."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _write_port_file(path: str, port: int) -> None:
    """Write atomically (temp file + rename) so readers never see a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fake-upstream-port-", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{port}\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayd-fake-upstream",
        description="Fake Anthropic + OpenAI API server for tests, benchmarks and demos.",
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:0",
        type=_parse_listen,
        metavar="HOST:PORT",
        help="address to listen on (port 0 picks a free port; default %(default)s)",
    )
    parser.add_argument("--port-file", metavar="PATH", help="write the bound port here")
    parser.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate")
    parser.add_argument("--tls-key", metavar="PEM", help="private key for --tls-cert")
    parser.add_argument(
        "--config",
        metavar="JSON",
        default="{}",
        help="baseline knobs as a JSON object, e.g. '{\"chunks\": 8}'",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "--quiet", dest="verbose", action="store_false", help="no access log (default)"
    )
    verbosity.add_argument(
        "--verbose", dest="verbose", action="store_true", help="log every request"
    )
    parser.set_defaults(verbose=False)
    return parser


def _start_logging(verbose: bool) -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    level = LogLevel.info if verbose else LogLevel.warn
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake upstream until SIGINT/SIGTERM; the only user of the global reactor."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        defaults = json.loads(args.config)
        if not isinstance(defaults, dict):
            raise KnobError("--config must be a JSON object")
        BUILTIN_KNOBS.updated(defaults)
    except ValueError as exc:
        parser.error(f"--config: {exc}")

    from twisted.internet import reactor as global_reactor

    reactor = cast(Any, global_reactor)
    _start_logging(args.verbose)
    site = make_site(reactor, defaults=defaults, access_log=args.verbose)
    interface, port = args.listen
    if args.tls_cert:
        from twisted.internet import ssl

        with open(args.tls_cert, "rb") as cert, open(args.tls_key, "rb") as key:
            pem = key.read() + b"\n" + cert.read()
        options = ssl.PrivateCertificate.loadPEM(pem).options()
        listening = reactor.listenSSL(port, site, options, backlog=1024, interface=interface)
        scheme = "https"
    else:
        listening = reactor.listenTCP(port, site, backlog=1024, interface=interface)
        scheme = "http"
    address = listening.getHost()
    host = f"[{address.host}]" if ":" in address.host else address.host
    sys.stdout.write(f"fake-upstream listening on {scheme}://{host}:{address.port}\n")
    sys.stdout.flush()
    if args.port_file:
        _write_port_file(args.port_file, address.port)
    reactor.run()
    return 0
