"""A compact Llama-family decoder (Llama, Qwen2, Mistral) over a flattened, paged batch.

RMSNorm, RoPE (with Llama 3 scaling), grouped-query attention, SwiGLU, optional q/k/v bias
(Qwen2) and tied embeddings. Q/K/V and gate/up projections are fused into one matmul each,
which matters most for small decode batches on a CPU where per-op overhead dominates.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ecoserve.kernels import cpu as cpu_kernels
from ecoserve.model.attention import AttentionMetadata, paged_attention
from ecoserve.model.hf_config import ModelSpec
from ecoserve.model.rope import apply_rope, rope_cos_sin, rope_inv_freq


# Below this many rows a CPU matmul is a matrix-vector product, and PyTorch's CPU GEMV streams
# the weights from memory on one core at about a third of the machine's copy bandwidth. Cutting
# the weight's rows into SPLIT slices and running them as one batched matmul spreads the read
# over all cores (benchmarks/bench_engine numbers: see docs/results in the issue note).
SMALL_BATCH_ROWS = 16
SPLIT = 32


def linear(x: torch.Tensor, layer: nn.Linear | nn.Embedding) -> torch.Tensor:
    """x [num_tokens, in_features] times the layer's weight (an embedding acts as a tied head):
    through the layer's prepacked weight when it has one (`prepack_cpu_weights`), else with the
    split-row path for small CPU batches."""
    bias = getattr(layer, "bias", None)
    packed = getattr(layer, "packed_weight", None)
    if packed is not None and x.dtype == torch.bfloat16:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    w = layer.weight  # [out_features, in_features]
    rows, out_features = x.shape[0], w.shape[0]
    if rows > SMALL_BATCH_ROWS or w.device.type != "cpu" or out_features % SPLIT:
        return F.linear(x, w, bias)
    slices = w.view(SPLIT, out_features // SPLIT, w.shape[1])  # [SPLIT, out/SPLIT, in]
    y = torch.bmm(slices, x.t().expand(SPLIT, -1, -1))  # [SPLIT, out/SPLIT, num_tokens]
    y = y.view(out_features, rows).t()
    return y + bias if bias is not None else y.contiguous()


def can_prepack_cpu_bf16() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (x86 builds with mkldnn do)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def prepack_cpu_weights(model: nn.Module) -> int:
    """bfloat16 on the CPU: reorder every projection's weight (and a tied or separate LM head)
    once into oneDNN's blocked layout, so each matmul reads it as it is instead of reordering it
    on every call; returns how many were packed.

    The products are the same as `F.linear`'s in bfloat16, bit for bit (both are oneDNN's
    kernel; `tests/engine/test_prepack.py`), 1.2-2x faster per matmul on one core of an AVX-512
    / AMX machine (docs/engine-speed.md). The packed copy sits beside the original weight, which
    the embedding lookup and checkpoint code still read: the projections' weights take twice
    their memory. float32 keeps `F.linear`: oneDNN's float32 kernel rounds differently from the
    one transformers uses, and float32 promises transformers' exact greedy tokens.
    """
    count = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if not isinstance(mod, (nn.Linear, nn.Embedding)) or w is None or w.dtype != torch.bfloat16 or w.device.type != "cpu":
            continue
        if isinstance(mod, nn.Embedding) and getattr(model, "lm_head", None) is not None:
            continue  # an untied embedding is only looked up, never multiplied
        mod.packed_weight = torch.ops.mkldnn._reorder_linear_weight(w.detach())
        count += 1
    return count


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, fused_cpu_bf16: bool = False) -> torch.Tensor:
        if fused_cpu_bf16:  # the same steps in one C pass (kernels/csrc/elementwise_bf16.c)
            return cpu_kernels.rms_norm_bf16(x, self.weight, self.eps)
        # Normalise in float32 and cast back before the weight, exactly as transformers does.
        # (F.rms_norm is no faster on CPU: it decomposes into more ops than these.)
        h = x if x.dtype == torch.float32 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True).add_(self.eps))
        return self.weight * (h if h.dtype == x.dtype else h.to(x.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.num_q_heads = spec.num_q_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.scale = spec.head_dim**-0.5
        q_size, kv_size = spec.num_q_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(spec.hidden_size, q_size + 2 * kv_size, bias=spec.attention_bias)
        self.o_proj = nn.Linear(q_size, spec.hidden_size, bias=False)
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.fused_cpu_bf16: bool = False  # set by LlamaForCausalLM.use_cpu_bf16_kernels

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        cos: torch.Tensor,  # [num_tokens, head_dim]
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # K, V: [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # Submodules are called through .forward: nn.Module.__call__'s hook handling costs
        # microseconds a call, which adds up over ~100 calls per decode step.
        num_tokens = x.shape[0]
        fused = self.fused_cpu_bf16
        qkv = linear(self.input_layernorm.forward(x, fused), self.qkv_proj)
        if fused:  # rotate q and k in place inside qkv, one C pass
            cpu_kernels.rope_bf16_(qkv, self.num_q_heads + self.num_kv_heads, self.head_dim, cos, sin)
            qk = qkv[:, : self.split[0] + self.split[1]].view(num_tokens, -1, self.head_dim)
        else:  # rotate q and k in one pass: [num_tokens, num_q_heads + num_kv_heads, head_dim]
            qk = apply_rope(qkv[:, : self.split[0] + self.split[1]].view(num_tokens, -1, self.head_dim), cos, sin)
        q, k = qk.split((self.num_q_heads, self.num_kv_heads), dim=1)
        v = qkv[:, self.split[0] + self.split[1] :].view(num_tokens, self.num_kv_heads, self.head_dim)
        attn = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        x = x + linear(attn.view(num_tokens, -1), self.o_proj)
        gate_up = linear(self.post_attention_layernorm.forward(x, fused), self.gate_up_proj)
        if fused:
            return x + linear(cpu_kernels.silu_mul_bf16(gate_up), self.down_proj)
        gate, up = gate_up.chunk(2, dim=-1)
        return x + linear(F.silu(gate) * up, self.down_proj)


class LlamaForCausalLM(nn.Module):
    rope_cos: torch.Tensor  # [max_positions, head_dim] float32 buffers (not in checkpoints)
    rope_sin: torch.Tensor

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        inv_freq = rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling)
        cos, sin = rope_cos_sin(inv_freq, spec.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_positions, head_dim]
        self.register_buffer("rope_sin", sin, persistent=False)
        self.fused_cpu_bf16 = False

    def use_cpu_bf16_kernels(self) -> bool:
        """Run RMSNorm, RoPE and SiLU-times-up through the bfloat16 C kernels
        (kernels/csrc/elementwise_bf16.c): one pass each instead of 3-8 torch ops. Only for a
        bfloat16 model on the CPU with the kernels built; float32 keeps torch's ops, and with them
        transformers' exact tokens. Returns whether it is on."""
        p = self.embed_tokens.weight
        on = p.dtype == torch.bfloat16 and p.device.type == "cpu" and cpu_kernels.available()
        self.fused_cpu_bf16 = on
        for layer in self.layers:
            cast(DecoderLayer, layer).fused_cpu_bf16 = on
        return on

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer: K, V views of the paged tensor
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,  # [num_sampled] rows whose next-token logits are needed
    ) -> torch.Tensor:
        """Returns float32 logits [num_sampled, vocab_size]."""
        x = self.embed_tokens(input_ids)
        # transformers casts the float32 tables to the activation dtype before rotating.
        cos = self.rope_cos[positions].to(x.dtype)
        sin = self.rope_sin[positions].to(x.dtype)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer.forward(x, cos, sin, cache, meta)
        x = self.norm.forward(x[logits_indices], self.fused_cpu_bf16)
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return linear(x, head).float()
