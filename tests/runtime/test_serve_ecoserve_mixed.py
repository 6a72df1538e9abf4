"""`--policy ecoserve` on mixed workers (EcoServe's iteration, issue 17), through `ecoserve serve`.

With 2 mixed workers and with 1 prefill + 1 mixed: every request carries a TPOT SLO tight enough
that the slo schedule's budget binds, and still greedy tokens equal LLM.generate's and
transformers' (test_serve_equivalence's sixteen requests and reference), prompts join decode
iterations (mixed steps on the mixed workers; with a prefill worker, its prompts' KV reaches the mixed
worker), and every device block, host swap block and
reservation is released at the end. A forced under-prediction run (as test_serve_equivalence's,
on one mixed worker) preempts by swap and by recompute on the mixed worker for real and still
returns exactly the reference tokens.

The tiny model, as test_serve_equivalence's forced runs use it: SmolLM2-135M through the same
layouts took about 16 minutes on the 2-core machine (the 2-mixed run passed), past the suite's
timeout. The tiny model has no latency fit of its own: SmolLM2's CPU fit, which over-predicts its
steps, stands in (`--latency-profile`; a smaller budget than needed, never a broken target).
"""

from __future__ import annotations

import asyncio

import pytest

from ecoserve.client import AsyncClient, Completion
from ecoserve.params import SLO, SamplingParams
from tests.runtime.test_serve_equivalence import MAX_TOKENS, PROMPT_LENS, prompts, reference

# SmolLM2's CPU fit (the profile here) predicts about 190 ms for 8 decodes alone and 3 ms more
# per prompt token in the same step: a 400 ms target admits tens of prompt tokens, not the
# whole 256-token budget.
TIGHT = SLO(tpot_ms=400.0)
# Beside a prefill worker a prompt is prefilled locally only when the mixed worker's iterations
# are predicted to reach it within its TTFT; a 1 ms TTFT never is, so every prompt goes to the
# prefill worker and its KV moves to the mixed one (the 2-mixed case covers local prompts).
UNREACHABLE_TTFT = SLO(ttft_ms=1.0, tpot_ms=400.0)


async def serve_all(addr: str, model: str, slo: SLO | None, first: tuple[int, ...] = ()) -> tuple[list[Completion], dict[str, float]]:
    """The sixteen requests concurrently (those in `first` sent before the others, once they are
    dispatched); completions in index order, then the cluster's stats."""
    async with await AsyncClient.connect(addr, timeout=30) as client:
        def send(i: int) -> asyncio.Task[Completion]:
            params = SamplingParams(max_tokens=MAX_TOKENS[i], temperature=0, ignore_eos=True)
            return asyncio.ensure_future(client.generate(prompts(model)[i], params, slo=slo, timeout=600))

        tasks = {i: send(i) for i in first}
        if first:
            await asyncio.sleep(0)
            while (await client.stats())["queue_waiting_prefill"] > 0:
                await asyncio.sleep(0.01)
        tasks |= {i: send(i) for i in range(len(PROMPT_LENS)) if i not in tasks}
        done = list(await asyncio.gather(*(tasks[i] for i in range(len(PROMPT_LENS)))))
        return done, await client.stats()


def check(addr: str, model: str, slo: SLO | None, first: tuple[int, ...] = ()) -> dict[str, float]:
    completions, stats = asyncio.run(serve_all(addr, model, slo, first))
    for i, (done, want) in enumerate(zip(completions, reference(model))):
        assert done.token_ids == want, f"request {i} ({PROMPT_LENS[i]}-token prompt) diverged"
        assert done.finish_reason == "length" and done.num_prompt_tokens == PROMPT_LENS[i]
    assert stats["finished"] == len(PROMPT_LENS) and stats["failed"] == 0
    assert stats["kv_used_blocks"] == 0 and stats["reserved_blocks"] == 0, "blocks left allocated after every request ended"
    for key in ("reserved_tokens", "swap_used_blocks", "running", "waiting", "parked"):
        assert sum(v for k, v in stats.items() if k.endswith(f".{key}")) == 0, f"workers still hold {key}"
    return stats


@pytest.mark.parametrize(
    ("layout", "extra"),
    [((0, 0, 2), ("--num-blocks", "40")), ((1, 0, 1), ("--num-blocks", "40"))],
    ids=["2mixed", "1p1mixed"],
)
def test_ecoserve_on_mixed_workers_matches_offline_and_transformers(  # type: ignore[no-untyped-def]
    cluster, layout: tuple[int, int, int], extra: tuple[str, ...]
) -> None:
    model = "tiny-llama"
    reference(model)  # before the cluster starts: the CPU is not shared with it then
    options = ("--policy", "ecoserve", "--latency-profile", "cpu-smollm2-135m", "--max-num-batched-tokens", "256", *extra)
    with cluster(model, *layout, *options) as addr:
        stats = check(addr, model, UNREACHABLE_TTFT if layout[0] else TIGHT)
    print({k: v for k, v in stats.items() if "mixed_steps" in k or "preempt" in k})
    if layout[0]:  # P:mixed: prompts prefilled on the prefill worker move to the mixed worker
        assert stats["rank1.receives"] > 0, "no KV reached the mixed worker"
    else:
        assert stats["rank0.mixed_steps"] + stats["rank1.mixed_steps"] > 0, "no prompt joined a decode iteration"
    assert stats["predicted"] == 16


# As test_serve_equivalence's forced run: requests 14 and 6 go first and hold reservations
# together that leave no room for the last extension either one needs.
PREEMPTING_PAIR = (14, 6)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_forced_under_prediction_on_a_mixed_worker_preempts_and_keeps_tokens_exact(cluster, mode: str) -> None:  # type: ignore[no-untyped-def]
    """Every request predicted to produce 4 tokens: extensions run out of room on the mixed
    worker and victims are preempted by `mode` (KV to the host swap space and back, or dropped
    and recomputed inside the slo schedule's budget), resumed, and still produce exactly the
    reference tokens. The tiny model has no fit of its own: SmolLM2's CPU fit, which
    over-predicts its steps, stands in (a smaller budget than needed, never a broken target)."""
    model = "tiny-llama"
    reference(model)
    options = (
        "--policy", "ecoserve", "--latency-profile", "cpu-smollm2-135m",
        "--predictor", "fixed", "--predictor-option", "length=4",
        "--policy-option", "buckets=[4,8,16,32]", "--policy-option", "margin=0.125", "--policy-option", f"preempt_mode={mode}",
        "--block-size", "4", "--num-blocks", "48", "--num-host-blocks", "256", "--max-num-batched-tokens", "64",
    )
    with cluster(model, 0, 0, 1, *options) as addr:
        stats = check(addr, model, TIGHT, PREEMPTING_PAIR)
    print({k: v for k, v in stats.items() if "preempt" in k or "extension" in k or "mixed_steps" in k})
    assert stats["under_predicted"] == sum(1 for m in MAX_TOKENS if m > 4)
    assert stats["extensions"] > 0
    assert stats[f"preemptions_{mode}"] >= 1, stats
    if mode == "recompute":
        assert stats["preemptions_swap"] == 0
    assert stats["rank0.mixed_steps"] > 0
