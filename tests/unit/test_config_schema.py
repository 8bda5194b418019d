"""Tests for :mod:`relayd.config.schema`: the generic section reader, on a model of its own."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from relayd.config.checks import Context, positive_int, string
from relayd.config.schema import (
    Hook,
    Section,
    checked,
    hooked,
    nested,
    read_section,
    section_keys,
)


@dataclass(frozen=True)
class Range:
    low: int = field(default=1, metadata=checked(positive_int, at_most="high"))
    high: int = field(default=5, metadata=checked(positive_int))


@dataclass(frozen=True)
class Quota:
    count: int | None = field(default=None, metadata=checked(positive_int))
    unit: str = field(default="s", metadata=checked(string))

    def any(self) -> bool:
        return self.count is not None


@dataclass(frozen=True)
class Thing:
    name: str = field(metadata=checked(string))
    pair: str = field(metadata=hooked("left", "right"))
    range: Range = field(default=Range(), metadata=nested(Range))
    quota: Quota | None = field(default=None, metadata=nested(Quota, keep=Quota.any))
    size: int = field(default=2, metadata=checked(positive_int))
    note: str = ""  # no key: set by the program


def read_pair(section: Section) -> None:
    """The hook of ``pair``: both halves are required."""
    left, right = section.require("left", string), section.require("right", string)
    if left is not None and right is not None:
        section.values["pair"] = f"{left}-{right}"


def read(
    value: object, base: Thing | None = None, **hooks: Hook
) -> tuple[Thing | None, list[str]]:
    context = Context(environ={}, base_dir="/")
    thing = read_section(
        Thing, value, "things[0]", context, base=base, hooks={"pair": read_pair, **hooks}
    )
    return thing, [str(error) for error in context.errors]


VALID = {"name": "a", "left": "l", "right": "r"}


def test_section_keys_follow_the_fields_and_name_the_hooked_keys() -> None:
    assert section_keys(Thing) == ("name", "left", "right", "range", "quota", "size")


def test_a_valid_section_is_built_with_the_dataclass_defaults() -> None:
    assert read(VALID) == (Thing(name="a", pair="l-r"), [])


def test_every_problem_is_reported_in_field_order_with_its_key_path() -> None:
    value = {"wat": 1, "left": "l", "size": 0, "range": {"high": "x"}}
    assert read(value) == (
        None,
        [
            "things[0].wat: unknown key",
            "things[0].name: is required",
            "things[0].right: is required",
            "things[0].range.high: must be a positive integer, got string",
            "things[0].size: must be a positive integer, got 0",
        ],
    )


def test_a_rejected_optional_value_keeps_its_default() -> None:
    thing, errors = read({**VALID, "size": -3})
    assert thing == Thing(name="a", pair="l-r", size=2)
    assert errors == ["things[0].size: must be a positive integer, got -3"]


def test_a_value_that_is_not_a_mapping_is_no_section() -> None:
    assert read(["a"]) == (None, ["things[0]: must be a mapping, got list"])


def test_absent_keys_and_nested_sections_inherit_from_the_base() -> None:
    base = Thing(name="", pair="", range=Range(low=2, high=9), size=7, note="kept")
    thing, errors = read({**VALID, "range": {"low": 3}}, base=base)
    assert errors == []
    assert thing == Thing(name="a", pair="l-r", range=Range(low=3, high=9), size=7, note="kept")


def test_a_required_field_is_required_even_over_a_base() -> None:
    base = Thing(name="base", pair="base")
    assert read({"left": "l", "right": "r"}, base=base) == (None, ["things[0].name: is required"])


def test_an_ordering_rule_is_reported_at_the_key_the_section_sets() -> None:
    base = Thing(name="", pair="", range=Range(low=2, high=9))
    assert read({**VALID, "range": {"low": 10}}, base=base)[1] == [
        "things[0].range.low: must not exceed high (9)"
    ]
    base = Thing(name="", pair="", range=Range(low=8, high=9))
    assert read({**VALID, "range": {"high": 3}}, base=base)[1] == [
        "things[0].range.high: must not be below low (8)"
    ]


def test_an_ordering_rule_is_skipped_in_a_section_with_another_problem() -> None:
    errors = read({**VALID, "range": {"low": 10, "wat": 1}})[1]
    assert errors == ["things[0].range.wat: unknown key"]


def test_a_nested_section_that_keep_refuses_is_none() -> None:
    assert read({**VALID, "quota": {"unit": "m"}})[0] == Thing(name="a", pair="l-r", quota=None)
    thing = read({**VALID, "quota": {"count": 4}})[0]
    assert thing is not None and thing.quota == Quota(count=4)


def test_a_hook_runs_after_its_fields_own_check_and_sees_what_was_read() -> None:
    seen: list[object] = []

    def after_size(section: Section) -> None:
        seen.append((section.value("size"), section.get("range"), section.value("quota")))
        section.context.error(section.key_path("size"), "checked by the hook")

    errors = read({**VALID, "size": 0}, size=after_size)[1]
    assert seen == [(None, Range(), None)]
    assert errors == [
        "things[0].size: must be a positive integer, got 0",
        "things[0].size: checked by the hook",
    ]


def test_hooks_must_match_the_schema() -> None:
    context = Context(environ={}, base_dir="/")
    with pytest.raises(TypeError, match=r"missing \['pair'\]"):
        read_section(Thing, VALID, "", context)
    with pytest.raises(TypeError, match=r"not at a key \['note'\]"):
        read_section(Thing, VALID, "", context, hooks={"pair": read_pair, "note": read_pair})
