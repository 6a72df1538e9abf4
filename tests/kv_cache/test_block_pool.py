from __future__ import annotations

import random

import pytest

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
