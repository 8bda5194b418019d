"""Secrets in the configuration: upstream API keys (inline, from the environment or from
a file), the admin token and Redis password files, and client key digests.

Every message here names where a secret came from (the key, the variable, the file)
and never the secret itself, nor a file's contents or an environment value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from relayd.config.checks import (
    UNSAFE_CHAR_RE,
    Context,
    items,
    local_path,
    mapping,
    string,
    type_name,
)
from relayd.config.errors import key_path, os_reason
from relayd.config.schema import Section

__all__ = [
    "BACKEND_KEY_SOURCES",
    "KEY_SOURCES",
    "MAX_SECRET_FILE_BYTES",
    "SIGNING_SECRET_SOURCES",
    "key_digest",
    "read_api_keys",
    "read_signing_secret",
    "secret_file",
]

# Key and token files are tiny; the cap keeps a mistaken path such as /dev/zero from
# hanging startup.
MAX_SECRET_FILE_BYTES = 64 * 1024

KEY_SOURCES = ("api_key", "api_key_env", "api_key_file")  # one key (also in api_keys items)
BACKEND_KEY_SOURCES = (*KEY_SOURCES, "api_keys")  # a backend gives exactly one of these
SIGNING_SECRET_SOURCES = ("secret_file", "secret_env")  # clients[].signing: one of them
_HEX_DIGEST_RE = re.compile(r"[0-9A-Fa-f]{64}")


def read_api_keys(section: Section) -> None:
    """A backend's ``api_keys``: exactly one of api_key, api_key_env, api_key_file (one
    key) or api_keys (a list of such sources), the section's hooked keys."""
    given = _one_source(section.fields, section.path, BACKEND_KEY_SOURCES, section.context)
    if given is None:
        return
    path, value = section.key_path(given), section.fields[given]
    if given == "api_keys":
        keys = _key_list(value, path, section.context)
    else:
        key = _api_key(given, value, path, section.context)
        keys = None if key is None else (key,)
    if keys is not None:
        section.values["api_keys"] = keys


def read_signing_secret(section: Section) -> None:
    """A client's signing secret: exactly one of ``secret_file`` (a file, relative to
    the configuration's directory) or ``secret_env`` (an environment variable)."""
    given = _one_source(section.fields, section.path, SIGNING_SECRET_SOURCES, section.context)
    if given is None:
        return
    path, value = section.key_path(given), section.fields[given]
    if given == "secret_env":
        secret = _env_key(value, path, section.context)
    else:
        where = local_path(value, path, section.context)
        secret = None if where is None else secret_file(
            where, path, "signing secret", "a signing secret", section.context
        )
    if secret is not None:
        if len(secret) < 16:
            section.context.error(path, "the signing secret must be at least 16 characters")
            return
        section.values["secret"] = secret


def _one_source(
    fields: Mapping[str, object], path: str, sources: Sequence[str], context: Context
) -> str | None:
    """The one key of ``sources`` present in ``fields``; none or several is an error."""
    given = [key for key in sources if key in fields]
    if len(given) != 1:
        found = f" (found {', '.join(given)})" if given else ""
        context.error(path, f"needs exactly one of {', '.join(sources)}{found}")
        return None
    return given[0]


def _key_list(value: object, path: str, context: Context) -> tuple[str, ...] | None:
    """A non-empty ``api_keys`` list of ``{api_key|api_key_env|api_key_file: ...}``
    mappings; the same key twice is an error at the later item."""
    pairs = items(value, path, context, empty="must list at least one key")
    first_seen: dict[str, str] = {}
    keys: list[str | None] = []
    for item_path, item in pairs:
        fields = mapping(item, item_path, KEY_SOURCES, context)
        given = None if fields is None else _one_source(fields, item_path, KEY_SOURCES, context)
        key = None
        if fields is not None and given is not None:
            key = _api_key(given, fields[given], key_path(item_path, given), context)
        if key is not None and key in first_seen:
            context.error(item_path, f"duplicate API key (same as {first_seen[key]})")
            key = None
        elif key is not None:
            first_seen[key] = item_path
        keys.append(key)
    valid = [key for key in keys if key is not None]
    return tuple(valid) if valid and len(valid) == len(keys) else None


def _api_key(source: str, value: object, path: str, context: Context) -> str | None:
    """One API key from ``source`` (api_key, api_key_env or api_key_file) at ``path``."""
    loaders: dict[str, Callable[[object, str, Context], str | None]] = {
        "api_key": _literal_key,
        "api_key_env": _env_key,
        "api_key_file": _file_key,
    }
    return loaders[source](value, path, context)


def _literal_key(value: object, path: str, context: Context) -> str | None:
    """A key written inline in the file."""
    if not isinstance(value, str):
        context.error(path, f"must be a string, got {type_name(value)}")
        return None
    return _clean_secret(value, path, "the key", context)


def _env_key(value: object, path: str, context: Context) -> str | None:
    """A key read from the environment variable named by ``value``."""
    variable = string(value, path, context)
    if variable is None:
        return None
    secret = context.environ.get(variable)
    if secret is None:
        context.error(path, f"environment variable {variable} is not set")
        return None
    return _clean_secret(secret, path, f"environment variable {variable}", context)


def _file_key(value: object, path: str, context: Context) -> str | None:
    """A key read from the file at ``value`` (relative to the configuration's directory)."""
    key_file = local_path(value, path, context)
    if key_file is None:
        return None
    return secret_file(key_file, path, "key", "an API key", context)


def secret_file(file: str, path: str, what: str, holds: str, context: Context) -> str | None:
    """The secret held in ``file`` (a ``what`` file that ``holds`` it): at most 64 KiB of
    UTF-8, stripped, non-empty and header-safe. Errors name the file, never its contents."""
    try:
        with open(file, "rb") as stream:
            raw = stream.read(MAX_SECRET_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:
        context.error(path, f"cannot read {what} file {file}: {os_reason(exc)}")
        return None
    if len(raw) > MAX_SECRET_FILE_BYTES:
        context.error(path, f"{what} file {file} is too large to hold {holds}")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        context.error(path, f"{what} file {file} is not valid UTF-8")
        return None
    return _clean_secret(text, path, f"{what} file {file}", context)


def _clean_secret(value: str, path: str, origin: str, context: Context) -> str | None:
    """Strip surrounding whitespace; the secret must then be non-empty and header-safe.

    ``origin`` describes where the secret came from; the secret itself is never shown.
    """
    secret = value.strip()
    if not secret:
        context.error(path, f"{origin} is empty")
        return None
    if UNSAFE_CHAR_RE.search(secret):
        context.error(path, f"{origin} contains whitespace or control characters")
        return None
    return secret


def key_digest(value: object, path: str, context: Context) -> bytes | None:
    """A client's key digest: 64 hex digits (either case) as 32 raw bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        context.error(path, "must be a string (quote the hex digest), got integer")
        return None
    if not isinstance(value, str) or not _HEX_DIGEST_RE.fullmatch(value):
        context.error(path, "must be 64 hexadecimal characters (a SHA-256 digest)")
        return None
    return bytes.fromhex(value)
