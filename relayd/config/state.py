"""The ``state`` section: where limits and usage live, and the Redis connection.

``url``, ``password_file`` and ``ca_file`` mean something only with ``store: redis``,
so they are read by hooks that know the store (read before them) instead of by checks.
"""

from __future__ import annotations

from relayd.config.addresses import redis_url
from relayd.config.checks import Context, local_path
from relayd.config.model import StateConfig
from relayd.config.schema import Section, read_section
from relayd.config.secrets import secret_file

__all__ = ["read_state"]


def read_state(value: object, path: str, context: Context) -> StateConfig | None:
    """The ``state`` mapping at ``path``; None (the default stands) if it is unusable."""
    return read_section(
        StateConfig,
        value,
        path,
        context,
        hooks={"url": _url, "password_file": _password_file, "ca_file": _ca_file},
    )


def _redis_key(section: Section, key: str) -> bool:
    """Whether ``key`` is to be read: it is given with ``store: redis`` and a ``url``.

    With ``store: memory`` giving it is an error; without a ``url`` (an error already
    reported) it is not read.
    """
    if section.get("store") != "redis":
        if key in section.fields:
            section.context.error(section.key_path(key), "only used with store: redis")
        return False
    return key in section.fields and "url" in section.fields


def _url(section: Section) -> None:
    """The Redis URL, required with ``store: redis``, and what it holds."""
    if section.get("store") == "redis" and "url" not in section.fields:
        section.context.error(section.key_path("url"), "required with store: redis")
        return
    if not _redis_key(section, "url"):
        return
    address = section.check("url", redis_url)
    if address is not None:
        section.values.update(address._asdict())


def _password_file(section: Section) -> None:
    """The Redis password (``AUTH``), read from its file at load time."""
    if not _redis_key(section, "password_file"):
        return
    password_file = section.check("password_file", local_path)
    if password_file is None:
        return
    path = section.key_path("password_file")
    password = secret_file(password_file, path, "password", "a password", section.context)
    section.values.update(password_file=password_file, password=password)


def _ca_file(section: Section) -> None:
    """The CA bundle that verifies a ``rediss://`` server."""
    if not _redis_key(section, "ca_file"):
        return
    ca_file = section.check("ca_file", local_path)
    if "url" in section.values and not section.get("tls"):
        section.context.error(section.key_path("ca_file"), "only used with a rediss:// url")
    if ca_file is not None:
        section.values["ca_file"] = ca_file
