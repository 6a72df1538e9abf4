"""The offline engine: add requests, then step (schedule -> execute -> update) until done.

Beyond the local batcher's own choices, the engine takes orders meant for a coordinator:
`preempt` parks a decoding request (its KV swapped to host memory, or dropped to be
recomputed), `resume` brings it back, `set_reservation` caps the KV blocks a request may hold
(FCFSScheduler.held lists those waiting at their cap), and `release` ends a request in any
state, freeing its device and host blocks.

With `ModelConfig.engine == "sim"` the runner is engine.sim.SimRunner (a load-test tool: no
weights, modelled step times, deterministic tokens); everything else here is unchanged.
With `SchedulerConfig.schedule == "slo"` the batcher budgets prompt tokens by the
`latency_profile` and each decoding sequence's `tpot_target_ms` (engine/prompt_budget.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ecoserve.config import EngineConfig
from ecoserve.envs import num_threads
from ecoserve.engine.model_runner import ModelRunner, Runner, StepInputs, kv_cache_shape
from ecoserve.params import SamplingParams
from ecoserve.engine.scheduler import FCFSScheduler
from ecoserve.engine.sequence import FinishReason, Sequence, SequenceStatus
from ecoserve.engine.sim import SimRunner, sim_num_blocks, sim_spec
from ecoserve.kv_cache import BlockPool, BlockTable, OutOfBlocksError
from ecoserve.kv_cache.host_pool import HostSwapSpace
from ecoserve.model.loader import load_model
from ecoserve.model.registry import resolve_model
from ecoserve.model.sampling import sample
from ecoserve.latency.profile import load_profile


PREEMPT_MODES = ("swap", "recompute")


@dataclass(frozen=True)
class StepOutput:
    request_id: str
    new_token_id: int
    finished: bool


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        name = "bfloat16" if device == "cuda" else "float32"
    return getattr(torch, name)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA device is available; use 'cpu' or 'auto'")
    return name


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        threads = num_threads()
        if threads:
            torch.set_num_threads(threads)
        self.folder = resolve_model(config.model.model)
        # The sim engine (engine/sim.py, a load-test tool) models the model: no weights.
        self.sim_profile = load_profile(config.model.sim_profile) if config.model.engine == "sim" else None
        self.device = "cpu" if self.sim_profile else resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        torch.manual_seed(config.model.seed)
        self.model_id = config.model.model
        model = None
        if self.sim_profile:
            self.model_id = f"{config.model.model} (sim {self.sim_profile.name})"
            self.spec = sim_spec(self.folder, self.model_id)
        else:
            self.spec, model = load_model(self.folder, self.dtype, self.device)
        # Sliding-window attention is not implemented: within the window it equals full attention,
        # so a Mistral-style model is served up to its window and no further.
        limits = [self.spec.max_position_embeddings, self.spec.sliding_window or self.spec.max_position_embeddings]
        self.max_model_len = min(config.model.max_model_len or limits[0], *limits)
        block_size = config.cache.block_size
        num_blocks = config.cache.num_blocks or self._default_num_blocks(config, block_size)
        self.pool = BlockPool(num_blocks, block_size)
        self.runner: Runner
        if model is not None:
            self.runner = ModelRunner(model, self.spec, num_blocks, block_size, self.dtype)
        else:
            assert self.sim_profile is not None
            self.runner = SimRunner(self.spec, num_blocks, block_size, self.sim_profile, config.model.sim_time_scale)
        host_blocks = config.cache.num_host_blocks
        self.swap_space = HostSwapSpace(self.runner.kv_cache, host_blocks) if host_blocks else None
        sched = config.scheduler
        # The "slo" schedule budgets each step's prompt tokens by this profile (prompt_budget.py).
        self.slo_profile = load_profile(sched.latency_profile) if sched.schedule == "slo" and sched.latency_profile else None
        self.scheduler = FCFSScheduler(self.pool, sched.max_num_seqs, sched.max_num_batched_tokens,
                                       prefill_priority=sched.schedule == "prefill-priority", slo_profile=self.slo_profile)
        self.num_mixed_steps = 0  # steps that carried both prompt tokens and decodes
        self.sequences: dict[str, Sequence] = {}
        self.last_preempted: list[Sequence] = []
        # Tokens the last step computed; 0 when it scheduled nothing (every queued request held
        # at its reservation, or waiting for blocks). A step can compute tokens yet return no
        # output: a prefill chunk that does not reach the end of its sequence samples nothing.
        self.last_num_scheduled_tokens = 0
        self._arrivals = itertools.count()

    def _kv_bytes(self, config: EngineConfig) -> int:
        fraction = config.cache.gpu_memory_fraction
        if fraction is None:
            return int(config.cache.kv_cache_gib * 2**30)
        if self.device != "cuda":
            raise ValueError("gpu_memory_fraction sizes the KV pool on CUDA only; on CPU give num_blocks or kv_cache_gib")
        free, _ = torch.cuda.mem_get_info()
        return int(free * fraction)

    def _default_num_blocks(self, config: EngineConfig, block_size: int) -> int:
        """The sim engine holds its profile's measured KV capacity; else the memory setting's."""
        sim_blocks = sim_num_blocks(self.sim_profile, block_size) if self.sim_profile else None
        return sim_blocks or self._blocks_for_memory(self._kv_bytes(config), block_size)

    def _blocks_for_memory(self, num_bytes: int, block_size: int) -> int:
        per_block = torch.Size(kv_cache_shape(self.spec, 1, block_size)).numel() * self.dtype.itemsize
        return max(1, num_bytes // per_block)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Queue a request after validating it; a rejected request changes nothing."""
        self._validate(request_id, prompt_token_ids, params)
        self.scheduler.add(self.new_sequence(request_id, prompt_token_ids, params))

    def new_sequence(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Sequence:
        seq = Sequence(request_id, list(prompt_token_ids), params, next(self._arrivals), BlockTable(self.pool.block_size))
        self.sequences[request_id] = seq
        return seq

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt:
            raise ValueError("prompt is empty: give at least one token")
        vocab = self.spec.vocab_size
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the "
                f"model's context of {self.max_model_len} tokens; shorten the prompt or lower max_tokens"
            )
        if self.pool.blocks_for_tokens(total) > self.pool.num_blocks:
            raise ValueError(
                f"prompt + max_tokens = {total} tokens needs more KV blocks than the whole pool holds "
                f"({self.pool.num_blocks} blocks of {self.pool.block_size}); raise the KV cache size"
            )

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[StepOutput]:
        """One step; `self.last_preempted` then holds the sequences it preempted, and
        `self.last_num_scheduled_tokens` the tokens it computed."""
        out = self.scheduler.schedule()
        self.last_preempted = list(self.scheduler.preempted_log)
        self.scheduler.preempted_log.clear()
        self.last_num_scheduled_tokens = sum(c.num_new_tokens for c in out.prefills + out.decodes)
        self.num_mixed_steps += bool(out.prefills and out.decodes)
        if out.empty:
            return []
        inputs = self.runner.prepare(out.prefills, out.decodes)
        return self._update(inputs, self.runner.execute(inputs))

    def _update(self, inputs: StepInputs, logits: torch.Tensor) -> list[StepOutput]:
        for chunk in inputs.chunks:
            chunk.seq.num_computed_tokens += chunk.num_new_tokens
        seqs = [c.seq for c in inputs.sampled]
        tokens = sample(logits, [s.params for s in seqs], [self._generator(s) for s in seqs])
        results = []
        for seq, token in zip(seqs, tokens):
            seq.output_token_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                seq.finish_reason = reason
                self.scheduler.finish(seq)
            results.append(StepOutput(seq.request_id, token, reason is not None))
        return results

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        """A seeded request draws output token i from a generator seeded by (seed, i), so its
        tokens are the same whatever it is batched with, wherever it runs (a prefill worker
        samples token 0, a decode worker the rest) and after a preemption."""
        p = seq.params
        if p.greedy or p.seed is None:
            return None
        seed = (p.seed * 1_000_003 + len(seq.output_token_ids)) % 2**63
        return torch.Generator(device=self.device).manual_seed(seed)

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        # ignore_eos ignores only the model's EOS; explicit stop tokens still stop.
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.spec.eos_token_ids):
            return FinishReason.STOP
        if len(seq.output_token_ids) >= p.max_tokens:
            return FinishReason.LENGTH
        return None

    def pop_finished(self, request_id: str) -> Sequence:
        return self.sequences.pop(request_id)

    # --- orders from a coordinator: preempt, resume, reserve, release ----------------------

    def preempt(self, request_id: str, mode: str) -> str:
        """Park a decoding request; returns the mode actually used.

        "swap" copies the blocks holding its computed tokens to the host swap space, frees its
        device blocks and keeps its progress; with no swap space, or too few free host blocks,
        it falls back to "recompute" (the swap space left as it was). "recompute" frees its
        device blocks and resets its progress, to re-prefill prompt + outputs on resume.
        Only a running request whose prompt is fully computed can be preempted. A preemption
        ordered here is not listed in `last_preempted` (that reports the batcher's own).
        """
        if mode not in PREEMPT_MODES:
            raise ValueError(f"preempt mode must be one of {PREEMPT_MODES}, got {mode!r}")
        seq = self._sequence(request_id)
        if seq.status is not SequenceStatus.RUNNING or seq not in self.scheduler.running:
            state = seq.status.value if seq.status is not SequenceStatus.RUNNING else "detached from the batcher"
        elif seq.num_computed_tokens < len(seq.prompt_token_ids):
            state = "still prefilling its prompt"
        else:
            state = ""
        if state:
            raise ValueError(
                f"request {request_id!r} is {state}; only a running request whose prompt is fully computed "
                "(decoding) can be preempted"
            )
        if mode == "swap" and not self._swap_out(seq):
            mode = "recompute"
        if mode == "recompute":
            seq.num_computed_tokens = 0
        self.scheduler.park(seq)  # frees the device blocks
        seq.preempt_mode = mode
        seq.num_preemptions += 1
        return mode

    def _swap_out(self, seq: Sequence) -> bool:
        """Copy the blocks holding `seq`'s computed tokens to host; False, changing nothing, if
        there is no swap space or it lacks room."""
        if self.swap_space is None:
            return False
        used = seq.block_table.blocks[: self.pool.blocks_for_tokens(seq.num_computed_tokens)]
        try:
            seq.host_blocks = self.swap_space.swap_out(self.runner.kv_cache, used)
        except OutOfBlocksError:
            return False
        return True

    def resume(self, request_id: str) -> bool:
        """Schedule a parked request again; True once it is back in the batcher's queues.

        A swapped request needs device blocks for its computed tokens: if the pool has too few
        free, this returns False and nothing changes (try again when blocks free up); else its
        KV is copied back, its host blocks freed, and it rejoins the running in arrival (FCFS)
        order, decoding from where it stopped. A recomputed one goes to the front of the waiting
        queue and re-prefills its prompt and outputs through the normal admission path.
        """
        seq = self._sequence(request_id)
        if seq.status is not SequenceStatus.PARKED:
            raise ValueError(f"request {request_id!r} is {seq.status.value}; only a parked request can be resumed")
        if seq.preempt_mode == "swap":
            assert self.swap_space is not None
            need = len(seq.host_blocks)
            if need > self.pool.num_free:
                return False
            seq.block_table.ensure_capacity(seq.num_computed_tokens, self.pool)
            self.swap_space.swap_in(seq.host_blocks, self.runner.kv_cache, seq.block_table.blocks[:need])
            seq.host_blocks = []
        self.scheduler.unpark(seq)
        seq.preempt_mode = None
        return True

    def set_reservation(self, request_id: str, tokens: int | None) -> None:
        """Cap the request's device KV at `pool.blocks_for_tokens(tokens)` blocks (None: no cap).

        `tokens` must be at least the tokens it already has (prompt + outputs), else ValueError.
        A running request at its cap is held (listed in `scheduler.held` after each step, and
        given no token) until the cap is raised; raising it lets it go on at the next step.
        """
        self.scheduler.set_reservation(self._sequence(request_id), tokens)

    def release(self, request_id: str) -> Sequence | None:
        """End a request whatever its state (waiting, running, held, parked, swapped or
        finished): forget it, free its device blocks and host swap blocks, mark it FINISHED
        (a finished one keeps its finish reason). Returns it, or None for an unknown id."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.abort(seq)
        if seq.host_blocks:
            assert self.swap_space is not None
            self.swap_space.free(seq.host_blocks)
            seq.host_blocks = []
        seq.preempt_mode = None
        return seq

    def _sequence(self, request_id: str) -> Sequence:
        seq = self.sequences.get(request_id)
        if seq is None:
            raise ValueError(f"unknown request id {request_id!r}: not queued, running or parked on this engine")
        return seq
