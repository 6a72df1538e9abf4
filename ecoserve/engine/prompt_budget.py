"""The "slo" schedule's prompt budget: how many prompt tokens one step of a worker may add to
its decodes and still be predicted to keep every decoding request's TPOT target (DESIGN §4.1,
EcoServe's iteration).

The budget is computed here, on the worker, each step, because only the worker knows the step
it is about to run: which requests decode in it (the smallest `tpot_target_ms` among them, their
contexts) and which chunks of which prompts would join them. The coordinator only hands each
request its target (RunPrefill/ReceiveKV.tpot_target_ms) and the worker's latency profile is
the one the policy's cost model reads.

Two bounds, both from the profile (`LatencyProfile.mixed_ms`):

1. A token count, `LatencyProfile.prompt_budget`: the most prompt tokens which, taken as one
   fresh chunk (Σl² = n², the costliest split of n fresh tokens), keep the step within the
   target; capped by the chunked budget (max_num_batched_tokens less the decodes).
2. Each chunk's own cost: a chunk of n tokens after s cached ones attends to s + n keys, so it
   adds n·(s + n) to Σl² (as engine/sim.py costs it). A continued chunk of a long prompt can cost
   more than bound 1 assumed; it is cut to what keeps the step's predicted time within the target.

So every step's predicted time stays within the target, and no step takes more prompt tokens
than bound 1. With no target among the decodes the budget is the chunked one; with nothing
decoding there is no TPOT to keep, and the budget is the whole `cap`.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from ecoserve.engine.sequence import Sequence
from ecoserve.latency.profile import LatencyProfile


class PromptBudget:
    """Prompt tokens one step may still take, given the step's decodes. `take` asks, `spend`
    commits (the scheduler may fail to find blocks in between)."""

    def __init__(self, profile: LatencyProfile, decoding: Seq[Sequence], cap: int) -> None:
        self.profile = profile
        targets = [s.tpot_target_ms for s in decoding if s.tpot_target_ms is not None]
        self.target_ms: float | None = min(targets) if targets else None
        ctx = [s.num_computed_tokens + 1 for s in decoding]  # keys each decode's attention reads
        self.batch, self.sum_ctx, self.max_ctx = len(ctx), sum(ctx), max(ctx, default=0)
        cap = max(0, cap)
        if self.target_ms is None or not self.batch:
            self.tokens = cap
        else:
            self.tokens = profile.prompt_budget(self.target_ms, self.batch, self.sum_ctx, self.max_ctx, cap=cap)
        self.initial_tokens = self.tokens  # bound 1, for stats and tests
        self.sum_len = 0  # Σ n over the chunks spent
        self.sum_sq = 0  # Σ n·(s + n) over them

    def take(self, computed: int, want: int) -> int:
        """How many of `want` tokens after `computed` cached ones the step may still run."""
        n = min(want, self.tokens)
        if n <= 0 or self.target_ms is None or not self.batch or self.predicted_ms(computed, n) <= self.target_ms:
            return max(0, n)
        lo, hi = 0, n  # predicted_ms(lo) within the target (or lo == 0), predicted_ms(hi) over it
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.predicted_ms(computed, mid) <= self.target_ms:
                lo = mid
            else:
                hi = mid
        return lo

    def spend(self, computed: int, n: int) -> None:
        self.tokens -= n
        self.sum_len += n
        self.sum_sq += n * (computed + n)

    def predicted_ms(self, computed: int = 0, n: int = 0) -> float:
        """The step's predicted time with what was spent, plus `n` tokens after `computed`."""
        return self.profile.mixed_ms(
            self.sum_len + n, self.sum_sq + n * (computed + n), self.batch, self.sum_ctx, self.max_ctx,
        )
