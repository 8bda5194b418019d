"""Fast checks of debian/ and the package's lock file, run by ``make test``."""

from __future__ import annotations

import configparser
import ipaddress
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relayd.config import ConfigErrors, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
DEBIAN = REPO / "debian"
CONFFILE = DEBIAN / "relayd.yaml"
LOCK = REPO / "requirements-deb.txt"


def normalize(name: str) -> str:
    """PEP 503 project name normalization."""
    return re.sub(r"[-_.]+", "-", name).lower()


# -- the conffile ---------------------------------------------------------------------------


def test_shipped_config_passes_checkconfig() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relayd.checkconfig", "-c", str(CONFFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(
        "OK: 1 listener, 0 clients, 0 providers (0 backends), 0 routes"
    )


def test_shipped_config_is_safe() -> None:
    config = load_config(str(CONFFILE))
    assert [listener.address for listener in config.listen] == ["127.0.0.1:8080"]
    assert all(ipaddress.ip_address(listener.host).is_loopback for listener in config.listen)
    assert config.admin is None
    assert not config.clients and not config.providers and not config.routes
    assert "key_sha256: \"0" not in CONFFILE.read_text()  # no real-looking keys


def test_shipped_config_examples_are_valid_once_uncommented() -> None:
    """Uncommenting an example section gives valid YAML that fails only on its placeholders
    (files that do not exist here, the placeholder key hash)."""
    body = CONFFILE.read_text().split("\nlisten:\n", 1)[1]  # the header's comments are prose
    lines = ["listen:"]
    for line in body.splitlines():
        match = re.match(r"^# ((?:[a-z_]+:.*)|(?:  .*))$", line)
        lines.append(match.group(1) if match else line)
    with pytest.raises(ConfigErrors) as raised:
        data = yaml.safe_load("\n".join(lines))
        parse_config(data, source="uncommented", base_dir="/nonexistent")
    for error in raised.value.errors:
        message = str(error)
        assert "cannot read" in message or "key_sha256: must be 64 hexadecimal" in message, message
    assert len(raised.value.errors) == 4


def install_entries() -> list[tuple[str, ...]]:
    """debian/relayd.install as (SOURCE, DEST-DIR) pairs."""
    return [tuple(line.split()) for line in (DEBIAN / "relayd.install").read_text().splitlines()]


def test_conffile_is_installed_0640() -> None:
    assert install_entries()[0] == ("debian/relayd.yaml", "etc/")
    assert "chmod 0640 debian/relayd/etc/relayd.yaml" in (DEBIAN / "rules").read_text()
    postinst = (DEBIAN / "postinst").read_text()
    assert 'dpkg-statoverride --update --add root relayd 0640 "$CONF"' in postinst


def test_operators_kit_is_installed() -> None:
    """The Grafana dashboard and the Prometheus rules go to /usr/share/relayd (deb-test
    checks them in the installed root), and nothing else is installed."""
    assert install_entries() == [
        ("debian/relayd.yaml", "etc/"),
        ("contrib/grafana/relayd.json", "usr/share/relayd/grafana/"),
        ("contrib/prometheus/relayd-rules.yml", "usr/share/relayd/prometheus/"),
    ]
    for source, _dest in install_entries():
        assert (REPO / source).is_file(), source
    deb_test = (REPO / "scripts" / "deb-test.sh").read_text()
    assert '"$ROOT/usr/share/relayd/grafana/relayd.json"' in deb_test
    assert '"$ROOT/usr/share/relayd/prometheus/relayd-rules.yml"' in deb_test


# -- version and lock -----------------------------------------------------------------------


def test_debian_version_matches_setup_cfg() -> None:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.match(r"^relayd \(([^)]+)-(\d+)\) bookworm; urgency=\w+$", first)
    assert match, first
    assert match.group(1) == setup["metadata"]["version"]


def lock_requirements() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of requirements-deb.txt."""
    text = LOCK.read_text().replace("\\\n", " ")
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)\s+(.*)$", line)
        assert match, f"not an exact pin with hashes: {line!r}"
        hashes = re.findall(r"--hash=sha256:(\S+)", match.group(3))
        assert match.group(3).split() == [f"--hash=sha256:{h}" for h in hashes], line
        pins[normalize(match.group(1))] = (match.group(2), hashes)
    return pins


def test_lock_pins_every_file_by_hash() -> None:
    options = [
        line.strip() for line in LOCK.read_text().splitlines() if line.startswith("--")
    ]
    assert options == ["--require-hashes", "--only-binary :all:"]
    pins = lock_requirements()
    assert pins
    for name, (_version, hashes) in pins.items():
        assert hashes, f"{name} has no --hash"
        for digest in hashes:
            assert re.fullmatch(r"[0-9a-f]{64}", digest), (name, digest)


def test_lock_versions_match_requirements_lock() -> None:
    dev: dict[str, str] = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line.strip())
        if match:
            dev[normalize(match.group(1))] = match.group(2)
    for name, (version, _hashes) in lock_requirements().items():
        if name in dev:
            assert version == dev[name], f"{name}: {version} in the lock, {dev[name]} in dev"
        else:
            # only the build tools that requirements.lock leaves unpinned
            assert name in {"setuptools", "wheel"}, f"{name} is not in requirements.lock"


def test_lock_covers_install_requires() -> None:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    pins = lock_requirements()
    for requirement in setup["options"]["install_requires"].split("\n"):
        if requirement.strip():
            name = re.match(r"^\s*([A-Za-z0-9_.\-]+)", requirement)
            assert name and normalize(name.group(1)) in pins, requirement


# -- debian/ scripts ------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["postinst", "prerm", "postrm"])
def test_maintainer_script_parses(script: str) -> None:
    path = DEBIAN / script
    text = path.read_text()
    assert text.startswith("#!/bin/sh\nset -e\n")
    assert "#DEBHELPER#" in text
    result = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_rules_is_executable() -> None:
    assert (DEBIAN / "rules").stat().st_mode & 0o111
    assert (DEBIAN / "rules").read_text().startswith("#!/usr/bin/make -f\n")
