"""Owns the model and its paged KV tensor; turns a scheduled step into one forward pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ecoserve.engine.scheduler import ScheduledChunk
from ecoserve.kernels import cpu as cpu_kernels
from ecoserve.kernels import triton_available
from ecoserve.model.attention import AttentionMetadata, PrefillSegment
from ecoserve.model.hf_config import ModelSpec
from ecoserve import envs
from ecoserve.model.llama import LlamaForCausalLM, can_prepack_cpu_bf16, prepack_cpu_weights


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled] int64
    chunks: list[ScheduledChunk]  # every chunk of the step, in row order
    sampled: list[ScheduledChunk]  # chunks that end at the sequence's last token: they sample


def kv_cache_shape(spec: ModelSpec, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]."""
    return (spec.num_layers, 2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim)


class Runner(Protocol):
    """What LLMEngine needs of a runner: ModelRunner below, or engine.sim.SimRunner."""

    kv_cache: torch.Tensor  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]

    def prepare(self, prefills: list[ScheduledChunk], decodes: list[ScheduledChunk]) -> StepInputs: ...

    def execute(self, inputs: StepInputs) -> torch.Tensor: ...


class ModelRunner:
    def __init__(
        self, model: LlamaForCausalLM, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype
    ) -> None:
        self.model = model
        self.spec = spec
        self.block_size = block_size
        self.device = next(model.parameters()).device
        self.kv_cache = torch.zeros(kv_cache_shape(spec, num_blocks, block_size), dtype=dtype, device=self.device)
        # Per-layer K and V views, taken once rather than sliced out in every step.
        self.layer_caches = [(layer[0], layer[1]) for layer in self.kv_cache]
        # Triton kernels on CUDA; the torch path everywhere else (and on CUDA without triton).
        self.use_kernels = self.device.type == "cuda" and triton_available()
        # On the CPU, decode attention through the C kernel when it builds (float32 / bfloat16):
        # it reads blocks in place, where the torch path gathers and pads them in every layer.
        self.use_cpu_kernel = (
            self.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and cpu_kernels.available()
        )
        # bfloat16 on the CPU: the layer's elementwise steps in C, one pass each.
        self.fused_elementwise = self.use_cpu_kernel and dtype == torch.bfloat16 and model.use_cpu_bf16_kernels()
        # bfloat16 on the CPU: weights prepacked for oneDNN once, not reordered in every matmul.
        self.prepacked = (
            prepack_cpu_weights(model)
            if self.device.type == "cpu" and dtype == torch.bfloat16 and envs.cpu_prepack() and can_prepack_cpu_bf16()
            else 0
        )

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Run one step; returns float32 logits [num_sampled, vocab], one row per `inputs.sampled`."""
        return self.model(inputs.input_ids, inputs.positions, self.layer_caches, inputs.meta, inputs.logits_indices)

    def prepare(self, prefills: list[ScheduledChunk], decodes: list[ScheduledChunk]) -> StepInputs:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        sampled: list[ScheduledChunk] = []
        segments: list[PrefillSegment] = []
        for chunk in prefills:
            seq, start, n = chunk.seq, chunk.seq.num_computed_tokens, chunk.num_new_tokens
            end = start + n
            q_start = len(ids)
            ids += seq.token_ids(start, end)
            positions += range(start, end)
            slots += seq.block_table.slots(start, end)
            segments.append(self._segment(chunk, q_start))
            if end == seq.num_tokens:
                logits_rows.append(len(ids) - 1)
                sampled.append(chunk)
        decode_start = len(ids)
        for chunk in decodes:
            seq = chunk.seq
            pos = seq.num_computed_tokens
            ids.append(seq.token_ids(pos, pos + 1)[0])
            positions.append(pos)
            slots.append(seq.block_table.slot(pos))
            logits_rows.append(len(ids) - 1)
            sampled.append(chunk)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            prefills=tuple(segments),
            decode_start=decode_start,
            num_decodes=len(decodes),
            **self._decode_tables(decodes),
            use_kernels=self.use_kernels,
            use_cpu_kernel=self.use_cpu_kernel,
        )
        return StepInputs(
            self._tensor(ids), self._tensor(positions), meta, self._tensor(logits_rows), prefills + decodes, sampled
        )

    def _segment(self, chunk: ScheduledChunk, q_start: int) -> PrefillSegment:
        seq, n = chunk.seq, chunk.num_new_tokens
        start = seq.num_computed_tokens
        context_len = start + n
        if start == 0:
            return PrefillSegment(q_start, n, context_len, None, None)
        # Later chunk: attend to the cached prefix too. Query i sits at position start + i.
        gather = self._tensor(seq.block_table.blocks[: -(-context_len // self.block_size)])
        q_pos = torch.arange(start, context_len, device=self.device)[:, None]
        mask = torch.arange(context_len, device=self.device)[None, :] <= q_pos  # [n, context_len]
        return PrefillSegment(q_start, n, context_len, gather, mask)

    def _decode_tables(self, decodes: list[ScheduledChunk]) -> dict[str, torch.Tensor | None]:
        if not decodes:
            return dict(decode_blocks=None, decode_mask=None, decode_block_tables=None, decode_context_lens=None)
        ctx = [c.seq.num_computed_tokens + 1 for c in decodes]
        width = max(len(c.seq.block_table.blocks) for c in decodes)
        tables = [c.seq.block_table.blocks + [0] * (width - len(c.seq.block_table.blocks)) for c in decodes]
        block_tables = torch.tensor(tables, dtype=torch.int32, device=self.device)  # [num_decodes, width]
        lens = torch.tensor(ctx, dtype=torch.int32, device=self.device)
        if self.use_kernels or self.use_cpu_kernel:
            return dict(decode_blocks=None, decode_mask=None, decode_block_tables=block_tables, decode_context_lens=lens)
        # Additive float mask, built once per step: SDPA would convert a bool mask in every layer.
        # Keys past a sequence's context (the tail of its last block, padding blocks) get -inf.
        dtype = self.kv_cache.dtype
        keep = torch.arange(width * self.block_size, device=self.device)[None, :] < lens[:, None]
        mask = torch.zeros(keep.shape, dtype=dtype, device=self.device).masked_fill_(~keep, float("-inf"))
        return dict(
            decode_blocks=block_tables.long().view(-1),
            decode_mask=mask[:, None, None, :],
            decode_block_tables=None,
            decode_context_lens=None,
        )

    def _tensor(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)
