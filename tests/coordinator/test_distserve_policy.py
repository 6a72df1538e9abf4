"""The distserve policy as a pure function of plain data: no sockets, no torch."""

from __future__ import annotations

import subprocess
import sys
from collections import deque

import pytest

from ecoserve.coordinator.policies import make_policy
from ecoserve.coordinator.policies.distserve import DistServePolicy
from ecoserve.coordinator.policy import SchedulerState, WorkerView
from ecoserve.coordinator.request import Request, RequestStatus
from ecoserve.params import SamplingParams


def make_request(i: int, prompt_len: int, status: RequestStatus = RequestStatus.WAITING_PREFILL) -> Request:
    req = Request(
        request_id=f"r{i}", client=b"c", client_request_id=f"r{i}", prompt_token_ids=[1] * prompt_len,
        params=SamplingParams(max_tokens=16, temperature=0.0), stream=False,
    )
    if status is RequestStatus.TRANSFERRING:
        req.transition(RequestStatus.PREFILLING)
        req.transition(RequestStatus.TRANSFERRING)
        req.prefill_rank = 0
        req.output_token_ids.append(5)
    return req


def make_worker(rank: int, role: str, num_blocks: int = 100, free: int | None = None, budget: int = 256) -> WorkerView:
    return WorkerView(rank, role, num_blocks, 16, budget, num_blocks if free is None else free)


def make_state(waiting: list[Request] = (), kv_waiting: list[Request] = (), workers: list[WorkerView] = ()) -> SchedulerState:  # type: ignore[assignment]
    return SchedulerState(0.0, deque(waiting), deque(kv_waiting), {w.rank: w for w in workers})


def test_prompts_go_fcfs_to_the_prefill_worker_with_the_shortest_queue() -> None:
    p0, p1, d = make_worker(0, "prefill"), make_worker(1, "prefill"), make_worker(2, "decode")
    p0.queued_prefill_tokens = 100
    out = DistServePolicy().schedule(make_state([make_request(0, 50), make_request(1, 50), make_request(2, 200)], [], [p0, p1, d]))
    assert [(x.request_id, x.rank) for x in out.prefills] == [("r0", 1), ("r1", 1), ("r2", 0)]
    assert not any(x.decode_locally for x in out.prefills)


def test_the_head_that_fits_nowhere_blocks_the_queue() -> None:
    p0, d = make_worker(0, "prefill", num_blocks=10), make_worker(1, "decode")
    p0.queued_prefill_tokens = 1  # busy, so the 2x-budget queue cap applies
    out = DistServePolicy().schedule(make_state([make_request(0, 600), make_request(1, 10)], [], [p0, d]))
    assert out.empty  # r1 would fit, but FCFS keeps it behind r0


def test_an_idle_prefill_worker_takes_a_prompt_longer_than_its_queue_cap() -> None:
    out = DistServePolicy().schedule(make_state([make_request(0, 900)], [], [make_worker(0, "prefill"), make_worker(1, "decode")]))
    assert [x.request_id for x in out.prefills] == ["r0"]


def test_prefill_needs_decode_workers_and_mixed_workers_take_whole_requests() -> None:
    out = DistServePolicy().schedule(make_state([make_request(0, 10)], [], [make_worker(0, "prefill")]))
    assert out.empty
    out = DistServePolicy().schedule(make_state([make_request(0, 10)], [], [make_worker(0, "mixed")]))
    assert out.prefills[0].decode_locally and out.prefills[0].rank == 0


def test_kv_is_pulled_fcfs_by_the_decode_worker_with_most_free_blocks() -> None:
    d1, d2 = make_worker(1, "decode", free=50), make_worker(2, "decode", free=60)
    d1.num_running = d2.num_running = 3
    reqs = [make_request(i, 320, RequestStatus.TRANSFERRING) for i in range(3)]  # 20 blocks each
    out = DistServePolicy(headroom=0.05).schedule(make_state([], reqs, [make_worker(0, "prefill"), d1, d2]))
    # 60 -> d2 (40 left), 50 -> d1 (30 left), then 40 -> d2 (20 left); each keeps 5 blocks of headroom.
    assert [(t.request_id, t.dst_rank, t.num_blocks) for t in out.transfers] == [("r0", 2, 20), ("r1", 1, 20), ("r2", 2, 20)]


def test_a_busy_decode_worker_keeps_headroom_but_an_idle_one_takes_what_fits() -> None:
    req = make_request(0, 160, RequestStatus.TRANSFERRING)  # 10 blocks
    busy = make_worker(1, "decode", num_blocks=100, free=12)
    busy.num_running = 4
    assert DistServePolicy(headroom=0.05).schedule(make_state([], [req], [make_worker(0, "prefill"), busy])).empty
    idle = make_worker(1, "decode", num_blocks=100, free=10)
    out = DistServePolicy(headroom=0.05).schedule(make_state([], [req], [make_worker(0, "prefill"), idle]))
    assert [t.dst_rank for t in out.transfers] == [1]


def test_dead_workers_get_nothing() -> None:
    p0, d = make_worker(0, "prefill"), make_worker(1, "decode")
    d.alive = False
    assert DistServePolicy().schedule(make_state([make_request(0, 10)], [make_request(1, 10, RequestStatus.TRANSFERRING)], [p0, d])).empty


def test_bad_policy_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy 'fifo'; choose one of"):
        make_policy("fifo")
    with pytest.raises(ValueError, match=r"headroom must be in \[0, 1\)"):
        DistServePolicy(headroom=1.0)


def test_illegal_lifecycle_transitions_raise() -> None:
    req = make_request(0, 4)
    with pytest.raises(RuntimeError, match="illegal transition WAITING_PREFILL -> DECODING"):
        req.transition(RequestStatus.DECODING)
    req.transition(RequestStatus.ABORTED)
    with pytest.raises(RuntimeError, match="illegal transition ABORTED -> FAILED"):
        req.transition(RequestStatus.FAILED)
    assert [e.status for e in req.events] == [RequestStatus.WAITING_PREFILL, RequestStatus.ABORTED]


def test_the_coordinator_imports_no_torch() -> None:
    code = (
        "import sys, ecoserve.coordinator.server, ecoserve.coordinator.policies, ecoserve.kv_transfer, "
        "ecoserve.kv_transfer.planner, ecoserve.client; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_vllm_sends_whole_requests_fcfs_to_the_least_loaded_mixed_worker() -> None:
    m0, m1 = make_worker(0, "mixed"), make_worker(1, "mixed")
    m0.queued_prefill_tokens = 40
    out = make_policy("vllm").schedule(make_state([make_request(0, 30), make_request(1, 30)], [], [m0, m1]))
    assert [(d.request_id, d.rank, d.decode_locally, d.reserve_blocks) for d in out.prefills] == [
        ("r0", 1, True, 0), ("r1", 1, True, 0)
    ]


def test_orca_reserves_prompt_plus_max_tokens_and_admits_only_what_fits() -> None:
    m0 = make_worker(0, "mixed", num_blocks=4)  # 64 tokens; each request needs 10 + 16 = 26 -> 2 blocks
    m0.reserved_blocks = 1
    reqs = [make_request(i, 10) for i in range(3)]
    out = make_policy("orca").schedule(make_state(reqs, [], [m0]))
    assert [(d.request_id, d.reserve_blocks) for d in out.prefills] == [("r0", 2)], "3 free blocks hold one reservation of 2"


def test_policies_refuse_clusters_they_cannot_schedule() -> None:
    from ecoserve.coordinator.policy import check_cluster

    with pytest.raises(ValueError, match=r"policy 'vllm' needs mixed workers; this cluster has \['decode', 'prefill'\] \(start it with --mixed K\)"):
        check_cluster(make_policy("vllm"), {"prefill", "decode"})
    check_cluster(make_policy("distserve"), {"mixed"})
    check_cluster(make_policy("orca"), {"mixed", "prefill", "decode"})
