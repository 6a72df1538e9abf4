"""Load a Hugging Face folder's safetensors weights into our fused Llama-family module."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ecoserve.model.hf_config import ModelSpec, load_model_spec
from ecoserve.model.llama import LlamaForCausalLM
from ecoserve.model.rope import rope_cos_sin, rope_inv_freq


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    return files


def read_hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder, keyed by their Hugging Face names."""
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def _fused_state_dict(spec: ModelSpec, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map HF names onto ours, concatenating q/k/v and gate/up."""

    def take(name: str) -> torch.Tensor:
        try:
            return hf.pop(name)
        except KeyError:
            raise KeyError(f"weight {name!r} is missing from the checkpoint") from None

    out = {"embed_tokens.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    hf.pop("lm_head.weight", None)  # some tied checkpoints store a copy
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        attn, mlp = p + "self_attn.", p + "mlp."
        out[f"layers.{i}.qkv_proj.weight"] = torch.cat([take(attn + f"{n}_proj.weight") for n in "qkv"])
        if spec.attention_bias:
            out[f"layers.{i}.qkv_proj.bias"] = torch.cat([take(attn + f"{n}_proj.bias") for n in "qkv"])
        out[f"layers.{i}.o_proj.weight"] = take(attn + "o_proj.weight")
        out[f"layers.{i}.gate_up_proj.weight"] = torch.cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")])
        out[f"layers.{i}.down_proj.weight"] = take(mlp + "down_proj.weight")
        if spec.mlp_bias:
            out[f"layers.{i}.gate_up_proj.bias"] = torch.cat([take(mlp + "gate_proj.bias"), take(mlp + "up_proj.bias")])
            out[f"layers.{i}.down_proj.bias"] = take(mlp + "down_proj.bias")
        out[f"layers.{i}.input_layernorm.weight"] = take(p + "input_layernorm.weight")
        out[f"layers.{i}.post_attention_layernorm.weight"] = take(p + "post_attention_layernorm.weight")
    unused = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if unused:
        raise ValueError(f"checkpoint has weights this model does not use: {unused[:8]}")
    return out


def load_model(
    folder: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> tuple[ModelSpec, LlamaForCausalLM]:
    """Build the module for `folder` and load its weights, cast to `dtype`, on `device`."""
    folder = Path(folder)
    spec = load_model_spec(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(spec)
    state = _fused_state_dict(spec, read_hf_state_dict(folder))
    model = model.to_empty(device=device).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    # The rope tables are not in the checkpoint; they stay float32 and are cast per step.
    cos, sin = rope_cos_sin(
        rope_inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling), spec.max_position_embeddings
    )
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    model.eval().requires_grad_(False)
    return spec, model
