"""The validated configuration: immutable snapshots built by :mod:`relayd.config.loader`.

Every object here is frozen. Runtime objects (pools, routers, listeners) are built from a
snapshot by :mod:`relayd.runtime`; nothing on the request path reads YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# An API family is the name of a provider module registered in relayd.providers.
ApiFamily = str

DEFAULT_LISTEN_ADDRESS = "127.0.0.1:8080"
# The accept backlog of a listener: room for a burst of new connections (the kernel caps
# it at net.core.somaxconn). Twisted's own default is 50.
DEFAULT_BACKLOG = 1024
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
# Output tokens reserved for a request that sets no max_tokens (token limits).
DEFAULT_RESERVE_OUTPUT_TOKENS = 1024
# Translation to Anthropic: max_tokens when an OpenAI request sets no limit, and the
# anthropic-version header sent upstream.
DEFAULT_MAX_TOKENS = 4096
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """PEM files for a TLS-terminating listener (certificate may hold the full chain)."""

    certificate: str
    private_key: str


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One TCP listener. ``address`` is the text from the file; ``host``/``port`` parsed."""

    address: str
    host: str
    port: int
    tls: TlsConfig | None = None
    backlog: int = DEFAULT_BACKLOG


@dataclass(frozen=True, slots=True)
class ConnectionsConfig:
    """Bounds on client connections (see :mod:`relayd.http.connections`).

    ``max``: open client connections at most (``None``: auto, from the open-file limit);
    ``per_address``: per client address (``None``: no bound); ``head_timeout``: seconds
    from a request's first byte to the end of its head; ``body_timeout``: from the head to
    the end of the body; ``idle_timeout``: a keep-alive connection with no request.
    """

    max: int | None = None
    per_address: int | None = None
    head_timeout: float = 20.0
    body_timeout: float = 120.0
    idle_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class ClientLimitsConfig:
    """A client's policy; ``None`` means no limit of that kind.

    ``requests_per_minute`` and ``tokens_per_minute`` (input + output, cache reads and
    writes included) hold over any rolling 60 seconds; ``max_concurrent`` counts requests
    in flight; ``tokens_per_day``/``tokens_per_month`` are budgets per UTC calendar day
    or month. Token limits reserve an estimate before forwarding (the prompt's size plus
    ``max_tokens``, or ``reserve_output_tokens`` when the request sets none) and settle
    to the actual usage when the response ends.
    """

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    reserve_output_tokens: int = DEFAULT_RESERVE_OUTPUT_TOKENS

    def any(self) -> bool:
        return any(
            v is not None
            for v in (
                self.requests_per_minute,
                self.tokens_per_minute,
                self.max_concurrent,
                self.tokens_per_day,
                self.tokens_per_month,
            )
        )


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """A relay client: who may call, identified by the SHA-256 digest of its relay key."""

    name: str
    key_sha256: bytes  # 32 raw bytes, decoded from the hex in the file
    models: tuple[str, ...] | None = None  # glob allowlist; None means every model
    limits: ClientLimitsConfig | None = None


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """Upstream deadlines in seconds.

    ``connect``: TCP+TLS connect. ``first_byte``: from sending the request until the
    response headers arrive. ``idle``: longest silence between two body chunks.
    ``total``: the whole exchange, body included.
    """

    connect: float = 10.0
    first_byte: float = 600.0
    idle: float = 300.0
    total: float = 3600.0


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Persistent upstream connections of one backend.

    ``max_idle_connections`` is how many idle keep-alive connections are cached
    (Twisted's ``maxPersistentPerHost``); ``idle_timeout`` closes cached connections
    after this many idle seconds (keep it below the upstream's own keep-alive timeout).
    """

    max_idle_connections: int = 32
    idle_timeout: float = 50.0


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active health probes of a backend.

    Every ``interval`` seconds a probe (``path``, or the provider type's default probe
    when ``None``) must answer within ``timeout``; ``unhealthy_after`` consecutive failed
    probes mark the backend unhealthy, ``healthy_after`` consecutive good ones mark it
    healthy again.
    """

    enabled: bool = True
    path: str | None = None
    interval: float = 10.0
    timeout: float = 5.0
    unhealthy_after: int = 3
    healthy_after: int = 2


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """Passive outlier detection: a circuit breaker over a backend's recent outcomes.

    The breaker opens when ``failures`` of the last ``window`` outcomes were failures,
    stays open for ``cooldown`` seconds (doubling on each re-open up to ``max_cooldown``),
    then lets ``half_open_requests`` trial requests through; a successful trial closes
    it, a failed one re-opens it.
    """

    window: int = 20
    failures: int = 5
    cooldown: float = 5.0
    max_cooldown: float = 300.0
    half_open_requests: int = 1


@dataclass(frozen=True, slots=True)
class FailoverConfig:
    """Retrying a failed request on another backend, before any byte reached the client.

    ``max_attempts`` counts the first attempt. Retries are refused once they exceed
    ``retry_budget_ratio`` of the requests of the last 10 seconds plus
    ``retry_budget_min_per_second`` x 10. Bodies over ``max_replay_bytes`` are never
    retried. A ``retry-after`` relayd sends to a client is clamped to ``max_retry_after``.
    """

    max_attempts: int = 3
    retry_budget_ratio: float = 0.2
    retry_budget_min_per_second: float = 1.0
    max_replay_bytes: int = 4 * 1024 * 1024
    max_retry_after: float = 60.0


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin listener: /metrics, /healthz, /readyz and /admin/*."""

    address: str
    host: str
    port: int
    token_file: str | None = None
    token: str | None = field(default=None, repr=False)  # read from token_file at load


@dataclass(frozen=True, slots=True)
class UpstreamLimitsConfig:
    """The provider's quota relayd keeps a backend under (rolling 60 seconds).

    ``per: key`` (the default) gives each upstream key its own quota, as providers count
    per key or organisation; ``per: backend`` shares one quota among the backend's keys.
    """

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    per: str = "key"  # "key" | "backend"


@dataclass(frozen=True, slots=True)
class StateConfig:
    """Where limits, budgets and usage counters live.

    ``memory`` (the default) keeps them in this process. ``redis`` shares them across
    instances: ``url`` is ``redis://[user@]host[:port][/db]`` (``rediss://`` for TLS,
    verified against ``ca_file`` or the system's trust store), the password is read from
    ``password_file``. Every Redis call must answer within ``timeout`` seconds. While
    Redis is unreachable, ``on_store_failure: open`` admits requests under a local
    limiter that gives this instance ``1 / fallback_instances`` of each limit;
    ``closed`` refuses requests that have limits to check.
    """

    store: str = "memory"  # "memory" | "redis"
    url: str | None = None
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    tls: bool = False
    ca_file: str | None = None
    password_file: str | None = None
    password: str | None = field(default=None, repr=False)  # read from password_file
    timeout: float = 0.5
    key_prefix: str = "relayd"
    on_store_failure: str = "open"  # "open" | "closed"
    fallback_instances: int = 1


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One upstream endpoint of a provider (an account, a region, a gateway).

    ``api_keys`` holds one or more upstream keys (from ``api_key``/``api_key_env``/
    ``api_key_file``, or the ``api_keys`` list), used round-robin. ``priority`` is the
    tier: 0 is the first; a backend of tier 1 gets traffic only when no tier-0 backend
    is available. ``max_concurrent`` caps requests in flight to it (``None``: no cap).
    """

    name: str
    url: str  # scheme://host[:port][/prefix], no trailing slash
    api_keys: tuple[str, ...] = field(repr=False, default=())
    weight: int = 1
    priority: int = 0
    max_concurrent: int | None = None
    pool: PoolConfig = PoolConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()  # effective: global < provider < backend
    health: HealthCheckConfig = HealthCheckConfig()  # effective, merged the same way
    breaker: BreakerConfig = BreakerConfig()  # effective, merged the same way
    limits: UpstreamLimitsConfig | None = None
    # OpenAI account selectors relayd sends with this backend's key (never the client's).
    organization: str | None = None
    project: str | None = None


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """A named group of backends speaking one upstream API (``type``)."""

    name: str
    type: ApiFamily
    backends: tuple[BackendConfig, ...]


@dataclass(frozen=True, slots=True)
class RouteTargetConfig:
    """One place a route can send a request: a provider, and the model to ask it for.

    ``model`` replaces the client's model name upstream (``None`` keeps it); the client
    still sees the name it asked for. ``weight`` matters only with ``strategy: weighted``.
    """

    provider: str
    model: str | None = None
    weight: int = 1


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Requests arriving on ``api`` whose model matches ``models`` (globs) go to ``targets``.

    ``strategy: ordered`` tries the targets in order (the first available one serves,
    the next ones are the fallback); ``weighted`` picks the first target by weight and
    falls back to the others in order. A target whose provider type differs from ``api``
    is reached by translation (Chat Completions <-> Messages only), with ``strict``,
    ``default_max_tokens`` and ``anthropic_version`` governing it.
    """

    api: ApiFamily
    targets: tuple[RouteTargetConfig, ...]
    models: tuple[str, ...] | None = None  # None matches every model (and model-less calls)
    strategy: str = "ordered"  # "ordered" | "weighted"
    strict: bool = False
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    anthropic_version: str = DEFAULT_ANTHROPIC_VERSION


@dataclass(frozen=True, slots=True)
class Config:
    """A whole validated configuration file."""

    listen: tuple[ListenerConfig, ...]
    clients: tuple[ClientConfig, ...] = ()
    providers: tuple[ProviderConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    timeouts: TimeoutsConfig = TimeoutsConfig()
    pool: PoolConfig = PoolConfig()
    health: HealthCheckConfig = HealthCheckConfig()
    breaker: BreakerConfig = BreakerConfig()
    failover: FailoverConfig = FailoverConfig()
    admin: AdminConfig | None = None
    state: StateConfig = StateConfig()
    shutdown_timeout: float = 30.0
    # A request that finds every backend it may use at its max_concurrent waits up to
    # queue_timeout seconds for a free slot; at most max_queued requests wait at once.
    queue_timeout: float = 30.0
    max_queued: int = 1000
    # During upstream silence on an SSE answer, an SSE comment every this many seconds
    # keeps proxies in front from closing the connection as idle; 0 turns it off.
    stream_keepalive: float = 15.0
    # A client's end-of-file while its request is served: "cancel" (it is gone) or
    # "answer" (a half-close: answer, then close). See relayd.http.channel.
    half_close: str = "cancel"
    connections: ConnectionsConfig = ConnectionsConfig()
    # Client headers forwarded upstream besides each API's allow list (names or globs).
    forward_headers: tuple[str, ...] = ()
    source: str = "<defaults>"
