"""A MaxMind DB written at test time, for region routing tests (needs ``mmdb-writer``,
a test dependency)."""

from __future__ import annotations

from collections.abc import Mapping


def write_country_db(path: str, places: Mapping[str, tuple[str, str]]) -> str:
    """Write a GeoLite2-Country-shaped database mapping networks (CIDR) to (country,
    continent) codes, and return ``path``."""
    from mmdb_writer import MMDBWriter
    from netaddr import IPSet

    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country",
                        languages=["en"], description="relayd test database")
    for network, (country, continent) in places.items():
        writer.insert_network(
            IPSet([network]), {"country": {"iso_code": country}, "continent": {"code": continent}}
        )
    writer.to_db_file(path)
    return path
