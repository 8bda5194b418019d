"""Tests for :mod:`relayd.config.loader`: parsing, defaults, merging and every error rule."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

from relayd.config import (
    DEFAULT_MAX_BODY_BYTES,
    AdminConfig,
    BackendConfig,
    BreakerConfig,
    ClientConfig,
    Config,
    ConfigError,
    ConfigErrors,
    FailoverConfig,
    HealthCheckConfig,
    ListenerConfig,
    PoolConfig,
    ProviderConfig,
    RouteConfig,
    RouteTargetConfig,
    TimeoutsConfig,
    TlsConfig,
    load_config,
    parse_config,
)

SECRET = "sk-test-SECRET-value-0123456789"
TOKEN = "admin-TOKEN-value-9876543210"
DIGEST_A = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
DIGEST_B = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
DEFAULT_LISTENER = ListenerConfig(address="127.0.0.1:8080", host="127.0.0.1", port=8080)

EXAMPLE_YAML = """\
listen:
  - address: "127.0.0.1:8080"
  - address: "0.0.0.0:8443"
    tls: {certificate: tls/fullchain.pem, private_key: /etc/relayd/tls/privkey.pem}
admin: {address: "127.0.0.1:9091", token_file: admin-token}
max_body_bytes: 1048576
shutdown_timeout: 12.5
timeouts: {connect: 10, first_byte: 600, idle: 300, total: 3600}
pool: {max_idle_connections: 32, idle_timeout: 50}
health: {interval: 15, unhealthy_after: 2}
breaker: {window: 10, failures: 4}
failover:
  max_attempts: 2
  retry_budget_ratio: 0
  retry_budget_min_per_second: 0.5
  max_replay_bytes: 0
  max_retry_after: 30
clients:
  - name: team-a
    key_sha256: "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"
    models: ["claude-*", "gpt-4o*"]
  - name: team-b
    key_sha256: "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
providers:
  - name: anthropic
    type: anthropic
    timeouts: {connect: 5}
    health: {path: /v1/models, timeout: 2}
    backends:
      - name: us
        url: "https://api.anthropic.com/"
        api_keys:
          - {api_key_env: ANTHROPIC_API_KEY}
          - {api_key_file: keys/second}
        weight: 3
      - name: backup
        url: "http://gateway.internal:8000/anthropic/"
        api_key_file: keys/backup
        priority: 1
        max_concurrent: 8
        timeouts: {idle: 30.5}
        pool: {max_idle_connections: 4}
        health: {enabled: false}
        breaker: {cooldown: 1, half_open_requests: 2}
  - name: openai
    type: openai
    pool: {idle_timeout: 20}
    backends:
      - {name: main, url: "https://api.openai.com", api_key: "sk-inline"}
routes:
  - {api: anthropic, models: ["claude-*"], provider: anthropic}
  - {api: openai, provider: openai}
"""


# -- helpers -----------------------------------------------------------------------------


def backend(**extra: Any) -> dict[str, Any]:
    """A valid backend mapping, with ``extra`` keys added or replaced."""
    return {"name": "b0", "url": "https://api.example.com", "api_key": SECRET, **extra}


def provider(**extra: Any) -> dict[str, Any]:
    """A valid anthropic provider mapping with one backend."""
    return {"name": "p0", "type": "anthropic", "backends": [backend()], **extra}


def with_backend(**extra: Any) -> dict[str, Any]:
    """A document whose only backend is ``backend(**extra)``."""
    return {"providers": [provider(backends=[backend(**extra)])]}


def errors_of(data: object, **kwargs: Any) -> list[str]:
    """Every error ``parse_config`` reports for ``data``, as ``path: message`` strings."""
    with pytest.raises(ConfigErrors) as info:
        parse_config(data, **kwargs)
    return [str(error) for error in info.value.errors]


def only_backend(config: Config) -> BackendConfig:
    """The single backend of a single-provider config."""
    (only,) = config.providers
    (result,) = only.backends
    return result


# -- the example and the defaults -------------------------------------------------------


def test_example_parses_to_the_expected_objects(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "backup").write_text("\n  sk-from-file \n")
    (tmp_path / "keys" / "second").write_text("sk-second\n")
    (tmp_path / "admin-token").write_text(f"{TOKEN}\n")
    config_file = tmp_path / "relayd.yaml"
    config_file.write_text(EXAMPLE_YAML)

    config = load_config(str(config_file), environ={"ANTHROPIC_API_KEY": "sk-from-env"})

    global_timeouts = TimeoutsConfig(connect=10.0, first_byte=600.0, idle=300.0, total=3600.0)
    anthropic_timeouts = TimeoutsConfig(connect=5.0, first_byte=600.0, idle=300.0, total=3600.0)
    global_pool = PoolConfig(max_idle_connections=32, idle_timeout=50.0)
    global_health = HealthCheckConfig(interval=15.0, unhealthy_after=2)
    anthropic_health = HealthCheckConfig(
        path="/v1/models", interval=15.0, timeout=2.0, unhealthy_after=2
    )
    global_breaker = BreakerConfig(window=10, failures=4)
    assert config == Config(
        listen=(
            ListenerConfig(address="127.0.0.1:8080", host="127.0.0.1", port=8080),
            ListenerConfig(
                address="0.0.0.0:8443",
                host="0.0.0.0",
                port=8443,
                tls=TlsConfig(
                    certificate=str(tmp_path / "tls" / "fullchain.pem"),
                    private_key="/etc/relayd/tls/privkey.pem",
                ),
            ),
        ),
        clients=(
            ClientConfig(
                name="team-a", key_sha256=bytes.fromhex(DIGEST_A), models=("claude-*", "gpt-4o*")
            ),
            ClientConfig(name="team-b", key_sha256=bytes.fromhex(DIGEST_B), models=None),
        ),
        providers=(
            ProviderConfig(
                name="anthropic",
                type="anthropic",
                backends=(
                    BackendConfig(
                        name="us",
                        url="https://api.anthropic.com",
                        api_keys=("sk-from-env", "sk-second"),
                        weight=3,
                        max_concurrent=None,
                        pool=global_pool,
                        timeouts=anthropic_timeouts,
                        health=anthropic_health,
                        breaker=global_breaker,
                    ),
                    BackendConfig(
                        name="backup",
                        url="http://gateway.internal:8000/anthropic",
                        api_keys=("sk-from-file",),
                        weight=1,
                        priority=1,
                        max_concurrent=8,
                        pool=PoolConfig(max_idle_connections=4, idle_timeout=50.0),
                        timeouts=TimeoutsConfig(
                            connect=5.0, first_byte=600.0, idle=30.5, total=3600.0
                        ),
                        health=HealthCheckConfig(
                            enabled=False,
                            path="/v1/models",
                            interval=15.0,
                            timeout=2.0,
                            unhealthy_after=2,
                        ),
                        breaker=BreakerConfig(
                            window=10, failures=4, cooldown=1.0, half_open_requests=2
                        ),
                    ),
                ),
            ),
            ProviderConfig(
                name="openai",
                type="openai",
                backends=(
                    BackendConfig(
                        name="main",
                        url="https://api.openai.com",
                        api_keys=("sk-inline",),
                        pool=PoolConfig(max_idle_connections=32, idle_timeout=20.0),
                        timeouts=global_timeouts,
                        health=global_health,
                        breaker=global_breaker,
                    ),
                ),
            ),
        ),
        routes=(
            RouteConfig(
                api="anthropic", targets=(RouteTargetConfig("anthropic"),), models=("claude-*",)
            ),
            RouteConfig(api="openai", targets=(RouteTargetConfig("openai"),), models=None),
        ),
        max_body_bytes=1048576,
        timeouts=global_timeouts,
        pool=global_pool,
        health=global_health,
        breaker=global_breaker,
        failover=FailoverConfig(
            max_attempts=2,
            retry_budget_ratio=0.0,
            retry_budget_min_per_second=0.5,
            max_replay_bytes=0,
            max_retry_after=30.0,
        ),
        admin=AdminConfig(
            address="127.0.0.1:9091",
            host="127.0.0.1",
            port=9091,
            token_file=str(tmp_path / "admin-token"),
            token=TOKEN,
        ),
        shutdown_timeout=12.5,
        source=str(config_file),
    )
    assert TOKEN not in repr(config)
    assert "sk-from-env" not in repr(config)


@pytest.mark.parametrize("data", [None, {}])
def test_empty_document_gives_the_defaults(data: object) -> None:
    assert parse_config(data) == Config(listen=(DEFAULT_LISTENER,), source="<memory>")


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    config_file = tmp_path / "empty.yaml"
    config_file.write_text("# nothing configured yet\n")
    config = load_config(str(config_file))
    assert config == Config(listen=(DEFAULT_LISTENER,), source=str(config_file))
    assert config.max_body_bytes == DEFAULT_MAX_BODY_BYTES
    assert config.timeouts == TimeoutsConfig()
    assert config.pool == PoolConfig()
    assert config.health == HealthCheckConfig()
    assert config.breaker == BreakerConfig()
    assert config.failover == FailoverConfig()
    assert config.admin is None
    assert config.shutdown_timeout == 30.0


def test_source_argument_is_kept() -> None:
    assert parse_config({}, source="test.yaml").source == "test.yaml"


def test_backend_defaults_follow_the_global_settings() -> None:
    config = parse_config({"providers": [provider()]})
    assert only_backend(config) == BackendConfig(
        name="b0", url="https://api.example.com", api_keys=(SECRET,)
    )


def test_overrides_merge_field_by_field() -> None:
    data = {
        "timeouts": {"connect": 1, "total": 100},
        "pool": {"idle_timeout": 7},
        "providers": [
            provider(
                timeouts={"first_byte": 2, "total": 50},
                pool={"max_idle_connections": 3},
                backends=[backend(timeouts={"idle": 4}, pool={"idle_timeout": 5})],
            )
        ],
    }
    config = parse_config(data)
    assert config.timeouts == TimeoutsConfig(connect=1.0, first_byte=600.0, idle=300.0, total=100.0)
    assert config.pool == PoolConfig(max_idle_connections=32, idle_timeout=7.0)
    chosen = only_backend(config)
    assert chosen.timeouts == TimeoutsConfig(connect=1.0, first_byte=2.0, idle=4.0, total=50.0)
    assert chosen.pool == PoolConfig(max_idle_connections=3, idle_timeout=5.0)


def test_numbers_become_floats_and_integers_stay_integers() -> None:
    config = parse_config({"timeouts": {"connect": 3}, "pool": {"max_idle_connections": 2}})
    assert type(config.timeouts.connect) is float
    assert type(config.pool.max_idle_connections) is int


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("127.0.0.1:0", "127.0.0.1", 0),
        ("0.0.0.0:65535", "0.0.0.0", 65535),
        ("localhost:8080", "localhost", 8080),
        ("[::1]:8443", "::1", 8443),
        ("[::]:80", "::", 80),
    ],
)
def test_listener_addresses(address: str, host: str, port: int) -> None:
    config = parse_config({"listen": [{"address": address}]})
    assert config.listen == (ListenerConfig(address=address, host=host, port=port),)


def test_ephemeral_listeners_may_repeat() -> None:
    config = parse_config({"listen": [{"address": "127.0.0.1:0"}, {"address": "127.0.0.1:0"}]})
    assert [listener.port for listener in config.listen] == [0, 0]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.example.com/", "https://api.example.com"),
        ("HTTPS://api.example.com", "https://api.example.com"),
        ("http://10.0.0.5:8000/prefix/v1//", "http://10.0.0.5:8000/prefix/v1"),
        ("https://[::1]:8443/x", "https://[::1]:8443/x"),
    ],
)
def test_backend_urls_are_normalized(url: str, expected: str) -> None:
    assert only_backend(parse_config(with_backend(url=url))).url == expected


def test_uppercase_and_lowercase_digests_decode_alike() -> None:
    data = {"clients": [{"name": "a", "key_sha256": DIGEST_A.upper()}]}
    assert parse_config(data).clients[0].key_sha256 == bytes.fromhex(DIGEST_A)


def test_api_key_from_environment_is_stripped() -> None:
    data = {"providers": [provider(backends=[_backend_without_key(api_key_env="KEY_VAR")])]}
    config = parse_config(data, environ={"KEY_VAR": f"  {SECRET}\n"})
    assert only_backend(config).api_keys == (SECRET,)


def test_api_key_file_is_relative_to_base_dir(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(f"{SECRET}\n")
    data = {"providers": [provider(backends=[_backend_without_key(api_key_file="key")])]}
    assert only_backend(parse_config(data, base_dir=str(tmp_path))).api_keys == (SECRET,)


def test_relative_paths_default_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "key").write_text(SECRET)
    data = {
        "listen": [{"address": "[::1]:0", "tls": {"certificate": "c.pem", "private_key": "k"}}],
        "providers": [provider(backends=[_backend_without_key(api_key_file="key")])],
    }
    config = parse_config(data)
    assert only_backend(config).api_keys == (SECRET,)
    assert config.listen[0].tls == TlsConfig(
        certificate=os.path.join(os.getcwd(), "c.pem"), private_key=os.path.join(os.getcwd(), "k")
    )


def test_api_key_is_not_in_the_backend_repr() -> None:
    assert SECRET not in repr(parse_config({"providers": [provider()]}))


def _backend_without_key(**extra: Any) -> dict[str, Any]:
    """A backend mapping with no api_key, then ``extra``."""
    result = backend(**extra)
    if "api_key" not in extra:
        del result["api_key"]
    return result


# -- errors ---------------------------------------------------------------------------------


def test_config_error_and_errors_text() -> None:
    first = ConfigError("providers[0].backends[1].weight", "must be a positive integer, got 0")
    second = ConfigError("routes", "must be a list, got string")
    assert str(first) == "providers[0].backends[1].weight: must be a positive integer, got 0"
    assert (first.path, first.message) == (
        "providers[0].backends[1].weight",
        "must be a positive integer, got 0",
    )
    combined = ConfigErrors([first, second])
    assert combined.errors == [first, second]
    assert str(combined) == f"{first}\n{second}"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([], "(top level): must be a mapping, got list"),
        ("text", "(top level): must be a mapping, got string"),
        ({"listne": []}, "listne: unknown key"),
        ({"clients": None}, "clients: must be a list, got null"),
        ({"providers": {}}, "providers: must be a list, got mapping"),
        ({"routes": "all"}, "routes: must be a list, got string"),
        # listeners
        ({"listen": []}, "listen: must contain at least one listener"),
        ({"listen": None}, "listen: must be a list, got null"),
        ({"listen": ["127.0.0.1:80"]}, "listen[0]: must be a mapping, got string"),
        ({"listen": [{}]}, "listen[0].address: is required"),
        (
            {"listen": [{"address": 8080}]},
            'listen[0].address: must be a string such as "127.0.0.1:8080", got integer',
        ),
        (
            {"listen": [{"address": "127.0.0.1"}]},
            'listen[0].address: must be "host:port" or "[ipv6]:port"',
        ),
        (
            {"listen": [{"address": ":8080"}]},
            'listen[0].address: must be "host:port" or "[ipv6]:port"',
        ),
        (
            {"listen": [{"address": "[::1]8080"}]},
            'listen[0].address: must be "host:port" or "[ipv6]:port"',
        ),
        (
            {"listen": [{"address": "127.0.0.1:65536"}]},
            "listen[0].address: port must be a number from 0 to 65535",
        ),
        (
            {"listen": [{"address": "127.0.0.1:http"}]},
            "listen[0].address: port must be a number from 0 to 65535",
        ),
        (
            {"listen": [{"address": "127.0.0.1:"}]},
            "listen[0].address: port must be a number from 0 to 65535",
        ),
        (
            {"listen": [{"address": "example.com:80"}]},
            'listen[0].address: host must be an IP address or "localhost"',
        ),
        (
            {"listen": [{"address": "::1:80"}]},
            'listen[0].address: an IPv6 address must be written in brackets, as in "[::1]:8080"',
        ),
        (
            {"listen": [{"address": "[127.0.0.1]:80"}]},
            "listen[0].address: only an IPv6 address may be written in brackets",
        ),
        ({"listen": [{"address": "127.0.0.1:80", "port": 80}]}, "listen[0].port: unknown key"),
        (
            {"listen": [{"address": "127.0.0.1:80", "tls": True}]},
            "listen[0].tls: must be a mapping, got boolean",
        ),
        (
            {"listen": [{"address": "127.0.0.1:80", "tls": {"certificate": "c"}}]},
            "listen[0].tls.private_key: is required",
        ),
        (
            {
                "listen": [
                    {"address": "127.0.0.1:80", "tls": {"certificate": "", "private_key": "k"}}
                ]
            },
            "listen[0].tls.certificate: must not be empty",
        ),
        (
            {
                "listen": [
                    {
                        "address": "127.0.0.1:80",
                        "tls": {"certificate": "c", "private_key": "k", "ca": "x"},
                    }
                ]
            },
            "listen[0].tls.ca: unknown key",
        ),
        # body size, timeouts, pool
        ({"max_body_bytes": 0}, "max_body_bytes: must be a positive integer, got 0"),
        ({"max_body_bytes": True}, "max_body_bytes: must be a positive integer, got boolean"),
        ({"max_body_bytes": 1.5}, "max_body_bytes: must be a positive integer, got 1.5"),
        ({"max_body_bytes": "10MB"}, "max_body_bytes: must be a positive integer, got string"),
        ({"timeouts": None}, "timeouts: must be a mapping, got null"),
        (
            {"timeouts": {"connect": True}},
            "timeouts.connect: must be a positive number, got boolean",
        ),
        ({"timeouts": {"idle": 0}}, "timeouts.idle: must be a positive number, got 0"),
        ({"timeouts": {"total": -1.5}}, "timeouts.total: must be a positive number, got -1.5"),
        (
            {"timeouts": {"first_byte": "5"}},
            "timeouts.first_byte: must be a positive number, got string",
        ),
        ({"timeouts": {"total": math.inf}}, "timeouts.total: must be a positive number, got inf"),
        ({"timeouts": {"total": math.nan}}, "timeouts.total: must be a positive number, got nan"),
        ({"timeouts": {"read": 5}}, "timeouts.read: unknown key"),
        (
            {"pool": {"max_idle_connections": 1.0}},
            "pool.max_idle_connections: must be a positive integer, got 1.0",
        ),
        (
            {"pool": {"idle_timeout": False}},
            "pool.idle_timeout: must be a positive number, got boolean",
        ),
        ({"pool": {"size": 3}}, "pool.size: unknown key"),
        # clients
        ({"clients": [{"key_sha256": DIGEST_A}]}, "clients[0].name: is required"),
        ({"clients": [{"name": "", "key_sha256": DIGEST_A}]}, "clients[0].name: must not be empty"),
        (
            {"clients": [{"name": "team a", "key_sha256": DIGEST_A}]},
            "clients[0].name: must contain only letters, digits, '_', '.' and '-'",
        ),
        (
            {"clients": [{"name": 7, "key_sha256": DIGEST_A}]},
            "clients[0].name: must be a string, got integer",
        ),
        ({"clients": [{"name": "a"}]}, "clients[0].key_sha256: is required"),
        (
            {"clients": [{"name": "a", "key_sha256": DIGEST_A[:-1]}]},
            "clients[0].key_sha256: must be 64 hexadecimal characters (a SHA-256 digest)",
        ),
        (
            {"clients": [{"name": "a", "key_sha256": "g" * 64}]},
            "clients[0].key_sha256: must be 64 hexadecimal characters (a SHA-256 digest)",
        ),
        (
            {"clients": [{"name": "a", "key_sha256": 1234}]},
            "clients[0].key_sha256: must be a string (quote the hex digest), got integer",
        ),
        (
            {"clients": [{"name": "a", "key_sha256": DIGEST_A, "models": []}]},
            "clients[0].models: must list at least one model name or glob"
            " (leave the key out for all)",
        ),
        (
            {"clients": [{"name": "a", "key_sha256": DIGEST_A, "models": "claude-*"}]},
            "clients[0].models: must be a list, got string",
        ),
        (
            {"clients": [{"name": "a", "key_sha256": DIGEST_A, "models": ["x", ""]}]},
            "clients[0].models[1]: must not be empty",
        ),
        (
            {"clients": [{"name": "a", "key_sha256": DIGEST_A, "key": "x"}]},
            "clients[0].key: unknown key",
        ),
        (
            {
                "clients": [
                    {"name": "a", "key_sha256": DIGEST_A},
                    {"name": "a", "key_sha256": DIGEST_B},
                ]
            },
            "clients[1].name: duplicate client name 'a' (first used at clients[0].name)",
        ),
        (
            {
                "clients": [
                    {"name": "a", "key_sha256": DIGEST_A},
                    {"name": "b", "key_sha256": DIGEST_A.upper()},
                ]
            },
            "clients[1].key_sha256: same key digest as clients[0] (a)",
        ),
        # providers
        (
            {"providers": [provider(name="p 0")]},
            "providers[0].name: must contain only letters, digits, '_', '.' and '-'",
        ),
        (
            {"providers": [provider(type="gemini")]},
            "providers[0].type: must be one of anthropic, openai, got 'gemini'",
        ),
        (
            {"providers": [provider(type=1)]},
            "providers[0].type: must be one of anthropic, openai, got integer",
        ),
        (
            {"providers": [{"name": "p0", "backends": [backend()]}]},
            "providers[0].type: is required",
        ),
        ({"providers": [{"name": "p0", "type": "openai"}]}, "providers[0].backends: is required"),
        (
            {"providers": [provider(backends=[])]},
            "providers[0].backends: must contain at least one backend",
        ),
        (
            {"providers": [provider(backends=backend())]},
            "providers[0].backends: must be a list, got mapping",
        ),
        ({"providers": [provider(region="us")]}, "providers[0].region: unknown key"),
        (
            {"providers": [provider(timeouts={"idle": 0})]},
            "providers[0].timeouts.idle: must be a positive number, got 0",
        ),
        (
            {"providers": [provider(pool={"idle_timeout": "1"})]},
            "providers[0].pool.idle_timeout: must be a positive number, got string",
        ),
        (
            {"providers": [provider(), provider()]},
            "providers[1].name: duplicate provider name 'p0' (first used at providers[0].name)",
        ),
        # backends
        (with_backend(wieght=2), "providers[0].backends[0].wieght: unknown key"),
        (
            with_backend(weight=0),
            "providers[0].backends[0].weight: must be a positive integer, got 0",
        ),
        (
            with_backend(weight=True),
            "providers[0].backends[0].weight: must be a positive integer, got boolean",
        ),
        (
            with_backend(weight="3"),
            "providers[0].backends[0].weight: must be a positive integer, got string",
        ),
        (
            with_backend(max_concurrent=-1),
            "providers[0].backends[0].max_concurrent: must be a positive integer, got -1",
        ),
        (
            with_backend(timeouts={"connect": 0.0}),
            "providers[0].backends[0].timeouts.connect: must be a positive number, got 0.0",
        ),
        (
            with_backend(pool={"max_idle_connections": 0}),
            "providers[0].backends[0].pool.max_idle_connections: must be a positive integer, got 0",
        ),
        (
            with_backend(name="a/b"),
            "providers[0].backends[0].name: must contain only letters, digits, '_', '.' and '-'",
        ),
        (
            {"providers": [provider(backends=[backend(), backend()])]},
            "providers[0].backends[1].name: duplicate backend name 'b0'"
            " (first used at providers[0].backends[0].name)",
        ),
        (
            {"providers": [provider(backends=[{"url": "https://h", "api_key": "k"}])]},
            "providers[0].backends[0].name: is required",
        ),
        (
            {"providers": [provider(backends=[{"name": "b", "api_key": "k"}])]},
            "providers[0].backends[0].url: is required",
        ),
        # routes
        ({"routes": [{"provider": "p0"}], "providers": [provider()]}, "routes[0].api: is required"),
        (
            {"routes": [{"api": "gemini", "provider": "p0"}], "providers": [provider()]},
            "routes[0].api: must be one of anthropic, openai, got 'gemini'",
        ),
        ({"routes": [{"api": "anthropic"}]}, "routes[0]: needs exactly one of provider or targets"),
        (
            {
                "routes": [{"api": "anthropic", "provider": "p0", "targets": [{"provider": "p0"}]}],
                "providers": [provider()],
            },
            "routes[0]: needs exactly one of provider or targets",
        ),
        (
            {"routes": [{"api": "anthropic", "targets": []}], "providers": [provider()]},
            "routes[0].targets: must list at least one target",
        ),
        (
            {"routes": [{"api": "anthropic", "targets": [{"model": "x"}]}]},
            "routes[0].targets[0].provider: is required",
        ),
        (
            {"routes": [{"api": "anthropic", "targets": [{"provider": "nope"}]}]},
            "routes[0].targets[0].provider: no provider named 'nope'",
        ),
        (
            {
                "routes": [{"api": "anthropic", "targets": [{"provider": "p0", "model": ""}]}],
                "providers": [provider()],
            },
            "routes[0].targets[0].model: must not be empty",
        ),
        (
            {
                "routes": [{"api": "anthropic", "targets": [{"provider": "p0", "weight": 2}]}],
                "providers": [provider()],
            },
            "routes[0].targets[0].weight: is only used with strategy: weighted",
        ),
        (
            {
                "routes": [
                    {
                        "api": "anthropic",
                        "strategy": "weighted",
                        "targets": [{"provider": "p0", "weight": 0}],
                    }
                ],
                "providers": [provider()],
            },
            "routes[0].targets[0].weight: must be a positive integer, got 0",
        ),
        (
            {
                "routes": [
                    {
                        "api": "anthropic",
                        "targets": [
                            {"provider": "p0", "model": "m"},
                            {"provider": "p0", "model": "m"},
                        ],
                    }
                ],
                "providers": [provider()],
            },
            "routes[0].targets[1]: same provider and model as routes[0].targets[0]",
        ),
        (
            {
                "routes": [{"api": "anthropic", "targets": [{"provider": "p0", "x": 1}]}],
                "providers": [provider()],
            },
            "routes[0].targets[0].x: unknown key",
        ),
        (
            {
                "routes": [{"api": "anthropic", "provider": "p0", "strategy": "random"}],
                "providers": [provider()],
            },
            "routes[0].strategy: must be one of ordered, weighted; got 'random'",
        ),
        (
            {
                "routes": [{"api": "anthropic", "provider": "p0", "strict": "yes"}],
                "providers": [provider()],
            },
            "routes[0].strict: must be true or false, got string",
        ),
        (
            {
                "routes": [{"api": "anthropic", "provider": "p0", "default_max_tokens": 0}],
                "providers": [provider()],
            },
            "routes[0].default_max_tokens: must be a positive integer, got 0",
        ),
        (
            {
                "routes": [{"api": "openai", "provider": "p0", "anthropic_version": "latest"}],
                "providers": [provider()],
            },
            "routes[0].anthropic_version: must be a date like 2023-06-01, got 'latest'",
        ),
        (
            {"routes": [{"api": "anthropic", "provider": "nope"}]},
            "routes[0].provider: no provider named 'nope'",
        ),
        (
            {"routes": [{"api": "anthropic", "provider": ""}]},
            "routes[0].provider: must not be empty",
        ),
        (
            {
                "routes": [{"api": "anthropic", "provider": "p0", "models": []}],
                "providers": [provider()],
            },
            "routes[0].models: must list at least one model name or glob"
            " (leave the key out for all)",
        ),
        (
            {
                "routes": [{"api": "anthropic", "provider": "p0", "model": "x"}],
                "providers": [provider()],
            },
            "routes[0].model: unknown key",
        ),
    ],
)
def test_single_error(data: object, expected: str) -> None:
    assert errors_of(data) == [expected]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://files.example.com", "must start with http:// or https://"),
        ("api.example.com", "must start with http:// or https://"),
        ("https://", "must include a host"),
        ("https:///v1", "must include a host"),
        (
            "https://user:pw@api.example.com",
            "must not contain user info (put credentials in api_key, api_key_env or api_key_file)",
        ),
        ("https://api.example.com/v1?beta=1", "must not contain a query string (?...)"),
        ("https://api.example.com/?", "must not contain a query string (?...)"),
        ("https://api.example.com/#top", "must not contain a fragment (#...)"),
        ("https://api.example.com:99999", "has an invalid port"),
        ("https://api.example.com:0", "has an invalid port"),
        ("https://api.example.com:x", "has an invalid port"),
        ("https://[::1", "is not a valid URL"),
        ("https://api.example.com/a b", "must not contain whitespace or control characters"),
        ("", "must not be empty"),
    ],
)
def test_bad_backend_url(url: str, message: str) -> None:
    assert errors_of(with_backend(url=url)) == [f"providers[0].backends[0].url: {message}"]


def test_duplicate_listeners_compare_normalized_addresses() -> None:
    data = {
        "listen": [
            {"address": "[::1]:8080"},
            {"address": "127.0.0.1:8080"},
            {"address": "[0:0::1]:8080", "tls": {"certificate": "c"}},
        ]
    }
    assert errors_of(data) == [
        "listen[2].address: duplicate listener (same as listen[0])",
        "listen[2].tls.private_key: is required",
    ]


def test_a_missing_api_key_is_an_error() -> None:
    data = {"providers": [provider(backends=[_backend_without_key()])]}
    assert errors_of(data) == [
        "providers[0].backends[0]: needs exactly one of api_key, api_key_env, api_key_file,"
        " api_keys"
    ]


def test_two_api_key_sources_are_an_error() -> None:
    data = with_backend(api_key_env="KEY_VAR", api_key_file="/k")
    assert errors_of(data, environ={"KEY_VAR": SECRET}) == [
        "providers[0].backends[0]: needs exactly one of api_key, api_key_env, api_key_file,"
        " api_keys (found api_key, api_key_env, api_key_file)"
    ]


@pytest.mark.parametrize(
    ("extra", "environ", "expected"),
    [
        ({"api_key": ""}, {}, "api_key: the key is empty"),
        ({"api_key": "   "}, {}, "api_key: the key is empty"),
        ({"api_key": 12345}, {}, "api_key: must be a string, got integer"),
        ({"api_key_env": "KEY_VAR"}, {}, "api_key_env: environment variable KEY_VAR is not set"),
        (
            {"api_key_env": "KEY_VAR"},
            {"KEY_VAR": " \n"},
            "api_key_env: environment variable KEY_VAR is empty",
        ),
        ({"api_key_env": ""}, {"": SECRET}, "api_key_env: must not be empty"),
        ({"api_key_env": ["KEY_VAR"]}, {}, "api_key_env: must be a string, got list"),
    ],
)
def test_bad_api_key(extra: dict[str, Any], environ: dict[str, str], expected: str) -> None:
    data = {"providers": [provider(backends=[_backend_without_key(**extra)])]}
    assert errors_of(data, environ=environ) == [f"providers[0].backends[0].{expected}"]


def test_bad_api_key_files(tmp_path: Path) -> None:
    (tmp_path / "blank").write_text(" \n\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe" + SECRET.encode())
    (tmp_path / "big").write_text("k" * (64 * 1024 + 1))
    names = ["missing", "blank", "binary", "big", "."]
    data = {
        "providers": [
            provider(
                backends=[
                    _backend_without_key(name=f"b{index}", api_key_file=name)
                    for index, name in enumerate(names)
                ]
            )
        ]
    }
    prefix = "providers[0].backends"
    assert errors_of(data, base_dir=str(tmp_path)) == [
        f"{prefix}[0].api_key_file: cannot read key file {tmp_path}/missing:"
        " No such file or directory",
        f"{prefix}[1].api_key_file: key file {tmp_path}/blank is empty",
        f"{prefix}[2].api_key_file: key file {tmp_path}/binary is not valid UTF-8",
        f"{prefix}[3].api_key_file: key file {tmp_path}/big is too large to hold an API key",
        f"{prefix}[4].api_key_file: cannot read key file {tmp_path}: Is a directory",
    ]


def test_every_error_is_reported_in_document_order() -> None:
    data = {
        "listen": [{"address": "localhost:99999"}],
        "max_body_bytes": -1,
        "clients": [{"name": "a", "key_sha256": "nothex"}],
        "providers": [
            provider(backends=[backend(weight=0), backend(name="b1", url="ftp://x")]),
            provider(name="p1", type="openai", backends=[]),
        ],
        "routes": [
            {"api": "openai", "provider": "p0", "strict": 1},
            {"api": "openai", "provider": "p9"},
        ],
        "extra": 1,
    }
    assert errors_of(data) == [
        "extra: unknown key",
        "listen[0].address: port must be a number from 0 to 65535",
        "max_body_bytes: must be a positive integer, got -1",
        "clients[0].key_sha256: must be 64 hexadecimal characters (a SHA-256 digest)",
        "providers[0].backends[0].weight: must be a positive integer, got 0",
        "providers[0].backends[1].url: must start with http:// or https://",
        "providers[1].backends: must contain at least one backend",
        "routes[0].strict: must be true or false, got integer",
        "routes[1].provider: no provider named 'p9'",
    ]


def test_routes_are_not_checked_against_an_unusable_providers_section() -> None:
    data = {"providers": "p0", "routes": [{"api": "openai", "provider": "p0"}]}
    assert errors_of(data) == ["providers: must be a list, got string"]


def test_a_provider_with_a_bad_type_still_exists_for_routes() -> None:
    data = {
        "providers": [provider(type="gemini")],
        "routes": [{"api": "openai", "provider": "p0"}],
    }
    assert errors_of(data) == ["providers[0].type: must be one of anthropic, openai, got 'gemini'"]


# -- health checks, breaker, failover, shutdown ------------------------------------------


def test_health_and_breaker_merge_across_three_levels() -> None:
    data = {
        "health": {"interval": 30, "path": "/global", "healthy_after": 4},
        "breaker": {"window": 50, "max_cooldown": 60},
        "providers": [
            provider(
                health={"timeout": 3, "path": "/provider"},
                breaker={"failures": 10, "cooldown": 2},
                backends=[
                    backend(
                        health={"enabled": False, "unhealthy_after": 1},
                        breaker={"window": 40, "half_open_requests": 3},
                    ),
                    backend(name="b1"),
                ],
            ),
            provider(name="p1", backends=[backend(health={"interval": 20})]),
        ],
    }
    config = parse_config(data)
    assert config.health == HealthCheckConfig(interval=30.0, path="/global", healthy_after=4)
    assert config.breaker == BreakerConfig(window=50, max_cooldown=60.0)
    first, second = config.providers[0].backends
    assert first.health == HealthCheckConfig(
        enabled=False,
        path="/provider",
        interval=30.0,
        timeout=3.0,
        unhealthy_after=1,
        healthy_after=4,
    )
    assert first.breaker == BreakerConfig(
        window=40, failures=10, cooldown=2.0, max_cooldown=60.0, half_open_requests=3
    )
    assert second.health == HealthCheckConfig(
        path="/provider", interval=30.0, timeout=3.0, healthy_after=4
    )
    assert second.breaker == BreakerConfig(window=50, failures=10, cooldown=2.0, max_cooldown=60.0)
    (other,) = config.providers[1].backends
    assert other.health == HealthCheckConfig(path="/global", interval=20.0, healthy_after=4)
    assert other.breaker == config.breaker


def test_health_and_breaker_numbers_have_model_types() -> None:
    config = parse_config({"health": {"interval": 7}, "breaker": {"cooldown": 2, "window": 30}})
    assert type(config.health.interval) is float
    assert type(config.breaker.cooldown) is float
    assert type(config.breaker.window) is int


def test_failover_and_shutdown_timeout() -> None:
    data = {
        "failover": {
            "max_attempts": 10,
            "retry_budget_ratio": 1,
            "retry_budget_min_per_second": 0,
            "max_replay_bytes": 1024,
            "max_retry_after": 0.5,
        },
        "shutdown_timeout": 5,
    }
    config = parse_config(data)
    assert config.failover == FailoverConfig(
        max_attempts=10,
        retry_budget_ratio=1.0,
        retry_budget_min_per_second=0.0,
        max_replay_bytes=1024,
        max_retry_after=0.5,
    )
    assert type(config.failover.retry_budget_ratio) is float
    assert config.shutdown_timeout == 5.0
    assert type(config.shutdown_timeout) is float


def test_failover_keys_are_each_optional() -> None:
    config = parse_config({"failover": {"max_attempts": 1}})
    assert config.failover == FailoverConfig(max_attempts=1)
    assert parse_config({"failover": {}}).failover == FailoverConfig()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # shutdown_timeout
        ({"shutdown_timeout": 0}, "shutdown_timeout: must be a positive number, got 0"),
        ({"shutdown_timeout": "30s"}, "shutdown_timeout: must be a positive number, got string"),
        ({"shutdown_timeout": math.inf}, "shutdown_timeout: must be a positive number, got inf"),
        # failover
        ({"failover": None}, "failover: must be a mapping, got null"),
        ({"failover": {"retries": 2}}, "failover.retries: unknown key"),
        (
            {"failover": {"max_attempts": 0}},
            "failover.max_attempts: must be an integer from 1 to 10, got 0",
        ),
        (
            {"failover": {"max_attempts": 11}},
            "failover.max_attempts: must be an integer from 1 to 10, got 11",
        ),
        (
            {"failover": {"max_attempts": 2.0}},
            "failover.max_attempts: must be an integer from 1 to 10, got 2.0",
        ),
        (
            {"failover": {"max_attempts": True}},
            "failover.max_attempts: must be an integer from 1 to 10, got boolean",
        ),
        (
            {"failover": {"retry_budget_ratio": 1.01}},
            "failover.retry_budget_ratio: must be a number from 0 to 1, got 1.01",
        ),
        (
            {"failover": {"retry_budget_ratio": -0.1}},
            "failover.retry_budget_ratio: must be a number from 0 to 1, got -0.1",
        ),
        (
            {"failover": {"retry_budget_ratio": math.nan}},
            "failover.retry_budget_ratio: must be a number from 0 to 1, got nan",
        ),
        (
            {"failover": {"retry_budget_ratio": False}},
            "failover.retry_budget_ratio: must be a number from 0 to 1, got boolean",
        ),
        (
            {"failover": {"retry_budget_min_per_second": -1}},
            "failover.retry_budget_min_per_second: must be a non-negative number, got -1",
        ),
        (
            {"failover": {"retry_budget_min_per_second": math.inf}},
            "failover.retry_budget_min_per_second: must be a non-negative number, got inf",
        ),
        (
            {"failover": {"max_replay_bytes": -1}},
            "failover.max_replay_bytes: must be a non-negative integer, got -1",
        ),
        (
            {"failover": {"max_replay_bytes": 1.5}},
            "failover.max_replay_bytes: must be a non-negative integer, got 1.5",
        ),
        (
            {"failover": {"max_retry_after": 0}},
            "failover.max_retry_after: must be a positive number, got 0",
        ),
        # health
        ({"health": True}, "health: must be a mapping, got boolean"),
        ({"health": {"port": 80}}, "health.port: unknown key"),
        ({"health": {"enabled": "yes"}}, "health.enabled: must be true or false, got string"),
        ({"health": {"enabled": 1}}, "health.enabled: must be true or false, got integer"),
        ({"health": {"path": "v1/models"}}, "health.path: must start with '/'"),
        ({"health": {"path": ""}}, "health.path: must not be empty"),
        ({"health": {"path": None}}, "health.path: must be a string, got null"),
        (
            {"health": {"path": "/v1/x y"}},
            "health.path: must not contain whitespace or control characters",
        ),
        ({"health": {"interval": 0}}, "health.interval: must be a positive number, got 0"),
        ({"health": {"timeout": -1}}, "health.timeout: must be a positive number, got -1"),
        (
            {"health": {"unhealthy_after": 0}},
            "health.unhealthy_after: must be a positive integer, got 0",
        ),
        (
            {"health": {"healthy_after": 1.0}},
            "health.healthy_after: must be a positive integer, got 1.0",
        ),
        ({"health": {"timeout": 11}}, "health.timeout: must not exceed interval (10.0)"),
        ({"health": {"interval": 4}}, "health.interval: must not be below timeout (5.0)"),
        (
            {"health": {"interval": 2, "timeout": 3}},
            "health.timeout: must not exceed interval (2.0)",
        ),
        (
            {"providers": [provider(health={"enabled": None})]},
            "providers[0].health.enabled: must be true or false, got null",
        ),
        (
            {"providers": [provider(health={"timeout": 20})]},
            "providers[0].health.timeout: must not exceed interval (10.0)",
        ),
        (
            with_backend(health={"intervall": 5}),
            "providers[0].backends[0].health.intervall: unknown key",
        ),
        (
            with_backend(health={"interval": 1}),
            "providers[0].backends[0].health.interval: must not be below timeout (5.0)",
        ),
        # breaker
        ({"breaker": []}, "breaker: must be a mapping, got list"),
        ({"breaker": {"threshold": 1}}, "breaker.threshold: unknown key"),
        ({"breaker": {"window": 0}}, "breaker.window: must be a positive integer, got 0"),
        ({"breaker": {"failures": 0}}, "breaker.failures: must be a positive integer, got 0"),
        ({"breaker": {"cooldown": 0}}, "breaker.cooldown: must be a positive number, got 0"),
        (
            {"breaker": {"max_cooldown": "5m"}},
            "breaker.max_cooldown: must be a positive number, got string",
        ),
        (
            {"breaker": {"half_open_requests": 0}},
            "breaker.half_open_requests: must be a positive integer, got 0",
        ),
        ({"breaker": {"failures": 21}}, "breaker.failures: must not exceed window (20)"),
        ({"breaker": {"window": 4}}, "breaker.window: must not be below failures (5)"),
        ({"breaker": {"cooldown": 301}}, "breaker.cooldown: must not exceed max_cooldown (300.0)"),
        (
            {"breaker": {"max_cooldown": 4.5}},
            "breaker.max_cooldown: must not be below cooldown (5.0)",
        ),
        (
            {"providers": [provider(breaker={"window": 3})]},
            "providers[0].breaker.window: must not be below failures (5)",
        ),
        (
            with_backend(breaker={"failures": 30}),
            "providers[0].backends[0].breaker.failures: must not exceed window (20)",
        ),
        # priority
        (
            with_backend(priority=-1),
            "providers[0].backends[0].priority: must be a non-negative integer, got -1",
        ),
        (
            with_backend(priority="1"),
            "providers[0].backends[0].priority: must be a non-negative integer, got string",
        ),
        (
            with_backend(priority=True),
            "providers[0].backends[0].priority: must be a non-negative integer, got boolean",
        ),
    ],
)
def test_single_error_in_new_sections(data: object, expected: str) -> None:
    assert errors_of(data) == [expected]


def test_limits_are_inclusive() -> None:
    data = {
        "health": {"interval": 5, "timeout": 5},
        "breaker": {"window": 5, "failures": 5, "cooldown": 7, "max_cooldown": 7},
    }
    config = parse_config(data)
    assert (config.health.interval, config.health.timeout) == (5.0, 5.0)
    assert (config.breaker.window, config.breaker.failures) == (5, 5)


def test_priority_defaults_to_zero() -> None:
    assert only_backend(parse_config(with_backend())).priority == 0
    assert only_backend(parse_config(with_backend(priority=0))).priority == 0
    assert only_backend(parse_config(with_backend(priority=2))).priority == 2


def test_ordering_rule_is_checked_on_the_merged_result_of_each_level() -> None:
    # The level that sets one of the two keys is blamed; an inherited problem is
    # reported once, where it was made, not again for every provider and backend.
    data = {
        "health": {"timeout": 12},
        "breaker": {"failures": 8},
        "providers": [
            provider(
                breaker={"window": 6},
                backends=[backend(), backend(name="b1", health={"healthy_after": 1})],
            ),
            provider(
                name="p1",
                health={"interval": 15},
                breaker={"window": 8},
                backends=[backend(health={"interval": 11, "timeout": 12.5})],
            ),
        ],
    }
    assert errors_of(data) == [
        "health.timeout: must not exceed interval (10.0)",
        "providers[0].breaker.window: must not be below failures (8)",
        "providers[1].backends[0].health.timeout: must not exceed interval (11.0)",
    ]


def test_a_lower_level_can_repair_an_inherited_value() -> None:
    data = {
        "providers": [
            provider(
                health={"interval": 2, "timeout": 1},
                backends=[backend(health={"interval": 30, "timeout": 20})],
            )
        ]
    }
    assert only_backend(parse_config(data)).health.timeout == 20.0


def test_ordering_rule_is_skipped_when_a_value_is_rejected() -> None:
    # With interval rejected, comparing timeout against the inherited interval would
    # only add noise.
    assert errors_of({"health": {"interval": 0, "timeout": 20}}) == [
        "health.interval: must be a positive number, got 0"
    ]
    assert errors_of({"breaker": {"window": "x", "failures": 50}}) == [
        "breaker.window: must be a positive integer, got string"
    ]


# -- api_keys --------------------------------------------------------------------------


def test_api_keys_resolve_every_source_in_order(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "c").write_text(" sk-c\n")
    keys = [{"api_key": "sk-a"}, {"api_key_env": "KEY_B"}, {"api_key_file": "keys/c"}]
    data = {"providers": [provider(backends=[_backend_without_key(api_keys=keys)])]}
    config = parse_config(data, environ={"KEY_B": "sk-b\n"}, base_dir=str(tmp_path))
    assert only_backend(config).api_keys == ("sk-a", "sk-b", "sk-c")


def test_a_single_item_api_keys_list_equals_api_key() -> None:
    listed = with_backend(api_keys=[{"api_key": SECRET}])
    del listed["providers"][0]["backends"][0]["api_key"]
    assert parse_config(listed) == parse_config(with_backend())


def _with_keys(keys: object) -> dict[str, Any]:
    """A document whose only backend gets its keys from ``api_keys: keys``."""
    return {"providers": [provider(backends=[_backend_without_key(api_keys=keys)])]}


KEYS_PATH = "providers[0].backends[0].api_keys"


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ([], ": must list at least one key"),
        ({"api_key": "k"}, ": must be a list, got mapping"),
        (None, ": must be a list, got null"),
        (["sk-plain"], "[0]: must be a mapping, got string"),
        ([{}], "[0]: needs exactly one of api_key, api_key_env, api_key_file"),
        (
            [{"api_key": "k1"}, {"api_key": "k2", "api_key_env": "KEY_VAR"}],
            "[1]: needs exactly one of api_key, api_key_env, api_key_file"
            " (found api_key, api_key_env)",
        ),
        ([{"api_key": "k", "api_keys": [{"api_key": "k2"}]}], "[0].api_keys: unknown key"),
        ([{"api_key": "k1"}, {"api_key": ""}], "[1].api_key: the key is empty"),
        (
            [{"api_key": "k1"}, {"api_key": "k2"}, {"api_key_env": "MISSING"}],
            "[2].api_key_env: environment variable MISSING is not set",
        ),
        ([{"api_key_file": 3}], "[0].api_key_file: must be a string, got integer"),
    ],
)
def test_bad_api_keys(keys: object, expected: str) -> None:
    assert errors_of(_with_keys(keys), environ={"KEY_VAR": "k3"}) == [f"{KEYS_PATH}{expected}"]


def test_an_unknown_key_in_an_api_keys_item_is_reported_with_the_key() -> None:
    assert errors_of(_with_keys([{"api_key": "k", "weight": 2}])) == [
        f"{KEYS_PATH}[0].weight: unknown key"
    ]


def test_api_keys_and_another_source_are_an_error() -> None:
    data = with_backend(api_keys=[{"api_key": "k"}])
    assert errors_of(data) == [
        "providers[0].backends[0]: needs exactly one of api_key, api_key_env, api_key_file,"
        " api_keys (found api_key, api_keys)"
    ]


def test_duplicate_keys_are_reported_at_the_later_item(tmp_path: Path) -> None:
    (tmp_path / "k").write_text(f"{SECRET}\n")
    keys = [
        {"api_key": SECRET},
        {"api_key": "sk-other"},
        {"api_key_env": "SAME"},
        {"api_key_file": "k"},
    ]
    with pytest.raises(ConfigErrors) as info:
        parse_config(_with_keys(keys), environ={"SAME": f" {SECRET}"}, base_dir=str(tmp_path))
    assert SECRET not in str(info.value)
    assert str(info.value).splitlines() == [
        f"{KEYS_PATH}[2]: duplicate API key (same as {KEYS_PATH}[0])",
        f"{KEYS_PATH}[3]: duplicate API key (same as {KEYS_PATH}[0])",
    ]


def test_the_same_key_in_two_backends_is_allowed() -> None:
    data = {"providers": [provider(backends=[backend(), backend(name="b1")])]}
    assert [b.api_keys for b in parse_config(data).providers[0].backends] == [(SECRET,)] * 2


# -- admin -----------------------------------------------------------------------------


def test_admin_without_token() -> None:
    config = parse_config({"admin": {"address": "[::1]:9091"}})
    assert config.admin == AdminConfig(address="[::1]:9091", host="::1", port=9091)


def test_admin_token_file_is_relative_to_base_dir_and_stripped(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token").write_text(f"\n {TOKEN}\n")
    data = {"admin": {"address": "127.0.0.1:9091", "token_file": "secrets/token"}}
    config = parse_config(data, base_dir=str(tmp_path))
    assert config.admin == AdminConfig(
        address="127.0.0.1:9091",
        host="127.0.0.1",
        port=9091,
        token_file=str(tmp_path / "secrets" / "token"),
        token=TOKEN,
    )
    assert TOKEN not in repr(config)


def test_admin_may_share_port_0_with_a_listener() -> None:
    data = {"listen": [{"address": "127.0.0.1:0"}], "admin": {"address": "127.0.0.1:0"}}
    admin = parse_config(data).admin
    assert admin is not None
    assert admin.port == 0


def test_admin_may_use_the_port_of_a_listener_on_another_host() -> None:
    data = {"listen": [{"address": "127.0.0.1:8080"}], "admin": {"address": "[::1]:8080"}}
    assert parse_config(data).admin is not None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"admin": None}, "admin: must be a mapping, got null"),
        ({"admin": "127.0.0.1:9091"}, "admin: must be a mapping, got string"),
        ({"admin": {}}, "admin.address: is required"),
        ({"admin": {"address": "127.0.0.1:9091", "tls": {}}}, "admin.tls: unknown key"),
        (
            {"admin": {"address": 9091}},
            'admin.address: must be a string such as "127.0.0.1:8080", got integer',
        ),
        ({"admin": {"address": "9091"}}, 'admin.address: must be "host:port" or "[ipv6]:port"'),
        (
            {"admin": {"address": "admin.internal:9091"}},
            'admin.address: host must be an IP address or "localhost"',
        ),
        (
            {"admin": {"address": "127.0.0.1:70000"}},
            "admin.address: port must be a number from 0 to 65535",
        ),
        # The default listener is 127.0.0.1:8080.
        ({"admin": {"address": "127.0.0.1:8080"}}, "admin.address: already used by listen[0]"),
        (
            {
                "listen": [{"address": "127.0.0.1:8080"}, {"address": "[::1]:9091"}],
                "admin": {"address": "[0:0::1]:9091"},
            },
            "admin.address: already used by listen[1]",
        ),
        (
            {"admin": {"address": "127.0.0.1:9091", "token_file": ""}},
            "admin.token_file: must not be empty",
        ),
        (
            {"admin": {"address": "127.0.0.1:9091", "token_file": ["t"]}},
            "admin.token_file: must be a string, got list",
        ),
    ],
)
def test_bad_admin(data: object, expected: str) -> None:
    assert errors_of(data) == [expected]


UNSAFE_TOKEN = "token file {file} contains whitespace or control characters"


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (None, "cannot read token file {file}: No such file or directory"),
        (b" \n", "token file {file} is empty"),
        (b"\xff" + TOKEN.encode(), "token file {file} is not valid UTF-8"),
        (b"t" * (64 * 1024 + 1), "token file {file} is too large to hold a token"),
        (f"{TOKEN} {TOKEN}\n".encode(), UNSAFE_TOKEN),
        (f"{TOKEN}\x00".encode(), UNSAFE_TOKEN),
    ],
)
def test_bad_admin_token_file(tmp_path: Path, write: bytes | None, message: str) -> None:
    token_file = tmp_path / "token"
    if write is not None:
        token_file.write_bytes(write)
    data = {"admin": {"address": "127.0.0.1:9091", "token_file": "token"}}
    with pytest.raises(ConfigErrors) as info:
        parse_config(data, base_dir=str(tmp_path))
    assert str(info.value).splitlines() == ["admin.token_file: " + message.format(file=token_file)]
    assert TOKEN not in str(info.value)
    assert TOKEN not in repr(info.value)


def test_admin_token_file_that_is_a_directory(tmp_path: Path) -> None:
    data = {"admin": {"address": "127.0.0.1:9091", "token_file": "."}}
    assert errors_of(data, base_dir=str(tmp_path)) == [
        f"admin.token_file: cannot read token file {tmp_path}: Is a directory"
    ]


def test_admin_address_and_token_errors_are_both_reported(tmp_path: Path) -> None:
    data = {"admin": {"address": "127.0.0.1:8080", "token_file": "absent"}}
    assert errors_of(data, base_dir=str(tmp_path)) == [
        "admin.address: already used by listen[0]",
        f"admin.token_file: cannot read token file {tmp_path}/absent: No such file or directory",
    ]


# -- secrets never appear in errors -----------------------------------------------------


def test_secrets_never_appear_in_errors(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(f"{SECRET}\n{SECRET}\n")
    (tmp_path / "good-key").write_text(SECRET)
    (tmp_path / "token").write_text(f"{TOKEN}\t{SECRET}\n")
    data = {
        "admin": {"address": "127.0.0.1:9091", "token_file": "token"},
        "providers": [
            provider(
                backends=[
                    backend(api_key=f"{SECRET} trailing words"),
                    _backend_without_key(name="b1", api_key_env="KEY_VAR"),
                    _backend_without_key(name="b2", api_key_file="key"),
                    backend(name="b3", url=f"https://user:{SECRET}@api.example.com"),
                    backend(name="b4", url=f"https://api.example.com/?key={SECRET}"),
                    backend(name="b5", api_key=SECRET, api_key_env="KEY_VAR"),
                    _backend_without_key(
                        name="b6",
                        api_keys=[
                            {"api_key": f"{SECRET}\n{SECRET}"},
                            {"api_key_env": "KEY_VAR"},
                            {"api_key_file": "key"},
                            {"api_key": SECRET, "api_key_file": "key"},
                        ],
                    ),
                    _backend_without_key(
                        name="b7",
                        api_keys=[{"api_key_file": "good-key"}, {"api_key": f" {SECRET}\n"}],
                    ),
                ]
            )
        ],
    }
    with pytest.raises(ConfigErrors) as info:
        parse_config(data, environ={"KEY_VAR": f"{SECRET}\x00"}, base_dir=str(tmp_path))
    text = str(info.value)
    for secret in (SECRET, TOKEN):
        assert secret not in text
        assert secret not in repr(info.value)
    b6 = "providers[0].backends[6].api_keys"
    assert text.splitlines() == [
        f"admin.token_file: token file {tmp_path}/token contains whitespace or control characters",
        "providers[0].backends[0].api_key: the key contains whitespace or control characters",
        "providers[0].backends[1].api_key_env: environment variable KEY_VAR contains whitespace"
        " or control characters",
        f"providers[0].backends[2].api_key_file: key file {tmp_path}/key contains whitespace"
        " or control characters",
        "providers[0].backends[3].url: must not contain user info (put credentials in api_key,"
        " api_key_env or api_key_file)",
        "providers[0].backends[4].url: must not contain a query string (?...)",
        "providers[0].backends[5]: needs exactly one of api_key, api_key_env, api_key_file,"
        " api_keys (found api_key, api_key_env)",
        f"{b6}[0].api_key: the key contains whitespace or control characters",
        f"{b6}[1].api_key_env: environment variable KEY_VAR contains whitespace"
        " or control characters",
        f"{b6}[2].api_key_file: key file {tmp_path}/key contains whitespace or control characters",
        f"{b6}[3]: needs exactly one of api_key, api_key_env, api_key_file"
        " (found api_key, api_key_file)",
        "providers[0].backends[7].api_keys[1]: duplicate API key"
        " (same as providers[0].backends[7].api_keys[0])",
    ]


def test_yaml_syntax_errors_do_not_quote_the_file(tmp_path: Path) -> None:
    config_file = tmp_path / "relayd.yaml"
    config_file.write_text(f'providers:\n  - api_key: "{SECRET}\n')
    with pytest.raises(ConfigErrors) as info:
        load_config(str(config_file))
    assert SECRET not in str(info.value)
    assert [str(error) for error in info.value.errors] == [
        f"{config_file}:3:1: YAML syntax error: found unexpected end of stream"
        " (while scanning a quoted scalar at line 2, column 14)"
    ]


# -- reading files --------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    config_file = tmp_path / "relayd.yaml"
    config_file.write_text("listen:\n  - address: [1, 2\nclients: []\n")
    with pytest.raises(ConfigErrors) as info:
        load_config(str(config_file))
    (error,) = info.value.errors
    assert error.path == f"{config_file}:3:8"
    assert error.message == (
        "YAML syntax error: expected ',' or ']', but got ':'"
        " (while parsing a flow sequence at line 2, column 14)"
    )


def test_unreadable_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigErrors) as info:
        load_config(missing)
    assert str(info.value) == f"{missing}: cannot read file: No such file or directory"


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    config_file = tmp_path / "relayd.yaml"
    config_file.write_bytes(b"clients: \xff\n")
    with pytest.raises(ConfigErrors) as info:
        load_config(str(config_file))
    assert str(info.value) == f"{config_file}: not valid utf-8 text (byte 9)"


def test_file_with_a_control_character(tmp_path: Path) -> None:
    config_file = tmp_path / "relayd.yaml"
    config_file.write_bytes(b"clients: \x01\n")
    with pytest.raises(ConfigErrors) as info:
        load_config(str(config_file))
    assert str(info.value) == f"{config_file}: contains a control character (character 9)"


def test_validation_errors_from_a_file(tmp_path: Path) -> None:
    config_file = tmp_path / "relayd.yaml"
    config_file.write_text(
        "listen:\n  - address: 127.0.0.1:8080\n    wat: 1\nmax_body_bytes: yes\n"
    )
    with pytest.raises(ConfigErrors) as info:
        load_config(str(config_file))
    assert str(info.value).splitlines() == [
        "listen[0].wat: unknown key",
        "max_body_bytes: must be a positive integer, got boolean",
    ]


def test_load_config_uses_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAYD_TEST_KEY", SECRET)
    config_file = tmp_path / "relayd.yaml"
    config_file.write_text(
        "providers:\n"
        "  - name: p\n"
        "    type: openai\n"
        "    backends: [{name: b, url: 'https://h', api_key_env: RELAYD_TEST_KEY}]\n"
    )
    assert only_backend(load_config(str(config_file))).api_keys == (SECRET,)


# -- limits and the state store ----------------------------------------------------------


def test_client_limits_and_upstream_limits_parse() -> None:
    client = {
        "name": "c",
        "key_sha256": "a" * 64,
        "limits": {"requests_per_minute": 60, "tokens_per_day": 1000, "reserve_output_tokens": 0},
    }
    config = parse_config(
        {"clients": [client], **with_backend(limits={"tokens_per_minute": 500, "per": "backend"})}
    )
    limits = config.clients[0].limits
    assert limits is not None
    assert (limits.requests_per_minute, limits.tokens_per_minute, limits.tokens_per_day) == (
        60,
        None,
        1000,
    )
    assert limits.reserve_output_tokens == 0
    upstream = only_backend(config).limits
    assert upstream is not None and (upstream.tokens_per_minute, upstream.per) == (500, "backend")
    assert config.state.store == "memory"


def test_empty_limits_mean_no_limits() -> None:
    client = {"name": "c", "key_sha256": "a" * 64, "limits": {}}
    assert parse_config({"clients": [client]}).clients[0].limits is None


def test_redis_state_parses_url_and_reads_the_password_file(tmp_path: Path) -> None:
    (tmp_path / "redis.pass").write_text("pw-123\n")
    state = parse_config(
        {
            "state": {
                "store": "redis",
                "url": "rediss://relay@cache.internal:6380/3",
                "password_file": "redis.pass",
                "on_store_failure": "closed",
                "fallback_instances": 3,
                "timeout": 0.2,
                "key_prefix": "prod",
            }
        },
        base_dir=str(tmp_path),
    ).state
    assert (state.host, state.port, state.db, state.tls, state.username) == (
        "cache.internal",
        6380,
        3,
        True,
        "relay",
    )
    assert state.password == "pw-123" and "pw-123" not in repr(state)
    assert (state.on_store_failure, state.fallback_instances, state.timeout) == ("closed", 3, 0.2)
    assert state.key_prefix == "prod"


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"store": "etcd"}, "state.store: must be one of memory, redis; got 'etcd'"),
        ({"store": "redis"}, "state.url: required with store: redis"),
        (
            {"store": "redis", "url": "http://x"},
            "state.url: must start with redis:// or rediss:// (TLS)",
        ),
        (
            {"store": "redis", "url": "redis://u:pw@x"},
            "state.url: must not contain a password; put it in state.password_file",
        ),
        (
            {"store": "redis", "url": "redis://x/db1"},
            "state.url: database must be a number, got 'db1'",
        ),
        ({"url": "redis://x"}, "state.url: only used with store: redis"),
        (
            {"on_store_failure": "maybe"},
            "state.on_store_failure: must be one of open, closed; got 'maybe'",
        ),
        (
            {"key_prefix": "{a}"},
            "state.key_prefix: must contain only letters, digits, '_', '.', ':' and '-'",
        ),
        ({"fallback_instances": 0}, "state.fallback_instances: must be a positive integer, got 0"),
        (
            {"store": "redis", "url": "redis://x", "ca_file": "ca.pem"},
            "state.ca_file: only used with a rediss:// url",
        ),
    ],
)
def test_bad_state(state: dict[str, Any], expected: str) -> None:
    assert errors_of({"state": state}) == [expected]


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (
            {"requests_per_minute": 0},
            "clients[0].limits.requests_per_minute: must be a positive integer, got 0",
        ),
        ({"tokens_per_hour": 5}, "clients[0].limits.tokens_per_hour: unknown key"),
        (
            {"max_concurrent": True},
            "clients[0].limits.max_concurrent: must be a positive integer, got boolean",
        ),
    ],
)
def test_bad_client_limits(limits: dict[str, Any], expected: str) -> None:
    client = {"name": "c", "key_sha256": "a" * 64, "limits": limits}
    assert errors_of({"clients": [client]}) == [expected]


def test_bad_upstream_limits() -> None:
    errors = errors_of(with_backend(limits={"per": "model", "requests_per_minute": -1}))
    assert errors == [
        "providers[0].backends[0].limits.per: must be one of key, backend; got 'model'",
        "providers[0].backends[0].limits.requests_per_minute: must be a positive integer, got -1",
    ]


def test_route_targets_across_provider_types() -> None:
    data = {
        "providers": [provider(), provider(name="p1", type="openai")],
        "routes": [
            {
                "api": "openai",
                "models": ["smart"],
                "strategy": "weighted",
                "strict": True,
                "default_max_tokens": 2048,
                "anthropic_version": "2023-06-01",
                "targets": [
                    {"provider": "p0", "model": "claude-sonnet-4-5", "weight": 3},
                    {"provider": "p1", "model": "gpt-5"},
                ],
            },
            {"api": "anthropic", "provider": "p1"},
        ],
    }
    config = parse_config(data)
    assert config.routes == (
        RouteConfig(
            api="openai",
            targets=(
                RouteTargetConfig("p0", "claude-sonnet-4-5", 3),
                RouteTargetConfig("p1", "gpt-5", 1),
            ),
            models=("smart",),
            strategy="weighted",
            strict=True,
            default_max_tokens=2048,
            anthropic_version="2023-06-01",
        ),
        RouteConfig(api="anthropic", targets=(RouteTargetConfig("p1"),)),
    )
    assert config.routes[1].default_max_tokens == 4096
    assert config.routes[1].strategy == "ordered"
