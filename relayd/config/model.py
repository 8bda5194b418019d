"""The validated configuration: immutable snapshots built by :mod:`relayd.config.loader`.

Every object here is frozen. Runtime objects (pools, routers, listeners) are built from a
snapshot by :mod:`relayd.runtime`; nothing on the request path reads YAML.

This is also the configuration's schema: each field a YAML key sets names, in its
metadata, the check of its value (see :mod:`relayd.config.schema`), and fields are
declared in the order their keys are read and their problems reported. Classes whose
field order follows that rather than what a caller would guess are keyword-only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relayd.config import checks
from relayd.config.addresses import backend_url
from relayd.config.regions import (
    Network,
    affinity_key,
    allow_list,
    mmdb_file,
    networks,
    region_map,
)
from relayd.config.rules import rule_pattern
from relayd.config.schema import checked, hooked, nested
from relayd.config.secrets import BACKEND_KEY_SOURCES, SIGNING_SECRET_SOURCES, key_digest

# An API family is the name of a provider module registered in relayd.providers.
ApiFamily = str

DEFAULT_LISTEN_ADDRESS = "127.0.0.1:8080"
# The accept backlog of a listener: room for a burst of new connections (the kernel caps
# it at net.core.somaxconn). Twisted's own default is 50.
DEFAULT_BACKLOG = 1024
MAX_BACKLOG = 65535  # the kernel's own limit for a listen() backlog
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
# Output tokens reserved for a request that sets no max_tokens (token limits).
DEFAULT_RESERVE_OUTPUT_TOKENS = 1024
# Translation to Anthropic: max_tokens when an OpenAI request sets no limit, and the
# anthropic-version header sent upstream.
DEFAULT_MAX_TOKENS = 4096
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"
MAX_ATTEMPTS_LIMIT = 10  # failover.max_attempts, the first attempt included
# The response cache: the memory (L1) bound, and the largest answer it stores.
DEFAULT_CACHE_MEMORY_BYTES = 64 * 1024 * 1024
DEFAULT_CACHE_MAX_ENTRY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """PEM files for a TLS-terminating listener (certificate may hold the full chain)."""

    certificate: str = field(metadata=checked(checks.local_path))
    private_key: str = field(metadata=checked(checks.local_path))
    # Seconds a client may resume its TLS session (ticket or session id) after it.
    session_timeout: float = field(default=3600.0, metadata=checked(checks.positive_number))


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One TCP listener. ``address`` is the text from the file; ``host``/``port`` parsed."""

    # Read with host and port by a hook: no two listeners may share an address.
    address: str = field(metadata=hooked())
    host: str
    port: int
    tls: TlsConfig | None = field(default=None, metadata=nested(TlsConfig))
    backlog: int = field(
        default=DEFAULT_BACKLOG, metadata=checked(checks.int_between(1, MAX_BACKLOG))
    )


@dataclass(frozen=True, slots=True)
class ConnectionsConfig:
    """Bounds on client connections (see :mod:`relayd.http.connections`).

    ``max``: open client connections at most (``None``: auto, from the open-file limit);
    ``per_address``: per client address (``None``: no bound); ``head_timeout``: seconds
    from a request's first byte to the end of its head; ``body_timeout``: from the head to
    the end of the body; ``idle_timeout``: a keep-alive connection with no request.
    """

    max: int | None = field(default=None, metadata=checked(checks.connection_limit))
    per_address: int | None = field(default=None, metadata=checked(checks.positive_int))
    head_timeout: float = field(default=20.0, metadata=checked(checks.positive_number))
    body_timeout: float = field(default=120.0, metadata=checked(checks.positive_number))
    idle_timeout: float = field(default=60.0, metadata=checked(checks.positive_number))


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

    requests_per_minute: int | None = field(default=None, metadata=checked(checks.positive_int))
    tokens_per_minute: int | None = field(default=None, metadata=checked(checks.positive_int))
    max_concurrent: int | None = field(default=None, metadata=checked(checks.positive_int))
    tokens_per_day: int | None = field(default=None, metadata=checked(checks.positive_int))
    tokens_per_month: int | None = field(default=None, metadata=checked(checks.positive_int))
    reserve_output_tokens: int = field(
        default=DEFAULT_RESERVE_OUTPUT_TOKENS, metadata=checked(checks.non_negative_int)
    )

    def any(self) -> bool:
        """True if any limit is set (a ``limits`` mapping without one means no limits)."""
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


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientSigningConfig:
    """``clients[].signing``: the client signs its requests (relayd.signing).

    ``secret`` is read from ``secret_file`` or ``secret_env``. A timestamp is accepted
    from ``window`` seconds in the past to ``future`` seconds ahead; each nonce once.
    ``required: false`` accepts unsigned requests too (while a client rolls it out);
    signed ones are checked all the same.
    """

    secret: str = field(repr=False, default="", metadata=hooked(*SIGNING_SECRET_SOURCES))
    window: float = field(default=300.0, metadata=checked(checks.positive_number))
    future: float = field(default=30.0, metadata=checked(checks.non_negative_number))
    required: bool = field(default=True, metadata=checked(checks.boolean))


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """A relay client: who may call, identified by the SHA-256 digest of its relay key."""

    name: str = field(metadata=checked(checks.name))  # unique among clients
    # 32 raw bytes, decoded from the hex in the file; unique among clients.
    key_sha256: bytes = field(metadata=checked(key_digest))
    # A glob allowlist; None means every model.
    models: tuple[str, ...] | None = field(default=None, metadata=checked(checks.globs))
    limits: ClientLimitsConfig | None = field(
        default=None, metadata=nested(ClientLimitsConfig, keep=ClientLimitsConfig.any)
    )
    # The region this client's requests prefer, whatever its address (docs/routing.md).
    region: str | None = field(default=None, metadata=checked(checks.name))
    signing: ClientSigningConfig | None = field(default=None, metadata=hooked())
    # Client addresses this client's requests may come from (None: any); others get 403.
    allow_from: tuple[Network, ...] | None = field(default=None, metadata=checked(allow_list))


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """Upstream deadlines in seconds.

    ``connect``: TCP+TLS connect. ``first_byte``: from sending the request until the
    response headers arrive. ``idle``: longest silence between two body chunks.
    ``total``: the whole exchange, body included.
    """

    connect: float = field(default=10.0, metadata=checked(checks.positive_number))
    first_byte: float = field(default=600.0, metadata=checked(checks.positive_number))
    idle: float = field(default=300.0, metadata=checked(checks.positive_number))
    total: float = field(default=3600.0, metadata=checked(checks.positive_number))


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Persistent upstream connections of one backend.

    ``max_idle_connections`` is how many idle keep-alive connections are cached
    (Twisted's ``maxPersistentPerHost``); ``idle_timeout`` closes cached connections
    after this many idle seconds (keep it below the upstream's own keep-alive timeout).
    """

    max_idle_connections: int = field(default=32, metadata=checked(checks.positive_int))
    idle_timeout: float = field(default=50.0, metadata=checked(checks.positive_number))


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """Active health probes of a backend.

    Every ``interval`` seconds a probe (``path``, or the provider type's default probe
    when ``None``) must answer within ``timeout``; ``unhealthy_after`` consecutive failed
    probes mark the backend unhealthy, ``healthy_after`` consecutive good ones mark it
    healthy again.
    """

    enabled: bool = field(default=True, metadata=checked(checks.boolean))
    path: str | None = field(default=None, metadata=checked(checks.probe_path))
    interval: float = field(default=10.0, metadata=checked(checks.positive_number))
    timeout: float = field(
        default=5.0, metadata=checked(checks.positive_number, at_most="interval")
    )
    unhealthy_after: int = field(default=3, metadata=checked(checks.positive_int))
    healthy_after: int = field(default=2, metadata=checked(checks.positive_int))


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """Passive outlier detection: a circuit breaker over a backend's recent outcomes.

    The breaker opens when ``failures`` of the last ``window`` outcomes were failures,
    stays open for ``cooldown`` seconds (doubling on each re-open up to ``max_cooldown``),
    then lets ``half_open_requests`` trial requests through; a successful trial closes
    it, a failed one re-opens it.
    """

    window: int = field(default=20, metadata=checked(checks.positive_int))
    failures: int = field(default=5, metadata=checked(checks.positive_int, at_most="window"))
    cooldown: float = field(
        default=5.0, metadata=checked(checks.positive_number, at_most="max_cooldown")
    )
    max_cooldown: float = field(default=300.0, metadata=checked(checks.positive_number))
    half_open_requests: int = field(default=1, metadata=checked(checks.positive_int))


@dataclass(frozen=True, slots=True)
class FailoverConfig:
    """Retrying a failed request on another backend, before any byte reached the client.

    ``max_attempts`` counts the first attempt. Retries are refused once they exceed
    ``retry_budget_ratio`` of the requests of the last 10 seconds plus
    ``retry_budget_min_per_second`` x 10. Bodies over ``max_replay_bytes`` are never
    retried. A ``retry-after`` relayd sends to a client is clamped to ``max_retry_after``.
    """

    max_attempts: int = field(
        default=3, metadata=checked(checks.int_between(1, MAX_ATTEMPTS_LIMIT))
    )
    retry_budget_ratio: float = field(default=0.2, metadata=checked(checks.fraction))
    retry_budget_min_per_second: float = field(
        default=1.0, metadata=checked(checks.non_negative_number)
    )
    max_replay_bytes: int = field(
        default=4 * 1024 * 1024, metadata=checked(checks.non_negative_int)
    )
    max_retry_after: float = field(default=60.0, metadata=checked(checks.positive_number))


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin listener: /metrics, /healthz, /readyz and /admin/*."""

    # Read with host and port by a hook: no listener may have the same address.
    address: str = field(metadata=hooked())
    host: str
    port: int
    token_file: str | None = field(default=None, metadata=hooked())  # read into token
    token: str | None = field(default=None, repr=False)  # read from token_file at load


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamLimitsConfig:
    """The provider's quota relayd keeps a backend under (rolling 60 seconds).

    ``per: key`` (the default) gives each upstream key its own quota, as providers count
    per key or organisation; ``per: backend`` shares one quota among the backend's keys.
    """

    per: str = field(default="key", metadata=checked(checks.choice("key", "backend")))
    requests_per_minute: int | None = field(default=None, metadata=checked(checks.positive_int))
    tokens_per_minute: int | None = field(default=None, metadata=checked(checks.positive_int))

    def any(self) -> bool:
        """True if a quota is set (a ``limits`` mapping without one means no limits)."""
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


@dataclass(frozen=True, slots=True, kw_only=True)
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

    store: str = field(default="memory", metadata=checked(checks.choice("memory", "redis")))
    timeout: float = field(default=0.5, metadata=checked(checks.positive_number))
    key_prefix: str = field(default="relayd", metadata=checked(checks.key_prefix))
    on_store_failure: str = field(
        default="open", metadata=checked(checks.choice("open", "closed"))
    )
    fallback_instances: int = field(default=1, metadata=checked(checks.positive_int))
    # The Redis connection, for store: redis only, so read by hooks that know the store;
    # the url gives host, port, db, username and tls.
    url: str | None = field(default=None, metadata=hooked())
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    tls: bool = False
    password_file: str | None = field(default=None, metadata=hooked())
    password: str | None = field(default=None, repr=False)  # read from password_file
    ca_file: str | None = field(default=None, metadata=hooked())


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig:
    """One upstream endpoint of a provider (an account, a region, a gateway).

    ``api_keys`` holds one or more upstream keys (from ``api_key``/``api_key_env``/
    ``api_key_file``, or the ``api_keys`` list), used round-robin. ``priority`` is the
    tier: 0 is the first; a backend of tier 1 gets traffic only when no tier-0 backend
    is available. ``max_concurrent`` caps requests in flight to it (``None``: no cap).
    """

    name: str = field(metadata=checked(checks.name))  # unique within the provider
    # scheme://host[:port][/prefix], no trailing slash
    url: str = field(metadata=checked(backend_url))
    api_keys: tuple[str, ...] = field(
        repr=False, default=(), metadata=hooked(*BACKEND_KEY_SOURCES)
    )
    weight: int = field(default=1, metadata=checked(checks.positive_int))
    priority: int = field(default=0, metadata=checked(checks.non_negative_int))
    max_concurrent: int | None = field(default=None, metadata=checked(checks.positive_int))
    # Where it is, for region routing: clients whose region this is prefer it.
    region: str | None = field(default=None, metadata=checked(checks.name))
    # The effective settings, merged field by field: top level < provider < backend.
    timeouts: TimeoutsConfig = field(default=TimeoutsConfig(), metadata=nested(TimeoutsConfig))
    pool: PoolConfig = field(default=PoolConfig(), metadata=nested(PoolConfig))
    health: HealthCheckConfig = field(
        default=HealthCheckConfig(), metadata=nested(HealthCheckConfig)
    )
    breaker: BreakerConfig = field(default=BreakerConfig(), metadata=nested(BreakerConfig))
    # OpenAI account selectors relayd sends with this backend's key (never the client's);
    # only backends of providers of type openai have them.
    organization: str | None = field(default=None, metadata=checked(checks.header_value))
    project: str | None = field(default=None, metadata=checked(checks.header_value))
    limits: UpstreamLimitsConfig | None = field(
        default=None, metadata=nested(UpstreamLimitsConfig, keep=UpstreamLimitsConfig.any)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LeastLatencyConfig:
    """``balance: least_latency`` (peak-EWMA): how fast old latency samples fade
    (``decay``, seconds) and the latency assumed for a backend without samples."""

    decay: float = field(default=10.0, metadata=checked(checks.positive_number))
    default_rtt: float = field(default=0.05, metadata=checked(checks.positive_number))


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """A named group of backends speaking one upstream API (``type``).

    ``balance``: ``weighted`` (smooth weighted round-robin) or ``least_latency``
    (peak-EWMA of the time to response headers times the requests in flight, power of
    two choices, scaled by weight); see docs/routing.md.
    """

    name: str = field(metadata=checked(checks.name))  # unique among providers
    type: ApiFamily = field(metadata=checked(checks.api_family))
    # Read by a hook from ``backends``, each over this provider's timeouts, pool, health
    # and breaker (merged over the top level's).
    backends: tuple[BackendConfig, ...] = field(
        metadata=hooked("timeouts", "pool", "health", "breaker", "backends")
    )
    balance: str = field(
        default="weighted", metadata=checked(checks.choice("weighted", "least_latency"))
    )
    least_latency: LeastLatencyConfig = field(
        default=LeastLatencyConfig(), metadata=nested(LeastLatencyConfig)
    )
    # Client locations (country or continent codes, ``default``) to backend regions.
    regions: tuple[tuple[str, str], ...] | None = field(
        default=None, metadata=checked(region_map)
    )


@dataclass(frozen=True, slots=True)
class RouteTargetConfig:
    """One place a route can send a request: a provider, and the model to ask it for.

    ``model`` replaces the client's model name upstream (``None`` keeps it); the client
    still sees the name it asked for. ``weight`` matters only with ``strategy: weighted``.
    """

    provider: str = field(metadata=checked(checks.string))  # a provider of the file
    model: str | None = field(default=None, metadata=checked(checks.string))
    weight: int = field(default=1, metadata=checked(checks.positive_int))


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteCacheConfig:
    """A route's response cache (``routes[].cache``): see docs/caching.md.

    Complete 200 answers are kept ``ttl`` seconds, per client unless ``scope: shared``.
    ``sampled``: also cache requests that sample (a generation with ``temperature``
    above 0, or none given: the APIs' default is 1). ``coalesce``: identical requests
    arriving while the first is in flight wait for its answer. ``stale_if_error``: an
    entry expired less than this many seconds ago is served when every target fails.
    """

    ttl: float = field(default=60.0, metadata=checked(checks.positive_number))
    scope: str = field(default="client", metadata=checked(checks.choice("client", "shared")))
    sampled: bool = field(default=False, metadata=checked(checks.boolean))
    coalesce: bool = field(default=False, metadata=checked(checks.boolean))
    stale_if_error: float = field(default=0.0, metadata=checked(checks.non_negative_number))


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteAffinityConfig:
    """A route's session affinity (``routes[].affinity``): see docs/routing.md.

    ``key``: ``session`` (the default) pins requests that carry an explicit session
    signal (``X-Claude-Code-Session-Id``, Anthropic ``metadata.user_id``, OpenAI
    ``prompt_cache_key`` or ``user``); ``auto`` also pins the others by a digest of
    their system prompt, tools and first user message; ``header NAME`` uses only that
    header; ``none`` turns it off. A pin lives ``ttl`` seconds after its last use.
    """

    key: str = field(default="session", metadata=checked(affinity_key))
    ttl: float = field(default=300.0, metadata=checked(checks.positive_number))

    @property
    def header(self) -> bytes | None:
        """The header of ``key: header NAME``, lower-case."""
        kind, _, name = self.key.partition(" ")
        return name.encode("ascii") if kind == "header" else None


@dataclass(frozen=True, slots=True, kw_only=True)
class PerAddressConfig:
    """``edge.per_address``: a leaky bucket per client address, as nginx ``limit_req``
    with ``nodelay``: ``rate`` requests per second, ``burst`` more at once."""

    rate: float = field(metadata=checked(checks.positive_number))
    burst: int = field(default=0, metadata=checked(checks.non_negative_int))


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthFailuresConfig:
    """``edge.auth_failures``: an address with ``limit`` failed authentications within
    ``window`` seconds gets 429 for ``cooldown`` seconds."""

    limit: int = field(metadata=checked(checks.positive_int))
    window: float = field(default=60.0, metadata=checked(checks.positive_number))
    cooldown: float = field(default=300.0, metadata=checked(checks.positive_number))


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeConfig:
    """``edge``: rules on client addresses, checked before authentication."""

    per_address: PerAddressConfig | None = field(
        default=None, metadata=nested(PerAddressConfig)
    )
    exempt: tuple[Network, ...] = field(default=(), metadata=checked(networks))
    auth_failures: AuthFailuresConfig | None = field(
        default=None, metadata=nested(AuthFailuresConfig)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class GeoIpConfig:
    """``geoip``: the MaxMind DB file client addresses are located with."""

    database: str = field(metadata=checked(mmdb_file))


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheConfig:
    """The response cache's stores (the top-level ``cache``); routes opt in.

    ``memory_bytes`` bounds the in-process cache (L1, least recently used out first);
    ``max_entry_bytes`` is the largest answer stored. With ``shared`` and
    ``state.store: redis`` entries also go to Redis (L2), where every instance finds
    them and identical requests coalesce across instances, a waiter waiting at most
    ``coalesce_wait`` seconds. ``model_list_ttl`` keeps each provider's model list that
    long (0: asked every time).
    """

    memory_bytes: int = field(
        default=DEFAULT_CACHE_MEMORY_BYTES, metadata=checked(checks.positive_int)
    )
    max_entry_bytes: int = field(
        default=DEFAULT_CACHE_MAX_ENTRY_BYTES,
        metadata=checked(checks.positive_int, at_most="memory_bytes"),
    )
    shared: bool = field(default=True, metadata=checked(checks.boolean))
    coalesce_wait: float = field(default=30.0, metadata=checked(checks.positive_number))
    model_list_ttl: float = field(default=0.0, metadata=checked(checks.non_negative_number))


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    """Requests arriving on ``api`` whose model matches ``models`` (globs) go to ``targets``.

    ``strategy: ordered`` tries the targets in order (the first available one serves,
    the next ones are the fallback); ``weighted`` picks the first target by weight and
    falls back to the others in order. A target whose provider type differs from ``api``
    is reached by translation (Chat Completions <-> Messages only), with ``strict``,
    ``default_max_tokens`` and ``anthropic_version`` governing it.
    """

    api: ApiFamily = field(metadata=checked(checks.api_family))
    # How /admin/cache/purge names the route; unique. Default: routes[INDEX].
    name: str | None = field(default=None, metadata=checked(checks.name))
    # None matches every model (and model-less calls).
    models: tuple[str, ...] | None = field(default=None, metadata=checked(checks.globs))
    strategy: str = field(
        default="ordered", metadata=checked(checks.choice("ordered", "weighted"))
    )
    # From ``targets``, or ``provider: NAME``, short for ``targets: [{provider: NAME}]``.
    targets: tuple[RouteTargetConfig, ...] = field(metadata=hooked("provider", "targets"))
    strict: bool = field(default=False, metadata=checked(checks.boolean))
    default_max_tokens: int = field(
        default=DEFAULT_MAX_TOKENS, metadata=checked(checks.positive_int)
    )
    anthropic_version: str = field(
        default=DEFAULT_ANTHROPIC_VERSION, metadata=checked(checks.anthropic_version)
    )
    cache: RouteCacheConfig | None = field(default=None, metadata=nested(RouteCacheConfig))
    affinity: RouteAffinityConfig = field(
        default=RouteAffinityConfig(), metadata=nested(RouteAffinityConfig)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleMatchConfig:
    """``rules[].match``: a regular expression searched in the request's text."""

    pattern: str = field(metadata=checked(rule_pattern))
    # prompt: the conversation's messages; system: the system prompt; any: both.
    where: str = field(default="any", metadata=checked(checks.choice("prompt", "system", "any")))
    case: str = field(
        default="insensitive", metadata=checked(checks.choice("insensitive", "sensitive"))
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleConfig:
    """A content rule (``rules[]``): see docs/security.md. ``deny`` refuses a matching
    request with 403 before any upstream contact; ``flag`` lets it through marked.
    ``clients`` and ``routes`` (names; a route without ``name`` is ``routes[INDEX]``)
    narrow where it applies; absent, everywhere."""

    name: str = field(metadata=checked(checks.name))
    match: RuleMatchConfig = field(metadata=nested(RuleMatchConfig))
    action: str = field(default="deny", metadata=checked(checks.choice("deny", "flag")))
    clients: tuple[str, ...] | None = field(default=None, metadata=checked(checks.names))
    routes: tuple[str, ...] | None = field(default=None, metadata=checked(checks.names))


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """A whole validated configuration file."""

    listen: tuple[ListenerConfig, ...] = field(metadata=hooked())  # default: one listener
    admin: AdminConfig | None = field(default=None, metadata=hooked())  # after listen
    max_body_bytes: int = field(
        default=DEFAULT_MAX_BODY_BYTES, metadata=checked(checks.positive_int)
    )
    shutdown_timeout: float = field(default=30.0, metadata=checked(checks.positive_number))
    # Worker processes serving the listeners (relayd.workers); 0 is auto (one per CPU).
    workers: int = field(default=1, metadata=checked(checks.worker_count))
    # A request that finds every backend it may use at its max_concurrent waits up to
    # queue_timeout seconds for a free slot; at most max_queued requests wait at once.
    queue_timeout: float = field(default=30.0, metadata=checked(checks.non_negative_number))
    max_queued: int = field(default=1000, metadata=checked(checks.non_negative_int))
    connections: ConnectionsConfig = field(
        default=ConnectionsConfig(), metadata=nested(ConnectionsConfig)
    )
    # A client's end-of-file while its request is served: "cancel" (it is gone) or
    # "answer" (a half-close: answer, then close). See relayd.http.channel.
    half_close: str = field(default="cancel", metadata=checked(checks.choice("cancel", "answer")))
    # Client headers forwarded upstream besides each API's allow list (names or globs).
    forward_headers: tuple[str, ...] = field(default=(), metadata=checked(checks.header_globs))
    # During upstream silence on an SSE answer, an SSE comment every this many seconds
    # keeps proxies in front from closing the connection as idle; 0 turns it off.
    stream_keepalive: float = field(default=15.0, metadata=checked(checks.non_negative_number))
    # Peers whose X-Forwarded-For is believed (relayd.client_address); default none.
    trusted_proxies: tuple[Network, ...] = field(default=(), metadata=checked(networks))
    geoip: GeoIpConfig | None = field(default=None, metadata=nested(GeoIpConfig))
    edge: EdgeConfig = field(default=EdgeConfig(), metadata=nested(EdgeConfig))
    # The top level of the settings providers and backends inherit.
    timeouts: TimeoutsConfig = field(default=TimeoutsConfig(), metadata=nested(TimeoutsConfig))
    pool: PoolConfig = field(default=PoolConfig(), metadata=nested(PoolConfig))
    health: HealthCheckConfig = field(
        default=HealthCheckConfig(), metadata=nested(HealthCheckConfig)
    )
    breaker: BreakerConfig = field(default=BreakerConfig(), metadata=nested(BreakerConfig))
    failover: FailoverConfig = field(default=FailoverConfig(), metadata=nested(FailoverConfig))
    state: StateConfig = field(default=StateConfig(), metadata=hooked())
    cache: CacheConfig = field(default=CacheConfig(), metadata=nested(CacheConfig))
    clients: tuple[ClientConfig, ...] = field(default=(), metadata=hooked())
    providers: tuple[ProviderConfig, ...] = field(default=(), metadata=hooked())
    routes: tuple[RouteConfig, ...] = field(default=(), metadata=hooked())  # after providers
    rules: tuple[RuleConfig, ...] = field(default=(), metadata=hooked())  # after routes
    source: str = "<defaults>"
