"""The simulated engine (`--engine sim`): a load-test tool that swaps the model for a stand-in.

Like Dynamo's mocker, it lets the real coordinator, sockets, processes and KV transfer carry
many workers on one small machine. Everything but the model is the real thing: LLMEngine, the
FCFS batcher, the block pool, reservations, preemption and the host swap space, and
torch.distributed KV transfer between workers. `SimRunner` replaces `ModelRunner`:

- KV tensor: real, paged like the model's, but tiny (SIM_NUM_LAYERS x SIM_NUM_KV_HEADS x
  SIM_HEAD_DIM float32 = 128 bytes a token), so transfers and swaps move real bytes cheaply.
  Each step writes, for every token it computes, K = the token id and V = its position; each
  decode step checks the KV of the token before it, so KV lost in a transfer or a swap stops
  the worker with an error instead of passing unseen.
- Step time: a step lasts as long as the latency profile says (ecoserve.latency.profile, from
  DistServe's A100 fits), times `sim_time_scale`, counted from the start of `prepare` (a step
  whose own work takes longer just takes longer). Prefill chunks cost a + b·Σn + c·Σn·(s+n)
  for chunks of n tokens after s cached ones (a + b·Σl + c·Σl² for whole prompts); decodes
  a + b·Σctx + c·batch; a step holding both (mixed workers) costs the profile's `mixed_ms` (one
  fused pass unless the profile measured otherwise). KV-transfer time is
  not modelled: the transfers are real, and small, and a worker moves them on (`while_waiting`)
  while a step waits out its modelled time, as a GPU engine's CPU is free while the GPU computes. The engine's own scheduling and sampling
  (about 1.3 ms of CPU a step at batch 100) come on top, as a real engine's CPU work would.
- Tokens: the token at position i of a request is a pure function of (its prompt, i): a 64-bit
  key mixed from a blake2b digest of the prompt ids and i picks the target token among ids
  [width/2, width) of the vocabulary (width = min(vocab, SIM_LOGITS_WIDTH); ids below, where
  tokenizers keep their special tokens, and the EOS ids are never picked) and a row of a fixed
  noise table. The "logits" are that noise row (values in [-8, 0), -inf outside the candidates)
  with the target set to +1, so the real `sample()` runs on them: greedy picks the target,
  a seeded request draws the same tokens on every run and worker (LLMEngine seeds its
  generators per output index), an unseeded one draws at random. Since the key ignores batch
  and worker, a prefill on one worker and the decode on another agree with an offline run,
  and a preempted request resumes with the same tokens. EOS is never the target, so a greedy
  request runs to max_tokens.

The model folder (`ModelConfig.model`; `tiny-llama` for `serve --engine sim` unless --model is
given) supplies only the vocabulary size, EOS ids and context length (read from config.json,
no transformers import); its tokenizer is the coordinator's. The KV pool holds the profile's
capacity (DistServe's max_num_tokens) unless num_blocks is given. Registration reports the sim
KV dims and a model id naming the profile, so the coordinator never pairs a sim worker with a
real one; the coordinator's KV bytes per token (swap-vs-recompute costs) are the sim's, too.
"""

from __future__ import annotations

import array
import hashlib
import time
from pathlib import Path
from typing import Callable

import torch

from ecoserve.engine.model_runner import StepInputs, kv_cache_shape
from ecoserve.engine.scheduler import ScheduledChunk
from ecoserve.engine.sequence import Sequence
from ecoserve.model.attention import AttentionMetadata
from ecoserve.model.hf_config import ModelSpec, check_model_type, eos_token_ids, read_config_json
from ecoserve.latency.profile import LatencyProfile

SIM_NUM_LAYERS = 2
SIM_NUM_KV_HEADS = 1
SIM_HEAD_DIM = 8
SIM_LOGITS_WIDTH = 1024  # logits cover token ids [0, width); the targets are ids [width/2, width)
WAIT_SLICE_S = 0.0005  # while_waiting's period during a step's modelled time
NOISE_ROWS = 251  # distinct noise rows (a prime, so key % rows and key // rows mix well)
_MASK64 = 2**64 - 1
_DIGEST_CACHE_MAX = 8192


def sim_spec(folder: Path, model_id: str) -> ModelSpec:
    """The folder's vocabulary, EOS ids and context length, with the sim engine's KV dims."""
    raw = read_config_json(folder)
    check_model_type(raw, folder)
    try:
        vocab, max_positions = int(raw["vocab_size"]), int(raw["max_position_embeddings"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{folder / 'config.json'} needs integer vocab_size and max_position_embeddings") from None
    bos = raw.get("bos_token_id")
    hidden = SIM_NUM_KV_HEADS * SIM_HEAD_DIM
    return ModelSpec(
        model_id=model_id, model_type=str(raw["model_type"]), vocab_size=vocab, hidden_size=hidden,
        intermediate_size=hidden, num_layers=SIM_NUM_LAYERS, num_q_heads=SIM_NUM_KV_HEADS,
        num_kv_heads=SIM_NUM_KV_HEADS, head_dim=SIM_HEAD_DIM, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=None, max_position_embeddings=max_positions, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=eos_token_ids(folder, raw.get("eos_token_id")), dtype="float32",
    )


def sim_num_blocks(profile: LatencyProfile, block_size: int) -> int | None:
    """KV blocks holding the profile's measured capacity; None when it gives none."""
    return max(1, profile.max_num_tokens // block_size) if profile.max_num_tokens else None


def step_time_ms(profile: LatencyProfile, prefills: list[ScheduledChunk], decodes: list[ScheduledChunk]) -> float:
    """Modelled time of one step, before `sim_time_scale`; call it before the step's update."""
    sum_len = sum(c.num_new_tokens for c in prefills)
    # A chunk of n queries after s cached tokens attends to s + n keys: n·(s + n), l² when s = 0.
    sum_sq = sum(c.num_new_tokens * (c.seq.num_computed_tokens + c.num_new_tokens) for c in prefills)
    ctx = [c.seq.num_computed_tokens + 1 for c in decodes]
    return profile.mixed_ms(sum_len, sum_sq, len(decodes), sum(ctx), max(ctx, default=0))


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit function of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def prompt_digest(prompt_token_ids: list[int]) -> int:
    """A 64-bit digest of the prompt, the same in every process and Python version."""
    data = array.array("q", prompt_token_ids).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def token_key(digest: int, position: int) -> int:
    return _mix64(digest ^ _mix64(position))


class SimRunner:
    """Stands in for ModelRunner: the same KV layout and step inputs, a modelled step time,
    and logits that make `sample()` pick a deterministic token (see the module docstring)."""

    def __init__(
        self, spec: ModelSpec, num_blocks: int, block_size: int, profile: LatencyProfile, time_scale: float
    ) -> None:
        self.spec = spec
        self.block_size = block_size
        self.profile = profile
        self.time_scale = time_scale
        self.kv_cache = torch.zeros(kv_cache_shape(spec, num_blocks, block_size), dtype=torch.float32)
        # [num_layers, 2, num_blocks * block_size, num_kv_heads, head_dim]: indexed by slot.
        self.kv_slots = self.kv_cache.view(spec.num_layers, 2, num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
        width = min(SIM_LOGITS_WIDTH, spec.vocab_size)
        banned = set(spec.eos_token_ids) | ({spec.bos_token_id} if spec.bos_token_id is not None else set())
        self.candidates = [t for t in range(width // 2, width) if t not in banned] or [t for t in range(width) if t not in banned]
        gen = torch.Generator().manual_seed(0)
        noise = torch.full((NOISE_ROWS, width), float("-inf"))  # [rows, width]
        noise[:, self.candidates] = -8.0 * torch.rand(NOISE_ROWS, len(self.candidates), generator=gen)
        self.noise = noise
        self._digests: dict[str, tuple[list[int], int]] = {}  # request id -> (its prompt list, digest)
        self._step_start = 0.0
        self.last_step_ms = 0.0  # the last step's modelled time, before time_scale
        # Called about every WAIT_SLICE_S while a step waits out its modelled time, when set (a
        # worker moves its KV transfers on): a GPU engine's CPU is free while the GPU computes.
        self.while_waiting: Callable[[], None] | None = None

    def prepare(self, prefills: list[ScheduledChunk], decodes: list[ScheduledChunk]) -> StepInputs:
        """The real runner's bookkeeping (token ids, positions, KV slots, sampled chunks), no
        attention tables."""
        self._step_start = time.perf_counter()
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sampled: list[ScheduledChunk] = []
        for chunk in prefills:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            end = start + chunk.num_new_tokens
            ids += seq.token_ids(start, end)
            positions += range(start, end)
            slots += seq.block_table.slots(start, end)
            if end == seq.num_tokens:
                sampled.append(chunk)
        decode_start = len(ids)
        for chunk in decodes:
            seq = chunk.seq
            pos = seq.num_computed_tokens
            ids.append(_token_at(seq, pos))
            positions.append(pos)
            slots.append(seq.block_table.slot(pos))
            sampled.append(chunk)
        meta = AttentionMetadata(
            slot_mapping=_tensor(slots), prefills=(), decode_start=decode_start, num_decodes=len(decodes),
            decode_blocks=None, decode_mask=None, decode_block_tables=None, decode_context_lens=None,
        )
        rows = _tensor(list(range(len(sampled))))
        return StepInputs(_tensor(ids), _tensor(positions), meta, rows, prefills + decodes, sampled)

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Write the step's KV, wait out the modelled step time; float32 logits [num_sampled, width]."""
        num_prefills = len(inputs.chunks) - inputs.meta.num_decodes
        prefills, decodes = inputs.chunks[:num_prefills], inputs.chunks[num_prefills:]
        self._check_kv(decodes)
        slots = inputs.meta.slot_mapping
        self.kv_slots[:, 0, slots] = inputs.input_ids.float()[:, None, None]  # K = token id
        self.kv_slots[:, 1, slots] = inputs.positions.float()[:, None, None]  # V = position
        self.last_step_ms = step_time_ms(self.profile, prefills, decodes)
        end = self._step_start + self.last_step_ms * self.time_scale / 1e3
        while (wait := end - time.perf_counter()) > 0:
            if self.while_waiting is None:
                time.sleep(wait)
                break
            self.while_waiting()
            time.sleep(min(wait, WAIT_SLICE_S))
        return self.logits(inputs.sampled)

    def logits(self, sampled: list[ScheduledChunk]) -> torch.Tensor:
        """[num_sampled, width]: a noise row each, its target token at +1 above all the rest."""
        keys = [token_key(self._digest(c.seq), c.seq.num_tokens) for c in sampled]
        rows = torch.tensor([k % NOISE_ROWS for k in keys], dtype=torch.int64)
        targets = torch.tensor([self.candidates[(k // NOISE_ROWS) % len(self.candidates)] for k in keys], dtype=torch.int64)
        out = self.noise[rows]  # a copy
        out[torch.arange(len(keys)), targets] = 1.0
        return out

    def _digest(self, seq: Sequence) -> int:
        cached = self._digests.get(seq.request_id)
        if cached is not None and cached[0] is seq.prompt_token_ids:
            return cached[1]
        if len(self._digests) >= _DIGEST_CACHE_MAX:  # forget finished requests now and then
            self._digests.clear()
        digest = prompt_digest(seq.prompt_token_ids)
        self._digests[seq.request_id] = (seq.prompt_token_ids, digest)
        return digest

    def _check_kv(self, decodes: list[ScheduledChunk]) -> None:
        """Each decode's previous token must be in its KV (written here, received, or swapped in)."""
        prev = [(c.seq, c.seq.num_computed_tokens - 1) for c in decodes if c.seq.num_computed_tokens > 0]
        if not prev:
            return
        slots = _tensor([seq.block_table.slot(pos) for seq, pos in prev])
        want = torch.tensor([[_token_at(seq, pos) for seq, pos in prev], [pos for _, pos in prev]], dtype=torch.float32)
        got = self.kv_slots[0, :, slots, 0, 0]  # [2, len(prev)]: K and V of layer 0
        if not torch.equal(got, want):
            i = int((got != want).any(dim=0).nonzero()[0])
            seq, pos = prev[i]
            raise RuntimeError(
                f"sim engine: the KV of request {seq.request_id!r} at position {pos} holds (token, position) "
                f"{tuple(got[:, i].tolist())}, expected {tuple(want[:, i].tolist())}: KV was lost in a transfer or a swap"
            )


def _token_at(seq: Sequence, pos: int) -> int:
    prompt_len = len(seq.prompt_token_ids)
    return seq.prompt_token_ids[pos] if pos < prompt_len else seq.output_token_ids[pos - prompt_len]


def _tensor(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)
