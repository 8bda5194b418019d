"""Tests for :mod:`relayd.config.loader`: parsing, defaults, merging and every error rule."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

from relayd.config import (
    DEFAULT_MAX_BODY_BYTES,
    BackendConfig,
    ClientConfig,
    Config,
    ConfigError,
    ConfigErrors,
    ListenerConfig,
    PoolConfig,
    ProviderConfig,
    RouteConfig,
    TimeoutsConfig,
    TlsConfig,
    load_config,
    parse_config,
)

SECRET = "sk-test-SECRET-value-0123456789"
DIGEST_A = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
DIGEST_B = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
DEFAULT_LISTENER = ListenerConfig(address="127.0.0.1:8080", host="127.0.0.1", port=8080)

EXAMPLE_YAML = """\
listen:
  - address: "127.0.0.1:8080"
  - address: "0.0.0.0:8443"
    tls: {certificate: tls/fullchain.pem, private_key: /etc/relayd/tls/privkey.pem}
max_body_bytes: 1048576
timeouts: {connect: 10, first_byte: 600, idle: 300, total: 3600}
pool: {max_idle_connections: 32, idle_timeout: 50}
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
    backends:
      - name: us
        url: "https://api.anthropic.com/"
        api_key_env: ANTHROPIC_API_KEY
        weight: 3
      - name: backup
        url: "http://gateway.internal:8000/anthropic/"
        api_key_file: keys/backup
        max_concurrent: 8
        timeouts: {idle: 30.5}
        pool: {max_idle_connections: 4}
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
    config_file = tmp_path / "relayd.yaml"
    config_file.write_text(EXAMPLE_YAML)

    config = load_config(str(config_file), environ={"ANTHROPIC_API_KEY": "sk-from-env"})

    global_timeouts = TimeoutsConfig(connect=10.0, first_byte=600.0, idle=300.0, total=3600.0)
    anthropic_timeouts = TimeoutsConfig(connect=5.0, first_byte=600.0, idle=300.0, total=3600.0)
    global_pool = PoolConfig(max_idle_connections=32, idle_timeout=50.0)
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
                        api_key="sk-from-env",
                        weight=3,
                        max_concurrent=256,
                        pool=global_pool,
                        timeouts=anthropic_timeouts,
                    ),
                    BackendConfig(
                        name="backup",
                        url="http://gateway.internal:8000/anthropic",
                        api_key="sk-from-file",
                        weight=1,
                        max_concurrent=8,
                        pool=PoolConfig(max_idle_connections=4, idle_timeout=50.0),
                        timeouts=TimeoutsConfig(
                            connect=5.0, first_byte=600.0, idle=30.5, total=3600.0
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
                        api_key="sk-inline",
                        pool=PoolConfig(max_idle_connections=32, idle_timeout=20.0),
                        timeouts=global_timeouts,
                    ),
                ),
            ),
        ),
        routes=(
            RouteConfig(api="anthropic", provider="anthropic", models=("claude-*",)),
            RouteConfig(api="openai", provider="openai", models=None),
        ),
        max_body_bytes=1048576,
        timeouts=global_timeouts,
        pool=global_pool,
        source=str(config_file),
    )


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


def test_source_argument_is_kept() -> None:
    assert parse_config({}, source="test.yaml").source == "test.yaml"


def test_backend_defaults_follow_the_global_settings() -> None:
    config = parse_config({"providers": [provider()]})
    assert only_backend(config) == BackendConfig(
        name="b0", url="https://api.example.com", api_key=SECRET
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
    assert only_backend(config).api_key == SECRET


def test_api_key_file_is_relative_to_base_dir(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(f"{SECRET}\n")
    data = {"providers": [provider(backends=[_backend_without_key(api_key_file="key")])]}
    assert only_backend(parse_config(data, base_dir=str(tmp_path))).api_key == SECRET


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
    assert only_backend(config).api_key == SECRET
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
        ({"routes": [{"api": "anthropic"}]}, "routes[0].provider: is required"),
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
        (
            {"routes": [{"api": "openai", "provider": "p0"}], "providers": [provider()]},
            "routes[0].provider: providers of type anthropic cannot serve the openai API yet"
            " (no translation)",
        ),
        (
            {
                "routes": [{"api": "anthropic", "provider": "p0"}],
                "providers": [provider(type="openai")],
            },
            "routes[0].provider: providers of type openai cannot serve the anthropic API yet"
            " (no translation)",
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
        "providers[0].backends[0]: needs exactly one of api_key, api_key_env, api_key_file"
    ]


def test_two_api_key_sources_are_an_error() -> None:
    data = with_backend(api_key_env="KEY_VAR", api_key_file="/k")
    assert errors_of(data, environ={"KEY_VAR": SECRET}) == [
        "providers[0].backends[0]: needs exactly one of api_key, api_key_env, api_key_file"
        " (found api_key, api_key_env, api_key_file)"
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
        "routes": [{"api": "openai", "provider": "p0"}, {"api": "openai", "provider": "p9"}],
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
        "routes[0].provider: providers of type anthropic cannot serve the openai API yet"
        " (no translation)",
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


# -- secrets never appear in errors -----------------------------------------------------


def test_secrets_never_appear_in_errors(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(f"{SECRET}\n{SECRET}\n")
    data = {
        "providers": [
            provider(
                backends=[
                    backend(api_key=f"{SECRET} trailing words"),
                    _backend_without_key(name="b1", api_key_env="KEY_VAR"),
                    _backend_without_key(name="b2", api_key_file="key"),
                    backend(name="b3", url=f"https://user:{SECRET}@api.example.com"),
                    backend(name="b4", url=f"https://api.example.com/?key={SECRET}"),
                    backend(name="b5", api_key=SECRET, api_key_env="KEY_VAR"),
                ]
            )
        ]
    }
    with pytest.raises(ConfigErrors) as info:
        parse_config(data, environ={"KEY_VAR": f"{SECRET}\x00"}, base_dir=str(tmp_path))
    text = str(info.value)
    assert SECRET not in text
    assert SECRET not in repr(info.value)
    assert text.splitlines() == [
        "providers[0].backends[0].api_key: the key contains whitespace or control characters",
        "providers[0].backends[1].api_key_env: environment variable KEY_VAR contains whitespace"
        " or control characters",
        f"providers[0].backends[2].api_key_file: key file {tmp_path}/key contains whitespace"
        " or control characters",
        "providers[0].backends[3].url: must not contain user info (put credentials in api_key,"
        " api_key_env or api_key_file)",
        "providers[0].backends[4].url: must not contain a query string (?...)",
        "providers[0].backends[5]: needs exactly one of api_key, api_key_env, api_key_file"
        " (found api_key, api_key_env)",
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
    assert only_backend(load_config(str(config_file))).api_key == SECRET
