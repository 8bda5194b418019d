"""The admin HTTP interface: metrics, liveness, readiness and backend state.

Served on its own listener, meant for a private address. Routes (GET and HEAD only,
other methods get 405; unknown paths 404; errors are JSON ``{"error": "..."}``):

``/metrics``
    Prometheus text exposition of the process's metrics registry. Not behind the admin
    token, so Prometheus can scrape it without a secret.
``/healthz``
    200 ``{"status": "ok"}`` whenever the reactor turns: liveness, nothing more.
``/readyz``
    503 ``{"status": "draining"}`` while draining, else the runtime's readiness:
    200 ``{"status": "ready"}`` or 503 ``{"status": "not ready", "problems": [...]}``.
``/admin/backends``
    200 ``{"backends": [...]}``, one ``backend.describe(now)`` per backend.
``/admin/usage``
    Token totals per client, model and backend, from the state store.
``/admin/cache``
    The response cache's figures: memory entries and bytes, lookups by result, stores.
``POST /admin/cache/purge?route=NAME&client=NAME``
    Drops the cached answers of a route and/or a client (neither: all), from memory
    and from Redis; 200 ``{"purged": {"memory": N, "shared": N}}``. POST only.

Every ``/admin/*`` path, known or not, first needs ``Authorization: Bearer <token>``
when an admin token is configured (401 otherwise, so unknown admin paths reveal
nothing). With no token configured the ``/admin/*`` endpoints are open to anyone who
can reach the listener: the admin address should then be loopback only.

Adding an admin endpoint is one entry in :attr:`AdminResource.admin_routes`.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from relayd.config.model import Config
from relayd.http.body import BoundedBody
from relayd.metrics import RelayMetrics

log = Logger()

#: A route handler: returns the status code, the content type and the body.
Response = tuple[int, bytes, bytes]  # status, content type, body
Handler = Callable[["AdminResource", Request], "Response | Deferred[Response]"]

JSON_TYPE = b"application/json"
ALLOWED_METHODS = (b"GET", b"HEAD")
ADMIN_PREFIX = b"/admin/"


def json_response(status: int, document: object) -> tuple[int, bytes, bytes]:
    """A JSON response triple."""
    return status, JSON_TYPE, json.dumps(document, separators=(",", ":")).encode() + b"\n"


def error_response(status: int, message: str) -> tuple[int, bytes, bytes]:
    """A JSON error response triple: ``{"error": message}``."""
    return json_response(status, {"error": message})


def readiness_response(
    problems: Sequence[str], *, draining: bool = False
) -> tuple[int, bytes, bytes]:
    """``/readyz``'s answer: draining, or ready when there is no problem."""
    if draining:
        return json_response(503, {"status": "draining"})
    if not problems:
        return json_response(200, {"status": "ready"})
    return json_response(503, {"status": "not ready", "problems": list(problems)})


class AdminResource(Resource):
    """The root resource of the admin listener.

    ``get_runtime`` returns the runtime currently serving requests (read per request, so
    a reload shows at once); ``clock`` gives "now" for backend descriptions and is also
    the reactor :func:`admin_site` hands to its Site; ``get_token`` returns the admin
    token, or ``None`` when none is configured (read per request, so a reload can change
    it); ``is_draining`` tells whether the process is shutting down.
    """

    isLeaf = True

    #: Unauthenticated routes: exact path -> handler.
    routes: Mapping[bytes, Handler]
    #: Routes behind the admin token: exact path (under ``/admin/``) -> handler.
    admin_routes: Mapping[bytes, Handler]

    def __init__(
        self,
        metrics: RelayMetrics,
        get_runtime: Callable[[], Any],
        clock: IReactorTime,
        *,
        get_token: Callable[[], str | None],
        is_draining: Callable[[], bool],
    ) -> None:
        super().__init__()
        self.metrics = metrics
        self.get_runtime = get_runtime
        self.clock = clock
        self.get_token = get_token
        self.is_draining = is_draining

    def render(self, request: Request) -> Any:
        """Route ``request``: token check for ``/admin/*``, then path, then method."""
        path = request.path
        try:
            result = self._dispatch(request, path)
        except Exception:
            log.failure("relayd: admin request {path!r} failed", path=path)
            result = error_response(500, "internal error")
        if isinstance(result, Deferred):
            gone: list[Failure] = []  # the client's connection was lost meanwhile
            request.notifyFinish().addErrback(gone.append)
            result.addErrback(self._failed, path)
            result.addCallback(self._write_later, request, gone)
            return NOT_DONE_YET
        return self._respond(request, result)

    @staticmethod
    def _failed(failure: Failure, path: bytes) -> Response:
        log.failure("relayd: admin request {path!r} failed", failure, path=path)
        return error_response(500, "internal error")

    def _write_later(self, response: Response, request: Request, gone: list[Failure]) -> None:
        body = self._respond(request, response)
        if not request.finished and not gone:
            request.write(body)
            request.finish()

    def _respond(self, request: Request, response: Response) -> bytes:
        status, content_type, body = response
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        if request.method == b"HEAD":
            return b""
        return body

    def _dispatch(self, request: Request, path: bytes) -> Response | Deferred[Response]:
        """Find and run the handler of ``path``, or produce the right error."""
        if path.startswith(ADMIN_PREFIX):
            denied = self._check_token(request)
            if denied is not None:
                return denied
            handler = self.admin_routes.get(path)
        else:
            handler = self.routes.get(path)
        if handler is None:
            return error_response(404, "not found")
        allowed = self.methods.get(path, ALLOWED_METHODS)
        if request.method not in allowed:
            request.setHeader(b"allow", b", ".join(allowed))
            return error_response(405, "method not allowed")
        return handler(self, request)

    def _check_token(self, request: Request) -> tuple[int, bytes, bytes] | None:
        """``None`` if the request may use ``/admin/*``, else the 401 response.

        The comparison is constant-time on bytes. An empty configured token counts as
        no token (the endpoints are then open).
        """
        token = self.get_token()
        if not token:
            return None
        header = request.getHeader(b"authorization")
        if header is None:
            request.setHeader(b"www-authenticate", b"Bearer")
            return error_response(401, "admin token required")
        scheme, _, presented = header.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(
            presented.strip(), token.encode()
        ):
            request.setHeader(b"www-authenticate", b'Bearer error="invalid_token"')
            return error_response(401, "invalid admin token")
        return None

    # -- handlers ----------------------------------------------------------------------

    def render_metrics(self, request: Request) -> tuple[int, bytes, bytes]:
        """Prometheus text exposition of the metrics registry."""
        return 200, CONTENT_TYPE_LATEST.encode(), generate_latest(self.metrics.registry)

    def render_healthz(self, request: Request) -> tuple[int, bytes, bytes]:
        """Liveness: answering at all means the reactor turns."""
        return json_response(200, {"status": "ok"})

    def render_readyz(self, request: Request) -> tuple[int, bytes, bytes]:
        """Readiness: not while draining, else whatever the runtime says."""
        if self.is_draining():
            return readiness_response((), draining=True)
        _, problems = self.get_runtime().readiness()
        return readiness_response(problems)

    def render_backends(self, request: Request) -> tuple[int, bytes, bytes]:
        """Every backend of the current runtime, as its ``describe(now)`` dict."""
        now = self.clock.seconds()
        backends = [b.describe(now) for b in self.get_runtime().backends]
        return json_response(200, {"backends": backends})

    def render_usage(self, request: Request) -> Deferred[Response]:
        """Token totals per client, model and backend, from the state store: this
        instance's since start (memory), or every instance's (Redis)."""
        store = self.get_runtime().store

        def answer(snapshot: dict[str, Any]) -> Response:
            return json_response(200, {**snapshot, "store": store.describe()})

        def unavailable(failure: Failure) -> Response:
            message = f"state store unavailable: {failure.getErrorMessage()}"
            return json_response(503, {"error": message, "store": store.describe()})

        d: Deferred[dict[str, Any]] = store.usage_snapshot()
        return d.addCallbacks(answer, unavailable)

    def render_cache(self, request: Request) -> Response:
        """The response cache's figures (this instance's memory level and counters)."""
        return json_response(200, self.get_runtime().response_cache.stats())

    def render_cache_purge(self, request: Request) -> Deferred[Response]:
        """Drop cached answers: ``route`` and/or ``client`` from the query string."""
        args = request.args or {}

        def one(name: bytes) -> str | None:
            values = args.get(name)
            return values[0].decode("utf-8", "replace") if values else None

        route, client = one(b"route"), one(b"client")
        d = self.get_runtime().response_cache.purge(route, client)
        return d.addCallback(
            lambda purged: json_response(200, {"route": route, "client": client, "purged": purged})
        )

    #: Methods of the paths that are not read-only (default: GET and HEAD).
    methods: Mapping[bytes, tuple[bytes, ...]] = {b"/admin/cache/purge": (b"POST",)}

    routes = {
        b"/metrics": render_metrics,
        b"/healthz": render_healthz,
        b"/readyz": render_readyz,
    }
    admin_routes = {
        b"/admin/backends": render_backends,
        b"/admin/usage": render_usage,
        b"/admin/cache": render_cache,
        b"/admin/cache/purge": render_cache_purge,
    }


class AdminSite(Site):
    """The admin listener's Site: no access log, no tracebacks, no request bodies.

    No admin endpoint takes a body, so any body is dropped as it arrives rather than
    buffered (the method then gets 405 anyway).
    """

    noisy = False
    displayTracebacks = False

    def getContentFile(self, length: int | None) -> Any:
        return BoundedBody(0)

    def log(self, request: Any) -> None:
        pass


def admin_site(resource: AdminResource) -> Site:
    """A Site serving ``resource``; its reactor is ``resource.clock`` (the reactor)."""
    return AdminSite(
        resource,
        requestFactory=Request,
        reactor=resource.clock,
        parsePOSTFormSubmission=False,
    )


class AdminListener:
    """A process's admin listener across reloads (one relayd process, or the daemon of
    its workers): bound when the configuration gives a new address, closed when it
    gives none. ``make_resource`` builds the resource a new port serves.

    :meth:`bind` may raise and touches nothing in use (step 1 of a reload);
    :meth:`switch` then makes the result current.
    """

    _log = Logger(namespace="relayd.service")

    def __init__(self, reactor: Any, make_resource: Callable[[], AdminResource]) -> None:
        self.reactor = reactor
        self.make_resource = make_resource
        self.port: IListeningPort | None = None
        self.address: str | None = None

    def bind(self, config: Config) -> IListeningPort | None:
        """Bind ``config``'s admin listener if it is new or moved (may raise)."""
        admin = config.admin
        if admin is None or admin.address == self.address:
            return None
        port: IListeningPort = self.reactor.listenTCP(
            admin.port, admin_site(self.make_resource()), interface=admin.host
        )
        return port

    def switch(self, port: IListeningPort | None, config: Config) -> None:
        """Make ``port`` (from :meth:`bind`) current, or close the listener when
        ``config`` has none."""
        admin = config.admin
        if port is None:
            if admin is None:
                self.close()
            return
        assert admin is not None
        old, self.port, self.address = self.port, port, admin.address
        host = f"[{admin.host}]" if ":" in admin.host else admin.host
        self._log.info(
            "relayd admin listening on http://{host}:{port}",
            host=host,
            port=getattr(port.getHost(), "port", admin.port),
        )
        if old is not None:
            old.stopListening()

    def close(self) -> Deferred[None] | None:
        """Stop listening (the end of the drain, or a reload that removed it)."""
        port, self.port, self.address = self.port, None, None
        return port.stopListening() if port is not None else None
