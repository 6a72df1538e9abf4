"""Retry bookkeeping of the lifecycle on the fake cluster (real lifecycle and policies, fake
workers, tick clock): a lost worker's requests and failed transfers are retried elsewhere up to
`max_retries`, the stream goes on without duplicates or gaps, each request gets exactly one
terminal event, and every surviving worker and the coordinator's accounting return to zero."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ecoserve import protocol as p
from ecoserve.config import ClusterShape, CoordinatorConfig
from ecoserve.coordinator.policies import make_policy
from ecoserve.coordinator.request import Request, RequestStatus as S
from ecoserve.params import SamplingParams
from tests.coordinator.fake_cluster import FakeCluster, worker_specs

DISAGG = ("distserve", "ecoserve")


def make_cluster(policy: str = "distserve", prefill: int = 1, decode: int = 2, mixed: int = 0, pool: int = 128,
                 max_retries: int = 2) -> FakeCluster:
    options: dict[str, Any] = {"predictor": "oracle"} if policy == "ecoserve" else {}
    specs = worker_specs(ClusterShape(prefill=prefill, decode=decode, mixed=mixed), pool)
    cluster = FakeCluster(make_policy(policy, **options), specs)
    cluster.lifecycle.config = CoordinatorConfig(max_retries=max_retries, retry_backoff_s=0.0)
    return cluster


def submit(cluster: FakeCluster, n: int, prompt: int = 40, length: int = 30) -> list[str]:
    """`n` streamed requests; returns their client request ids."""
    ids = [cluster.submit(prompt + i, length, 64) for i in range(n)]
    for rid in ids:
        cluster.lifecycle.requests[rid].stream = True
    return ids


def live(cluster: FakeCluster, client_id: str) -> Request:
    return next(r for r in cluster.lifecycle.requests.values() if r.client_request_id == client_id)


def step_until(cluster: FakeCluster, cond: Any, limit: int = 1000) -> None:
    for _ in range(limit):
        if cond():
            return
        cluster.step()
    raise AssertionError("condition not reached")


def check_end(cluster: FakeCluster, ids: list[str], lengths: dict[str, int] | None = None) -> None:
    """Exactly one terminal event each; every finished one streamed indices 0..n-1 once, in
    order, matching its final tokens; no leaks anywhere."""
    cluster.run_until_idle()
    assert cluster.terminal_events() == {rid: 1 for rid in ids}
    for rid in ids:
        deltas = [m for m in cluster.client_messages if isinstance(m, p.TokenDelta) and m.request_id == rid]
        done = [m for m in cluster.client_messages if isinstance(m, p.RequestFinished) and m.request_id == rid]
        streamed = [t for d in deltas for t in d.token_ids]
        assert [d.index for d in deltas] == list(range(len(deltas))), f"{rid}: a gap or a duplicate"
        if done:
            assert streamed == done[0].token_ids
            if lengths is not None:
                assert len(done[0].token_ids) == lengths[rid]
    cluster.assert_no_leaks()


# --- worker loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", DISAGG)
def test_a_lost_decode_worker_s_requests_resume_on_the_other_one_from_where_they_were(policy: str) -> None:
    cluster = make_cluster(policy)
    sent: list[tuple[int, Any]] = []
    to_worker = cluster.lifecycle.to_worker
    cluster.lifecycle.to_worker = lambda rank, msg: (sent.append((rank, msg)), to_worker(rank, msg))  # type: ignore[func-returns-value]
    # 1. Six requests; run until some decode on rank 1 with a few tokens out.
    ids = submit(cluster, 6)
    step_until(cluster, lambda: sum(r.decode_rank == 1 and len(r.output_token_ids) >= 5
                                    for r in cluster.lifecycle.requests.values() if r.status is S.DECODING) >= 2)
    on_rank1 = {r.client_request_id: len(r.output_token_ids) for r in cluster.lifecycle.requests.values()
                if r.decode_rank == 1 and r.status is S.DECODING}
    # 2. Rank 1 dies: it is fenced, its peers told, its requests back in the queue under new ids.
    cluster.kill(1, "its process exited with code -9")
    assert (1, p.Shutdown()) in sent and (0, p.PeerLost(1)) in sent and (2, p.PeerLost(1)) in sent
    for cid, produced in on_rank1.items():
        req = live(cluster, cid)
        assert req.status is S.WAITING_PREFILL and req.request_id == f"retry1:{cid}"
        assert req.num_retries == 1 and req.num_replayed == produced and req.decode_rank is None
        assert "worker rank 1 (decode) was lost: its process exited with code -9" in req.retry_reasons[0]
    # 3. The retry's prefill replays what was streamed; its decode goes to rank 2.
    cluster.step()
    prefills = [m for r, m in sent if isinstance(m, p.RunPrefill) and m.request_id.startswith("retry1:")]
    assert {m.request_id.removeprefix("retry1:"): len(m.generated_token_ids) for m in prefills} == on_rank1
    check_end(cluster, ids, {rid: 30 for rid in ids})
    stats = cluster.lifecycle.stats()
    assert stats["workers_lost"] == 1 and stats["retries"] == len(on_rank1) and stats["finished"] == 6
    assert stats["workers_alive"] == 2 and stats["reserved_blocks"] == 0


@pytest.mark.parametrize("policy", DISAGG)
@pytest.mark.parametrize("phase", [S.PREFILLING, S.TRANSFERRING])
def test_a_lost_prefill_worker_s_requests_are_queued_again_and_served_by_the_other(policy: str, phase: S) -> None:
    cluster = make_cluster(policy, prefill=2, decode=1)
    cluster.transfer_ticks = 6  # transfers stay in flight long enough to be caught there
    # 1. Run until a request on prefill rank 0 is in `phase`.
    ids = submit(cluster, 8, prompt=200)
    step_until(cluster, lambda: any(r.prefill_rank == 0 and r.status is phase for r in cluster.lifecycle.requests.values()))
    hit = [r.client_request_id for r in cluster.lifecycle.requests.values() if r.prefill_rank == 0 and r.status is phase]
    produced = {cid: len(live(cluster, cid).output_token_ids) for cid in hit}
    # 2. Rank 0 dies: those requests wait for prefill again, nothing of theirs held anywhere.
    cluster.kill(0)
    for cid in hit:
        req = live(cluster, cid)
        assert req.status is S.WAITING_PREFILL and req.num_replayed == produced[cid]
        assert req.request_id not in cluster.lifecycle.ledger.where
        assert req.request_id not in cluster.lifecycle.transfer_blocks
    # 3. All finish on rank 1, with every token once.
    check_end(cluster, ids, {rid: 30 for rid in ids})


def test_a_lost_mixed_worker_s_requests_finish_on_the_other_mixed_worker() -> None:
    cluster = make_cluster("vllm", prefill=0, decode=0, mixed=2)
    ids = submit(cluster, 6)
    step_until(cluster, lambda: any(r.decode_rank == 0 and len(r.output_token_ids) > 3 for r in cluster.lifecycle.requests.values()))
    cluster.kill(0)
    assert cluster.lifecycle.counters["retries"] > 0
    check_end(cluster, ids, {rid: 30 for rid in ids})


def test_a_request_fails_naming_every_lost_rank_once_its_retries_are_used_up() -> None:
    cluster = make_cluster(decode=3, max_retries=1)
    # 1. One request, decoding on some rank; that rank dies: retry 1.
    (rid,) = submit(cluster, 1, length=60)
    step_until(cluster, lambda: live(cluster, rid).status is S.DECODING)
    first = live(cluster, rid).decode_rank
    assert first is not None
    cluster.kill(first)
    # 2. Its next decode rank dies too: no retries left, one ErrorReply naming both.
    step_until(cluster, lambda: live(cluster, rid).status is S.DECODING)
    second = live(cluster, rid).decode_rank
    assert second is not None and second != first
    cluster.kill(second)
    errors = [m for m in cluster.client_messages if isinstance(m, p.ErrorReply)]
    assert len(errors) == 1 and errors[0].code == "failed"
    text = errors[0].message
    assert f"worker rank {second} (decode) was lost" in text and f"worker rank {first} (decode) was lost" in text
    assert "after 1 retries; the limit is --max-retries 1" in text
    # 3. The survivors still serve.
    (other,) = submit(cluster, 1, prompt=10, length=5)
    check_end(cluster, [rid, other])


def test_losing_the_last_decode_worker_fails_every_request_with_the_reason() -> None:
    cluster = make_cluster(decode=1)
    ids = submit(cluster, 4)
    step_until(cluster, lambda: any(r.status is S.DECODING for r in cluster.lifecycle.requests.values()))
    cluster.kill(1, "no heartbeat for 2.0 s")
    errors = [m for m in cluster.client_messages if isinstance(m, p.ErrorReply)]
    assert len(errors) == 4
    assert all("no live worker can serve requests (worker rank 1 (decode) was lost: no heartbeat for 2.0 s)" in e.message
               for e in errors)
    check_end(cluster, ids)


def test_messages_from_a_lost_rank_and_about_an_old_attempt_are_ignored() -> None:
    cluster = make_cluster()
    (rid,) = submit(cluster, 1, length=40)
    step_until(cluster, lambda: live(cluster, rid).status is S.DECODING and len(live(cluster, rid).output_token_ids) > 3)
    rank = live(cluster, rid).decode_rank
    assert rank is not None
    cluster.kill(rank)
    before = len(cluster.client_messages)
    # The lost worker (only slow) reports a token, and a live one reports one for the old id.
    for r in (rank, 3 - rank):
        cluster.lifecycle.on_worker_message(p.TokenEvents(
            rank=r, request_ids=[rid], token_ids=[7], finish_reasons=["length"], preempted=[], free_blocks=10,
        ))
    cluster.lifecycle.on_worker_message(p.TransferStatus(3 - rank, rid, "failed", "late"))
    assert len(cluster.client_messages) == before and live(cluster, rid).status is S.WAITING_PREFILL
    check_end(cluster, [rid], {rid: 40})


# --- transfer faults -------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", DISAGG)
def test_a_failed_transfer_is_aborted_on_both_sides_and_retried(policy: str) -> None:
    cluster = make_cluster(policy)
    cluster.transfer_ticks = 5
    ids = submit(cluster, 3)
    step_until(cluster, lambda: bool(cluster.lifecycle.transfer_blocks))
    rid = next(iter(cluster.lifecycle.transfer_blocks))
    req = cluster.lifecycle.requests[rid]
    src, dst = req.prefill_rank, req.decode_rank
    cluster.fail_transfer(rid)
    assert req.status is S.WAITING_PREFILL and req.request_id == f"retry1:{rid}" and req.num_replayed == 1
    assert cluster.lifecycle.releasing[rid] == {src, dst}, "both sides are told to free the old attempt"
    assert cluster.lifecycle.counters["transfers_failed"] == 1
    check_end(cluster, ids, {r: 30 for r in ids})


def test_a_failed_transfer_s_retry_waits_out_the_backoff_first() -> None:
    """A peer that died fails its transfers at once; the backoff leaves time to notice."""
    cluster = make_cluster()
    cluster.lifecycle.config = CoordinatorConfig(retry_backoff_s=0.05)
    cluster.lifecycle.clock = lambda: cluster.tick / 100  # 10 ms a tick
    (rid,) = submit(cluster, 1)
    step_until(cluster, lambda: bool(cluster.lifecycle.transfer_blocks))
    cluster.fail_transfer(rid)
    req = live(cluster, rid)
    assert req.request_id in cluster.lifecycle.backoff and req not in cluster.lifecycle.waiting
    assert cluster.lifecycle.stats()["queue_retry_backoff"] == 1
    assert cluster.lifecycle.next_retry_in() == pytest.approx(0.05)
    start = cluster.tick
    step_until(cluster, lambda: req.status is not S.WAITING_PREFILL)
    assert cluster.tick - start >= 5 and not cluster.lifecycle.backoff
    check_end(cluster, [rid], {rid: 30})


def test_with_no_retries_a_failed_transfer_fails_the_request_with_its_reason() -> None:
    cluster = make_cluster(max_retries=0)
    (rid,) = submit(cluster, 1)
    step_until(cluster, lambda: bool(cluster.lifecycle.transfer_blocks))
    cluster.fail_transfer(rid)
    (error,) = [m for m in cluster.client_messages if isinstance(m, p.ErrorReply)]
    assert error.message.startswith("KV transfer timed_out on rank ") and "without a retry; the limit is --max-retries 0" in error.message
    check_end(cluster, [rid])


# --- the state machine ----------------------------------------------------------------------------


def test_retry_is_the_only_way_back_to_waiting_and_only_from_live_work() -> None:
    req = Request(
        request_id="r", client=b"c", client_request_id="r", prompt_token_ids=[1, 2, 3],
        params=SamplingParams(max_tokens=8, temperature=0.0), stream=False,
    )
    with pytest.raises(RuntimeError, match="cannot retry from WAITING_PREFILL"):
        req.retry(1.0, "x")
    req.transition(S.PREFILLING, 1.0)
    with pytest.raises(RuntimeError, match="illegal transition PREFILLING -> WAITING_PREFILL"):
        req.transition(S.WAITING_PREFILL, 2.0)
    req.prefill_rank = 0
    req.transition(S.TRANSFERRING, 2.0)
    req.output_token_ids.append(9)
    req.retry(3.0, "KV transfer timed_out")
    assert (req.status, req.num_retries, req.num_replayed, req.num_prefill_tokens, req.prefill_rank) == (
        S.WAITING_PREFILL, 1, 1, 4, None)
    assert [e.status for e in req.events][-1] is S.WAITING_PREFILL
    req.transition(S.FAILED, 4.0)
    with pytest.raises(RuntimeError):
        req.retry(5.0, "x")


# --- property: any mix of losses and transfer failures ----------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(DISAGG),
    n=st.integers(1, 25),
    faults=st.lists(st.tuples(st.integers(0, 80), st.sampled_from(["kill", "transfer"]), st.integers(0, 10)), max_size=4),
    max_retries=st.integers(0, 3),
)
def test_any_mix_of_faults_ends_every_request_once_with_no_leaks_on_survivors(
    policy: str, n: int, faults: list[tuple[int, str, int]], max_retries: int,
) -> None:
    cluster = make_cluster(policy, prefill=2, decode=3, pool=96, max_retries=max_retries)
    cluster.transfer_ticks = 3
    ids = [cluster.submit(10 + 13 * i % 150, 1 + 17 * i % 90, 100) for i in range(n)]
    for rid in ids:
        cluster.lifecycle.requests[rid].stream = True
    killed: set[int] = set()
    for tick, kind, pick in sorted(faults):
        while cluster.tick < tick and not cluster.idle():
            cluster.step()
        if kind == "kill":
            alive = [r for r in cluster.workers if r not in killed]
            rank = alive[pick % len(alive)]
            if len(killed) < 2 and (cluster.workers[rank].role == "decode" or rank not in (0, 1) or not {0, 1} & killed):
                killed.add(rank)
                cluster.kill(rank)
        else:
            for _ in range(50):  # the next transfer in flight
                if cluster.lifecycle.transfer_blocks or cluster.idle():
                    break
                cluster.step()
            if cluster.lifecycle.transfer_blocks:
                rids = sorted(cluster.lifecycle.transfer_blocks)
                cluster.fail_transfer(rids[pick % len(rids)])
    check_end(cluster, ids, {rid: min(cluster.true_lengths[rid], 100) for rid in ids})
    c = cluster.lifecycle.counters
    assert c["finished"] + c["failed"] == n
    # The cluster still serves.
    more = cluster.submit(20, 4, 8)
    cluster.run_until_idle()
    assert cluster.terminal_events()[more] == 1 and any(
        isinstance(m, p.RequestFinished) and m.request_id == more for m in cluster.client_messages)
