"""The load-and-fault suite's figures: collected by the tests, printed at the end of the
run and written to build/load-report.json (timings and memory are reported, never
asserted, except the soak's RSS bound)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPORT_FILE = Path(__file__).resolve().parents[2] / "build" / "load-report.json"
_FIGURES: dict[str, dict[str, Any]] = {}


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A dict the test fills with its figures, kept under the test's name."""
    figures: dict[str, Any] = {}
    yield figures
    if figures:
        _FIGURES[request.node.name] = figures


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("load-and-fault suite figures")
    for name, figures in _FIGURES.items():
        terminalreporter.write_line(f"{name}: {json.dumps(figures, sort_keys=True)}")
    REPORT_FILE.parent.mkdir(exist_ok=True)
    REPORT_FILE.write_text(json.dumps(_FIGURES, indent=2, sort_keys=True) + "\n")
    terminalreporter.write_line(f"(also in {REPORT_FILE})")
