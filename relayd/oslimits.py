"""The operating system's limits a relay meets under load: open files and the accept
backlog.

Every client connection and every upstream connection is a file descriptor; systemd
starts services with a soft limit of 1024 (and a far higher hard limit), which a burst of
a few hundred streams exhausts (each uses two). A listen backlog beyond
``net.core.somaxconn`` is cut to it by the kernel, silently.
"""

from __future__ import annotations

import resource
from pathlib import Path

SOMAXCONN = Path("/proc/sys/net/core/somaxconn")


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, wanted
    return soft, soft


def somaxconn(path: Path = SOMAXCONN) -> int | None:
    """The kernel's cap on a listen backlog, or None where it cannot be read."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
