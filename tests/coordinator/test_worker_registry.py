"""Worker registration: the coordinator refuses what does not belong to its cluster."""

from __future__ import annotations

import dataclasses

from ecoserve import protocol as p
from ecoserve.coordinator.workers import ExpectedRank, Silence, WorkerRegistry, worker_identity


def make_registration(rank: int = 0, role: str = "prefill", **overrides: object) -> p.RegisterWorker:
    msg = p.RegisterWorker(
        protocol_version=p.PROTOCOL_VERSION, secret="s3cret", rank=rank, role=role, pid=100 + rank, num_blocks=64,
        block_size=16, max_num_batched_tokens=512, model_id="smollm2-135m", dtype="float32", num_layers=30,
        num_kv_heads=3, head_dim=64, vocab_size=49152, max_model_len=2048,
    )
    return dataclasses.replace(msg, **overrides)  # type: ignore[arg-type]


def make_registry() -> WorkerRegistry:
    return WorkerRegistry([ExpectedRank(0, "prefill"), ExpectedRank(1, "decode")], "s3cret", 30.0)


def test_matching_workers_register_and_complete_the_cluster() -> None:
    reg = make_registry()
    assert reg.register(make_registration(0, "prefill")) is None
    assert not reg.complete
    assert reg.register(make_registration(1, "decode", num_blocks=80)) is None
    assert reg.complete and reg.min_request_pool() == 80
    assert reg.views[1].free_blocks == 80 and reg.views[1].role == "decode"


def test_a_mismatched_compatibility_record_is_refused_naming_every_field() -> None:
    reg = make_registry()
    assert reg.register(make_registration(0)) is None
    reason = reg.register(make_registration(1, "decode", dtype="bfloat16", block_size=32, num_kv_heads=4))
    assert reason is not None
    for text in ("dtype", "float32", "bfloat16", "block_size", "num_kv_heads"):
        assert text in reason, reason
    assert 1 not in reg.views, "a refused worker must change nothing"


def test_strangers_are_refused() -> None:
    reg = make_registry()
    assert "wrong cluster secret" in (reg.register(make_registration(0, secret="guess")) or "")
    assert "not part of this cluster" in (reg.register(make_registration(0, "decode")) or "")
    assert "not part of this cluster" in (reg.register(make_registration(7, "prefill")) or "")
    assert "protocol version" in (reg.register(make_registration(0, protocol_version=99)) or "")
    assert reg.register(make_registration(0)) is None
    assert "already registered" in (reg.register(make_registration(0)) or "")
    assert list(reg.views) == [0]


def test_only_the_ranks_own_socket_registers_and_speaks_for_it() -> None:
    reg = make_registry()
    assert "wrong cluster secret" in (reg.register(make_registration(0, secret="s3cre"), worker_identity(0)) or "")
    assert "must register from its own control socket (routing id b'rank-0')" in (
        reg.register(make_registration(0), b"rank-1") or ""
    )
    assert reg.rank_of(worker_identity(0)) is None, "nothing registered yet"
    assert reg.register(make_registration(0), worker_identity(0)) is None
    assert reg.rank_of(b"rank-0") == 0
    for stranger in (b"rank-1", b"rank-00", b"rank-", b"rank-0 ", b"stray", b"rank-" + b"9" * 40, b"\xff" * 255):
        assert reg.rank_of(stranger) is None, stranger


def test_a_rank_is_silent_only_past_the_timeout_and_its_silence_is_recorded() -> None:
    """The monitor's check on a fake clock (`now` is the check's time; last_seen as the registry
    noted it): silent at the first check past the timeout since the rank last spoke, never at
    or before it, and what the stats report of it is exact."""
    reg = make_registry()  # heartbeat timeout 30 s
    assert reg.register(make_registration(0)) is None and reg.register(make_registration(1, "decode")) is None
    reg.last_seen = {0: 100.0, 1: 100.0}
    assert reg.silent(110.0) == []
    reg.last_seen[0] = 125.0  # rank 0 spoke again: its silence starts over
    assert reg.silent(130.0) == [] and reg.silences == {}, "exactly the timeout is not yet silent"
    assert reg.silent(130.5) == [1] and reg.silences == {1: Silence(silent_s=30.5, silent_at_previous_check_s=30.0)}
    reg.views[1].alive = False  # declared lost: the monitor's next checks leave it alone
    assert reg.silent(155.0) == []
    assert reg.silent(155.5) == [0] and reg.silences[0] == Silence(silent_s=30.5, silent_at_previous_check_s=30.0)
    assert list(reg.silences) == [1, 0]
