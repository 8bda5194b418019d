"""Region routing: the client's address (trusted proxies), its place (geoip), and the
region each provider's map gives it (a preference within a priority tier, never a
filter)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from relay_harness import Harness, base_config, sha
from twisted.web.http_headers import Headers

from relayd.client_address import TrustedProxies
from relayd.config import ConfigErrors, parse_config
from relayd.config.checks import Context
from relayd.config.regions import networks
from relayd.geoip import NOWHERE, GeoDatabase, GeoDatabaseError, Location, RegionMap
from relayd.testing.geodb import write_country_db

MESSAGE = {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
PLACES = {
    "10.1.0.0/16": ("JP", "AS"),
    "10.2.0.0/16": ("DE", "EU"),
    "10.3.0.0/16": ("FR", "EU"),
    "10.4.0.0/16": ("US", "NA"),
    "2001:db8::/32": ("JP", "AS"),
}


class FakeRequest:
    """What TrustedProxies reads of a request: its peer and its headers."""

    def __init__(self, peer: str, forwarded: list[str] | None = None) -> None:
        self._peer = peer
        self.requestHeaders = Headers()
        for value in forwarded or []:
            self.requestHeaders.addRawHeader(b"x-forwarded-for", value.encode())

    def getClientAddress(self) -> Any:
        class Address:
            host = self._peer
        return Address()


def proxies(*cidrs: str) -> TrustedProxies:
    context = Context(environ={}, base_dir="/")
    found = networks(list(cidrs), "trusted_proxies", context)
    assert not context.errors and found is not None
    return TrustedProxies(found)


# -- the client's address --------------------------------------------------------------


def test_without_trusted_proxies_the_header_is_never_read() -> None:
    request = FakeRequest("203.0.113.9", ["198.51.100.1"])
    assert TrustedProxies(()).client_address(request) == "203.0.113.9"  # type: ignore[arg-type]


def test_a_forged_header_from_an_untrusted_peer_changes_nothing() -> None:
    request = FakeRequest("203.0.113.9", ["10.1.0.5"])
    assert proxies("10.0.0.0/8").client_address(request) == "203.0.113.9"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        # The proxy appended the address it got the request from: that is the client.
        ("10.9.0.1", ["198.51.100.7"], "198.51.100.7"),
        # A forged entry on the left is skipped: read from the right.
        ("10.9.0.1", ["1.2.3.4, 198.51.100.7"], "198.51.100.7"),
        # Trusted hops are skipped, right to left.
        ("10.9.0.1", ["198.51.100.7, 10.9.0.2, 10.9.0.3"], "198.51.100.7"),
        # Several header lines are one list, in order.
        ("10.9.0.1", ["198.51.100.7", "10.9.0.2"], "198.51.100.7"),
        # Every hop trusted: the leftmost.
        ("10.9.0.1", ["10.9.0.5, 10.9.0.2"], "10.9.0.5"),
        # Garbage ends the walk: the last good hop counts.
        ("10.9.0.1", ["198.51.100.7, not-an-ip, 10.9.0.2"], "10.9.0.2"),
        ("10.9.0.1", ["unknown"], "10.9.0.1"),
        # Ports and IPv6 forms.
        ("10.9.0.1", ["198.51.100.7:4711"], "198.51.100.7"),
        ("10.9.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("10.9.0.1", ["2001:DB8::1"], "2001:db8::1"),
        # An IPv4 peer seen as IPv4-mapped IPv6 is still trusted.
        ("::ffff:10.9.0.1", ["198.51.100.7"], "198.51.100.7"),
        # No header from a trusted peer: the peer.
        ("10.9.0.1", [], "10.9.0.1"),
    ],
)
def test_behind_trusted_proxies_the_header_is_read_right_to_left(
    peer: str, forwarded: list[str], client: str
) -> None:
    request = FakeRequest(peer, forwarded)
    assert proxies("10.9.0.0/16").client_address(request) == client  # type: ignore[arg-type]


def test_trusted_proxies_must_be_networks() -> None:
    with pytest.raises(ConfigErrors) as raised:
        parse_config({"trusted_proxies": ["10.0.0.0/8", "10.0.0.0/40", 7]})
    text = str(raised.value)
    assert "trusted_proxies[1]" in text and "trusted_proxies[2]" in text


# -- the place and the region ----------------------------------------------------------


@pytest.fixture
def database(tmp_path: Path) -> str:
    return write_country_db(str(tmp_path / "geo.mmdb"), PLACES)


def test_the_database_locates_addresses(database: str) -> None:
    db = GeoDatabase.open(database)
    assert db.locate("10.1.2.3") == Location("JP", "AS")
    assert db.locate("2001:db8::5") == Location("JP", "AS")
    assert db.locate("192.0.2.1") is NOWHERE
    assert db.locate("") is NOWHERE and db.locate("not an address") is NOWHERE
    assert db.describe()["type"] == "GeoLite2-Country"
    db.close()


def test_a_bad_database_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mmdb"
    junk.write_bytes(b"not a database" * 100)
    for path, message in ((str(junk), "not a MaxMind DB file"),
                          (str(tmp_path / "missing.mmdb"), "no such file"),
                          (str(tmp_path), "is a directory")):
        with pytest.raises(ConfigErrors) as raised:
            parse_config({"geoip": {"database": path}})
        assert f"geoip.database: {message}" in str(raised.value)
    with pytest.raises(GeoDatabaseError):
        GeoDatabase.open(str(junk))


def test_a_country_wins_over_its_continent_and_default_takes_the_rest() -> None:
    regions = RegionMap((("JP", "asia"), ("EU", "eu"), ("DE", "de"), ("default", "us")))
    assert regions.region_for(Location("JP", "AS")) == "asia"
    assert regions.region_for(Location("DE", "EU")) == "de"
    assert regions.region_for(Location("FR", "EU")) == "eu"
    assert regions.region_for(Location("BR", "SA")) == "us"
    assert regions.region_for(NOWHERE) == "us"
    assert regions.region_for(Location(None, None, "eu")) == "eu"  # the client's own


def test_codes_that_are_both_a_country_and_a_continent_can_be_told_apart() -> None:
    bare = RegionMap((("SA", "south"),))
    assert bare.region_for(Location("SA", "AS")) == "south"  # Saudi Arabia
    assert bare.region_for(Location("BR", "SA")) == "south"  # South America
    explicit = RegionMap((("continent:SA", "south"), ("country:SA", "gulf")))
    assert explicit.region_for(Location("SA", "AS")) == "gulf"
    assert explicit.region_for(Location("BR", "SA")) == "south"
    assert RegionMap((("continent:SA", "south"),)).region_for(Location("SA", "AS")) is None


def test_region_names_must_be_backends_regions() -> None:
    config = regional_config()
    config["providers"][0]["regions"]["JP"] = "asia"
    config["clients"][0]["region"] = "mars"
    with pytest.raises(ConfigErrors) as raised:
        parse_config(config)
    text = str(raised.value)
    assert "providers[0].regions.JP: no backend of provider 'anthropic' has region 'asia'" in text
    assert "clients[0].region: no backend has region 'mars'" in text


# -- routing by region in the relay ----------------------------------------------------


def regional_config(**overrides: Any) -> dict[str, Any]:
    config = base_config(**overrides)
    us, eu = config["providers"][0]["backends"]
    us["region"], eu["region"] = "us", "eu"
    config["providers"][0]["regions"] = {"EU": "eu", "default": "us"}
    return config


@pytest.fixture
def regional(database: str) -> Iterator[Harness]:
    # The harness's client connects from 127.0.0.1: trusted, like a local proxy.
    h = Harness(regional_config(trusted_proxies=["127.0.0.0/8"],
                                geoip={"database": database}))
    yield h
    h.close()


def served_by(harness: Harness, forwarded: str | None = None, **call: Any) -> str:
    headers = {"x-forwarded-for": forwarded} if forwarded else {}
    status, _, _ = harness.call("POST", "/v1/messages", MESSAGE, headers=headers, **call)
    assert status == 200
    return str(harness.logs.access()[-1]["backend"])


def test_clients_are_sent_to_their_regions_backends(regional: Harness) -> None:
    assert {served_by(regional, "10.2.0.1") for _ in range(6)} == {"eu"}  # Germany
    assert {served_by(regional, "10.3.0.1") for _ in range(6)} == {"eu"}  # France
    assert {served_by(regional, "10.1.0.1") for _ in range(6)} == {"us"}  # Japan: default
    assert regional.logs.access()[-1]["client_ip"] == "10.1.0.1"


def test_without_a_location_requests_are_balanced_in_the_default_region(
    regional: Harness,
) -> None:
    assert {served_by(regional, "192.0.2.1") for _ in range(4)} == {"us"}


def test_a_region_is_a_preference_not_a_filter(regional: Harness) -> None:
    eu = next(b for b in regional.runtime.backends if b.name == "eu")
    eu.health.healthy = False
    assert served_by(regional, "10.2.0.1") == "us"  # would succeed without regions too
    for _ in range(eu.breaker.config.failures):
        eu.breaker.record_failure("test")
    eu.health.healthy = True
    assert served_by(regional, "10.2.0.1") == "us"


def test_priority_comes_before_region(database: str) -> None:
    config = regional_config(trusted_proxies=["127.0.0.0/8"], geoip={"database": database})
    config["providers"][0]["backends"][1]["priority"] = 1  # eu is a backup
    h = Harness(config)
    try:
        assert served_by(h, "10.2.0.1") == "us"
    finally:
        h.close()


def test_a_client_key_may_pin_its_region(database: str) -> None:
    config = regional_config(trusted_proxies=["127.0.0.0/8"], geoip={"database": database})
    config["clients"][0]["region"] = "eu"
    h = Harness(config)
    try:
        assert {served_by(h, "10.4.0.1") for _ in range(4)} == {"eu"}  # from the US
    finally:
        h.close()


def test_a_forged_header_from_an_untrusted_peer_does_not_move_a_request(database: str) -> None:
    h = Harness(regional_config(trusted_proxies=["10.250.0.0/16"],
                                geoip={"database": database}))
    try:
        assert {served_by(h, "10.2.0.1") for _ in range(4)} == {"us"}
        assert h.logs.access()[-1]["client_ip"] == "127.0.0.1"
    finally:
        h.close()


def test_without_backend_regions_nothing_is_looked_up(database: str) -> None:
    h = Harness(base_config(trusted_proxies=["127.0.0.0/8"], geoip={"database": database}))
    try:
        assert not h.runtime.regional
        picks = [served_by(h, "10.2.0.1") for _ in range(4)]
        assert picks.count("us") == 3  # the weights, as without geoip
    finally:
        h.close()


def test_affinity_comes_before_region(regional: Harness) -> None:
    session = {"x-claude-code-session-id": "s-1"}
    status, _, _ = regional.call("POST", "/v1/messages", MESSAGE,
                                 headers={**session, "x-forwarded-for": "10.1.0.1"})
    assert status == 200 and regional.logs.access()[-1]["backend"] == "us"
    # The same session from a German address: its prompt cache is on us.
    regional.call("POST", "/v1/messages", MESSAGE,
                  headers={**session, "x-forwarded-for": "10.2.0.1"})
    assert regional.logs.access()[-1]["backend"] == "us"
    assert regional.logs.access()[-1]["affinity"] == "hit"


def test_the_reload_reopens_the_database(tmp_path: Path) -> None:
    path = write_country_db(str(tmp_path / "geo.mmdb"), {"10.2.0.0/16": ("DE", "EU")})
    config = regional_config(trusted_proxies=["127.0.0.0/8"], geoip={"database": path})
    h = Harness(config)
    try:
        assert served_by(h, "10.2.0.1") == "eu"
        write_country_db(path, {"10.2.0.0/16": ("US", "NA")})
        from relayd.runtime import RelayRuntime
        from relayd.runtime_diff import plan_reload

        parsed = parse_config(config)
        h.runtime = RelayRuntime(parsed, h.clock, carry=plan_reload(h.runtime, parsed))
        assert served_by(h, "10.2.0.1") == "us"
    finally:
        h.close()


def test_a_client_region_needs_no_database() -> None:
    config = regional_config()
    config["clients"].append({"name": "eu-team", "key_sha256": sha("sk-eu"), "region": "eu"})
    h = Harness(config)
    try:
        assert {served_by(h, key="sk-eu") for _ in range(4)} == {"eu"}
        picks = [served_by(h) for _ in range(4)]
        assert picks == ["us"] * 4  # default region
    finally:
        h.close()
