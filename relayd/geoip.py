"""Where a client is: its country and continent from a MaxMind DB file, and the region
each provider's ``regions`` map gives that place.

The database (``geoip.database``: GeoLite2-Country or -City, or any MaxMind DB whose
records carry ``country.iso_code`` and ``continent.code``) is read with the
``maxminddb`` package, whole into memory, so that replacing or truncating the file on
disk (``geoipupdate``) can never fault a running relay; a reload opens it again. Answers
are memoised per address (a bounded table): a client sends many requests.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, NamedTuple

import maxminddb

__all__ = ["NOWHERE", "GeoDatabase", "GeoDatabaseError", "Location", "RegionMap"]

#: Addresses whose location is remembered; the least recently used go first beyond it.
MEMO_SIZE = 8192


class GeoDatabaseError(Exception):
    """The database file cannot be used (its message names the problem, not the data)."""


class Location(NamedTuple):
    """Where a request comes from: ``region`` when its client key pins one, else the
    country and continent codes found for its address (None: not known)."""

    country: str | None
    continent: str | None
    region: str | None = None


NOWHERE = Location(None, None)


class GeoDatabase:
    """A MaxMind DB opened for lookups of client addresses."""

    __slots__ = ("_memo", "_reader", "path")

    def __init__(self, reader: Any, path: str) -> None:
        self._reader = reader
        self.path = path
        self._memo: OrderedDict[str, Location] = OrderedDict()

    @classmethod
    def open(cls, path: str) -> GeoDatabase:
        """The database at ``path``, read whole into memory."""
        return cls(_reader(path, maxminddb.MODE_MEMORY), path)

    @staticmethod
    def check(path: str) -> None:
        """Raise :class:`GeoDatabaseError` unless ``path`` opens as a MaxMind DB. For the
        configuration check: the file is mapped, not read (only its metadata is parsed),
        so a 70 MB database is not read twice on every start and reload."""
        _reader(path, maxminddb.MODE_AUTO).close()

    def locate(self, address: str) -> Location:
        """The country and continent of ``address`` (NOWHERE when the database has no
        record, or the address is not an IP address)."""
        memo = self._memo
        found = memo.get(address)
        if found is not None:
            memo.move_to_end(address)
            return found
        try:
            record = self._reader.get(address)
        except ValueError:  # not an IP address (a UNIX socket peer)
            record = None
        found = _location(record)
        memo[address] = found
        if len(memo) > MEMO_SIZE:
            memo.popitem(last=False)
        return found

    def describe(self) -> dict[str, Any]:
        metadata = self._reader.metadata()
        return {
            "path": self.path,
            "type": metadata.database_type,
            "built": metadata.build_epoch,
        }

    def close(self) -> None:
        self._reader.close()


def _reader(path: str, mode: int) -> Any:
    if os.path.isdir(path):  # the mapped modes would call it an invalid database
        raise GeoDatabaseError(f"is a directory, not a MaxMind DB file: {path}")
    try:
        return maxminddb.open_database(path, mode)
    except FileNotFoundError:
        raise GeoDatabaseError(f"no such file: {path}") from None
    except PermissionError:
        raise GeoDatabaseError(f"cannot be read (permission denied): {path}") from None
    except (maxminddb.InvalidDatabaseError, ValueError, OSError) as exc:
        raise GeoDatabaseError(
            f"not a MaxMind DB file ({type(exc).__name__}): {path}"
        ) from None


def _location(record: object) -> Location:
    if not isinstance(record, dict):
        return NOWHERE
    country = _code(record.get("country"), "iso_code") or _code(
        record.get("registered_country"), "iso_code"
    )
    continent = _code(record.get("continent"), "code")
    return Location(country, continent) if country or continent else NOWHERE


def _code(section: object, field: str) -> str | None:
    if isinstance(section, dict):
        value = section.get(field)
        if isinstance(value, str) and value:
            return value.upper()
    return None


class RegionMap:
    """A provider's ``regions``: the region a client's location prefers.

    A country code wins over a continent code; ``country:XX`` and ``continent:XX``
    entries match only that kind; ``default`` is for every other location (and for
    clients whose location is unknown).
    """

    __slots__ = ("_continents", "_countries", "default")

    def __init__(self, entries: Iterable[tuple[str, str]]) -> None:
        self._countries: dict[str, str] = {}
        self._continents: dict[str, str] = {}
        self.default: str | None = None
        bare: list[tuple[str, str]] = []
        for code, region in entries:
            kind, _, rest = code.partition(":")
            if code == "default":
                self.default = region
            elif kind == "country" and rest:
                self._countries[rest] = region
            elif kind == "continent" and rest:
                self._continents[rest] = region
            else:
                bare.append((code, region))
        for code, region in bare:  # explicit entries win over bare ones
            self._countries.setdefault(code, region)
            self._continents.setdefault(code, region)

    def region_for(self, location: Location) -> str | None:
        if location.region is not None:
            return location.region
        country = location.country
        if country is not None:
            region = self._countries.get(country)
            if region is not None:
                return region
        continent = location.continent
        if continent is not None:
            region = self._continents.get(continent)
            if region is not None:
                return region
        return self.default
