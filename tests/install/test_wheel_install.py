"""relayd as it is installed: the wheel built from a clean copy, in a fresh virtualenv.

The editable checkout that the rest of the suite runs from hides packaging mistakes (a
subpackage missing from the wheel imports fine from the source tree). These tests build
the wheel from the files git knows, install it (not editable) with its dependencies at
the versions of ``requirements.lock`` into a new virtualenv, and use only that venv:
every ``relayd`` module imports, twistd finds the plugin, and ``twistd relayd`` started
from there relays one call per API to the fake upstream installed with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relayd.testing.processes import ProcessGroup, wait_for

REPO = Path(__file__).resolve().parents[2]
CLIENT_KEY = "sk-relay-wheel-check"


def run(args: list[str], cwd: Path, timeout: float = 600) -> str:
    result = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"),
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout


def clean_copy(dest: Path) -> Path:
    """The files git tracks (and untracked ones it does not ignore), as in ``make deb``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True, timeout=60,
    ).stdout.split(b"\0")
    src = dest / "src"
    archive = dest / "src.tar"
    with tarfile.open(archive, "w") as tar:
        for name in filter(None, listed):
            path = REPO / name.decode()
            if path.is_file():
                tar.add(path, arcname=name.decode())
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    return src


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv holding the relayd wheel and its locked dependencies."""
    work = tmp_path_factory.mktemp("wheel")
    src = clean_copy(work)
    wheels = work / "wheels"
    # No build isolation: build with this environment's setuptools, no download needed.
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(src)], cwd=work)
    (wheel,) = wheels.glob("relayd-*.whl")
    env = work / "venv"
    run([sys.executable, "-m", "venv", str(env)], cwd=work)
    run([str(env / "bin" / "pip"), "install", "-q", "-c", str(REPO / "requirements.lock"),
         str(wheel)], cwd=work)
    yield env


def test_every_module_imports_from_the_installed_wheel(venv: Path, tmp_path: Path) -> None:
    script = (
        "import importlib, json, pkgutil, relayd\n"
        "names = [m.name for m in pkgutil.walk_packages(relayd.__path__, 'relayd.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "print(json.dumps({'file': relayd.__file__, 'modules': names}))\n"
    )
    found = json.loads(run([str(venv / "bin" / "python"), "-c", script], cwd=tmp_path))
    assert found["file"].startswith(str(venv)), "relayd was imported from outside the venv"
    # Every module of the source tree is in the wheel, and nothing else.
    source = sorted(
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for path in (REPO / "relayd").rglob("*.py")
    )
    assert sorted([*found["modules"], "relayd"]) == source


@pytest.mark.parametrize("workers", [1, 2])
def test_twistd_from_the_venv_relays_both_apis(venv: Path, tmp_path: Path, workers: int) -> None:
    python = str(venv / "bin" / "python")
    plugins = run([str(venv / "bin" / "twistd"), "--help"], cwd=tmp_path)
    assert "relayd" in plugins
    with ProcessGroup(tmp_path) as processes:
        upstream = processes.upstream("up", python=python)
        config = {
            "listen": [{"address": "127.0.0.1:0"}],
            "clients": [{"name": "c", "key_sha256": hashlib.sha256(CLIENT_KEY.encode())
                         .hexdigest()}],
            "providers": [
                {"name": "anthropic", "type": "anthropic",
                 "backends": [{"name": "a", "url": upstream.url, "api_key": "sk-up"}]},
                {"name": "openai", "type": "openai",
                 "backends": [{"name": "o", "url": upstream.url, "api_key": "sk-up"}]},
            ],
            "routes": [{"api": "anthropic", "provider": "anthropic"},
                       {"api": "openai", "provider": "openai"}],
            "workers": workers,
        }
        relay = processes.relay(config, python=python)
        if workers > 1:
            wait_for(lambda: "relayd serving with 2 workers" in relay.log_text(), 30,
                     "the workers to serve", relay.log_path)
        base = relay.url()
        anthropic = post(base + "/v1/messages",
                         {"model": "claude-x", "max_tokens": 8,
                          "messages": [{"role": "user", "content": "hi"}]},
                         {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"})
        assert anthropic["type"] == "message" and anthropic["content"][0]["text"]
        openai = post(base + "/v1/chat/completions",
                      {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]},
                      {"authorization": f"Bearer {CLIENT_KEY}"})
        assert openai["object"] == "chat.completion"
        assert openai["choices"][0]["message"]["content"]
        # The relay (and its workers) and the fake upstream that answered are the venv's.
        assert relay.process is not None and upstream.process is not None
        pids = [relay.process.pid, upstream.process.pid]
        children = Path(f"/proc/{relay.process.pid}/task/{relay.process.pid}/children")
        workers_pids = [int(p) for p in children.read_text().split()]
        assert len(workers_pids) == (workers if workers > 1 else 0)
        for pid in pids + workers_pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert str(venv).encode() in cmdline


def post(url: str, payload: object, headers: dict[str, str]) -> Any:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST")
    request.add_header("content-type", "application/json")
    for name, value in headers.items():
        request.add_header(name, value)
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        return json.loads(response.read())
