"""Checks of the keys that steer requests by who sends them: ``trusted_proxies``,
``geoip.database``, ``providers[].regions``, and ``routes[].affinity.key``.

Like :mod:`relayd.config.checks`, each takes a YAML value and its key path and reports
problems to the :class:`~relayd.config.checks.Context`; none raises for a bad value.
"""

from __future__ import annotations

import ipaddress
import re

from relayd.config.checks import NAME_RE, Context, items, local_path, string, type_name
from relayd.config.errors import key_path
from relayd.geoip import GeoDatabase, GeoDatabaseError

__all__ = [
    "AFFINITY_KEYS",
    "CONTINENTS",
    "Network",
    "affinity_key",
    "allow_list",
    "mmdb_file",
    "networks",
    "region_map",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The continent codes of MaxMind databases (``continent.code``).
CONTINENTS = frozenset({"AF", "AN", "AS", "EU", "NA", "OC", "SA"})
#: ``routes[].affinity.key`` values besides ``header NAME``.
AFFINITY_KEYS = ("session", "auto", "none")

_COUNTRY_RE = re.compile(r"[A-Z]{2}")
_HEADER_NAME_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


def networks(value: object, path: str, context: Context) -> tuple[Network, ...] | None:
    """A list of IP networks in CIDR notation (``10.0.0.0/8``, ``::1/128``) or single
    addresses (a /32 or /128)."""
    found: list[Network] = []
    for each_path, item in items(value, path, context, empty=None):
        text = string(item, each_path, context)
        if text is None:
            continue
        try:
            found.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            context.error(each_path, f"must be an IP address or network (CIDR), got {text!r}")
    return tuple(found)


def allow_list(value: object, path: str, context: Context) -> tuple[Network, ...] | None:
    """A non-empty list of networks (``clients[].allow_from``)."""
    if isinstance(value, list) and not value:
        context.error(path, "must list at least one network (leave the key out to allow all)")
        return None
    return networks(value, path, context)


def region_map(value: object, path: str, context: Context) -> tuple[tuple[str, str], ...] | None:
    """``{CODE: REGION}``: ISO 3166 country codes (``JP``) or continent codes (``EU``)
    to region names, plus ``default``. ``country:XX`` and ``continent:XX`` say which one
    a code is where both exist (``AS`` is American Samoa and Asia); a bare code is
    looked up as a country first, then as a continent."""
    if not isinstance(value, dict):
        context.error(path, f"must be a mapping of country or continent codes to region "
                            f"names, got {type_name(value)}")
        return None
    if not value:
        context.error(path, "must map at least one code (or default) to a region")
        return None
    result: list[tuple[str, str]] = []
    for code, region in value.items():
        each_path = key_path(path, code)
        if not isinstance(code, str) or _code(code) is None:
            shown = repr(code) if isinstance(code, str) and len(code) < 40 else type_name(code)
            context.error(
                each_path if isinstance(code, str) else path,
                f"{shown} is not a two-letter country code (JP), a continent code "
                f"({', '.join(sorted(CONTINENTS))}), country:XX, continent:XX or default",
            )
            continue
        name = string(region, each_path, context)
        if name is None:
            continue
        if not NAME_RE.fullmatch(name):
            context.error(each_path, "must be a region name (letters, digits, '_', '.', '-')")
            continue
        result.append((_code(code) or code, name))
    return tuple(result)


def _code(code: str) -> str | None:
    """The normalized key of a region map entry, or None if it is no code."""
    if code == "default":
        return code
    kind, _, rest = code.partition(":")
    if rest:
        if kind == "country" and _COUNTRY_RE.fullmatch(rest):
            return code
        if kind == "continent" and rest in CONTINENTS:
            return code
        return None
    return code if _COUNTRY_RE.fullmatch(code) else None


def affinity_key(value: object, path: str, context: Context) -> str | None:
    """``session``, ``auto``, ``none``, or ``header NAME`` (kept as ``header name``,
    lower-cased)."""
    text = string(value, path, context)
    if text is None:
        return None
    if text in AFFINITY_KEYS:
        return text
    kind, _, name = text.partition(" ")
    if kind == "header" and _HEADER_NAME_RE.fullmatch(name.strip()):
        return f"header {name.strip().lower()}"
    shown = repr(text) if len(text) < 60 else "this value"
    context.error(path, f"must be session, auto, none or 'header NAME'; got {shown}")
    return None


def mmdb_file(value: object, path: str, context: Context) -> str | None:
    """A readable MaxMind DB file (checked by opening it, as relayd will)."""
    where = local_path(value, path, context)
    if where is None:
        return None
    try:
        GeoDatabase.check(where)
    except GeoDatabaseError as exc:
        context.error(path, str(exc))
        return None
    return where
