"""The shipped example configuration stays valid, and every key of the schema documented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from relayd.config import load_config, model
from relayd.config.schema import section_keys

ROOT = Path(__file__).resolve().parents[2]


def schema_keys() -> dict[str, tuple[str, ...]]:
    """The keys of every section, by its model class, as the schema on the fields says."""
    sections = [
        kind
        for kind in vars(model).values()
        if isinstance(kind, type) and dataclasses.is_dataclass(kind)
    ]
    return {kind.__name__: section_keys(kind) for kind in sections}


def test_schema_keys_come_from_every_kind_of_field() -> None:
    keys = schema_keys()
    assert keys["PoolConfig"] == ("max_idle_connections", "idle_timeout")  # checked
    assert "limits" in keys["ClientConfig"]  # nested
    assert {"api_key", "api_key_env", "api_key_file", "api_keys"} <= set(keys["BackendConfig"])
    assert "host" not in keys["ListenerConfig"]  # derived from address, no key
    assert "source" not in keys["Config"]


def test_example_config_is_valid() -> None:
    config = load_config(str(ROOT / "etc" / "relayd.yaml"))
    assert [listener.address for listener in config.listen] == ["127.0.0.1:8080"]
    assert config.admin is not None and config.admin.host == "127.0.0.1"
    assert {p.name for p in config.providers} == {"anthropic", "openai"}


def test_every_key_of_the_schema_is_documented() -> None:
    docs = (ROOT / "docs" / "configuration.md").read_text()
    # A key is documented by a table row of its own (`key`, or `tls.key` for a nested
    # one) or by a heading naming it (`## \`max_body_bytes\``).
    missing = sorted(
        f"{section}: {key}"
        for section, keys in schema_keys().items()
        for key in keys
        if not re.search(rf"^\| `(?:[a-z_]+\.)*{key}` \|", docs, re.MULTILINE)
        and not re.search(rf"^#+ .*`{key}`", docs, re.MULTILINE)
    )
    assert not missing, f"keys of the schema not documented in docs/configuration.md: {missing}"


def test_every_key_of_the_example_is_in_the_schema() -> None:
    """Commented-out keys too: the example must not teach a key relayd does not know."""
    text = (ROOT / "etc" / "relayd.yaml").read_text()
    keys = set(re.findall(r"^\s*#?\s*-?\s*([a-z_]+):", text, re.MULTILINE))
    keys |= set(re.findall(r"[{,]\s*([a-z_]+):", text))
    assert keys, "no keys found"
    known = {key for section in schema_keys().values() for key in section}
    known.add("default")  # the catch-all entry of a regions map (whose keys are data)
    unknown = sorted(keys - known)
    assert not unknown, f"keys in etc/relayd.yaml that no section of the schema has: {unknown}"
