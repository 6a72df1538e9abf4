"""ECOSERVE_FAULT parsing: inert unless set, per rank, and bad entries refused with what is allowed."""

from __future__ import annotations

import math

import pytest

from ecoserve.runtime.faults import Faults


def test_unset_means_no_fault() -> None:
    assert Faults.parse("", 0) == Faults() and Faults().send_delay_s(1) == 0.0


def test_a_rank_reads_only_its_own_entries() -> None:
    spec = "2:die_after_tokens=20; 0:drop_send=1;0:delay_send_ms=1500;0:delay_sends=3;1:die_on_receive=4"
    assert Faults.parse(spec, 2) == Faults(die_after_tokens=20)
    assert Faults.parse(spec, 1) == Faults(die_on_receive=4)
    zero = Faults.parse(spec, 0)
    assert [zero.send_delay_s(n) for n in (1, 2, 3, 4)] == [math.inf, 1.5, 1.5, 0.0]
    assert Faults.parse(spec, 3) == Faults()


@pytest.mark.parametrize("entry, match", [
    ("die_after_tokens=3", "give RANK:NAME=VALUE with NAME one of"),
    ("0:explode=1", "NAME one of"),
    ("0:drop_send=x", "'x' is not a number"),
    ("0:die_on_send=0", "counts start at 1"),
])
def test_bad_entries_are_refused_naming_the_entry(entry: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Faults.parse(entry, 0)
