"""``make run``'s demo: relayd plus the fake upstream, both stopped with the demo."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

from relayd.testing.processes import ProcessGroup, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]


def test_demo_answers_and_sigterm_stops_relayd_and_the_fake_upstream(
    tmp_path: Path, processes: ProcessGroup
) -> None:
    upstream_port, relay_port = free_port(), free_port()
    config = yaml.safe_load((REPO / "etc" / "relayd.yaml").read_text())
    config["listen"] = [{"address": f"127.0.0.1:{relay_port}"}]
    del config["admin"]
    for provider in config["providers"]:
        provider["backends"][0]["url"] = f"http://127.0.0.1:{upstream_port}"
    (tmp_path / "relayd.yaml").write_text(yaml.safe_dump(config))
    log = tmp_path / "demo.log"
    demo = processes.popen(
        [sys.executable, "-m", "relayd.testing.demo", "-c", str(tmp_path / "relayd.yaml"),
         "--upstream", f"127.0.0.1:{upstream_port}"],
        log,
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{relay_port}/v1/messages",
        data=json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 16,
                         "messages": [{"role": "user", "content": "Hi"}]}).encode(),
        headers={"x-api-key": "sk-relay-demo", "anthropic-version": "2023-06-01",
                 "content-type": "application/json"},
    )

    def answered() -> bool:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    wait_for(answered, 30, "the demo relay to answer", log)
    children = subprocess.run(
        ["pgrep", "-P", str(demo.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert len(children) == 2  # twistd and the fake upstream
    demo.send_signal(signal.SIGTERM)
    assert demo.wait(30) == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid)


def _state(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"
