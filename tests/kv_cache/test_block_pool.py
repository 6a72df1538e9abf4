from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecoserve.kv_cache import BlockPool, BlockTable, OutOfBlocksError


def test_allocate_free_roundtrip() -> None:
    pool = BlockPool(8, block_size=4)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert sorted(a + b) == list(range(8))
    assert pool.num_free == 0
    pool.check_invariants()
    pool.free(a)
    pool.free(b)
    pool.assert_no_leaks()


def test_out_of_blocks_changes_nothing() -> None:
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(OutOfBlocksError, match="asked for 2 KV blocks but only 1 of 4 are free"):
        pool.allocate(2)
    assert pool.num_free == 1
    pool.check_invariants()


def test_refcounts_share_blocks() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.incref(blocks)
    assert [pool.ref_count(b) for b in blocks] == [2, 2]
    pool.free(blocks)
    assert pool.num_free == 2  # still held by the second owner
    pool.free(blocks)
    pool.assert_no_leaks()


def test_double_free_and_foreign_ids_are_refused() -> None:
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([b])
    with pytest.raises(ValueError, match="outside the pool"):
        pool.free([99])
    pool.assert_no_leaks()


def test_assert_no_leaks_reports_held_blocks() -> None:
    pool = BlockPool(4)
    pool.allocate(1)
    with pytest.raises(AssertionError, match="1 KV blocks still allocated"):
        pool.assert_no_leaks()


def test_block_table_slots_and_growth() -> None:
    pool = BlockPool(16, block_size=4)
    table = BlockTable(4)
    table.ensure_capacity(5, pool)
    assert len(table.blocks) == 2 and table.capacity == 8
    assert table.slots(0, 5) == [table.blocks[0] * 4 + i for i in range(4)] + [table.blocks[1] * 4]
    assert table.slot(6) == table.blocks[1] * 4 + 2
    table.ensure_capacity(8, pool)
    assert len(table.blocks) == 2  # no growth needed
    with pytest.raises(OutOfBlocksError):
        table.ensure_capacity(4 * 17, pool)
    assert len(table.blocks) == 2  # a failed growth keeps the table as it was
    table.release(pool)
    pool.assert_no_leaks()


def test_random_operations_keep_invariants() -> None:
    rng = random.Random(0)
    pool = BlockPool(32, block_size=16)
    tables: list[BlockTable] = []
    for _ in range(2000):
        if tables and rng.random() < 0.4:
            tables.pop(rng.randrange(len(tables))).release(pool)
        else:
            t = BlockTable(16)
            try:
                t.ensure_capacity(rng.randint(1, 100), pool)
                tables.append(t)
            except OutOfBlocksError:
                assert t.blocks == []
        pool.check_invariants()
        assert pool.num_used == sum(len(t.blocks) for t in tables)
    for t in tables:
        t.release(pool)
    pool.assert_no_leaks()


def test_multi_block_allocations_take_the_smallest_run_that_fits() -> None:
    pool = BlockPool(32)
    a, b, c, d = pool.allocate(4), pool.allocate(6), pool.allocate(3), pool.allocate(10)
    assert (a, d) == ([0, 1, 2, 3], list(range(13, 23)))
    pool.free(b)  # a run of 6 at 4..9; the tail run is 23..31 (9)
    pool.free(a)  # now 0..9 is one run of 10
    assert pool.allocate(8) == list(range(23, 31)), "best fit: the 9-run beats the 10-run"
    assert pool.allocate(10) == list(range(0, 10))
    pool.free(c)
    assert pool.allocate(1) == [10], "single blocks take the lowest free id"
    assert pool.allocate(3) == [11, 12, 31], "no run holds 3: lowest free ids"
    pool.check_invariants()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 12)), max_size=60))
def test_random_allocations_and_frees_keep_the_invariants(ops: list[tuple[bool, int]]) -> None:
    pool = BlockPool(40)
    held: list[list[int]] = []
    for do_free, n in ops:
        if do_free and held:
            pool.free(held.pop(n % len(held)))
        elif pool.can_allocate(n):
            blocks = pool.allocate(n)
            assert len(set(blocks)) == n
            assert not any(set(blocks) & set(h) for h in held), "a block was handed out twice"
            held.append(blocks)
        pool.check_invariants()
        assert pool.num_free == 40 - sum(map(len, held))
    for blocks in held:
        pool.free(blocks)
    pool.assert_no_leaks()
