"""The shipped example configuration stays valid and documented."""

from __future__ import annotations

import re
from pathlib import Path

from relayd.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_example_config_is_valid() -> None:
    config = load_config(str(ROOT / "etc" / "relayd.yaml"))
    assert [listener.address for listener in config.listen] == ["127.0.0.1:8080"]
    assert config.admin is not None and config.admin.host == "127.0.0.1"
    assert {p.name for p in config.providers} == {"anthropic", "openai"}


def test_every_key_of_the_example_is_documented() -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text()
    text = (ROOT / "etc" / "relayd.yaml").read_text()
    keys = set(re.findall(r"^\s*#?\s*-?\s*([a-z_]+):", text, re.MULTILINE))
    keys |= set(re.findall(r"[{,]\s*([a-z_]+):", text))
    assert keys, "no keys found"
    # Documented as `key` or as the last part of a dotted path (`tls.certificate`).
    missing = sorted(k for k in keys if not re.search(rf"[`.]{k}`", docs))
    assert not missing, f"keys used in etc/relayd.yaml but not in docs/configuration.md: {missing}"
