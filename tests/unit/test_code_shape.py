"""The shape issue 13 asked of the request path, kept: no class over 400 lines, and no
private Twisted attribute outside the adapters that own that dependency."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "relayd"
MAX_CLASS_LINES = 400
# The small adapters that own a private Twisted dependency (each tested against the
# installed Twisted).
ADAPTERS = {"client_protocol.py", "generic_channel.py", "pool.py"}
_PRIVATE = re.compile(r"\.(_factory|_connections|_exitSignal|_disconnected)\b")


def test_no_class_is_over_400_lines() -> None:
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({size} lines)")
    assert not long, long


def test_private_twisted_attributes_stay_in_their_adapters() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in ROOT.rglob("*.py") if path.name not in ADAPTERS
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _PRIVATE.search(line)
    ]
    assert not found, found
