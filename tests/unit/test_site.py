"""RelayRequest: twisted.web requests handed straight to the relay resource."""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.test.requesthelper import DummyChannel

from relayd.http.site import RelayRequest


class Leaf(Resource):
    isLeaf = True

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.seen: list[bytes] = []

    def render(self, request: Any) -> Any:
        self.seen.append(request.path)
        if self.fail:
            raise RuntimeError("boom")
        return NOT_DONE_YET


def request_for(resource: Resource, path: bytes) -> RelayRequest:
    channel = DummyChannel()
    channel.site = Site(resource)
    channel.site.displayTracebacks = False
    request = RelayRequest(channel)
    request.method = b"POST"
    request.uri = request.path = path
    request.clientproto = b"HTTP/1.1"
    return request


def test_every_path_goes_to_the_resource_with_a_date_and_no_server_header() -> None:
    leaf = Leaf()
    request = request_for(leaf, b"/v1/messages/batches/x%2F..")
    request.process()
    assert leaf.seen == [b"/v1/messages/batches/x%2F.."]  # as sent: no traversal, no unquote
    assert request.responseHeaders.hasHeader(b"date")
    assert not request.responseHeaders.hasHeader(b"server")
    assert not request.finished


def test_a_resource_that_raises_gets_a_500() -> None:
    request = request_for(Leaf(fail=True), b"/v1/messages")
    request.process()
    assert request.code == 500 and request.finished
