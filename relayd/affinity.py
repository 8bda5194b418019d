"""Session affinity: a conversation goes back to the backend and key that hold its
prompt cache, as long as they can serve it.

Anthropic and OpenAI keep prompt caches per account (organisation, workspace): a
session moved to another upstream account pays a full cache write instead of a read.
A route's ``affinity`` (default ``key: session``) pins each session, keyed by (client,
route, session) so that two clients reusing one session id never share a pin, to the
backend and upstream key that last answered it. The pin only orders the candidates
(:mod:`relayd.http.planner`): when its backend cannot serve (unhealthy, breaker not
closed, at capacity, key cooling down, a better priority tier available, removed by a
reload), the normal choice runs and the pin moves to whichever backend answers. It
never makes a request fail.

Pins live in memory (a bounded table, least recently used out first) and, with
``state.store: redis``, in Redis for every instance (``GETEX ... PX`` reads a pin and
slides its expiry in one command; the memory table serves while Redis is away). A
failure to read or write a pin is never the client's error.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from relayd.config.model import RouteAffinityConfig
from relayd.keyring import UpstreamKey
from relayd.limits import LimitStore
from relayd.limits.redis import RedisStore
from relayd.providers import Endpoint, IProvider
from relayd.upstream import Backend

__all__ = ["MAX_PINS", "SESSION_HEADER", "Pin", "SessionAffinity", "SessionPins"]

#: Claude Code names its session in this header on every request.
SESSION_HEADER = b"x-claude-code-session-id"
#: Pins the memory table holds; the least recently used go first beyond it.
MAX_PINS = 100_000
#: Longest session signal used as it is (longer ones are digested like the rest).
_MAX_SIGNAL = 1024

#: Why a pin moved (``relayd_affinity_repins_total{reason}``).
REPIN_REASONS = (
    "gone", "unhealthy", "breaker", "busy", "key", "priority", "order", "failed",
)


class Pin(NamedTuple):
    """Where a session's requests go: a backend of a provider, and its key by index."""

    provider: str
    backend: str
    key: int

    def encode(self) -> str:
        return json.dumps([self.provider, self.backend, self.key])

    @classmethod
    def decode(cls, raw: object) -> Pin | None:
        try:
            text = raw.decode() if isinstance(raw, bytes) else raw
            provider, backend, key = json.loads(text)  # type: ignore[arg-type]
        except (TypeError, ValueError, UnicodeDecodeError):
            return None
        if isinstance(provider, str) and isinstance(backend, str) and type(key) is int:
            return cls(provider, backend, key)
        return None


class SessionPins:
    """Every session's pin: in memory, and in Redis when the state store is Redis.

    Carried across reloads (a reload keeps the sessions where they are); :meth:`bind`
    follows the state store the new configuration uses.
    """

    __slots__ = ("_base", "_clock", "_memory", "_redis", "errors", "hits", "misses", "repins")

    def __init__(self, clock: IReactorTime, store: LimitStore) -> None:
        self._clock = clock
        self._memory: OrderedDict[str, tuple[Pin, float]] = OrderedDict()
        self._redis: RedisStore | None = None
        self._base = ""
        self.hits = 0  # requests whose pinned backend was tried first
        self.misses = 0  # requests of a session without a pin (new, or expired)
        self.repins: dict[str, int] = dict.fromkeys(REPIN_REASONS, 0)
        self.errors = 0  # Redis calls that failed (memory served)
        self.bind(store)

    def bind(self, store: LimitStore) -> None:
        self._redis = store if isinstance(store, RedisStore) else None
        if self._redis is not None:
            self._base = f"{{{self._redis.config.key_prefix}}}:pin:"

    def find(self, key: str, ttl: float) -> Pin | Deferred[Pin | None] | None:
        """The session's pin (its expiry pushed ``ttl`` on); a Deferred when in Redis."""
        redis = self._redis
        if redis is None or redis.state != "up":
            return self._remembered(key, ttl)
        d = redis.command(
            "pin_get", "execute_command", "GETEX", self._base + key, "PX", _ms(ttl)
        )
        return d.addCallbacks(self._found, self._failed, callbackArgs=(key, ttl),
                              errbackArgs=(key, ttl))

    def _found(self, raw: object, key: str, ttl: float) -> Pin | None:
        pin = Pin.decode(raw) if raw is not None else None
        if pin is not None:
            self._remember(key, pin, ttl)
        return pin

    def _failed(self, failure: Failure, key: str, ttl: float) -> Pin | None:
        self.errors += 1
        return self._remembered(key, ttl)

    def _remembered(self, key: str, ttl: float) -> Pin | None:
        memory = self._memory
        found = memory.get(key)
        if found is None:
            return None
        now = self._clock.seconds()
        if found[1] <= now:
            del memory[key]
            return None
        memory[key] = (found[0], now + ttl)
        memory.move_to_end(key)
        return found[0]

    def _remember(self, key: str, pin: Pin, ttl: float) -> None:
        memory = self._memory
        memory[key] = (pin, self._clock.seconds() + ttl)
        memory.move_to_end(key)
        if len(memory) > MAX_PINS:
            memory.popitem(last=False)

    def keep(self, key: str, pin: Pin, ttl: float) -> None:
        """Pin the session (not waited for)."""
        self._remember(key, pin, ttl)
        redis = self._redis
        if redis is None or redis.state != "up":
            return
        d = redis.command("pin_set", "execute_command", "SET", self._base + key, pin.encode(),
                          "PX", _ms(ttl))
        d.addErrback(self._set_failed)

    def _set_failed(self, failure: Failure) -> None:
        self.errors += 1

    def stats(self) -> dict[str, Any]:
        return {
            "pins": len(self._memory),
            "hits": self.hits,
            "misses": self.misses,
            "repins": dict(self.repins),
            "shared": self._redis is not None,
            "errors": self.errors,
        }


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


def session_key(
    config: RouteAffinityConfig,
    family: IProvider,
    headers: Headers,
    payload: dict[str, Any] | None,
) -> str | None:
    """The request's session signal per ``config.key``, or None (no affinity)."""
    header = config.header
    if header is not None:
        values = headers.getRawHeaders(header)
        return values[0].decode("latin-1") if values and values[0] else None
    values = headers.getRawHeaders(SESSION_HEADER)
    if values and values[0]:
        return "h:" + values[0].decode("latin-1")
    if payload is None:
        return None
    found = family.session_of(payload)
    if found is not None:
        return "b:" + found
    if config.key == "auto":
        conversation = family.conversation_of(payload)
        if conversation is not None:
            return "c:" + hashlib.sha256(conversation).hexdigest()
    return None


class SessionAffinity:
    """One request's session: its pin, and what became of it.

    Made by :meth:`for_request`; the planner reads :attr:`pin` and reports with
    :meth:`moved` why it could not use it; :meth:`served` re-pins the session to the
    backend and key that answered.
    """

    __slots__ = ("_key", "_pins", "_ttl", "outcome", "pin", "reason", "used")

    def __init__(self, pins: SessionPins, key: str, ttl: float) -> None:
        self._pins = pins
        self._key = key
        self._ttl = ttl
        self.pin: Pin | None = None
        self.reason: str | None = None  # why the pin was not used (REPIN_REASONS)
        self.used = False  # the first attempt went to the pinned backend
        self.outcome: str | None = None  # what served() did (see state)

    @classmethod
    def for_request(
        cls,
        pins: SessionPins,
        config: RouteAffinityConfig | None,
        endpoint: Endpoint,
        family: IProvider,
        client: str,
        route: str,
        headers: Headers,
        payload: dict[str, Any] | None,
    ) -> SessionAffinity | None:
        """The affinity of a request on a route with ``config``; None when the route
        has none, the endpoint keeps no prompt cache, or the request names no session."""
        if config is None or not endpoint.samples:
            return None
        signal = session_key(config, family, headers, payload)
        if signal is None:
            return None
        if len(signal) > _MAX_SIGNAL:
            signal = "d:" + hashlib.sha256(signal.encode("utf-8", "replace")).hexdigest()
        digest = hashlib.sha256(
            f"{len(client)}:{client}{len(route)}:{route}{signal}".encode("utf-8", "replace")
        ).hexdigest()[:32]
        return cls(pins, digest, config.ttl)

    def find(self) -> Deferred[Pin | None] | None:
        """Look the pin up: done at once (None returned) or a Deferred (Redis)."""
        found = self._pins.find(self._key, self._ttl)
        if isinstance(found, Deferred):
            return found.addCallback(self._got)
        self._got(found)
        return None

    def _got(self, pin: Pin | None) -> Pin | None:
        self.pin = pin
        if pin is None:
            self._pins.misses += 1
        return pin

    def hit(self) -> None:
        self.used = True
        self._pins.hits += 1

    def moved(self, reason: str) -> None:
        self.reason = reason

    def served(self, backend: Backend, key: UpstreamKey) -> None:
        """The answer came from ``backend`` with ``key``: pin the session there."""
        pin = self.pin
        if (
            pin is not None and pin.key == key.index and pin.backend == backend.name
            and pin.provider == backend.provider_name
        ):
            self.outcome = "hit"
            return  # still where it was (its expiry slid when it was read)
        new = Pin(backend.provider_name, backend.name, key.index)
        self._pins.keep(self._key, new, self._ttl)
        if pin is None:
            self.outcome = "new"
        else:
            reason = self.reason or "failed"
            self._pins.repins[reason] = self._pins.repins.get(reason, 0) + 1
            self.outcome = f"moved:{reason}"
        self.pin = new

    @property
    def state(self) -> str:
        """For the access log: ``hit`` (the pinned backend served), ``new`` (no pin
        yet), ``moved:REASON`` (the pin went elsewhere, see REPIN_REASONS); before an
        answer, what the planning found."""
        if self.outcome is not None:
            return self.outcome
        if self.used:
            return "hit"
        return f"moved:{self.reason}" if self.reason is not None else "new"
