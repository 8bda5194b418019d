"""The validated configuration: immutable snapshots built by :mod:`relayd.config.loader`.

Every object here is frozen. Runtime objects (pools, routers, listeners) are built from a
snapshot by :mod:`relayd.runtime`; nothing on the request path reads YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# An API family is the name of a provider module registered in relayd.providers.
ApiFamily = str

DEFAULT_LISTEN_ADDRESS = "127.0.0.1:8080"
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024


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


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """A relay client: who may call, identified by the SHA-256 digest of its relay key."""

    name: str
    key_sha256: bytes  # 32 raw bytes, decoded from the hex in the file
    models: tuple[str, ...] | None = None  # glob allowlist; None means every model


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
class BackendConfig:
    """One upstream endpoint of a provider (an account, a region, a gateway)."""

    name: str
    url: str  # scheme://host[:port][/prefix], no trailing slash
    api_key: str = field(repr=False)
    weight: int = 1
    max_concurrent: int = 256
    pool: PoolConfig = PoolConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()  # effective: global < provider < backend


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """A named group of backends speaking one upstream API (``type``)."""

    name: str
    type: ApiFamily
    backends: tuple[BackendConfig, ...]


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Requests arriving on ``api`` whose model matches ``models`` (globs) go to ``provider``."""

    api: ApiFamily
    provider: str
    models: tuple[str, ...] | None = None  # None matches every model (and model-less calls)


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
    source: str = "<defaults>"
