"""The ecoserve policy: the timeline, pipelining against exact allocation, and property-based
runs of every policy on the fake cluster (fake clock, fake workers, real lifecycle)."""

from __future__ import annotations

import math
import random
from collections import deque

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from ecoserve.config import ClusterShape
from ecoserve.coordinator.ledger import ReservationLedger, Timeline, _values
from ecoserve.coordinator.policies import make_policy
from ecoserve.coordinator.policies.ecoserve import BucketQueues, EcoServeConfig, EcoServePolicy
from ecoserve.coordinator.policy import SchedulerState, WorkerView
from ecoserve.coordinator.request import Request, RequestStatus
from ecoserve.params import SamplingParams
from ecoserve.predictor.buckets import BucketScheme
from tests.coordinator.fake_cluster import FakeCluster, worker_specs

BS = 16


def _request(rid: str, prompt: int, max_tokens: int) -> Request:
    return Request(
        request_id=rid, client=b"c", client_request_id=rid, prompt_token_ids=[1] * prompt,
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0), stream=False,
    )


def _blocks(tokens: int) -> int:
    return -(-tokens // BS)


# --- the timeline ------------------------------------------------------------------------------------


def test_timeline_peak_is_at_a_cohort_end() -> None:
    # Two started cohorts: 2 x (32 KV tokens, 64 more) ending at step 64, and 1 x (16, 200) ending at 200.
    tl = Timeline(BS, now=0, capacity=100, delay=0, shapes=[(2, 64, 0, 64, 64), (1, 16, 0, 200, 200)])
    # Just before step 64: 2 + (64 + 2*63)/16 + 1 + (16 + 63)/16; just before 200: 1 + (16 + 199)/16.
    assert tl.peak == pytest.approx(max(2 + 190 / 16 + 1 + 79 / 16, 1 + 215 / 16))


def test_pipelining_admits_a_guest_that_exact_allocation_refuses_and_the_timeline_proves_it_safe() -> None:
    """A host decoding since step 0 with 1,200 tokens to go holds little now; a guest with a long
    prompt and a short predicted output fits in the space the host will need only later."""
    host_prompt, host_h, guest_prompt, guest_h, pool, delay = 16, 1200, 400, 64, 100, 32
    assert _blocks(host_prompt + host_h) + _blocks(guest_prompt + guest_h) > pool  # exact allocation: no
    admitted = {}
    for pipelining in (False, True):
        ledger = ReservationLedger(start_delay=delay)
        ledger.add(1, BS, host_h, [("host", host_prompt)], step=0)
        ledger.started("host", 0)
        policy = EcoServePolicy(EcoServeConfig(
            predictor="oracle", margin=0.0, pipelining=pipelining, start_delay=delay,
            buckets=BucketScheme(bounds=(64, 1200)),
        ))
        queue = BucketQueues()
        guest = _request("guest", guest_prompt, max_tokens=64)
        assert policy.predictor is not None
        policy.predictor.bind({"guest": 60}.get)  # its true length, as a lifecycle binds it
        policy.on_admit(guest)
        assert guest.predicted_tokens == guest_h
        queue.push(guest)
        workers = {0: WorkerView(0, "prefill", 100, BS, 512, 100), 1: WorkerView(1, "decode", pool, BS, 512, 99)}
        state = SchedulerState(0.0, queue, deque(), workers, ledger)
        decisions = policy.schedule(state)
        admitted[pipelining] = [r.members for r in decisions.reservations]
    assert admitted[False] == []
    assert admitted[True] == [(("guest", guest_prompt),)]
    # The proof: whenever in the start window the guest begins, actual block use (ceil per
    # request) stays within the pool at every step until both end.
    for start in range(delay + 1):
        for t in range(host_h + 1):
            host = _blocks(host_prompt + min(t, host_h))
            g = _blocks(guest_prompt + min(t - start, guest_h)) if start <= t < start + guest_h else 0
            assert host + g <= pool, (start, t)


def test_cohort_check_equals_members_checked_alone() -> None:
    tl = Timeline(BS, now=10, capacity=1e9, delay=8, shapes=[(3, 300, 0, 128, 140), (1, 50, 5, 512, 520)])
    cohort = tl.pending(4, 4 * 100, 64)
    singles = [tl.pending(1, 100, 64)] * 4
    assert tl.peak_with([cohort]) == pytest.approx(tl.peak_with(singles))


@settings(max_examples=200, deadline=None)
@given(
    now=st.integers(0, 500),
    delay=st.integers(0, 64),
    cohorts=st.lists(
        st.tuples(st.integers(1, 6), st.integers(0, 4000), st.one_of(st.none(), st.integers(0, 400)),
                  st.integers(0, 300), st.integers(1, 1500), st.booleans()),
        max_size=40,
    ),
    extra=st.lists(st.tuples(st.integers(-3, 5), st.integers(-900, 900), st.integers(1, 900)), max_size=3),
)
def test_the_fast_timeline_equals_the_cohort_by_cohort_reference_exactly(
    now: int, delay: int, cohorts: list, extra: list
) -> None:
    """The ledger's vectorised shapes and the swept usage equal `Cohort.shape` and the O(n^2)
    evaluation bit for bit (every term is a multiple of 1/16), and so does a one-shape check."""
    ledger = ReservationLedger(start_delay=delay)
    for i, (n, kv, first, later, horizon, pending) in enumerate(cohorts):
        members = [(f"r{i}.{j}", kv + j) for j in range(n)]
        ledger.add(1, BS, horizon, members, step=0)
        if first is not None:
            for j, (rid, _) in enumerate(members):
                if pending and j == n - 1 and n > 1:
                    break  # the last member has not started
                ledger.started(rid, min(first + later * j // n, now))
    led = ledger.rank(1, BS)
    d = ledger.delay(1)
    slow = [c.shape(now, d) for c in led.cohorts.values()]
    adds = [(n, kv, now, h, now + d + h) for n, kv, h in extra if n]
    fast = ledger.timeline(1, BS, now, 1e9, adds)
    assert fast.shapes.tolist() == [list(map(float, x)) for x in slow + adds]
    ref = np.array(slow + adds, dtype=np.float64).reshape(-1, 5)
    assert fast.usage.tolist() == _values(ref, fast.points, BS).tolist()
    for n, kv, h in extra:
        shape = (max(n, 1), abs(kv), now, h, now + d + h)
        both = np.concatenate([ref, np.array([shape], dtype=np.float64)])
        own = np.array([max(now, shape[4] - 1)], dtype=np.float64)
        want = max(float(_values(both, fast.points, BS).max()), float(_values(both, own, BS)[0]))
        assert fast.peak_with([shape]) == want


def test_bad_policy_configuration_is_refused_with_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"margin must be in \[0, 1\)"):
        make_policy("ecoserve", margin=1.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        make_policy("ecoserve", buckets=[64, 32])
    with pytest.raises(ValueError, match="unknown predictor 'psychic'"):
        make_policy("ecoserve", predictor="psychic")
    with pytest.raises(ValueError, match="unknown ecoserve option"):
        make_policy("ecoserve", pipelinin=False)
    with pytest.raises(ValueError, match="preempt_mode"):
        make_policy("ecoserve", preempt_mode="teleport")
    with pytest.raises(ValueError, match="takes no options"):
        make_policy("distserve", predictor="histogram")


# --- property-based runs on the fake cluster ---------------------------------------------------------

POLICIES = ("ecoserve", "distserve", "vllm", "orca")


def _cluster(name: str, options: dict, pool: int, host_blocks: int) -> FakeCluster:
    policy = make_policy(name, **options)
    shape = ClusterShape(mixed=2) if name in ("vllm", "orca") else ClusterShape(prefill=1, decode=2)
    return FakeCluster(policy, worker_specs(shape, pool, decode_host_blocks=host_blocks))


def _run(cluster: FakeCluster, arrivals: list[tuple[int, int, int, int]], aborts: set[int], check) -> dict[str, int]:
    """Feed `arrivals` ((tick, prompt, true length, max_tokens)); abort the i-th request of
    `aborts` a few ticks after it arrives; call `check` every tick; run until idle."""
    pending = sorted(arrivals)
    ids: list[str] = []
    abort_at: dict[int, str] = {}
    tick = 0
    while pending or abort_at:
        while pending and pending[0][0] <= tick:
            _, prompt, true_len, max_tokens = pending.pop(0)
            rid = cluster.submit(prompt, true_len, max_tokens)
            if len(ids) in aborts:
                abort_at[tick + 1 + len(ids) % 7] = rid
            ids.append(rid)
        rid = abort_at.pop(tick, None)
        if rid is not None:
            cluster.lifecycle.abort_client_request(b"c", rid)
        cluster.step()
        check(cluster)
        tick += 1
    while not cluster.idle():
        cluster.step()
        check(cluster)
        assert cluster.tick < 200_000
    counts = cluster.terminal_events()
    assert sorted(counts) == sorted(ids), "every accepted request gets a terminal event"
    assert set(counts.values()) == {1} if ids else True, "exactly one terminal event per request"
    cluster.assert_no_leaks()
    return counts


def _invariants(cluster: FakeCluster) -> None:
    for w in cluster.workers.values():
        assert w.pool.num_used <= w.pool.num_blocks
        assert w.host_free >= 0
        assert not w.violations, w.violations[:3]
    # Reserved >= used for every decoding request that has not overrun its prediction.
    lc = cluster.lifecycle
    for rid, cohort in list(lc.ledger.where.items()):
        req = lc.requests[rid]
        seq = cluster.workers[cohort.rank].running.get(rid)
        if seq is None or req.predicted_tokens is None or len(req.output_token_ids) > req.predicted_tokens:
            continue
        tokens = lc.ledger.reservation_tokens(rid)
        assert tokens is not None and len(seq.blocks) <= _blocks(tokens), (rid, len(seq.blocks), tokens)


arrival = st.tuples(
    st.integers(0, 60), st.integers(1, 300), st.integers(1, 400), st.integers(1, 400),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(POLICIES),
    arrivals=st.lists(arrival, min_size=0, max_size=60),
    sigma=st.floats(0.0, 1.5),
    margin=st.floats(0.0, 0.5),
    pool=st.integers(48, 160),
    host_blocks=st.integers(0, 64),
    aborts=st.sets(st.integers(0, 59), max_size=6),
    ablate=st.sets(st.sampled_from(["pipelining", "rl_buckets", "ordering", "exact_allocation"]), max_size=2),
)
# Found by a random search: a request needing more than (1 - margin) of an idle pool waited forever.
@example(name="ecoserve", arrivals=[(0, 233, 284, 346), (49, 253, 2, 321), (14, 263, 30, 157)], sigma=0.0,
         margin=0.49999999999999994, pool=48, host_blocks=0, aborts=set(), ablate=set())
def test_every_policy_keeps_capacity_one_terminal_event_and_no_leaks(
    name: str, arrivals: list, sigma: float, margin: float, pool: int, host_blocks: int, aborts: set[int], ablate: set[str],
) -> None:
    max_len = pool * BS // 2  # every request fits a pool on its own
    arrivals = [(t, min(p, max_len // 2), tl, min(m, max_len // 2)) for t, p, tl, m in arrivals]
    options: dict = {}
    if name == "ecoserve":
        options = {"predictor": "oracle-noisy", "predictor_options": {"sigma": sigma}, "margin": margin}
        options.update({k: False for k in ablate})
    cluster = _cluster(name, options, pool, host_blocks)
    _run(cluster, arrivals, aborts, _invariants)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrivals=st.lists(arrival, min_size=1, max_size=80), pool=st.integers(48, 160), margin=st.floats(0.0, 0.3))
def test_ecoserve_with_perfect_predictions_and_pipelining_never_preempts(arrivals: list, pool: int, margin: float) -> None:
    max_len = pool * BS // 2
    arrivals = [(t, min(p, max_len // 2), tl, min(m, max_len // 2)) for t, p, tl, m in arrivals]
    cluster = _cluster("ecoserve", {"predictor": "oracle", "margin": margin}, pool, 0)
    _run(cluster, arrivals, set(), _invariants)
    counters = cluster.lifecycle.counters
    assert counters["preemptions"] == 0 and counters["preemptions_local"] == 0, counters


def test_under_prediction_preempts_by_swap_and_by_recompute_and_every_request_completes() -> None:
    """Predict 8 tokens for everything: requests overrun, get extended while there is room,
    and victims are preempted (swap while host space lasts, recompute after), then resume."""
    rng = random.Random(3)
    for mode in ("swap", "recompute", "auto"):
        options = {"predictor": "fixed", "predictor_options": {"length": 8}, "margin": 0.0, "preempt_mode": mode}
        cluster = _cluster("ecoserve", options, pool=64, host_blocks=24)
        arrivals = [(rng.randint(0, 20), rng.randint(16, 120), rng.randint(40, 300), 320) for _ in range(40)]
        _run(cluster, arrivals, set(), _invariants)
        c = cluster.lifecycle.counters
        assert c["extensions"] > 0 and c["preemptions"] > 0, c
        if mode == "swap":
            assert c["preemptions_swap"] > 0
        if mode == "recompute":
            assert c["preemptions_recompute"] > 0 and c["preemptions_swap"] == 0
        lengths = {m.request_id: len(m.token_ids) for m in cluster.client_messages if hasattr(m, "token_ids")}
        assert all(n == min(cluster.true_lengths[r], 320) for r, n in lengths.items())


def test_stats_expose_buckets_reservations_and_prediction_error() -> None:
    cluster = _cluster("ecoserve", {"predictor": "oracle-noisy", "predictor_options": {"sigma": 0.5}}, 96, 16)
    for i in range(30):
        cluster.submit(20 + i, 10 + 5 * i, 256)
    cluster.step()
    stats = cluster.lifecycle.stats()
    assert any(k.startswith("queue_bucket.") for k in stats)
    # Each admitted request holds an exact reservation on its decode worker for its prompt plus its
    # predicted output (the bucket its prediction falls in), rounded up to whole blocks; the
    # prefill worker reserves nothing.
    admitted = [r for r in cluster.lifecycle.requests.values() if r.status is not RequestStatus.WAITING_PREFILL]
    assert {r.decode_rank for r in admitted} == {1, 2}, "both decode workers hold reservations"
    assert all(r.predicted_tokens for r in admitted)
    for rank in (1, 2):
        expected = sum(_blocks(r.num_prompt_tokens + (r.predicted_tokens or 0)) for r in admitted if r.decode_rank == rank)
        assert stats[f"worker.{rank}.reserved_blocks"] == expected, rank
    assert stats["worker.0.reserved_blocks"] == 0
    cluster.run_until_idle()
    stats = cluster.lifecycle.stats()
    # The predictor's seeded draws, in arrival order, give each prediction: ceil(true x e^N(0, 0.25)),
    # clipped to [1, max_tokens]; every request runs to its true length.
    rng = random.Random(0)
    lengths = [10 + 5 * i for i in range(30)]
    predictions = [max(1, min(256, math.ceil(n * math.exp(rng.gauss(0.0, 0.5))))) for n in lengths]
    expected = sum(abs(p - n) for p, n in zip(predictions, lengths)) / 30  # 41.57
    assert stats["predicted"] == 30 and stats["prediction_mean_abs_error"] == pytest.approx(expected, rel=1e-12)


def test_a_request_extended_in_a_round_is_not_also_that_round_s_victim() -> None:
    """Two requests on one decode worker exhaust their reservations together; there is room to
    extend one. The other's extension then needs a victim, and it must not be the request just
    extended (that would preempt and extend the same request in one round)."""
    ledger = ReservationLedger(start_delay=0)
    policy = EcoServePolicy(EcoServeConfig(predictor="fixed", predictor_options={"length": 32}, margin=0.0,
                                           buckets=BucketScheme(bounds=(32, 64, 128))))
    requests = {}
    for rid in ("a", "b"):
        req = _request(rid, 64, max_tokens=128)
        policy.on_admit(req)
        for status in (RequestStatus.PREFILLING, RequestStatus.TRANSFERRING, RequestStatus.DECODING):
            req.transition(status)
        req.decode_rank, req.prefill_rank, req.decode_start_step = 1, 0, 0
        req.output_token_ids = [1] * 32  # used its reservation up
        requests[rid] = req
    ledger.add(1, BS, 32, [("a", 64), ("b", 64)], step=0)
    ledger.started("a", 0)
    ledger.started("b", 0)
    # 14 blocks: each holds 6 now; extending one to 64 tokens needs 2 more; two extensions do not fit.
    workers = {0: WorkerView(0, "prefill", 100, BS, 512, 100), 1: WorkerView(1, "decode", 15, BS, 512, 3)}
    workers[1].decode_steps = 31
    state = SchedulerState(0.0, BucketQueues(), deque(), workers, ledger, dict(requests), {}, requests)
    d = policy.schedule(state)
    extended = {e.request_id for e in d.extensions}
    preempted = {p.request_id for p in d.preemptions}
    assert extended and not extended & preempted, (d.extensions, d.preemptions)


def test_a_request_the_worker_dropped_while_held_at_its_cap_is_still_extended() -> None:
    """A request held at its reservation can be the victim when an older one needs blocks (a
    local recompute: PREEMPTED with no mode, its reservation kept). Recomputed up to its cap it
    produces no token, so only an extension brings it back: it must still get one. A request
    preempted by the coordinator's own order resumes by a Resume instead and is not extended."""
    ledger = ReservationLedger(start_delay=0)
    policy = EcoServePolicy(EcoServeConfig(predictor="fixed", predictor_options={"length": 32}, margin=0.0,
                                           buckets=BucketScheme(bounds=(32, 64, 128))))
    requests = {}
    for rid, mode in (("local", None), ("ordered", "swap")):
        req = _request(rid, 64, max_tokens=128)
        policy.on_admit(req)
        for status in (RequestStatus.PREFILLING, RequestStatus.TRANSFERRING, RequestStatus.DECODING,
                       RequestStatus.PREEMPTED):
            req.transition(status)
        req.decode_rank, req.prefill_rank, req.decode_start_step, req.preempt_mode = 1, 0, 0, mode
        req.output_token_ids = [1] * 32  # at its cap
        requests[rid] = req
    ledger.add(1, BS, 32, [("local", 64)], step=0)
    ledger.started("local", 0)
    workers = {0: WorkerView(0, "prefill", 100, BS, 512, 100), 1: WorkerView(1, "decode", 40, BS, 512, 40)}
    workers[1].decode_steps = 31
    state = SchedulerState(0.0, BucketQueues(), deque(), workers, ledger, dict(requests), {}, requests)
    d = policy.schedule(state)
    assert [e.request_id for e in d.extensions] == ["local"] and not d.preemptions
