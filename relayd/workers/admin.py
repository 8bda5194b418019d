"""The daemon's admin listener: one answer for all the workers.

The routes are the one-process ones (:class:`~relayd.http.admin.AdminResource`), the
token check included; the answers are gathered from every serving worker over its
control channel and merged:

``/metrics``
    The daemon's own families (reloads, workers, restarts), then the workers' merged
    (:mod:`relayd.workers.merge`).
``/readyz``
    200 once every worker serves and each finds its runtime ready; else 503 with the
    problems, each prefixed ``worker N:``. 503 ``draining`` while the daemon stops.
``/admin/backends``
    Every worker's backends, each entry with a ``worker`` field (health and breakers
    are each worker's own).
``/admin/usage``
    From one worker: its store is the daemon's (memory) or Redis, the same for all.
``/admin/cache``, ``/admin/cache/purge``
    Summed over the workers (each holds its own memory cache level).

A worker that does not answer within :data:`ASK_TIMEOUT` seconds is left out (and a
readiness problem).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from twisted.internet.defer import Deferred, DeferredList
from twisted.web.server import Request

from relayd.http.admin import (
    AdminResource,
    Handler,
    Response,
    error_response,
    json_response,
    readiness_response,
)
from relayd.metrics import ReloadMetrics
from relayd.workers.merge import Exposition, WorkerFamilies, sum_documents
from relayd.workers.processes import WorkerProcess

#: Seconds the daemon waits for a worker's answer to an admin question.
ASK_TIMEOUT = 5.0


class DaemonMetrics:
    """The daemon's own metrics: reloads (reported once), workers and their restarts."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.reloads = ReloadMetrics(r)
        self.workers = Gauge(
            "relayd_workers", "Worker processes, by state (starting, serving, stopping).",
            ["state"], registry=r,
        )
        self._restarts = Counter(
            "relayd_worker_restarts_total",
            "Worker processes started again after one died, by worker index.", ["worker"],
            registry=r,
        )

    def config_reload(self, result: str) -> None:
        self.reloads.count(result)

    def worker_restarted(self, index: int) -> None:
        self._restarts.labels(str(index)).inc()

    def count_workers(self, workers: list[WorkerProcess]) -> None:
        for state in ("starting", "serving", "stopping"):
            self.workers.labels(state).set(sum(1 for w in workers if w.state == state))


def ask_workers(
    clock: Any, workers: list[WorkerProcess], op: str, *args: Any
) -> Deferred[dict[WorkerProcess, Any]]:
    """``op`` asked of every serving worker: {worker: answer}, leaving out the workers
    that failed or did not answer in :data:`ASK_TIMEOUT` seconds."""
    asked = [w for w in workers if w.state == "serving" and w.channel is not None]
    calls = []
    for worker in asked:
        assert worker.channel is not None
        d = worker.channel.call(op, *args)
        d.addTimeout(ASK_TIMEOUT, clock)
        calls.append(d)

    def gathered(results: list[tuple[bool, Any]]) -> dict[WorkerProcess, Any]:
        return {w: value for w, (ok, value) in zip(asked, results, strict=True) if ok}

    return DeferredList(calls, consumeErrors=True).addCallback(gathered)


class DaemonAdmin(AdminResource):
    """The admin resource of the daemon (see the module's routes)."""

    def __init__(
        self,
        metrics: DaemonMetrics,
        workers: Callable[[], list[WorkerProcess]],
        clock: Any,
        *,
        families: WorkerFamilies,
        wanted: Callable[[], int],
        get_token: Callable[[], str | None],
        is_draining: Callable[[], bool],
    ) -> None:
        super().__init__(
            metrics, lambda: None, clock,  # type: ignore[arg-type]
            get_token=get_token, is_draining=is_draining,
        )
        self.daemon_metrics = metrics
        self.workers = workers
        self.families = families
        self.wanted = wanted

    def _ask(self, op: str, *args: Any) -> Deferred[dict[int, Any]]:
        """``op`` of every serving worker, by index."""
        d = ask_workers(self.clock, self.workers(), op, *args)
        return d.addCallback(lambda answers: {w.index: a for w, a in answers.items()})

    def render_metrics(self, request: Request) -> Any:
        self.daemon_metrics.count_workers(self.workers())

        def render(answers: dict[WorkerProcess, Any]) -> Response:
            by_serial = {w.serial: (w.index, families) for w, families in answers.items()}
            exposition = Exposition(self.daemon_metrics.registry,
                                    self.families.merged(by_serial))
            return 200, CONTENT_TYPE_LATEST.encode(), generate_latest(exposition)

        d = ask_workers(self.clock, self.workers(), "metrics")
        return d.addCallback(render)

    def render_readyz(self, request: Request) -> Any:
        if self.is_draining():
            return readiness_response((), draining=True)
        workers = self.workers()

        def judge(answers: dict[int, Any]) -> Response:
            problems = []
            for worker in workers:
                if worker.state != "serving":
                    problems.append(f"worker {worker.index}: {worker.state}")
                elif worker.index not in answers:
                    problems.append(f"worker {worker.index}: did not answer")
                else:
                    _ready, found = answers[worker.index]
                    problems += [f"worker {worker.index}: {p}" for p in found]
            present = {worker.index for worker in workers}
            problems += [f"worker {index}: not running (starting again)"
                         for index in range(self.wanted()) if index not in present]
            return readiness_response(problems)

        return self._ask("readiness").addCallback(judge)

    def _view(self, path: bytes, request: Request) -> Deferred[dict[int, Any]]:
        args = dict(request.args or {})
        return self._ask("admin", path, args)

    def render_backends(self, request: Request) -> Any:
        def merged(answers: dict[int, Any]) -> Response:
            backends = []
            for index in sorted(answers):
                for backend in json.loads(answers[index][2])["backends"]:
                    backends.append({"worker": index, **backend})
            return json_response(200, {"backends": backends})

        return self._view(b"/admin/backends", request).addCallback(merged)

    def render_usage(self, request: Request) -> Any:
        def first(answers: dict[int, Any]) -> Response:
            if not answers:
                return error_response(503, "no worker answered")
            answer: Response = answers[min(answers)]
            return answer

        return self._view(b"/admin/usage", request).addCallback(first)

    def _summed(self, path: bytes, request: Request) -> Any:
        def summed(answers: dict[int, Any]) -> Response:
            if not answers:
                return error_response(503, "no worker answered")
            ok = [json.loads(a[2]) for a in answers.values() if a[0] == 200]
            if not ok:
                return cast(Response, answers[min(answers)])
            return json_response(200, sum_documents(ok))

        return self._view(path, request).addCallback(summed)

    def render_cache(self, request: Request) -> Any:
        return self._summed(b"/admin/cache", request)

    def render_cache_purge(self, request: Request) -> Any:
        return self._summed(b"/admin/cache/purge", request)

    routes = cast(Mapping[bytes, Handler], {
        b"/metrics": render_metrics,
        b"/healthz": AdminResource.render_healthz,
        b"/readyz": render_readyz,
    })
    admin_routes = cast(Mapping[bytes, Handler], {
        b"/admin/backends": render_backends,
        b"/admin/usage": render_usage,
        b"/admin/cache": render_cache,
        b"/admin/cache/purge": render_cache_purge,
    })
