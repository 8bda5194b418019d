"""ProcessGroup, the integration tests' harness: whatever it started is stopped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from relayd.testing.processes import ProcessGroup


def test_stop_all_stops_every_member_even_one_whose_start_failed(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path)
    sleeper = group.popen([sys.executable, "-c", "import time; time.sleep(120)"],
                          tmp_path / "sleeper.log")
    upstream = group.upstream("up")
    with pytest.raises(RuntimeError, match="exited early"):
        group.upstream("broken", tls=(str(tmp_path / "no-cert.pem"), str(tmp_path / "no.key")))
    assert sleeper.poll() is None and upstream.process is not None
    assert upstream.process.poll() is None
    group.stop_all()
    assert upstream.process.poll() == 0  # SIGTERM: a clean stop
    assert sleeper.poll() is not None
    group.stop_all()  # nothing left: a second call is harmless


def test_the_context_manager_stops_on_an_error(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), ProcessGroup(tmp_path) as group:
        upstream = group.upstream("up")
        1 / 0  # noqa: B018
    assert upstream.process is not None and upstream.process.poll() is not None
