"""What a simulated worker instance is: its role, latency profile and TP degree, and the hardware
the profile does not describe (links, host memory, block and batch sizes)."""

from __future__ import annotations

from dataclasses import dataclass

from ecoserve.latency.profile import LatencyProfile


@dataclass(frozen=True)
class HardwareConfig:
    """What the latency profile does not say: links, host memory, block and batch sizes."""

    block_size: int = 16
    prefill_token_budget: int = 2048  # prompt tokens per prefill step
    mixed_token_budget: int = 512  # tokens per colocated step (decode tokens + prefill chunks)
    link_bytes_per_s: float = 25e9  # per GPU, prefill -> decode (PCIe 4 x16 class)
    link_latency_s: float = 1e-4
    swap_bytes_per_s: float = 25e9  # device <-> host, per GPU
    host_blocks_factor: float = 1.0  # host swap space per worker, in units of its device pool
    kv_bytes_per_token: int = 0  # per instance (all GPUs); 0: from the profile's model
    # A live worker is one thread: it reads the coordinator's messages (work, SendKV, ReceiveKV,
    # preemptions) only between steps. True models that (each message waits for the end of the
    # step running when it came, so a KV transfer starts once both ends are between steps);
    # False hands every message to its worker at once.
    messages_between_steps: bool = False
    # Prefill workers fill their token budget with a chunk of the next prompt, as our engine's
    # FCFS batcher does (True), or run whole prompts, as DistServe's engine does (False). Mixed
    # workers always chunk.
    chunked_prefill: bool = False


@dataclass(frozen=True)
class InstanceSpec:
    """One worker instance: a role on `tp` GPUs with that TP degree's latency profile."""

    role: str  # "prefill" | "decode" | "mixed"
    profile: LatencyProfile
    tp: int = 1
    num_blocks: int | None = None  # default: the profile's KV capacity


# K and V bytes per token over all layers in fp16 (2 · layers · hidden · 2) for the models the
# bundled profiles describe; a fitted profile carries its own `kv_bytes_per_token`.
_MODEL_KV_BYTES = {"opt-13b": 2 * 40 * 5120 * 2, "opt-66b": 2 * 64 * 9216 * 2, "opt-175b": 2 * 96 * 12288 * 2}


def kv_bytes_per_token(profile: LatencyProfile) -> int:
    """KV bytes per token of the profile's model (all GPUs of the instance together)."""
    own = getattr(profile, "kv_bytes_per_token", None)
    if own:
        return int(own)
    name = profile.name.removeprefix("vllm-").rsplit("-tp", 1)[0]
    if name not in _MODEL_KV_BYTES:
        raise ValueError(f"profile {profile.name!r} does not say its KV bytes per token; set HardwareConfig.kv_bytes_per_token")
    return _MODEL_KV_BYTES[name]
