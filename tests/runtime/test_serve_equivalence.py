"""Through `ecoserve serve`, greedy tokens equal LLM.generate's and transformers' (float32).

Sixteen concurrent requests of different prompt and output lengths, on 1 prefill + 1 decode,
2 + 2, and 1 mixed worker; tiny-llama and SmolLM2-135M. The pools are small enough that
requests queue for KV, so the runtime's waiting paths are exercised, not just the happy one.
A separate test forces preemption by recompute on the decode worker. Under `--policy
ecoserve` the tokens are the same too, and a forced under-prediction run preempts by swap and
by recompute for real (KV copied to the host swap space and back, or dropped and recomputed)
and still returns exactly the reference tokens, with every block and reservation released; two
requests sent ahead of the others make that preemption certain, whatever the timing.
"""

from __future__ import annotations

import asyncio
from functools import lru_cache

import pytest
import torch

from ecoserve import LLM, SamplingParams
from ecoserve.client import AsyncClient, Completion
from ecoserve.data.sharegpt import iter_sharegpt_conversations
from ecoserve.model.registry import resolve_model

PROMPT_LENS = [1, 15, 16, 17, 5, 40, 70, 130, 33, 64, 9, 100, 48, 2, 80, 24]
MAX_TOKENS = [24, 8, 17, 30, 12, 1, 20, 16, 25, 9, 32, 14, 2, 28, 19, 11]


@lru_cache(maxsize=None)
def prompts(model: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve_model(model)))
    stream: list[int] = []
    for conv in iter_sharegpt_conversations(limit=60):
        stream += tok.encode(" ".join(t.text for t in conv.turns), add_special_tokens=False)
        if len(stream) > 2 * sum(PROMPT_LENS):
            break
    out, start = [], 0
    for n in PROMPT_LENS:
        out.append(stream[start : start + n])
        start += n + 11
    return out


@lru_cache(maxsize=None)
def reference(model: str) -> list[list[int]]:
    """LLM.generate's greedy tokens (all sixteen in one call, as a user would), checked here
    against transformers' generate one prompt at a time."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    llm = LLM(model=model, dtype="float32", device="cpu")
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]
    outs = [o.token_ids for o in llm.generate(prompts(model), params, use_tqdm=False)]
    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model(model)), dtype=torch.float32).eval()
    for prompt, m, ours in zip(prompts(model), MAX_TOKENS, outs):
        config = GenerationConfig(max_new_tokens=m, min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.inference_mode():
            ids = hf.generate(torch.tensor([prompt]), generation_config=config, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert ids[0, len(prompt):].tolist() == ours, f"LLM.generate differs from transformers on a {len(prompt)}-token prompt"
    return outs


async def serve_all(
    addr: str, model: str, first: tuple[int, ...] = ()
) -> tuple[list[Completion], dict[str, float]]:
    """All sixteen concurrently; the completions come back in index order. The requests in
    `first` are sent before the others, which follow once none of them waits for prefill (each
    was dispatched to prefill, so a reserving policy has reserved its decode memory)."""
    async with await AsyncClient.connect(addr, timeout=30) as client:
        def send(i: int) -> asyncio.Task[Completion]:
            params = SamplingParams(max_tokens=MAX_TOKENS[i], temperature=0, ignore_eos=True)
            return asyncio.ensure_future(client.generate(prompts(model)[i], params, timeout=300))

        tasks = {i: send(i) for i in first}
        if first:
            await asyncio.sleep(0)  # the tasks send their requests before the stats call below
            while (await client.stats())["queue_waiting_prefill"] > 0:
                await asyncio.sleep(0.01)
        tasks |= {i: send(i) for i in range(len(PROMPT_LENS)) if i not in tasks}
        done = list(await asyncio.gather(*(tasks[i] for i in range(len(PROMPT_LENS)))))
        return done, await client.stats()


def check(addr: str, model: str, first: tuple[int, ...] = ()) -> dict[str, float]:
    completions, stats = asyncio.run(serve_all(addr, model, first))
    expected = reference(model)
    for i, (done, want) in enumerate(zip(completions, expected)):
        assert done.token_ids == want, f"request {i} ({PROMPT_LENS[i]}-token prompt) diverged"
        assert done.finish_reason == "length" and done.num_prompt_tokens == PROMPT_LENS[i]
        assert done.ttft_ms > 0 and done.e2e_ms >= done.ttft_ms
    assert len({t for w in expected for t in w}) > 40, "degenerate reference outputs would prove little"
    assert stats["finished"] == len(PROMPT_LENS) and stats["failed"] == 0
    assert stats["kv_used_blocks"] == 0 and stats["reserved_blocks"] == 0, "blocks left allocated after every request ended"
    return stats


@pytest.mark.parametrize(
    ("model", "layout", "extra"),
    [
        # 24 blocks of 16 per worker: the decode side cannot hold all 16 requests at once.
        ("tiny-llama", (1, 1, 0), ("--num-blocks", "24", "--max-num-batched-tokens", "64")),
        ("tiny-llama", (2, 2, 0), ("--num-blocks", "48")),
        ("tiny-llama", (0, 0, 1), ("--num-blocks", "40", "--max-num-batched-tokens", "64")),
        ("smollm2-135m", (1, 1, 0), ("--num-blocks", "64", "--max-num-batched-tokens", "256")),
        ("smollm2-135m", (2, 2, 0), ("--num-blocks", "64")),
        ("smollm2-135m", (0, 0, 1), ("--num-blocks", "96")),
    ],
    ids=["tiny-1p1d", "tiny-2p2d", "tiny-mixed", "smollm2-1p1d", "smollm2-2p2d", "smollm2-mixed"],
)
def test_serve_matches_offline_and_transformers(cluster, model: str, layout: tuple[int, int, int], extra: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    reference(model)  # before the cluster starts: the CPU is not shared with it then
    with cluster(model, *layout, *extra) as addr:
        stats = check(addr, model)
    print({k: v for k, v in stats.items() if "." not in k})


def test_decode_preemption_by_recompute_keeps_tokens_exact(cluster) -> None:  # type: ignore[no-untyped-def]
    """Two requests pulled onto an 8-block decode pool together, each growing to 7 blocks: the
    decode worker must preempt one, recompute it, and still return the reference tokens."""
    model = "tiny-llama"
    two = [prompts(model)[5], prompts(model)[12]]  # 40 and 48 tokens: 3 blocks each
    llm = LLM(model=model, dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(two, params, use_tqdm=False)]

    async def run(addr: str) -> tuple[list[Completion], dict[str, float]]:
        async with await AsyncClient.connect(addr, timeout=30) as client:
            done = await asyncio.gather(*(client.generate(p, params, timeout=300) for p in two))
            return list(done), await client.stats()

    with cluster(model, 1, 1, 0, "--num-blocks", "8", "--max-num-batched-tokens", "256") as addr:
        done, stats = asyncio.run(run(addr))
    assert [d.token_ids for d in done] == expected
    assert stats["preemptions"] >= 1, "both requests fit their prompts but not their growth: one must be preempted"
    assert stats["kv_used_blocks"] == 0 and stats["reserved_blocks"] == 0


def test_seeded_sampling_through_serve_equals_offline(cluster) -> None:  # type: ignore[no-untyped-def]
    """Token i of a seeded request is drawn with (seed, i): the prefill worker's first token and
    the decode worker's later ones come out as in one offline process."""
    model = "tiny-llama"
    chosen = prompts(model)[:6]
    params = [SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=40, seed=100 + i, ignore_eos=True) for i in range(6)]
    llm = LLM(model=model, dtype="float32", device="cpu")
    expected = [llm.generate([p], sp, use_tqdm=False)[0].token_ids for p, sp in zip(chosen, params)]
    assert len({tuple(e) for e in expected}) == 6

    async def run(addr: str) -> list[Completion]:
        async with await AsyncClient.connect(addr, timeout=30) as client:
            return list(await asyncio.gather(*(client.generate(p, sp, timeout=300) for p, sp in zip(chosen, params))))

    with cluster(model, 1, 1, 0) as addr:
        done = asyncio.run(run(addr))
    assert [d.token_ids for d in done] == expected


@pytest.mark.parametrize("policy", ["vllm", "orca"])
def test_colocated_baselines_match_offline(cluster, policy: str) -> None:  # type: ignore[no-untyped-def]
    """`vllm` and `orca` on one mixed worker with a small pool: the same tokens; orca reserves
    prompt + max_tokens up front, so it never preempts, and every reservation is released."""
    reference("tiny-llama")
    with cluster("tiny-llama", 0, 0, 1, "--policy", policy, "--num-blocks", "24", "--max-num-batched-tokens", "64") as addr:
        stats = check(addr, "tiny-llama")
    if policy == "orca":
        assert stats["preemptions"] == 0


def test_a_policy_without_the_workers_it_needs_is_refused_at_start() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "ecoserve.cli", "serve", "--model", "tiny-llama", "--policy", "vllm", "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert "policy 'vllm' needs mixed workers; this cluster has ['decode', 'prefill'] (start it with --mixed K)" in out.stderr


def test_ecoserve_greedy_matches_offline_and_transformers_on_smollm2(cluster) -> None:  # type: ignore[no-untyped-def]
    model = "smollm2-135m"
    reference(model)
    with cluster(model, 1, 1, 0, "--policy", "ecoserve", "--num-blocks", "64", "--max-num-batched-tokens", "256") as addr:
        stats = check(addr, model)
    assert stats["predicted"] == 16 and stats["preemptions"] == 0


# Requests 14 and 6 (80- and 70-token prompts, 19 and 20 tokens): sent first, they hold decode
# reservations together that leave no room for the last extension either one needs.
PREEMPTING_PAIR = (14, 6)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_forced_under_prediction_preempts_and_keeps_tokens_exact(cluster, mode: str) -> None:  # type: ignore[no-untyped-def]
    """Every request predicted to produce 4 tokens (buckets 4, 8, 16, 32): all of them overrun,
    extensions run out of room on the decode worker, and victims are preempted by `mode` for
    real (KV copied to the host swap space and back, or dropped and recomputed), resumed, and
    still produce exactly the reference tokens.

    At least one preemption, whatever the timing. Blocks are 4 tokens (a request's KV stops at
    most 3 tokens past its reservation until it is extended) and the ledger plans 42 of the 48
    (margin 1/8). The pair goes first and the others once both are dispatched; the second waits
    for the prefill queue (2 x 64 tokens) to empty, so both are reserved before either decodes:
    at 4 tokens each, 1 + 84/4 + 1 + 74/4 = 41.5 blocks of ledger bound. Neither can end
    without its last extension (16 -> 19 or 20 tokens: a 16-token reservation stops it at 17 or
    19), tried from its 12th token on, when the two bounds come to at least
    2 + (150 + 11)/4 = 42.25 blocks: refused while the other holds its reservation. So one of
    the two is preempted before either ends (and, not having ended, is preempted by its worker).
    """
    model = "tiny-llama"
    reference(model)
    options = (
        "--policy", "ecoserve", "--predictor", "fixed", "--predictor-option", "length=4",
        "--policy-option", "buckets=[4,8,16,32]", "--policy-option", "margin=0.125", "--policy-option", f"preempt_mode={mode}",
        "--block-size", "4", "--num-blocks", "48", "--num-host-blocks", "256", "--max-num-batched-tokens", "64",
    )
    with cluster(model, 1, 1, 0, *options) as addr:
        stats = check(addr, model, PREEMPTING_PAIR)
    print({k: v for k, v in stats.items() if "preempt" in k or "extension" in k})
    assert stats["under_predicted"] == sum(1 for m in MAX_TOKENS if m > 4)
    assert stats["extensions"] > 0
    assert stats[f"preemptions_{mode}"] >= 1, stats
    if mode == "recompute":
        assert stats["preemptions_swap"] == 0
