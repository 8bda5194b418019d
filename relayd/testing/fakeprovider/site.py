"""The fake upstream's ``Site``: the resource served without an access log unless asked."""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.server import Site

from relayd.testing.fakeprovider.resource import DEFAULT_MAX_LOG, FakeProvider


class FakeSite(Site):
    """A ``Site`` serving a :class:`FakeProvider`, without access log by default."""

    noisy = False

    def __init__(self, provider: FakeProvider, *, access_log: bool = False) -> None:
        super().__init__(provider, reactor=provider.clock, parsePOSTFormSubmission=False)
        self.provider = provider
        self.access_log = access_log

    def log(self, request: http.Request) -> None:
        """Access-log only when asked to (it is costly for benchmarks)."""
        if self.access_log:
            super().log(request)


def make_site(
    clock: IReactorTime,
    *,
    defaults: Mapping[str, object] | None = None,
    max_log: int = DEFAULT_MAX_LOG,
    access_log: bool = False,
) -> FakeSite:
    """Build the fake upstream's ``Site``; the provider is ``site.provider``."""
    provider = FakeProvider(clock, defaults=defaults, max_log=max_log)
    return FakeSite(provider, access_log=access_log)
