"""What EcoServe needs to know about a Hugging Face model folder, read once into a `ModelSpec`.

Only the Llama family is served: Llama, Qwen2 (Llama plus q/k/v biases) and Mistral (Llama plus
an optional sliding window). transformers 5 keeps RoPE settings in `config.rope_parameters`
(`{"rope_type": ..., "rope_theta": ..., **scaling}`); older configs used `rope_theta` plus
`rope_scaling`. Both are normalised here so nothing downstream looks at raw configs.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")

# safetensors header dtype codes -> torch dtype names.
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and constants of one model, independent of how its weights are loaded."""

    model_id: str  # the folder name unless the caller names it (a built-in's name, for example)
    model_type: str  # one of SUPPORTED_MODEL_TYPES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None for plain RoPE; otherwise {"rope_type": "linear" | "llama3" | ..., "factor": ..., ...}
    # exactly as the config gives it, minus rope_theta (kept above).
    rope_scaling: dict[str, Any] | None = field(hash=False)
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v (and, for Llama with attention_bias, o) projections have biases
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # config.json and generation_config.json together
    dtype: str  # of the stored weights: "float32", "bfloat16" or "float16"
    # Set only when attention really is windowed (window < max positions). Below the window,
    # windowed and full attention agree, so a runner may refuse longer sequences instead.
    sliding_window: int | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype


def load_model_spec(folder: str | Path, model_id: str | None = None) -> ModelSpec:
    """Read `folder`'s config.json (and generation_config.json, weights header) into a ModelSpec."""
    folder = Path(folder)
    raw = read_config_json(folder)
    check_model_type(raw, folder)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    hidden = int(config.hidden_size)
    num_q_heads = int(config.num_attention_heads)
    max_positions = int(config.max_position_embeddings)
    rope_theta, rope_scaling = _rope(config)
    return ModelSpec(
        model_id=model_id or folder.resolve().name,
        model_type=config.model_type,
        vocab_size=int(config.vocab_size),
        hidden_size=hidden,
        intermediate_size=int(config.intermediate_size),
        num_layers=int(config.num_hidden_layers),
        num_q_heads=num_q_heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or num_q_heads),
        head_dim=int(getattr(config, "head_dim", None) or hidden // num_q_heads),
        rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        attention_bias=_attention_bias(config),
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        bos_token_id=_optional_int(getattr(config, "bos_token_id", None)),
        eos_token_ids=eos_token_ids(folder, getattr(config, "eos_token_id", None)),
        dtype=_weights_dtype(folder, config),
        sliding_window=_sliding_window(config, max_positions),
    )


def validate_model_folder(folder: Path) -> None:
    """ValueError unless `folder` has a supported config.json and safetensors weights."""
    check_model_type(read_config_json(folder), folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if not shards or missing:
            raise ValueError(f"{index} names missing weight shards: {missing or 'none listed'}")
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".gguf"))
        found = f" (found {', '.join(others)}, which are not read)" if others else ""
        raise ValueError(f"{folder} has no *.safetensors weights{found}")
    for path in files:
        check_safetensors_header(path)


MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


def check_safetensors_header(path: Path) -> None:
    """ValueError unless `path` starts like a safetensors file: an 8-byte little-endian header
    length, a JSON object of that length, and every tensor's data inside the file. Reads only
    the header, so a garbage file is refused before any worker starts to load it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little")
        if len(head) < 8 or length > min(size - 8, MAX_HEADER_BYTES):
            why = f"its header length field says {length} bytes" if len(head) == 8 else "it is shorter than 8 bytes"
            raise ValueError(f"{path} is not a safetensors file ({why}; the file has {size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object)")
    data_bytes = size - 8 - length
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if name != "__metadata__" and not (
            isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            raise ValueError(f"{path} is damaged: tensor {name!r} has data offsets {offsets} outside its {data_bytes} data bytes")


def read_config_json(folder: Path) -> dict[str, Any]:
    """The folder's config.json as a dict; ValueError if it is missing or not a JSON object."""
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json; a Hugging Face model folder needs one")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def check_model_type(raw: dict[str, Any], folder: Path) -> None:
    # Checked on the raw JSON so an unknown type gets our message, not AutoConfig's.
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} in {folder / 'config.json'} is not supported; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _rope(config: Any) -> tuple[float, dict[str, Any] | None]:
    # transformers 5: everything in rope_parameters. Older: rope_theta + rope_scaling (with
    # "type" instead of "rope_type" in the oldest ones).
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
    theta = params.pop("rope_theta", None) or getattr(config, "rope_theta", None) or 10000.0
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        return float(theta), None
    return float(theta), {"rope_type": rope_type, **params}


def _attention_bias(config: Any) -> bool:
    # Qwen2 always has q/k/v biases and its config has no flag for them.
    return config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))


def _optional_int(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def eos_token_ids(folder: Path, config_eos: Any) -> tuple[int, ...]:
    # Chat models often list extra stop tokens (e.g. <|eot_id|>) only in generation_config.json.
    ids = _as_ids(config_eos)
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        ids += _as_ids(json.loads(gen_path.read_text()).get("eos_token_id"))
    return tuple(dict.fromkeys(ids))  # de-duplicated, order kept


def _weights_dtype(folder: Path, config: Any) -> str:
    # The safetensors header is the truth; config.dtype can disagree (e.g. after conversion).
    files = sorted(folder.glob("*.safetensors"))
    if files:
        with files[0].open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        for name, entry in header.items():
            if name != "__metadata__" and entry["dtype"] in _SAFETENSORS_DTYPES:
                return _SAFETENSORS_DTYPES[entry["dtype"]]
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(dtype).removeprefix("torch.")


def _sliding_window(config: Any, max_positions: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    # Qwen2 keeps a sliding_window value even with use_sliding_window false; transformers 5
    # already clears it then, and layer_types says which layers really use it.
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    window = int(window)
    return window if window < max_positions else None
