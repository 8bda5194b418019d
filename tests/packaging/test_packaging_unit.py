"""Fast checks of the packaged systemd unit (debian/relayd.service), run by ``make test``.

The full check (build the .deb, install it into a fresh Debian 12 root, run the unit's
command lines there) is ``make deb-test``; see docs/packaging.md.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from relayd.config import load_config

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "debian" / "relayd.service"
CONFFILE = REPO / "debian" / "relayd.yaml"
VENV = "/opt/venvs/relayd"
# The dev virtualenv running these tests has the same console scripts as the package's.
DEV_BIN = Path(sys.executable).parent
MAX_EXPOSURE = 2.0


def unit_directives(path: Path = UNIT) -> dict[str, list[str]]:
    """``Key=value`` lines by key (a key may repeat), section names dropped."""
    directives: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def one(key: str) -> str:
    values = unit_directives().get(key, [])
    assert len(values) == 1, f"{key}= should appear once in {UNIT.name}, found {values}"
    return values[0]


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing: run `sh scripts/system-deps.sh` (make test does)")
    return tool


def localized_unit(directory: Path) -> Path:
    """A copy of the unit whose commands point at the dev venv instead of the package's."""
    text = UNIT.read_text()
    text = text.replace("/usr/bin/relayd-checkconfig", f"{DEV_BIN}/relayd-checkconfig")
    text = text.replace(f"{VENV}/bin/", f"{DEV_BIN}/")
    copy = directory / UNIT.name
    copy.write_text(text)
    return copy


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    # verify insists that every Exec*= binary exists, so it checks a copy whose commands
    # are the dev venv's (same console scripts); everything else is the packaged unit.
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(localized_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def exposure() -> float:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for relayd\.service: (\d+\.\d+) ", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def test_security_exposure_is_ok_and_documented() -> None:
    level = exposure()
    assert level <= MAX_EXPOSURE, f"exposure {level} > {MAX_EXPOSURE}"
    # The README and docs/packaging.md state the figure: keep them true.
    for doc in ("README.md", "docs/packaging.md"):
        text = (REPO / doc).read_text()
        assert f"exposure {level}" in text, f"{doc} should say 'exposure {level}'"


def test_service_type_commands_and_user() -> None:
    assert one("Type") == "notify"
    assert one("User") == "relayd"
    assert one("Group") == "relayd"
    assert one("Restart") == "on-failure"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert shlex.split(one("ExecStartPre")) == [
        "/usr/bin/relayd-checkconfig", "-c", "/etc/relayd.yaml"
    ]
    assert shlex.split(one("ExecStart")) == [
        f"{VENV}/bin/twistd",
        "--nodaemon",
        "--pidfile=",
        "--logger=relayd.logs.journal_observer",
        "relayd",
        "-c",
        "/etc/relayd.yaml",
    ]
    environment = dict(item.split("=", 1) for item in one("Environment").split())
    assert environment == {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def test_stop_waits_for_the_drain() -> None:
    shipped = load_config(str(CONFFILE))
    timeout = one("TimeoutStopSec")
    assert timeout.endswith("s") and float(timeout[:-1]) >= shipped.shutdown_timeout + 10
    assert one("KillSignal") == "SIGTERM"
    assert one("KillMode") == "mixed"  # SIGTERM to relayd alone, SIGKILL to all at the timeout


def test_open_file_limit_leaves_room_for_many_connections() -> None:
    """The campaign: under the shipped unit (soft limit 1024) 1,100 slow clients left no
    descriptor for ordinary requests."""
    assert int(one("LimitNOFILE")) >= 65536


def test_hardening() -> None:
    directives = unit_directives()
    assert one("CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert one("AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    for key in (
        "NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectClock",
        "ProtectHostname", "ProtectKernelTunables", "ProtectKernelModules",
        "ProtectKernelLogs", "ProtectControlGroups", "RestrictNamespaces", "RestrictRealtime",
        "RestrictSUIDSGID", "LockPersonality", "RemoveIPC", "PrivateMounts", "PrivateIPC",
    ):
        assert one(key) == "yes", key
    assert one("ProtectSystem") == "strict"
    assert one("RestrictAddressFamilies").split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert directives["SystemCallFilter"][0] == "@system-service"
    assert "ReadWritePaths" not in directives  # relayd writes nothing
    # pyOpenSSL's TLS callbacks need W+X memory: with this, TLS listeners fail.
    assert "MemoryDenyWriteExecute" not in directives
    # CAP_NET_BIND_SERVICE would not apply to the host's network from a user namespace.
    assert "PrivateUsers" not in directives


def test_exec_start_runs_relayd_with_notify_and_drain_exit(tmp_path: Path) -> None:
    """The unit's ExecStart flags work with the locked Twisted: READY=1, then STOPPING=1
    and exit 0 on SIGTERM (the service's whole lifecycle, minus systemd)."""
    config = tmp_path / "relayd.yaml"
    config.write_text(
        CONFFILE.read_text().replace('"127.0.0.1:8080"', '"127.0.0.1:0"', 1)
    )
    argv = shlex.split(one("ExecStart"))
    argv[0] = str(DEV_BIN / "twistd")
    argv[argv.index("/etc/relayd.yaml")] = str(config)
    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), PYTHONUNBUFFERED="1",
               PYTHONDONTWRITEBYTECODE="1")
    process = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen: list[str] = []
    try:
        assert b"READY=1" in notify.recv(4096)
        # relayd answers once the reactor runs (and has its SIGTERM handler installed).
        assert process.stdout is not None
        for line in process.stdout:
            seen.append(line)
            found = re.search(r"relayd listening on (http://127\.0\.0\.1:\d+)", line)
            if found:
                break
        assert found, "no 'relayd listening on' line"
        with pytest.raises(urllib.error.HTTPError):  # any HTTP answer will do
            urllib.request.urlopen(found.group(1) + "/v1/models", timeout=30)
        process.send_signal(signal.SIGTERM)
        assert b"STOPPING=1" in notify.recv(4096)
        output, _ = process.communicate(timeout=30)
    finally:
        notify.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    assert not (tmp_path / "twistd.pid").exists()  # --pidfile= writes none
    output = "".join(seen) + output
    lines = output.splitlines()
    assert any(line.startswith("[relayd.service#info] relayd listening on http://127.0.0.1:")
               for line in lines), output
    # journald stamps lines itself: none starts with a timestamp.
    assert not any(re.match(r"\d{4}-\d\d-\d\d", line) for line in lines), output
