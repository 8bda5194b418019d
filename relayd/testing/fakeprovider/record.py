"""What the fake upstream remembers of each API request (``GET /_fake/requests``)."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.http_headers import Headers


class RecordedRequest:
    """One API request as received, plus what happened to its response."""

    __slots__ = (
        "aborted",
        "body",
        "client_disconnected",
        "events_sent",
        "finished",
        "headers",
        "id",
        "method",
        "path",
        "started",
        "status",
    )

    def __init__(
        self, ident: int, method: str, path: str, headers: Headers, body: bytes, started: float
    ) -> None:
        self.id = ident
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.started = started
        #: The response was completed normally (``request.finish()``).
        self.finished = False
        #: The client went away before the response finished.
        self.client_disconnected = False
        #: The fake closed the connection on purpose (``drop_after``).
        self.aborted = False
        #: SSE events written so far.
        self.events_sent = 0
        #: The HTTP status sent, once headers are out.
        self.status: int | None = None

    def header(self, name: str) -> str | None:
        """The last value of a request header, or ``None``."""
        values = self.headers.getRawHeaders(name.encode("latin-1"))
        return values[-1].decode("utf-8", "replace") if values else None

    def json(self) -> Any:
        """The request body parsed as JSON."""
        return json.loads(self.body)

    def to_json(self) -> dict[str, object]:
        """The ``GET /_fake/requests`` representation of this record."""
        headers: dict[str, list[str]] = {}
        for name, values in self.headers.getAllRawHeaders():
            key = name.decode("latin-1").lower()
            headers.setdefault(key, []).extend(v.decode("utf-8", "replace") for v in values)
        return {
            "id": self.id,
            "method": self.method,
            "path": self.path,
            "headers": headers,
            "body": self.body.decode("utf-8", "replace"),
            "started": self.started,
            "finished": self.finished,
            "client_disconnected": self.client_disconnected,
            "aborted": self.aborted,
            "events_sent": self.events_sent,
            "status": self.status,
        }
