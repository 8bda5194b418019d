"""A bare Twisted + treq pass-through proxy: the reference point of relayd's CPU budget.

``relay_bench.py`` runs it next to relayd and drives it with the same non-streaming
batch, so "relayd CPU per request" can be read against what the simplest possible
Twisted relay costs on the same machine. It does nothing relayd does beyond passing
the request through: no authentication, routing, body inspection or access log.

``python bench/bare_proxy.py --upstream http://127.0.0.1:PORT --api-key KEY``
listens on 127.0.0.1 (``--port``, default 0 = ephemeral) and prints
``bare-proxy listening on http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import treq
from twisted.internet import reactor as global_reactor
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"upgrade",
        b"trailer",
        b"proxy-connection",
    }
)
_NOT_FORWARDED = _HOP_BY_HOP | {b"host", b"content-length", b"x-api-key", b"authorization"}


class PassThrough(Resource):
    """Forwards every request to the upstream with treq and writes back the reply."""

    isLeaf = True

    def __init__(self, upstream: bytes, api_key: bytes, pool: HTTPConnectionPool) -> None:
        super().__init__()
        self.upstream = upstream
        self.api_key = api_key
        self.pool = pool

    def render(self, request: Request) -> Any:
        assert request.content is not None
        body = request.content.read()
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in _NOT_FORWARDED:
                headers.setRawHeaders(name, values)
        headers.setRawHeaders(b"x-api-key", [self.api_key])
        d = treq.request(
            request.method.decode("ascii"),
            self.upstream + request.uri,
            headers=headers,
            data=body,
            pool=self.pool,
        )

        def relay(response: IResponse) -> Any:
            request.setResponseCode(response.code)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in _HOP_BY_HOP:
                    request.responseHeaders.setRawHeaders(name, values)
            return treq.content(response).addCallback(reply)

        def reply(content: bytes) -> None:
            request.write(content)
            request.finish()

        def fail(failure: Failure) -> None:
            if not request.finished and not request.startedWriting:
                request.setResponseCode(502)
                request.finish()

        d.addCallback(relay).addErrback(fail)
        return NOT_DONE_YET


class QuietSite(Site):
    noisy = False

    def log(self, request: Any) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT")
    parser.add_argument("--api-key", required=True, help="credential sent upstream")
    parser.add_argument("--port", type=int, default=0, help="listen port (default: ephemeral)")
    args = parser.parse_args(argv)
    reactor: Any = global_reactor
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 32
    pool.retryAutomatically = False
    site = QuietSite(
        PassThrough(args.upstream.rstrip("/").encode(), args.api_key.encode(), pool)
    )
    port = reactor.listenTCP(args.port, site, interface="127.0.0.1")
    sys.stdout.write(f"bare-proxy listening on http://127.0.0.1:{port.getHost().port}\n")
    sys.stdout.flush()
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
