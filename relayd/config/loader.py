"""Read and validate the YAML configuration into the frozen objects of :mod:`.model`.

The loader is deliberately strict: unknown keys, wrong types (a boolean is never a
number), ``null`` values and dangling references are all errors, because a typo in a
relay's configuration should stop it at startup (or at ``relayd-checkconfig``), not
silently widen access or route traffic somewhere unexpected.

Every problem is collected before anything is raised, so one run reports them all.
Error messages name the offending key by its path (``providers[0].backends[1].weight``)
and never quote a secret: API keys, key and token file contents and environment values
stay out.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import SplitResult, urlsplit

import yaml

from relayd.config.model import (
    DEFAULT_ANTHROPIC_VERSION,
    DEFAULT_BACKLOG,
    DEFAULT_LISTEN_ADDRESS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_TOKENS,
    AdminConfig,
    ApiFamily,
    BackendConfig,
    BreakerConfig,
    ClientConfig,
    ClientLimitsConfig,
    Config,
    ConnectionsConfig,
    FailoverConfig,
    HealthCheckConfig,
    ListenerConfig,
    PoolConfig,
    ProviderConfig,
    RouteConfig,
    RouteTargetConfig,
    StateConfig,
    TimeoutsConfig,
    TlsConfig,
    UpstreamLimitsConfig,
)
from relayd.providers import PROVIDERS

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ROOT_PATH",
    "ConfigError",
    "ConfigErrors",
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG_PATH = "/etc/relayd.yaml"
ROOT_PATH = "(top level)"  # the error path used for the document itself

_ROOT_KEYS = (
    "listen",
    "admin",
    "max_body_bytes",
    "shutdown_timeout",
    "queue_timeout",
    "max_queued",
    "stream_keepalive",
    "forward_headers",
    "half_close",
    "connections",
    "timeouts",
    "pool",
    "health",
    "breaker",
    "failover",
    "state",
    "clients",
    "providers",
    "routes",
)
_LISTENER_KEYS = ("address", "tls", "backlog")
_CONNECTIONS_KEYS = ("max", "per_address", "head_timeout", "body_timeout", "idle_timeout")
_MAX_BACKLOG = 65535  # the kernel's own limit for a listen() backlog
_TLS_KEYS = ("certificate", "private_key")
_ADMIN_KEYS = ("address", "token_file")
_TIMEOUT_KEYS = ("connect", "first_byte", "idle", "total")
_POOL_KEYS = ("max_idle_connections", "idle_timeout")
_HEALTH_KEYS = ("enabled", "path", "interval", "timeout", "unhealthy_after", "healthy_after")
_BREAKER_KEYS = ("window", "failures", "cooldown", "max_cooldown", "half_open_requests")
_FAILOVER_KEYS = (
    "max_attempts",
    "retry_budget_ratio",
    "retry_budget_min_per_second",
    "max_replay_bytes",
    "max_retry_after",
)
_CLIENT_KEYS = ("name", "key_sha256", "models", "limits")
_CLIENT_LIMIT_KEYS = (
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent",
    "tokens_per_day",
    "tokens_per_month",
    "reserve_output_tokens",
)
_UPSTREAM_LIMIT_KEYS = ("requests_per_minute", "tokens_per_minute", "per")
_STATE_KEYS = (
    "store",
    "url",
    "password_file",
    "ca_file",
    "timeout",
    "key_prefix",
    "on_store_failure",
    "fallback_instances",
)
_STATE_STORES = ("memory", "redis")
_STORE_FAILURE_MODES = ("open", "closed")
_KEY_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:-]+")
_PROVIDER_KEYS = ("name", "type", "timeouts", "pool", "health", "breaker", "backends")
_KEY_SOURCES = ("api_key", "api_key_env", "api_key_file")  # one key (also in api_keys items)
_BACKEND_KEY_SOURCES = (*_KEY_SOURCES, "api_keys")
_BACKEND_KEYS = (
    "name",
    "url",
    *_BACKEND_KEY_SOURCES,
    "weight",
    "priority",
    "max_concurrent",
    "timeouts",
    "pool",
    "health",
    "breaker",
    "limits",
    "organization",
    "project",
)
_ROUTE_KEYS = (
    "api",
    "models",
    "provider",
    "targets",
    "strategy",
    "strict",
    "default_max_tokens",
    "anthropic_version",
)
_TARGET_KEYS = ("provider", "model", "weight")
_ANTHROPIC_VERSION_RE = re.compile(r"\d{4}-\d{2}-\d{2}")

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_HEADER_GLOB_RE = re.compile(r"[A-Za-z0-9*?_.-]+")
_HEX_DIGEST_RE = re.compile(r"[0-9A-Fa-f]{64}")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_UNSAFE_CHAR_RE = re.compile(r"[\x00-\x20\x7f]")  # whitespace and control characters

# Key and token files are tiny; the cap keeps a mistaken path such as /dev/zero from
# hanging startup.
_MAX_KEY_FILE_BYTES = 64 * 1024

_MAX_ATTEMPTS_LIMIT = 10  # failover.max_attempts, the first attempt included

# Defaults come from the model so there is a single source of truth.
_BACKEND_DEFAULTS = BackendConfig(name="", url="")
_CONFIG_DEFAULTS = Config(listen=())

_T = TypeVar("_T")
_Check = Callable[[object, str], _T | None]


@dataclass(frozen=True, slots=True)
class _Levels:
    """What a provider or backend inherits from the level above.

    Each section is merged field by field: top level < provider < backend.
    """

    timeouts: TimeoutsConfig
    pool: PoolConfig
    health: HealthCheckConfig
    breaker: BreakerConfig


class ConfigError(Exception):
    """One problem in the configuration, located by its key path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(path, message)
        self.path = path
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigErrors(Exception):  # noqa: N818 (the public name is part of the API)
    """Every problem found in one configuration; ``str()`` lists one per line."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors: list[ConfigError] = list(errors)
        super().__init__(self.errors)

    def __str__(self) -> str:
        return "\n".join(str(error) for error in self.errors)


def load_config(path: str, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate the YAML file at ``path``.

    Relative paths inside the file (TLS, API key and admin token files) are resolved against the
    file's own directory. Raises :class:`ConfigErrors` for an unreadable file, a YAML
    syntax error or any validation problem.
    """
    data = _read_yaml(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    return parse_config(data, source=path, environ=environ, base_dir=base_dir)


def parse_config(
    data: object,
    *,
    source: str = "<memory>",
    environ: Mapping[str, str] | None = None,
    base_dir: str | None = None,
) -> Config:
    """Validate already-parsed YAML ``data`` and build a :class:`Config`.

    ``environ`` supplies ``api_key_env`` variables (default: ``os.environ``);
    ``base_dir`` anchors relative paths (default: the current directory).
    ``None`` (an empty document) gives the defaults.
    """
    parser = _Parser(
        environ=os.environ if environ is None else environ,
        base_dir=os.path.abspath(os.getcwd() if base_dir is None else base_dir),
    )
    config = parser.parse(data, source)
    if parser.errors:
        raise ConfigErrors(parser.errors)
    return config


def _read_yaml(path: str) -> object:
    """Load ``path`` with ``yaml.safe_load``, turning I/O and syntax errors into ConfigErrors."""
    try:
        with open(path, "rb") as stream:
            raw = stream.read()
    except (OSError, ValueError) as exc:
        raise ConfigErrors([ConfigError(path, f"cannot read file: {_os_reason(exc)}")]) from exc
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigErrors([_yaml_error(path, exc)]) from exc
    except (ValueError, RecursionError) as exc:  # e.g. an integer too long to convert
        message = f"cannot be loaded as YAML ({type(exc).__name__})"
        raise ConfigErrors([ConfigError(path, message)]) from exc


def _yaml_error(path: str, exc: yaml.YAMLError) -> ConfigError:
    """Describe a YAML error by file, line and column, without quoting the file's text.

    PyYAML's own ``str()`` includes a snippet of the offending line, which may hold a
    secret, so only the problem and context descriptions are kept.
    """
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = path if mark is None else f"{path}:{_mark_text(mark, ':')}"
        parts = [exc.problem or "invalid YAML"]
        if exc.context:
            since = exc.context_mark
            started = "" if since is None else f" at line {_mark_text(since, ', column ')}"
            parts.append(f"({exc.context}{started})")
        return ConfigError(where, "YAML syntax error: " + " ".join(parts))
    if isinstance(exc, yaml.reader.ReaderError):
        if exc.encoding == "unicode":  # PyYAML's marker for a non-printable character
            return ConfigError(path, f"contains a control character (character {exc.position})")
        return ConfigError(path, f"not valid {exc.encoding} text (byte {exc.position})")
    return ConfigError(path, f"invalid YAML ({type(exc).__name__})")


def _mark_text(mark: yaml.Mark, separator: str) -> str:
    """A YAML position as 1-based ``line<separator>column``."""
    return f"{mark.line + 1}{separator}{mark.column + 1}"


def _os_reason(exc: OSError | ValueError) -> str:
    """Why a file could not be opened, without repeating its name.

    ``open`` raises ValueError for a path containing a NUL character.
    """
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return "invalid path" if isinstance(exc, ValueError) else type(exc).__name__


def _key_path(path: str, key: object) -> str:
    """The path of ``key`` inside the mapping at ``path`` ("" is the document)."""
    return f"{path}.{key}" if path else str(key)


def _item_path(path: str, index: int) -> str:
    """The path of item ``index`` of the list at ``path``."""
    return f"{path}[{index}]"


def _type_name(value: object) -> str:
    """A YAML-flavoured name for the type of ``value``, used in type errors."""
    if value is None:
        return "null"
    names: tuple[tuple[type, str], ...] = (
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        (list, "list"),
        (dict, "mapping"),
    )
    for kind, name in names:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _plain_number(value: object) -> bool:
    """True for ints and floats; bools are ints to Python but never numbers here."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_float(value: object) -> float | None:
    """``value`` as a float if it is a plain number (an overflowing int becomes inf)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _normalized_host(host: str) -> str:
    """A canonical spelling of a listener host, for spotting duplicate listeners."""
    if host == "localhost":
        return host
    return str(ipaddress.ip_address(host))


def _split_address(address: str) -> tuple[str, str] | str:
    """Split ``host:port`` or ``[v6]:port`` into its parts, or return what is wrong."""
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
        if not sep:
            return 'must be "host:port" or "[ipv6]:port"'
        if not _is_ipv6(host):
            return "only an IPv6 address may be written in brackets"
        return host, port
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        return 'must be "host:port" or "[ipv6]:port"'
    if ":" in host:
        return 'an IPv6 address must be written in brackets, as in "[::1]:8080"'
    if host != "localhost" and not _is_ip(host):
        return 'host must be an IP address or "localhost"'
    return host, port


def _is_ip(host: str) -> bool:
    """True if ``host`` is an IPv4 or IPv6 literal."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_ipv6(host: str) -> bool:
    """True if ``host`` is an IPv6 literal."""
    return _is_ip(host) and ipaddress.ip_address(host).version == 6


def _parse_port(text: str) -> int | None:
    """The port number in ``text`` if it is a decimal from 0 to 65535."""
    if not _PORT_RE.fullmatch(text):
        return None
    port = int(text)
    return port if port <= 65535 else None


def _url_problem(url: str) -> str | None:
    """What is wrong with a backend URL, or None. Never quotes the URL (it may hold a secret)."""
    if _UNSAFE_CHAR_RE.search(url):
        return "must not contain whitespace or control characters"
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return "is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if "@" in parts.netloc:
        return (
            "must not contain user info (put credentials in api_key, api_key_env or api_key_file)"
        )
    problems = (
        (not parts.hostname, "must include a host"),
        (not _valid_port(parts), "has an invalid port"),
        ("#" in url, "must not contain a fragment (#...)"),
        ("?" in url, "must not contain a query string (?...)"),
    )
    return next((message for failed, message in problems if failed), None)


def _valid_port(parts: SplitResult) -> bool:
    """An absent port, or one from 1 to 65535 (an upstream cannot listen on port 0)."""
    try:
        port = parts.port
    except ValueError:  # not a number, or above 65535
        return False
    return port is None or port > 0


def _normalize_url(url: str) -> str:
    """Lower-case the scheme and drop trailing slashes; the path prefix is kept."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


class _Parser:
    """Walks the parsed YAML, records every error, and builds the model objects.

    Each ``check``-style method takes ``(value, path)`` and returns the validated value,
    or None after recording an error, so callers can carry on and find more problems.
    """

    def __init__(self, *, environ: Mapping[str, str], base_dir: str) -> None:
        self.environ = environ
        self.base_dir = base_dir
        self.errors: list[ConfigError] = []
        # Provider name -> type (None if the type was invalid); None if the providers
        # section itself is unusable, in which case route references are not checked.
        self.provider_types: dict[str, ApiFamily | None] | None = {}
        # (normalized host, port) of every valid listener -> its path, for admin.address.
        self.listen_addresses: dict[tuple[str, int], str] = {}

    def error(self, path: str, message: str) -> None:
        """Record one problem."""
        self.errors.append(ConfigError(path or ROOT_PATH, message))

    # -- the document ---------------------------------------------------------------

    def parse(self, data: object, source: str) -> Config:
        """Build the whole Config (meaningful only if no error was recorded)."""
        fields = self.mapping({} if data is None else data, "", _ROOT_KEYS)
        if fields is None:
            return Config(listen=(), source=source)
        listen = self.listeners(fields.get("listen"), "listen", "listen" in fields)
        admin = self.admin(fields["admin"], "admin") if "admin" in fields else None
        max_body = self.optional(
            fields, "max_body_bytes", "", self.positive_int, DEFAULT_MAX_BODY_BYTES
        )
        shutdown_timeout = self.optional(
            fields, "shutdown_timeout", "", self.positive_number, _CONFIG_DEFAULTS.shutdown_timeout
        )
        queue_timeout = self.optional(
            fields, "queue_timeout", "", self.non_negative_number, _CONFIG_DEFAULTS.queue_timeout
        )
        max_queued = self.optional(
            fields, "max_queued", "", self.non_negative_int, _CONFIG_DEFAULTS.max_queued
        )
        connections = (
            self.connections(fields["connections"], "connections")
            if "connections" in fields
            else ConnectionsConfig()
        )
        half_close = self.optional(
            fields, "half_close", "", self.choice(("cancel", "answer")),
            _CONFIG_DEFAULTS.half_close,
        )
        forward_headers = (
            self.header_globs(fields["forward_headers"], "forward_headers")
            if "forward_headers" in fields
            else ()
        )
        stream_keepalive = self.optional(
            fields,
            "stream_keepalive",
            "",
            self.non_negative_number,
            _CONFIG_DEFAULTS.stream_keepalive,
        )
        defaults = _Levels(
            timeouts=self.timeouts_in(fields, "", TimeoutsConfig()),
            pool=self.pool_in(fields, "", PoolConfig()),
            health=self.health_in(fields, "", HealthCheckConfig()),
            breaker=self.breaker_in(fields, "", BreakerConfig()),
        )
        failover = (
            self.failover(fields["failover"], "failover")
            if "failover" in fields
            else FailoverConfig()
        )
        state = self.state(fields["state"], "state") if "state" in fields else StateConfig()
        clients = self.clients(fields.get("clients", []), "clients")
        providers = self.providers(fields.get("providers", []), "providers", defaults)
        routes = self.routes(fields.get("routes", []), "routes")
        return Config(
            listen=listen,
            clients=clients,
            providers=providers,
            routes=routes,
            max_body_bytes=max_body,
            timeouts=defaults.timeouts,
            pool=defaults.pool,
            health=defaults.health,
            breaker=defaults.breaker,
            failover=failover,
            admin=admin,
            state=state,
            shutdown_timeout=shutdown_timeout,
            queue_timeout=queue_timeout,
            max_queued=max_queued,
            stream_keepalive=stream_keepalive,
            forward_headers=forward_headers,
            half_close=half_close,
            connections=connections,
            source=source,
        )

    # -- generic checks ---------------------------------------------------------------

    def mapping(self, value: object, path: str, allowed: Sequence[str]) -> dict[str, object] | None:
        """``value`` as a mapping whose keys are all in ``allowed``; unknown keys are errors."""
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, got {_type_name(value)}")
            return None
        fields: dict[str, object] = {}
        for key, item in value.items():
            if isinstance(key, str) and key in allowed:
                fields[key] = item
            else:
                self.error(_key_path(path, key), "unknown key")
        return fields

    def items(self, value: object, path: str, *, empty: str | None) -> list[tuple[str, object]]:
        """The ``(path, item)`` pairs of a list; ``empty`` is the error for an empty list."""
        if not isinstance(value, list):
            self.error(path, f"must be a list, got {_type_name(value)}")
            return []
        if not value and empty is not None:
            self.error(path, empty)
        return [(_item_path(path, index), item) for index, item in enumerate(value)]

    def required(
        self, fields: Mapping[str, object], key: str, path: str, check: _Check[_T]
    ) -> _T | None:
        """Check a key that must be present; a missing key is an error."""
        if key not in fields:
            self.error(_key_path(path, key), "is required")
            return None
        return check(fields[key], _key_path(path, key))

    def optional(
        self,
        fields: Mapping[str, object],
        key: str,
        path: str,
        check: _Check[_T],
        default: _T,
    ) -> _T:
        """Check a key that may be left out; ``default`` stands in if absent or invalid."""
        if key not in fields:
            return default
        result = check(fields[key], _key_path(path, key))
        return default if result is None else result

    def string(self, value: object, path: str) -> str | None:
        """A non-empty string."""
        if not isinstance(value, str):
            self.error(path, f"must be a string, got {_type_name(value)}")
            return None
        if not value.strip():
            self.error(path, "must not be empty")
            return None
        return value

    def name(self, value: object, path: str) -> str | None:
        """An identifier: letters, digits, ``_``, ``.`` and ``-``."""
        text = self.string(value, path)
        if text is not None and not _NAME_RE.fullmatch(text):
            self.error(path, "must contain only letters, digits, '_', '.' and '-'")
            return None
        return text

    def positive_int(self, value: object, path: str) -> int | None:
        """An integer above zero (booleans and floats are refused)."""
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            self.error(path, f"must be a positive integer, got {self.describe_number(value)}")
            return None
        return value

    def positive_number(self, value: object, path: str) -> float | None:
        """A finite int or float above zero (booleans are refused)."""
        number = _as_float(value)
        if number is None or not 0 < number < math.inf:
            self.error(path, f"must be a positive number, got {self.describe_number(value)}")
            return None
        return number

    def non_negative_int(self, value: object, path: str) -> int | None:
        """An integer of zero or more (booleans and floats are refused)."""
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            self.error(path, f"must be a non-negative integer, got {self.describe_number(value)}")
            return None
        return value

    def non_negative_number(self, value: object, path: str) -> float | None:
        """A finite int or float of zero or more (booleans are refused)."""
        number = _as_float(value)
        if number is None or not 0 <= number < math.inf:
            self.error(path, f"must be a non-negative number, got {self.describe_number(value)}")
            return None
        return number

    def int_between(self, low: int, high: int) -> _Check[int]:
        """A check for an integer from ``low`` to ``high`` inclusive."""

        def check(value: object, path: str) -> int | None:
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                shown = self.describe_number(value)
                self.error(path, f"must be an integer from {low} to {high}, got {shown}")
                return None
            return value

        return check

    def fraction(self, value: object, path: str) -> float | None:
        """An int or float from 0 to 1 inclusive (booleans are refused)."""
        number = _as_float(value)
        if number is None or not 0 <= number <= 1:
            self.error(path, f"must be a number from 0 to 1, got {self.describe_number(value)}")
            return None
        return number

    def boolean(self, value: object, path: str) -> bool | None:
        """A YAML boolean (``true``/``false``); strings and numbers are refused."""
        if not isinstance(value, bool):
            self.error(path, f"must be true or false, got {_type_name(value)}")
            return None
        return value

    def check_not_above(
        self,
        fields: Mapping[str, object],
        path: str,
        low: tuple[str, float],
        high: tuple[str, float],
    ) -> None:
        """The merged value of key ``low[0]`` must not exceed that of key ``high[0]``.

        Used after merging one level of ``health``/``breaker``: the error is reported
        only if this level sets one of the two keys (at ``low``'s key if it sets it),
        so a problem inherited from an upper level is reported once, up there.
        """
        (low_key, low_value), (high_key, high_value) = low, high
        if low_value <= high_value:
            return
        if low_key in fields:
            self.error(_key_path(path, low_key), f"must not exceed {high_key} ({high_value!r})")
        elif high_key in fields:
            self.error(_key_path(path, high_key), f"must not be below {low_key} ({low_value!r})")

    @staticmethod
    def describe_number(value: object) -> str:
        """Numbers are not secret, so show them; anything else only by type."""
        return repr(value) if _plain_number(value) else _type_name(value)

    def api_family(self, value: object, path: str) -> ApiFamily | None:
        """The name of a registered provider module (``relayd.providers.PROVIDERS``)."""
        if isinstance(value, str) and value in PROVIDERS:
            return value
        shown = repr(value) if isinstance(value, str) else _type_name(value)
        self.error(path, f"must be one of {', '.join(PROVIDERS)}, got {shown}")
        return None

    def globs(self, value: object, path: str) -> tuple[str, ...] | None:
        """A non-empty list of non-empty model names or fnmatch globs."""
        pairs = self.items(
            value,
            path,
            empty="must list at least one model name or glob (leave the key out for all)",
        )
        if not pairs:
            return None
        patterns = [self.string(item, item_path) for item_path, item in pairs]
        valid = [pattern for pattern in patterns if pattern is not None]
        return tuple(valid) if len(valid) == len(patterns) else None

    def connections(self, value: object, path: str) -> ConnectionsConfig:
        """The ``connections`` section; every key is optional."""
        base = ConnectionsConfig()
        fields = self.mapping(value, path, _CONNECTIONS_KEYS)
        if fields is None:
            return base
        limit = base.max
        given = fields.get("max", "auto")
        if given != "auto":
            if isinstance(given, int) and not isinstance(given, bool) and given > 0:
                limit = given
            else:
                self.error(
                    _key_path(path, "max"),
                    f"must be auto or a positive integer, got {self.describe_number(given)}",
                )
        return ConnectionsConfig(
            max=limit,
            per_address=self.optional(fields, "per_address", path, self.positive_int, None),
            head_timeout=self.optional(
                fields, "head_timeout", path, self.positive_number, base.head_timeout
            ),
            body_timeout=self.optional(
                fields, "body_timeout", path, self.positive_number, base.body_timeout
            ),
            idle_timeout=self.optional(
                fields, "idle_timeout", path, self.positive_number, base.idle_timeout
            ),
        )

    def header_globs(self, value: object, path: str) -> tuple[str, ...]:
        """A list of header names or globs (``x-fake-*``)."""
        pairs = self.items(value, path, empty=None)
        globs = []
        for item_path, item in pairs:
            glob = self.string(item, item_path)
            if glob is None:
                continue
            if not _HEADER_GLOB_RE.fullmatch(glob):
                self.error(item_path, "must be a header name or a glob of one (letters, "
                           "digits, - _ . and the wildcards * ?)")
                continue
            globs.append(glob.lower())
        return tuple(globs)

    def header_value(self, value: object, path: str) -> str | None:
        """A non-empty string usable as an HTTP header value (no whitespace or controls)."""
        text = self.string(value, path)
        if text is not None and _UNSAFE_CHAR_RE.search(text):
            self.error(path, "must not contain whitespace or control characters")
            return None
        return text

    def optional_globs(self, fields: Mapping[str, object], path: str) -> tuple[str, ...] | None:
        """The optional ``models`` key of ``fields``; absent means every model."""
        if "models" not in fields:
            return None
        return self.globs(fields["models"], _key_path(path, "models"))

    def unique(self, name: str | None, path: str, seen: dict[str, str], what: str) -> None:
        """Record ``name`` at ``path``; a name already seen is an error at this path."""
        if name is None:
            return
        if name in seen:
            self.error(path, f"duplicate {what} name {name!r} (first used at {seen[name]})")
        else:
            seen[name] = path

    def local_path(self, value: object, path: str) -> str | None:
        """A filesystem path, made absolute against the configuration's directory."""
        text = self.string(value, path)
        if text is None:
            return None
        return os.path.normpath(os.path.join(self.base_dir, text))

    # -- listeners --------------------------------------------------------------------

    def listeners(self, value: object, path: str, given: bool) -> tuple[ListenerConfig, ...]:
        """The ``listen`` list (one default listener if the key is absent)."""
        if not given:
            value = [{"address": DEFAULT_LISTEN_ADDRESS}]
        pairs = self.items(value, path, empty="must contain at least one listener")
        seen = self.listen_addresses
        listeners = [self.listener(item, item_path, seen) for item_path, item in pairs]
        return tuple(listener for listener in listeners if listener is not None)

    def listener(
        self, value: object, path: str, seen: dict[tuple[str, int], str]
    ) -> ListenerConfig | None:
        """One ``listen`` entry: an address (unique in ``seen``) and optional TLS files."""
        fields = self.mapping(value, path, _LISTENER_KEYS)
        if fields is None:
            return None
        address = self.required(fields, "address", path, self.address)
        if address is not None:
            self.check_listener_unique(address[1], address[2], path, seen)
        tls = self.tls(fields["tls"], _key_path(path, "tls")) if "tls" in fields else None
        backlog = self.optional(
            fields, "backlog", path, self.int_between(1, _MAX_BACKLOG), DEFAULT_BACKLOG
        )
        if address is None or ("tls" in fields and tls is None):
            return None
        text, host, port = address
        return ListenerConfig(address=text, host=host, port=port, tls=tls, backlog=backlog)

    def address(self, value: object, path: str) -> tuple[str, str, int] | None:
        """``host:port`` or ``[v6]:port`` as ``(text, host, port)``."""
        if not isinstance(value, str):
            self.error(path, f'must be a string such as "127.0.0.1:8080", got {_type_name(value)}')
            return None
        split = _split_address(value)
        if isinstance(split, str):
            self.error(path, split)
            return None
        host, port_text = split
        port = _parse_port(port_text)
        if port is None:
            self.error(path, "port must be a number from 0 to 65535")
            return None
        return value, host, port

    def check_listener_unique(
        self, host: str, port: int, path: str, seen: dict[tuple[str, int], str]
    ) -> None:
        """Two listeners on one host and port cannot both bind (port 0 is always fresh)."""
        if port == 0:
            return
        key = (_normalized_host(host), port)
        if key in seen:
            self.error(_key_path(path, "address"), f"duplicate listener (same as {seen[key]})")
        else:
            seen[key] = path

    def admin(self, value: object, path: str) -> AdminConfig | None:
        """The admin listener: an address no ``listen`` entry uses, and an optional token."""
        fields = self.mapping(value, path, _ADMIN_KEYS)
        if fields is None:
            return None
        address = self.required(fields, "address", path, self.address)
        if address is not None and address[2] != 0:
            first = self.listen_addresses.get((_normalized_host(address[1]), address[2]))
            if first is not None:
                self.error(_key_path(path, "address"), f"already used by {first}")
        token_file: str | None = None
        token: str | None = None
        if "token_file" in fields:
            token_path = _key_path(path, "token_file")
            token_file = self.local_path(fields["token_file"], token_path)
            if token_file is not None:
                token = self.read_secret_file(token_file, token_path, "token", "a token")
            if token is None:
                return None
        if address is None:
            return None
        text, host, port = address
        return AdminConfig(address=text, host=host, port=port, token_file=token_file, token=token)

    def tls(self, value: object, path: str) -> TlsConfig | None:
        """Certificate and private key paths; their existence is checked at startup."""
        fields = self.mapping(value, path, _TLS_KEYS)
        if fields is None:
            return None
        certificate = self.required(fields, "certificate", path, self.local_path)
        private_key = self.required(fields, "private_key", path, self.local_path)
        if certificate is None or private_key is None:
            return None
        return TlsConfig(certificate=certificate, private_key=private_key)

    # -- timeouts and pool ------------------------------------------------------------

    def timeouts_in(
        self, fields: Mapping[str, object], path: str, base: TimeoutsConfig
    ) -> TimeoutsConfig:
        """``base`` overridden by the optional ``timeouts`` key of ``fields``."""
        if "timeouts" not in fields:
            return base
        return self.timeouts(fields["timeouts"], _key_path(path, "timeouts"), base)

    def timeouts(self, value: object, path: str, base: TimeoutsConfig) -> TimeoutsConfig:
        """A partial ``timeouts`` mapping merged field by field over ``base``."""
        fields = self.mapping(value, path, _TIMEOUT_KEYS)
        if fields is None:
            return base
        number = self.positive_number
        return TimeoutsConfig(
            connect=self.optional(fields, "connect", path, number, base.connect),
            first_byte=self.optional(fields, "first_byte", path, number, base.first_byte),
            idle=self.optional(fields, "idle", path, number, base.idle),
            total=self.optional(fields, "total", path, number, base.total),
        )

    def pool_in(self, fields: Mapping[str, object], path: str, base: PoolConfig) -> PoolConfig:
        """``base`` overridden by the optional ``pool`` key of ``fields``."""
        if "pool" not in fields:
            return base
        return self.pool(fields["pool"], _key_path(path, "pool"), base)

    def pool(self, value: object, path: str, base: PoolConfig) -> PoolConfig:
        """A partial ``pool`` mapping merged field by field over ``base``."""
        fields = self.mapping(value, path, _POOL_KEYS)
        if fields is None:
            return base
        return PoolConfig(
            max_idle_connections=self.optional(
                fields, "max_idle_connections", path, self.positive_int, base.max_idle_connections
            ),
            idle_timeout=self.optional(
                fields, "idle_timeout", path, self.positive_number, base.idle_timeout
            ),
        )

    # -- health checks, breaker and failover -------------------------------------------

    def health_in(
        self, fields: Mapping[str, object], path: str, base: HealthCheckConfig
    ) -> HealthCheckConfig:
        """``base`` overridden by the optional ``health`` key of ``fields``."""
        if "health" not in fields:
            return base
        return self.health(fields["health"], _key_path(path, "health"), base)

    def health(self, value: object, path: str, base: HealthCheckConfig) -> HealthCheckConfig:
        """A partial ``health`` mapping merged field by field over ``base``."""
        errors = len(self.errors)
        fields = self.mapping(value, path, _HEALTH_KEYS)
        if fields is None:
            return base
        number, count = self.positive_number, self.positive_int
        merged = HealthCheckConfig(
            enabled=self.optional(fields, "enabled", path, self.boolean, base.enabled),
            path=self.optional(fields, "path", path, self.probe_path, base.path),
            interval=self.optional(fields, "interval", path, number, base.interval),
            timeout=self.optional(fields, "timeout", path, number, base.timeout),
            unhealthy_after=self.optional(
                fields, "unhealthy_after", path, count, base.unhealthy_after
            ),
            healthy_after=self.optional(fields, "healthy_after", path, count, base.healthy_after),
        )
        if len(self.errors) == errors:  # a rejected value would be replaced by base's
            self.check_not_above(
                fields, path, ("timeout", merged.timeout), ("interval", merged.interval)
            )
        return merged

    def probe_path(self, value: object, path: str) -> str | None:
        """An HTTP request path for health probes: starts with ``/``, no whitespace."""
        text = self.string(value, path)
        if text is None:
            return None
        if not text.startswith("/"):
            self.error(path, "must start with '/'")
            return None
        if _UNSAFE_CHAR_RE.search(text):
            self.error(path, "must not contain whitespace or control characters")
            return None
        return text

    def breaker_in(
        self, fields: Mapping[str, object], path: str, base: BreakerConfig
    ) -> BreakerConfig:
        """``base`` overridden by the optional ``breaker`` key of ``fields``."""
        if "breaker" not in fields:
            return base
        return self.breaker(fields["breaker"], _key_path(path, "breaker"), base)

    def breaker(self, value: object, path: str, base: BreakerConfig) -> BreakerConfig:
        """A partial ``breaker`` mapping merged field by field over ``base``."""
        errors = len(self.errors)
        fields = self.mapping(value, path, _BREAKER_KEYS)
        if fields is None:
            return base
        number, count = self.positive_number, self.positive_int
        merged = BreakerConfig(
            window=self.optional(fields, "window", path, count, base.window),
            failures=self.optional(fields, "failures", path, count, base.failures),
            cooldown=self.optional(fields, "cooldown", path, number, base.cooldown),
            max_cooldown=self.optional(fields, "max_cooldown", path, number, base.max_cooldown),
            half_open_requests=self.optional(
                fields, "half_open_requests", path, count, base.half_open_requests
            ),
        )
        if len(self.errors) == errors:  # a rejected value would be replaced by base's
            self.check_not_above(
                fields, path, ("failures", merged.failures), ("window", merged.window)
            )
            self.check_not_above(
                fields, path, ("cooldown", merged.cooldown), ("max_cooldown", merged.max_cooldown)
            )
        return merged

    def failover(self, value: object, path: str) -> FailoverConfig:
        """The top-level ``failover`` mapping; every key is optional."""
        base = FailoverConfig()
        fields = self.mapping(value, path, _FAILOVER_KEYS)
        if fields is None:
            return base
        return FailoverConfig(
            max_attempts=self.optional(
                fields,
                "max_attempts",
                path,
                self.int_between(1, _MAX_ATTEMPTS_LIMIT),
                base.max_attempts,
            ),
            retry_budget_ratio=self.optional(
                fields, "retry_budget_ratio", path, self.fraction, base.retry_budget_ratio
            ),
            retry_budget_min_per_second=self.optional(
                fields,
                "retry_budget_min_per_second",
                path,
                self.non_negative_number,
                base.retry_budget_min_per_second,
            ),
            max_replay_bytes=self.optional(
                fields, "max_replay_bytes", path, self.non_negative_int, base.max_replay_bytes
            ),
            max_retry_after=self.optional(
                fields, "max_retry_after", path, self.positive_number, base.max_retry_after
            ),
        )

    # -- clients ----------------------------------------------------------------------

    def clients(self, value: object, path: str) -> tuple[ClientConfig, ...]:
        """The ``clients`` list; names and key digests must be unique."""
        names: dict[str, str] = {}
        digests: dict[bytes, str] = {}
        pairs = self.items(value, path, empty=None)
        clients = [self.client(item, item_path, names, digests) for item_path, item in pairs]
        return tuple(client for client in clients if client is not None)

    def client(
        self, value: object, path: str, names: dict[str, str], digests: dict[bytes, str]
    ) -> ClientConfig | None:
        """One client: a name, the SHA-256 of its relay key, and an optional model allowlist."""
        fields = self.mapping(value, path, _CLIENT_KEYS)
        if fields is None:
            return None
        name = self.required(fields, "name", path, self.name)
        self.unique(name, _key_path(path, "name"), names, "client")
        digest = self.required(fields, "key_sha256", path, self.key_digest)
        if digest is not None:
            self.check_digest_unique(digest, name, path, digests)
        models = self.optional_globs(fields, path)
        limits = (
            self.client_limits(fields["limits"], _key_path(path, "limits"))
            if "limits" in fields
            else None
        )
        if name is None or digest is None or ("models" in fields and models is None):
            return None
        return ClientConfig(name=name, key_sha256=digest, models=models, limits=limits)

    def client_limits(self, value: object, path: str) -> ClientLimitsConfig | None:
        """A client's policy: every key optional; an empty mapping means no limits."""
        fields = self.mapping(value, path, _CLIENT_LIMIT_KEYS)
        if fields is None:
            return None
        base = ClientLimitsConfig()

        def limit(key: str) -> int | None:
            return self.optional(fields, key, path, self.positive_int, None)

        limits = ClientLimitsConfig(
            requests_per_minute=limit("requests_per_minute"),
            tokens_per_minute=limit("tokens_per_minute"),
            max_concurrent=limit("max_concurrent"),
            tokens_per_day=limit("tokens_per_day"),
            tokens_per_month=limit("tokens_per_month"),
            reserve_output_tokens=self.optional(
                fields,
                "reserve_output_tokens",
                path,
                self.non_negative_int,
                base.reserve_output_tokens,
            ),
        )
        return limits if limits.any() else None

    def upstream_limits(self, value: object, path: str) -> UpstreamLimitsConfig | None:
        """A backend's provider quota (per key or per backend)."""
        fields = self.mapping(value, path, _UPSTREAM_LIMIT_KEYS)
        if fields is None:
            return None
        per = self.optional(fields, "per", path, self.choice(("key", "backend")), "key")
        rpm = self.optional(fields, "requests_per_minute", path, self.positive_int, None)
        tpm = self.optional(fields, "tokens_per_minute", path, self.positive_int, None)
        if rpm is None and tpm is None:
            return None
        return UpstreamLimitsConfig(requests_per_minute=rpm, tokens_per_minute=tpm, per=per)

    def choice(self, options: Sequence[str]) -> _Check[str]:
        """A check for one of ``options``."""

        def check(value: object, path: str) -> str | None:
            if not isinstance(value, str) or value not in options:
                shown = repr(value) if isinstance(value, str) else _type_name(value)
                self.error(path, f"must be one of {', '.join(options)}; got {shown}")
                return None
            return value

        return check

    def state(self, value: object, path: str) -> StateConfig:
        """The ``state`` mapping: the store for limits and usage, and its failure mode."""
        base = StateConfig()
        fields = self.mapping(value, path, _STATE_KEYS)
        if fields is None:
            return base
        store = self.optional(fields, "store", path, self.choice(_STATE_STORES), base.store)
        timeout = self.optional(fields, "timeout", path, self.positive_number, base.timeout)
        prefix = self.optional(fields, "key_prefix", path, self.key_prefix, base.key_prefix)
        mode = self.optional(
            fields,
            "on_store_failure",
            path,
            self.choice(_STORE_FAILURE_MODES),
            base.on_store_failure,
        )
        instances = self.optional(
            fields, "fallback_instances", path, self.positive_int, base.fallback_instances
        )
        common = StateConfig(
            timeout=timeout,
            key_prefix=prefix,
            on_store_failure=mode,
            fallback_instances=instances,
        )
        if store == "memory":
            for key in ("url", "password_file", "ca_file"):
                if key in fields:
                    self.error(_key_path(path, key), "only used with store: redis")
            return common
        if "url" not in fields:
            self.error(_key_path(path, "url"), "required with store: redis")
            return base
        url_path = _key_path(path, "url")
        parsed = self.redis_url(fields["url"], url_path)
        password: str | None = None
        password_file: str | None = None
        if "password_file" in fields:
            file_path = _key_path(path, "password_file")
            password_file = self.local_path(fields["password_file"], file_path)
            if password_file is not None:
                password = self.read_secret_file(password_file, file_path, "password", "a password")
        ca_file = None
        if "ca_file" in fields:
            ca_file = self.local_path(fields["ca_file"], _key_path(path, "ca_file"))
            if parsed is not None and not parsed[4]:
                self.error(_key_path(path, "ca_file"), "only used with a rediss:// url")
        if parsed is None:
            return base
        url, host, port, db, tls, username = parsed
        return dataclasses.replace(
            common,
            store="redis",
            url=url,
            host=host,
            port=port,
            db=db,
            username=username,
            tls=tls,
            ca_file=ca_file,
            password_file=password_file,
            password=password,
        )

    def redis_url(
        self, value: object, path: str
    ) -> tuple[str, str, int, int, bool, str | None] | None:
        """``redis://[user@]host[:port][/db]`` or ``rediss://`` (TLS); no password inside."""
        text = self.string(value, path)
        if text is None:
            return None
        try:
            parts = urlsplit(text)
            port = parts.port or 6379
        except ValueError as exc:
            self.error(path, f"is not a valid URL: {exc}")
            return None
        if parts.scheme not in ("redis", "rediss"):
            self.error(path, "must start with redis:// or rediss:// (TLS)")
            return None
        if parts.password is not None:
            self.error(path, "must not contain a password; put it in state.password_file")
            return None
        if not parts.hostname:
            self.error(path, "must name a host")
            return None
        if parts.query or parts.fragment:
            self.error(path, "must not have a query or fragment")
            return None
        db_text = parts.path.strip("/") or "0"
        if not db_text.isdigit():
            self.error(path, f"database must be a number, got {db_text!r}")
            return None
        shown = f"{parts.scheme}://{parts.netloc}{parts.path}"
        return shown, parts.hostname, port, int(db_text), parts.scheme == "rediss", parts.username

    def key_prefix(self, value: object, path: str) -> str | None:
        """Letters, digits and ``_.:-`` (braces would break the hash tag)."""
        text = self.string(value, path)
        if text is not None and not _KEY_PREFIX_RE.fullmatch(text):
            self.error(path, "must contain only letters, digits, '_', '.', ':' and '-'")
            return None
        return text

    def key_digest(self, value: object, path: str) -> bytes | None:
        """64 hex digits (either case) as 32 raw bytes."""
        if isinstance(value, int) and not isinstance(value, bool):
            self.error(path, "must be a string (quote the hex digest), got integer")
            return None
        if not isinstance(value, str) or not _HEX_DIGEST_RE.fullmatch(value):
            self.error(path, "must be 64 hexadecimal characters (a SHA-256 digest)")
            return None
        return bytes.fromhex(value)

    def check_digest_unique(
        self, digest: bytes, name: str | None, path: str, seen: dict[bytes, str]
    ) -> None:
        """Two clients with one key could not be told apart."""
        first = seen.get(digest)
        if first is None:
            seen[digest] = path if name is None else f"{path} ({name})"
        else:
            self.error(_key_path(path, "key_sha256"), f"same key digest as {first}")

    # -- providers and backends -------------------------------------------------------

    def providers(self, value: object, path: str, inherited: _Levels) -> tuple[ProviderConfig, ...]:
        """The ``providers`` list; names must be unique."""
        if not isinstance(value, list):
            self.provider_types = None
        names: dict[str, str] = {}
        result = []
        for item_path, item in self.items(value, path, empty=None):
            provider = self.provider(item, item_path, names, inherited)
            if provider is not None:
                result.append(provider)
        return tuple(result)

    def provider(
        self, value: object, path: str, names: dict[str, str], inherited: _Levels
    ) -> ProviderConfig | None:
        """One provider: its API type and backends, with optional partial overrides."""
        fields = self.mapping(value, path, _PROVIDER_KEYS)
        if fields is None:
            return None
        name = self.required(fields, "name", path, self.name)
        self.unique(name, _key_path(path, "name"), names, "provider")
        family: ApiFamily | None = self.required(fields, "type", path, self.api_family)
        if name is not None and self.provider_types is not None:
            self.provider_types.setdefault(name, family)
        inherited = self.levels_in(fields, path, inherited)
        backends = self.required(
            fields, "backends", path, lambda v, p: self.backends(v, p, inherited)
        )
        listed = fields.get("backends")
        if family is not None and family != "openai" and isinstance(listed, list):
            for index, item in enumerate(listed):
                for key in ("organization", "project"):
                    if isinstance(item, dict) and key in item:
                        self.error(
                            _key_path(_item_path(_key_path(path, "backends"), index), key),
                            f"only backends of providers of type openai have an {key}",
                        )
        if name is None or family is None or not backends:
            return None
        return ProviderConfig(name=name, type=family, backends=backends)

    def levels_in(self, fields: Mapping[str, object], path: str, base: _Levels) -> _Levels:
        """``base`` with this level's optional timeouts/pool/health/breaker merged in."""
        return _Levels(
            timeouts=self.timeouts_in(fields, path, base.timeouts),
            pool=self.pool_in(fields, path, base.pool),
            health=self.health_in(fields, path, base.health),
            breaker=self.breaker_in(fields, path, base.breaker),
        )

    def backends(
        self, value: object, path: str, inherited: _Levels
    ) -> tuple[BackendConfig, ...] | None:
        """A provider's non-empty backend list; names are unique within the provider."""
        pairs = self.items(value, path, empty="must contain at least one backend")
        names: dict[str, str] = {}
        backends = [self.backend(item, item_path, names, inherited) for item_path, item in pairs]
        valid = [backend for backend in backends if backend is not None]
        return tuple(valid) if valid and len(valid) == len(backends) else None

    def backend(
        self, value: object, path: str, names: dict[str, str], inherited: _Levels
    ) -> BackendConfig | None:
        """One backend: URL, API keys, weight, tier, concurrency cap and effective settings."""
        fields = self.mapping(value, path, _BACKEND_KEYS)
        if fields is None:
            return None
        name = self.required(fields, "name", path, self.name)
        self.unique(name, _key_path(path, "name"), names, "backend")
        url = self.required(fields, "url", path, self.url)
        api_keys = self.backend_keys(fields, path)
        defaults = _BACKEND_DEFAULTS
        weight = self.optional(fields, "weight", path, self.positive_int, defaults.weight)
        priority = self.optional(fields, "priority", path, self.non_negative_int, defaults.priority)
        max_concurrent = self.optional(
            fields, "max_concurrent", path, self.positive_int, defaults.max_concurrent
        )
        effective = self.levels_in(fields, path, inherited)
        organization = self.optional(fields, "organization", path, self.header_value, None)
        project = self.optional(fields, "project", path, self.header_value, None)
        limits = (
            self.upstream_limits(fields["limits"], _key_path(path, "limits"))
            if "limits" in fields
            else None
        )
        if name is None or url is None or api_keys is None:
            return None
        return BackendConfig(
            name=name,
            url=url,
            api_keys=api_keys,
            weight=weight,
            priority=priority,
            max_concurrent=max_concurrent,
            pool=effective.pool,
            timeouts=effective.timeouts,
            health=effective.health,
            breaker=effective.breaker,
            limits=limits,
            organization=organization,
            project=project,
        )

    def url(self, value: object, path: str) -> str | None:
        """An http(s) base URL with a host and an optional path prefix."""
        text = self.string(value, path)
        if text is None:
            return None
        problem = _url_problem(text)
        if problem is not None:
            self.error(path, problem)
            return None
        return _normalize_url(text)

    # -- secrets ----------------------------------------------------------------------

    def backend_keys(self, fields: Mapping[str, object], path: str) -> tuple[str, ...] | None:
        """The backend's API keys: exactly one of api_key, api_key_env, api_key_file (one
        key) or api_keys (a list of such sources)."""
        given = self.one_source(fields, path, _BACKEND_KEY_SOURCES)
        if given is None:
            return None
        if given == "api_keys":
            return self.key_list(fields[given], _key_path(path, given))
        key = self.api_key(given, fields[given], _key_path(path, given))
        return None if key is None else (key,)

    def one_source(
        self, fields: Mapping[str, object], path: str, sources: Sequence[str]
    ) -> str | None:
        """The one key of ``sources`` present in ``fields``; none or several is an error."""
        given = [key for key in sources if key in fields]
        if len(given) != 1:
            found = f" (found {', '.join(given)})" if given else ""
            self.error(path, f"needs exactly one of {', '.join(sources)}{found}")
            return None
        return given[0]

    def key_list(self, value: object, path: str) -> tuple[str, ...] | None:
        """A non-empty ``api_keys`` list of ``{api_key|api_key_env|api_key_file: ...}``
        mappings; the same key twice is an error at the later item."""
        pairs = self.items(value, path, empty="must list at least one key")
        first_seen: dict[str, str] = {}
        keys: list[str | None] = []
        for item_path, item in pairs:
            fields = self.mapping(item, item_path, _KEY_SOURCES)
            given = None if fields is None else self.one_source(fields, item_path, _KEY_SOURCES)
            key = None
            if fields is not None and given is not None:
                key = self.api_key(given, fields[given], _key_path(item_path, given))
            if key is not None and key in first_seen:
                self.error(item_path, f"duplicate API key (same as {first_seen[key]})")
                key = None
            elif key is not None:
                first_seen[key] = item_path
            keys.append(key)
        valid = [key for key in keys if key is not None]
        return tuple(valid) if valid and len(valid) == len(keys) else None

    def api_key(self, source: str, value: object, path: str) -> str | None:
        """One API key from ``source`` (api_key, api_key_env or api_key_file) at ``path``."""
        loaders: dict[str, Callable[[object, str], str | None]] = {
            "api_key": self.literal_key,
            "api_key_env": self.env_key,
            "api_key_file": self.file_key,
        }
        return loaders[source](value, path)

    def literal_key(self, value: object, path: str) -> str | None:
        """A key written inline in the file."""
        if not isinstance(value, str):
            self.error(path, f"must be a string, got {_type_name(value)}")
            return None
        return self.secret(value, path, "the key")

    def env_key(self, value: object, path: str) -> str | None:
        """A key read from the environment variable named by ``value``."""
        variable = self.string(value, path)
        if variable is None:
            return None
        secret = self.environ.get(variable)
        if secret is None:
            self.error(path, f"environment variable {variable} is not set")
            return None
        return self.secret(secret, path, f"environment variable {variable}")

    def file_key(self, value: object, path: str) -> str | None:
        """A key read from the file at ``value`` (relative to the configuration's directory)."""
        key_file = self.local_path(value, path)
        if key_file is None:
            return None
        return self.read_secret_file(key_file, path, "key", "an API key")

    def read_secret_file(self, file: str, path: str, what: str, holds: str) -> str | None:
        """The secret held in ``file`` (a ``what`` file): at most 64 KiB of UTF-8, checked
        by :meth:`secret`. Errors name the file, never its contents."""
        try:
            with open(file, "rb") as stream:
                raw = stream.read(_MAX_KEY_FILE_BYTES + 1)
        except (OSError, ValueError) as exc:
            self.error(path, f"cannot read {what} file {file}: {_os_reason(exc)}")
            return None
        if len(raw) > _MAX_KEY_FILE_BYTES:
            self.error(path, f"{what} file {file} is too large to hold {holds}")
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.error(path, f"{what} file {file} is not valid UTF-8")
            return None
        return self.secret(text, path, f"{what} file {file}")

    def secret(self, value: str, path: str, origin: str) -> str | None:
        """Strip surrounding whitespace; the key must then be non-empty and header-safe.

        ``origin`` describes where the key came from; the key itself is never shown.
        """
        secret = value.strip()
        if not secret:
            self.error(path, f"{origin} is empty")
            return None
        if _UNSAFE_CHAR_RE.search(secret):
            self.error(path, f"{origin} contains whitespace or control characters")
            return None
        return secret

    # -- routes -----------------------------------------------------------------------

    def routes(self, value: object, path: str) -> tuple[RouteConfig, ...]:
        """The ordered ``routes`` list (first match wins)."""
        result = []
        for item_path, item in self.items(value, path, empty=None):
            route = self.route(item, item_path)
            if route is not None:
                result.append(route)
        return tuple(result)

    def route(self, value: object, path: str) -> RouteConfig | None:
        """One route: incoming API, optional model globs, and where requests go.

        ``provider: NAME`` is short for ``targets: [{provider: NAME}]``; exactly one of
        the two must be given.
        """
        fields = self.mapping(value, path, _ROUTE_KEYS)
        if fields is None:
            return None
        api: ApiFamily | None = self.required(fields, "api", path, self.api_family)
        models = self.optional_globs(fields, path)
        strategy = self.optional(
            fields, "strategy", path, self.choice(("ordered", "weighted")), "ordered"
        )
        targets: tuple[RouteTargetConfig, ...] | None = None
        if ("provider" in fields) == ("targets" in fields):
            self.error(path, "needs exactly one of provider or targets")
        elif "provider" in fields:
            provider = self.string(fields["provider"], _key_path(path, "provider"))
            if provider is not None:
                self.check_route_target(provider, _key_path(path, "provider"))
                targets = (RouteTargetConfig(provider),)
        else:
            targets = self.route_targets(fields["targets"], _key_path(path, "targets"), strategy)
        strict = self.optional(fields, "strict", path, self.boolean, False)
        default_max_tokens = self.optional(
            fields, "default_max_tokens", path, self.positive_int, DEFAULT_MAX_TOKENS
        )
        anthropic_version = self.optional(
            fields, "anthropic_version", path, self.anthropic_version, DEFAULT_ANTHROPIC_VERSION
        )
        if api is None or targets is None or ("models" in fields and models is None):
            return None
        return RouteConfig(
            api=api,
            targets=targets,
            models=models,
            strategy=strategy,
            strict=strict,
            default_max_tokens=default_max_tokens,
            anthropic_version=anthropic_version,
        )

    def route_targets(
        self, value: object, path: str, strategy: str
    ) -> tuple[RouteTargetConfig, ...] | None:
        """A route's ``targets``: providers (each with an optional model), in order."""
        result = []
        pairs = self.items(value, path, empty="must list at least one target")
        seen: dict[tuple[str, str | None], str] = {}
        for item_path, item in pairs:
            fields = self.mapping(item, item_path, _TARGET_KEYS)
            if fields is None:
                continue
            provider = self.required(fields, "provider", item_path, self.string)
            if provider is not None:
                self.check_route_target(provider, _key_path(item_path, "provider"))
            model = self.optional(fields, "model", item_path, self.string, None)
            weight = self.optional(fields, "weight", item_path, self.positive_int, 1)
            if "weight" in fields and strategy != "weighted":
                self.error(_key_path(item_path, "weight"), "is only used with strategy: weighted")
            if provider is None or ("model" in fields and model is None):
                continue
            first = seen.setdefault((provider, model), item_path)
            if first != item_path:
                self.error(item_path, f"same provider and model as {first}")
                continue
            result.append(RouteTargetConfig(provider, model, weight))
        return tuple(result) if pairs and len(result) == len(pairs) else None

    def anthropic_version(self, value: object, path: str) -> str | None:
        """An ``anthropic-version`` date such as ``2023-06-01``."""
        text = self.string(value, path)
        if text is not None and not _ANTHROPIC_VERSION_RE.fullmatch(text):
            self.error(path, f"must be a date like 2023-06-01, got {text!r}")
            return None
        return text

    def check_route_target(self, provider: str, path: str) -> None:
        """The provider must exist (either type can serve either API, by translation)."""
        if self.provider_types is None:
            return
        if provider not in self.provider_types:
            self.error(path, f"no provider named {provider!r}")
