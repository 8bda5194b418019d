"""Tests for the ``relayd-checkconfig`` command (:mod:`relayd.checkconfig`)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from relayd import checkconfig

SECRET = "sk-checkconfig-SECRET-42"
TOKEN = "admin-checkconfig-TOKEN-7"

VALID_YAML = """\
listen:
  - address: "127.0.0.1:0"
  - address: "[::1]:0"
clients:
  - {name: team-a, key_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}
providers:
  - name: anthropic
    type: anthropic
    backends:
      - {name: us, url: "https://api.anthropic.com", api_key_env: RELAYD_CHECK_KEY}
      - name: eu
        url: "https://eu.example.com"
        priority: 1
        api_keys: [{api_key_file: key}, {api_key: "sk-second"}]
  - name: openai
    type: openai
    backends:
      - {name: main, url: "https://api.openai.com", api_key: "sk-inline"}
routes:
  - {api: anthropic, provider: anthropic}
  - {api: openai, provider: openai}
"""

INVALID_YAML = f"""\
listen: []
providers:
  - name: anthropic
    type: anthropic
    backends:
      - {{name: us, url: "https://api.anthropic.com", api_key: "{SECRET} x", weight: 0}}
routes:
  - {{api: openai, provider: anthropic, strategy: random}}
"""


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding an API key file, with the key variable set in the environment."""
    (tmp_path / "key").write_text("sk-from-file\n")
    monkeypatch.setenv("RELAYD_CHECK_KEY", "sk-from-env")
    return tmp_path


def write(directory: Path, text: str) -> str:
    """Write ``text`` to ``relayd.yaml`` in ``directory`` and return its path."""
    path = directory / "relayd.yaml"
    path.write_text(text)
    return str(path)


def test_valid_file_prints_one_summary_line(
    config_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(config_dir, VALID_YAML)
    assert checkconfig.main(["-c", path]) == 0
    out, err = capsys.readouterr()
    assert out == (
        f"relayd-checkconfig: {path} OK: 2 listeners, 1 client, 2 providers (3 backends),"
        " 2 routes\n"
    )
    assert err == ""


def test_empty_file_counts_the_default_listener(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "")
    assert checkconfig.main(["--config", path]) == 0
    assert capsys.readouterr().out == (
        f"relayd-checkconfig: {path} OK: 1 listener, 0 clients, 0 providers (0 backends),"
        " 0 routes\n"
    )


ADMIN_YAML = """\
listen: [{address: "127.0.0.1:8080"}]
admin: {address: "127.0.0.1:9091", token_file: admin-token}
shutdown_timeout: 10
health: {path: /v1/models}
breaker: {window: 10}
failover: {max_attempts: 2}
"""


def test_summary_names_the_admin_listener(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "admin-token").write_text(f"{TOKEN}\n")
    path = write(tmp_path, ADMIN_YAML)
    assert checkconfig.main(["-c", path]) == 0
    out, err = capsys.readouterr()
    assert out == (
        f"relayd-checkconfig: {path} OK: 1 listener, 0 clients, 0 providers (0 backends),"
        " 0 routes, admin on 127.0.0.1:9091 (token required)\n"
    )
    assert TOKEN not in out
    assert err == ""


def test_summary_says_when_the_admin_listener_has_no_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, 'admin: {address: "[::1]:9091"}\n')
    assert checkconfig.main(["-c", path]) == 0
    assert capsys.readouterr().out.endswith(", 0 routes, admin on [::1]:9091 (no token)\n")


def test_admin_errors_never_show_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(f"{TOKEN} {TOKEN}\n")
    path = write(tmp_path, ADMIN_YAML.replace("9091", "8080").replace("max_attempts: 2", "x: 1"))
    assert checkconfig.main(["-c", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "admin.address: already used by listen[0]",
        f"admin.token_file: token file {token_file} contains whitespace or control characters",
        "failover.x: unknown key",
        f"relayd-checkconfig: {path}: 3 errors",
    ]
    assert TOKEN not in err


def test_invalid_file_prints_every_error(
    config_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(config_dir, INVALID_YAML)
    assert checkconfig.main(["-c", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "listen: must contain at least one listener",
        "providers[0].backends[0].api_key: the key contains whitespace or control characters",
        "providers[0].backends[0].weight: must be a positive integer, got 0",
        "routes[0].strategy: must be one of ordered, weighted; got 'random'",
        f"relayd-checkconfig: {path}: 4 errors",
    ]
    assert SECRET not in err


def test_missing_file_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "absent.yaml")
    assert checkconfig.main(["-c", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}: cannot read file: No such file or directory",
        f"relayd-checkconfig: {path}: 1 error",
    ]


def test_missing_environment_variable_is_reported(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RELAYD_CHECK_KEY")
    path = write(config_dir, VALID_YAML)
    assert checkconfig.main(["-c", path]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "providers[0].backends[0].api_key_env: environment variable RELAYD_CHECK_KEY is not set",
        f"relayd-checkconfig: {path}: 1 error",
    ]


def test_default_path_is_etc_relayd_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        checkconfig.main(["--help"])
    assert info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "configuration file to check (default: /etc/relayd.yaml)" in help_text


def test_without_arguments_the_default_path_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "{}")
    monkeypatch.setattr(checkconfig, "DEFAULT_CONFIG_PATH", path)
    assert checkconfig.main([]) == 0
    assert capsys.readouterr().out.startswith(f"relayd-checkconfig: {path} OK: ")


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        checkconfig.main(["--bogus"])
    assert info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_runs_as_a_module(tmp_path: Path) -> None:
    path = write(tmp_path, "max_body_bytes: 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "relayd.checkconfig", "-c", path],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"max_body_bytes: must be a positive integer, got 0\nrelayd-checkconfig: {path}: 1 error\n"
    )


def test_a_broken_installation_is_not_ok(
    config_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A valid file is still an error when the daemon that would read it cannot import
    (the .deb once lacked relayd.limits: checkconfig said OK, twistd could not start)."""
    path = write(config_dir, VALID_YAML)
    real_import = importlib.import_module

    def broken(name: str) -> object:
        if name == "relayd.service":
            raise ModuleNotFoundError("No module named 'relayd.limits'")
        return real_import(name)

    monkeypatch.setattr(importlib, "import_module", broken)
    assert checkconfig.main(["-c", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "relayd cannot start" in err and "No module named 'relayd.limits'" in err
