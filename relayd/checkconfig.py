"""``relayd-checkconfig``: validate a configuration file without starting relayd.

Like ``nginx -t``: prints one summary line and exits 0 when the file is valid, or
prints every problem (one ``path: message`` per line) to stderr and exits 1. It loads
the file exactly as the daemon does, so API key files and ``api_key_env`` variables
must be readable/set in the environment it runs in.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from relayd.config import DEFAULT_CONFIG_PATH, Config, ConfigErrors, load_config

PROG = "relayd-checkconfig"

# What ``twistd relayd`` imports to start: a file can only be "OK" if the daemon that
# would read it can start at all (a broken install lacking a module cannot).
_DAEMON_MODULE = "relayd.service"


def main(argv: list[str] | None = None) -> int:
    """Check the configuration file named on the command line; return the exit status."""
    args = _argument_parser().parse_args(argv)
    path: str = args.config
    try:
        config = load_config(path)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        print(f"{PROG}: {path}: {_count(len(exc.errors), 'error')}", file=sys.stderr)
        return 1
    try:
        importlib.import_module(_DAEMON_MODULE)
    except ImportError as exc:
        print(
            f"{PROG}: {path} is valid, but relayd cannot start: its installation is "
            f"broken ({type(exc).__name__}: {exc})",
            file=sys.stderr,
        )
        return 1
    print(f"{PROG}: {path} OK: {summarize(config)}")
    return 0


def summarize(config: Config) -> str:
    """A one-line count of what the configuration defines, and the admin listener if any."""
    backends = sum(len(provider.backends) for provider in config.providers)
    summary = (
        f"{_count(len(config.listen), 'listener')}, "
        f"{_count(len(config.clients), 'client')}, "
        f"{_count(len(config.providers), 'provider')} ({_count(backends, 'backend')}), "
        f"{_count(len(config.routes), 'route')}"
    )
    if config.admin is not None:
        access = "token required" if config.admin.token is not None else "no token"
        summary += f", admin on {config.admin.address} ({access})"
    return summary


def _count(number: int, noun: str) -> str:
    """``"1 route"``, ``"2 routes"``."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _argument_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Check a relayd configuration file and report every problem in it.",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=DEFAULT_CONFIG_PATH,
        help=f"configuration file to check (default: {DEFAULT_CONFIG_PATH})",
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
