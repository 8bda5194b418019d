"""Where relayd listens and what it connects to: listen addresses, backend URLs and
the Redis URL, checked like the values of :mod:`relayd.config.checks`.

Listen hosts are IP literals or ``localhost`` only, so that a listener binds where the
file says without a name lookup. URLs are never quoted in errors: a URL may carry a
credential someone pasted into it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple
from urllib.parse import SplitResult, urlsplit

from relayd.config.checks import UNSAFE_CHAR_RE, Context, string, type_name

__all__ = [
    "ListenAddress",
    "RedisAddress",
    "backend_url",
    "listen_address",
    "normalized_host",
    "redis_url",
]

_PORT_RE = re.compile(r"[0-9]{1,5}")
DEFAULT_REDIS_PORT = 6379


class ListenAddress(NamedTuple):
    """A listen address as written (``text``) and parsed."""

    text: str
    host: str
    port: int


class RedisAddress(NamedTuple):
    """A Redis URL without its password (``url``) and what it says."""

    url: str
    host: str
    port: int
    db: int
    tls: bool
    username: str | None


# -- listen addresses ---------------------------------------------------------------


def listen_address(value: object, path: str, context: Context) -> ListenAddress | None:
    """``host:port`` or ``[v6]:port``; the port is 0 (any free one) to 65535."""
    if not isinstance(value, str):
        context.error(path, f'must be a string such as "127.0.0.1:8080", got {type_name(value)}')
        return None
    split = _split_address(value)
    if isinstance(split, str):
        context.error(path, split)
        return None
    host, port_text = split
    port = _parse_port(port_text)
    if port is None:
        context.error(path, "port must be a number from 0 to 65535")
        return None
    return ListenAddress(value, host, port)


def normalized_host(host: str) -> str:
    """A canonical spelling of a listen host, for spotting two listeners on one address."""
    if host == "localhost":
        return host
    return str(ipaddress.ip_address(host))


def _split_address(address: str) -> tuple[str, str] | str:
    """Split ``host:port`` or ``[v6]:port`` into its parts, or return what is wrong."""
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
        if not sep:
            return 'must be "host:port" or "[ipv6]:port"'
        if not _is_ipv6(host):
            return "only an IPv6 address may be written in brackets"
        return host, port
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        return 'must be "host:port" or "[ipv6]:port"'
    if ":" in host:
        return 'an IPv6 address must be written in brackets, as in "[::1]:8080"'
    if host != "localhost" and not _is_ip(host):
        return 'host must be an IP address or "localhost"'
    return host, port


def _is_ip(host: str) -> bool:
    """True if ``host`` is an IPv4 or IPv6 literal."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_ipv6(host: str) -> bool:
    """True if ``host`` is an IPv6 literal."""
    return _is_ip(host) and ipaddress.ip_address(host).version == 6


def _parse_port(text: str) -> int | None:
    """The port number in ``text`` if it is a decimal from 0 to 65535."""
    if not _PORT_RE.fullmatch(text):
        return None
    port = int(text)
    return port if port <= 65535 else None


# -- backend URLs -------------------------------------------------------------------


def backend_url(value: object, path: str, context: Context) -> str | None:
    """An http(s) base URL with a host and an optional path prefix, normalized."""
    text = string(value, path, context)
    if text is None:
        return None
    problem = _url_problem(text)
    if problem is not None:
        context.error(path, problem)
        return None
    return _normalize_url(text)


def _url_problem(url: str) -> str | None:
    """What is wrong with a backend URL, or None. Never quotes the URL."""
    if UNSAFE_CHAR_RE.search(url):
        return "must not contain whitespace or control characters"
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return "is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if "@" in parts.netloc:
        return (
            "must not contain user info (put credentials in api_key, api_key_env or api_key_file)"
        )
    problems = (
        (not parts.hostname, "must include a host"),
        (not _valid_port(parts), "has an invalid port"),
        ("#" in url, "must not contain a fragment (#...)"),
        ("?" in url, "must not contain a query string (?...)"),
    )
    return next((message for failed, message in problems if failed), None)


def _valid_port(parts: SplitResult) -> bool:
    """An absent port, or one from 1 to 65535 (an upstream cannot listen on port 0)."""
    try:
        port = parts.port
    except ValueError:  # not a number, or above 65535
        return False
    return port is None or port > 0


def _normalize_url(url: str) -> str:
    """Lower-case the scheme and drop trailing slashes; the path prefix is kept."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


# -- Redis --------------------------------------------------------------------------


def redis_url(value: object, path: str, context: Context) -> RedisAddress | None:
    """``redis://[user@]host[:port][/db]`` or ``rediss://`` (TLS); no password inside."""
    text = string(value, path, context)
    if text is None:
        return None
    try:
        parts = urlsplit(text)
        port = parts.port or DEFAULT_REDIS_PORT
    except ValueError as exc:
        context.error(path, f"is not a valid URL: {exc}")
        return None
    host = parts.hostname or ""
    db_text = parts.path.strip("/") or "0"
    problems = (
        (parts.scheme not in ("redis", "rediss"), "must start with redis:// or rediss:// (TLS)"),
        (
            parts.password is not None,
            "must not contain a password; put it in state.password_file",
        ),
        (not host, "must name a host"),
        (bool(parts.query or parts.fragment), "must not have a query or fragment"),
        (not db_text.isdigit(), f"database must be a number, got {db_text!r}"),
    )
    problem = next((message for failed, message in problems if failed), None)
    if problem is not None:
        context.error(path, problem)
        return None
    shown = f"{parts.scheme}://{parts.netloc}{parts.path}"
    tls = parts.scheme == "rediss"
    return RedisAddress(shown, host, port, int(db_text), tls, parts.username)
