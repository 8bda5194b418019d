"""Real processes for integration tests, benchmarks and the demo.

:class:`RelaydProcess` runs ``twistd -n relayd -c FILE`` and :class:`FakeUpstreamProcess`
runs the fake upstream, each on 127.0.0.1 ephemeral ports, with output going to a log
file (never to a pipe that could fill up). Both are stopped by PID.
:class:`ProcessGroup` starts several of them and guarantees they are all stopped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import yaml

_LISTENING = re.compile(r"relayd listening on (https?://[^\s]+)")
_ADMIN_LISTENING = re.compile(r"relayd admin listening on (http://\S+)")


def _bin(name: str, python: str | None = None) -> str:
    """A console script installed beside ``python`` (default: this interpreter)."""
    return str(Path(python or sys.executable).with_name(name))


def wait_for(predicate: Any, timeout: float, what: str, log: Path | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{tail}")


@dataclass
class FakeUpstreamProcess:
    """``python -m relayd.testing.fakeprovider`` on an ephemeral port."""

    workdir: Path
    name: str = "upstream"
    tls: tuple[str, str] | None = None
    listen: str = "127.0.0.1:0"
    python: str = sys.executable  # another venv's interpreter runs its installed copy
    extra_args: tuple[str, ...] = ()  # more command-line flags, e.g. ("--config", "{...}")
    process: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def log_path(self) -> Path:
        """Where its stdout and stderr go."""
        return self.workdir / f"{self.name}.log"

    def start(self) -> FakeUpstreamProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        port_file = self.workdir / f"{self.name}.port"
        log = self.log_path
        args = [self.python, "-m", "relayd.testing.fakeprovider", "--listen", self.listen,
                "--port-file", str(port_file), *self.extra_args]
        if self.tls:
            args += ["--tls-cert", self.tls[0], "--tls-key", self.tls[1]]
        port_file.unlink(missing_ok=True)
        with log.open("wb") as out:
            # Not the caller's directory: with ``-m``, a checkout there would shadow an
            # installed relayd.
            self.process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir
            )

        def listening() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n" + log.read_text())
            return port_file.exists()

        wait_for(listening, 20, f"{self.name} to listen", log)
        self.port = int(port_file.read_text().strip())
        return self

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _call(self, method: str, path: str, payload: object = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("content-type", "application/json")
        # The control endpoints are test plumbing: don't verify the fake's certificate.
        context = ssl._create_unverified_context() if self.tls else None
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return json.loads(response.read() or b"null")

    def requests(self, include_probes: bool = False) -> list[dict[str, Any]]:
        """What the fake upstream received; relayd's health probes left out by default."""
        result: list[dict[str, Any]] = self._call("GET", "/_fake/requests")
        if include_probes:
            return result
        return [r for r in result if not _is_probe(r)]

    def reset(self) -> None:
        self._call("POST", "/_fake/reset", {})

    def configure(self, **knobs: Any) -> None:
        self._call("POST", "/_fake/config", knobs)

    def stop(self) -> int | None:
        """SIGTERM (then SIGKILL if it lingers); its exit code, ``None`` if never started."""
        return stop_process(self.process)


def _is_probe(recorded: dict[str, Any]) -> bool:
    agents = recorded.get("headers", {}).get("user-agent", [])
    return any("health-probe" in agent for agent in agents)


@dataclass
class RelaydProcess:
    """``twistd -n relayd -c FILE`` with a config written from a dict."""

    workdir: Path
    config: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    python: str | None = None  # run the twistd installed beside this interpreter
    logger: str | None = None  # twistd --logger, e.g. the unit's relayd.logs.journal_observer
    process: subprocess.Popen[bytes] | None = None
    urls: list[str] = field(default_factory=list)

    @property
    def config_path(self) -> Path:
        return self.workdir / "relayd.yaml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "relayd.log"

    def start(self, expect_listeners: int | None = None) -> RelaydProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        wanted = expect_listeners or len(self.config.get("listen", [{}]))
        args = [_bin("twistd", self.python), "-n", "--pidfile="]
        if self.logger is not None:
            args.append(f"--logger={self.logger}")
        args += ["relayd", "-c", str(self.config_path)]
        environ = dict(os.environ, **self.env)
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir, env=environ
            )

        def listening() -> list[str] | None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError("relayd exited early:\n" + self.log_path.read_text())
            found = _LISTENING.findall(self.log_path.read_text())
            return found if len(found) >= wanted else None

        self.urls = wait_for(listening, 30, "relayd to listen", self.log_path)
        return self

    def url(self, scheme: str = "http") -> str:
        return next(u for u in self.urls if u.startswith(scheme + "://"))

    def admin_url(self, timeout: float = 20) -> str:
        """The admin listener's URL, as last announced in the log (a reload may move it)."""
        found: list[str] = wait_for(
            lambda: _ADMIN_LISTENING.findall(self.log_text()), timeout, "the admin listener",
            self.log_path,
        )
        return found[-1]

    def log_text(self) -> str:
        return self.log_path.read_text()

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> int | None:
        return stop_process(self.process)


@dataclass
class RedisServerProcess:
    """A private ``redis-server`` on a free 127.0.0.1 port, without persistence.

    :meth:`kill` and :meth:`start` again (same port) simulate an outage and a recovery.
    """

    workdir: Path
    port: int = 0
    password: str | None = None
    tls: tuple[Path, Path, Path] | None = None  # certificate chain, key, CA: TLS only
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls is not None else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.tls is not None:
            chain, key, ca = self.tls
            args[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", str(chain), "--tls-key-file", str(key),
                     "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        log = self.workdir / "redis.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        wait_for(self._answers, 15, "redis-server to answer PING", log)
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError("redis-server exited early")
        try:
            self.command("PING")
        except OSError:
            return False
        return True

    def command(self, *words: str) -> bytes:
        """Send one command and return the raw reply (enough for tests)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw:
            sock: socket.socket = raw
            if self.tls is not None:
                sock = ssl.create_default_context(cafile=str(self.tls[2])).wrap_socket(
                    raw, server_hostname="127.0.0.1"
                )
            request = b""
            if self.password is not None:
                request += _resp("AUTH", self.password)
            request += _resp(*words)
            sock.sendall(request)
            reply = b""
            expected = 2 if self.password is not None else 1
            while reply.count(b"\r\n") < expected:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
            return reply

    def kill(self) -> None:
        """SIGKILL: the outage case, nothing is flushed."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        stop_process(self.process)


def _resp(*words: str) -> bytes:
    out = b"*%d\r\n" % len(words)
    for word in words:
        data = word.encode()
        out += b"$%d\r\n%s\r\n" % (len(data), data)
    return out


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 10) -> int | None:
    """SIGTERM the process we started, then SIGKILL if it lingers; returns its exit code."""
    if process is None or process.poll() is not None:
        return None if process is None else process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout)


class _Stoppable(Protocol):
    def stop(self) -> object: ...


@dataclass
class _Popened:
    """A plain subprocess in a :class:`ProcessGroup`."""

    process: subprocess.Popen[bytes]

    def stop(self) -> int | None:
        return stop_process(self.process)


class ProcessGroup:
    """The processes one test (or test module) starts, all stopped by :meth:`stop_all`.

    Each process joins the group *before* it starts, so one whose start fails or
    times out is stopped as well; :meth:`stop_all` stops them newest first (a relay
    before its upstreams) and carries on past a process that fails to stop.  Use it
    as a context manager, or through the integration tests' ``processes`` fixture,
    instead of a ``try``/``finally`` per test.

    Working directories: upstreams in ``workdir/upstreams`` (their port file and log
    named after them), a relay or a Redis server in ``workdir/<name>``.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._members: list[_Stoppable] = []

    def upstream(self, name: str = "upstream", **options: Any) -> FakeUpstreamProcess:
        """A started fake upstream; ``options`` as for :class:`FakeUpstreamProcess`."""
        process = FakeUpstreamProcess(self.workdir / "upstreams", name, **options)
        self._members.append(process)
        return process.start()

    def relay(
        self,
        config: dict[str, Any],
        name: str = "relayd",
        expect_listeners: int | None = None,
        **options: Any,
    ) -> RelaydProcess:
        """A started relay on ``config``; ``options`` as for :class:`RelaydProcess`."""
        process = RelaydProcess(self.workdir / name, config, **options)
        self._members.append(process)
        return process.start(expect_listeners)

    def redis(self, name: str = "redis", **options: Any) -> RedisServerProcess:
        """A started private ``redis-server``; ``options`` as for :class:`RedisServerProcess`."""
        process = RedisServerProcess(self.workdir / name, **options)
        self._members.append(process)
        return process.start()

    def popen(self, args: Sequence[str], log: Path, **options: Any) -> subprocess.Popen[bytes]:
        """Any other command, its output (stdout and stderr) to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **options)
        self._members.append(_Popened(process))
        return process

    def stop_all(self) -> None:
        """Stop every member, newest first; the first error is raised once all are stopped."""
        errors: list[BaseException] = []
        while self._members:
            try:
                self._members.pop().stop()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop_all()
