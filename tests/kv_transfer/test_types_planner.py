"""Plain data and the coordinator half: plan validation, per-pair numbering, finishing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ecoserve.kv_transfer import (
    CompatRecord,
    IncompatibleWorkerError,
    TransferPlan,
    TransferPlanner,
    TransferState,
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"src_rank": -1}, "src_rank must be an int >= 0, got -1"),
        ({"dst_rank": -2}, "dst_rank must be an int >= 0, got -2"),
        ({"dst_rank": 0}, "src_rank and dst_rank must differ"),
        ({"seq_no": -1}, "seq_no must be an int >= 0"),
        ({"num_tokens": 0}, "num_tokens must be an int >= 1, got 0"),
        ({"request_id": ""}, "request_id must be a non-empty string"),
    ],
)
def test_plan_validation_names_the_field(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "request_id": "r", "src_rank": 0, "dst_rank": 1, "seq_no": 0, "num_tokens": 5
    }
    fields.update(kwargs)
    with pytest.raises(ValueError, match=message):
        TransferPlan(**fields)  # type: ignore[arg-type]


def test_plan_num_blocks_rounds_up() -> None:
    plan = TransferPlan("r", 0, 1, 0, num_tokens=17)
    assert plan.num_blocks(16) == 2
    assert plan.num_blocks(17) == 1


def test_terminal_states() -> None:
    assert {s for s in TransferState if s.terminal} == {
        TransferState.DONE, TransferState.FAILED, TransferState.TIMED_OUT
    }


def test_sequence_numbers_are_per_pair() -> None:
    planner = TransferPlanner()
    seqs = [
        planner.plan(f"r{i}", src, dst, num_tokens=8).seq_no
        for i, (src, dst) in enumerate([(0, 1), (0, 1), (0, 2), (2, 1), (0, 1), (0, 2)])
    ]
    assert seqs == [0, 1, 0, 0, 2, 1]
    assert [p.request_id for p in planner.pending()] == [f"r{i}" for i in range(6)]
    for p in planner.pending():
        planner.finish(p.request_id)
    planner.assert_no_leaks()


def test_in_flight_counting_and_room() -> None:
    planner = TransferPlanner(max_in_flight_per_pair=2)
    planner.plan("a", 0, 1, 4)
    assert planner.has_room(0, 1)
    planner.plan("b", 0, 1, 4)
    assert (planner.in_flight(0, 1), planner.has_room(0, 1)) == (2, False)
    # plan never waits: a third transfer is numbered and handed out; the workers queue it
    assert planner.plan("c", 0, 1, 4).seq_no == 2
    assert (planner.in_flight(0, 1), planner.in_flight(1, 0)) == (3, 0)
    planner.finish("a")
    assert planner.in_flight(0, 1) == 2
    planner.finish("b")
    planner.finish("c")
    assert planner.has_room(0, 1)
    planner.assert_no_leaks()


def test_finish_is_idempotent_and_unknown_ids_raise() -> None:
    planner = TransferPlanner()
    planner.plan("a", 0, 1, 4)
    planner.finish("a")  # 1. the sender reports DONE
    planner.finish("a")  # 2. the receiver reports DONE: no-op
    assert planner.in_flight(0, 1) == 0
    with pytest.raises(KeyError, match="no transfer planned for request 'zzz'"):
        planner.finish("zzz")
    planner.assert_no_leaks()


def test_one_pending_transfer_per_request_then_retry() -> None:
    planner = TransferPlanner()
    planner.plan("a", 0, 1, 4)
    with pytest.raises(ValueError, match="already has a pending transfer"):
        planner.plan("a", 0, 2, 4)
    planner.finish("a")
    retry = planner.plan("a", 0, 2, 4)  # e.g. after a timeout, on another pair
    assert (retry.dst_rank, retry.seq_no) == (2, 0)
    planner.finish("a")
    planner.assert_no_leaks()


def test_assert_no_leaks_reports_unfinished() -> None:
    planner = TransferPlanner()
    planner.plan("a", 0, 1, 4)
    with pytest.raises(AssertionError, match="1 transfers never finished: 'a'"):
        planner.assert_no_leaks()


def test_planner_rejects_bad_bound() -> None:
    with pytest.raises(ValueError, match="max_in_flight_per_pair must be an int >= 1, got 0"):
        TransferPlanner(0)


def _record(**changes: object) -> CompatRecord:
    fields: dict[str, object] = {
        "model_id": "HuggingFaceTB/SmolLM2-135M", "dtype": "float32", "num_layers": 30,
        "num_kv_heads": 3, "head_dim": 64, "block_size": 16,
    }
    fields.update(changes)
    return CompatRecord(**fields)  # type: ignore[arg-type]


def test_compat_record_lists_every_mismatch() -> None:
    mine = _record()
    theirs = _record(dtype="bfloat16", block_size=32, num_kv_heads=4)
    assert mine.mismatches(theirs) == [
        "dtype: 'float32' != 'bfloat16'", "num_kv_heads: 3 != 4", "block_size: 16 != 32"
    ]
    with pytest.raises(IncompatibleWorkerError) as info:
        mine.check_compatible(theirs, "decode worker rank 3")
    message = str(info.value)
    for part in ("decode worker rank 3", "dtype: 'float32' != 'bfloat16'", "num_kv_heads: 3 != 4",
                 "block_size: 16 != 32", "same model and dtype"):
        assert part in message
    assert "head_dim" not in message
    assert isinstance(info.value, ValueError)
    mine.check_compatible(_record(), "decode worker rank 4")  # equal records pass
    assert mine.mismatches(_record()) == []


def test_compat_record_validation() -> None:
    with pytest.raises(ValueError, match="block_size must be an int >= 1, got 0"):
        _record(block_size=0)
    with pytest.raises(ValueError, match="model_id must be a non-empty string"):
        _record(model_id="")


def test_coordinator_half_imports_without_torch() -> None:
    code = (
        "import sys, ecoserve.kv_transfer, ecoserve.kv_transfer.planner, "
        "ecoserve.kv_transfer.types; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
