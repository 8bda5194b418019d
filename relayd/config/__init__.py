"""relayd's configuration: the YAML loader and the frozen model it produces."""

from relayd.config.loader import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    ConfigErrors,
    load_config,
    parse_config,
)
from relayd.config.model import (
    DEFAULT_LISTEN_ADDRESS,
    DEFAULT_MAX_BODY_BYTES,
    ApiFamily,
    BackendConfig,
    ClientConfig,
    Config,
    ListenerConfig,
    PoolConfig,
    ProviderConfig,
    RouteConfig,
    TimeoutsConfig,
    TlsConfig,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_LISTEN_ADDRESS",
    "DEFAULT_MAX_BODY_BYTES",
    "ApiFamily",
    "BackendConfig",
    "ClientConfig",
    "Config",
    "ConfigError",
    "ConfigErrors",
    "ListenerConfig",
    "PoolConfig",
    "ProviderConfig",
    "RouteConfig",
    "TimeoutsConfig",
    "TlsConfig",
    "load_config",
    "parse_config",
]
