"""One frozen root config made of per-concern sub-configs, each validated on construction.

Components take the sub-config they need. Later components (workers, coordinator, transfer)
add their own sub-configs here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
ENGINES = ("model", "sim")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to run and how.

    `dtype="auto"` picks float32 on CPU and bfloat16 on CUDA. Measured on the 2-core AVX-512
    (with bf16) CPU we develop on with `python benchmarks/bench_dtype.py` (SmolLM2-135M, context
    128): a decode step takes 37 ms in float32 against 50 ms in bfloat16 and 46 ms in float16 at
    batch 1, but 191 ms against 89 ms (and 403 ms in float16) at batch 32. float32 stays the CPU
    default for now because it is the dtype in which our tokens match transformers exactly and
    the fastest at batch 1; bfloat16 is the better choice for large batches on CPUs with native
    bf16 (pass dtype="bfloat16"), and making "auto" choose per CPU and load is left to the
    serving benchmarks. On GPUs bfloat16 halves the bytes every decode step reads.
    """

    model: str = "smollm2-135m"  # a built-in name or a local Hugging Face folder
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    seed: int = 0
    # "model" runs the weights. "sim" is a load-test tool (ecoserve/engine/sim.py): it keeps the
    # engine, the KV pool and KV transfer but models step times from `sim_profile` (a name in
    # ecoserve.latency.profile or a profile JSON file), scaled by `sim_time_scale` (0: no waiting),
    # and emits deterministic tokens; `model` then only gives the vocabulary and context length.
    engine: str = "model"
    sim_profile: str = "opt-13b-tp1"
    sim_time_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be a built-in model name or a folder path, got an empty string")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.dtype not in DTYPES + ("auto",):
            raise ValueError(f"dtype must be one of {DTYPES + ('auto',)}, got {self.dtype!r}")
        if self.device not in DEVICES + ("auto",):
            raise ValueError(f"device must be one of {DEVICES + ('auto',)}, got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 or None, got {self.max_model_len}")
        if self.engine == "sim":
            self._check_sim()

    def _check_sim(self) -> None:
        from ecoserve.latency.profile import load_profile

        load_profile(self.sim_profile)  # ValueError listing the profiles there are
        if not (isinstance(self.sim_time_scale, (int, float)) and 0 <= self.sim_time_scale < float("inf")):
            raise ValueError(f"sim_time_scale must be a finite number >= 0 (0: no waiting), got {self.sim_time_scale!r}")
        if self.device not in ("auto", "cpu"):
            raise ValueError(f"the sim engine runs on the CPU: device must be 'auto' or 'cpu', got {self.device!r}")
        if self.dtype not in ("auto", "float32"):
            raise ValueError(f"the sim engine keeps its KV in float32: dtype must be 'auto' or 'float32', got {self.dtype!r}")


MIN_NUM_BLOCKS = 2  # the smallest KV pool worth serving from: see CacheConfig


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV pool: block size, and a block count, or a share of the GPU's free memory
    (after the weights are loaded), or a memory size — the first of these that is set.

    `num_host_blocks` sizes the host-memory swap space (blocks shaped like the device's) where
    a request preempted by swap keeps its KV; 0 means none, and such a preemption recomputes.
    """

    block_size: int = 16
    num_blocks: int | None = None
    gpu_memory_fraction: float | None = None  # CUDA only
    kv_cache_gib: float = 1.0
    num_host_blocks: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < MIN_NUM_BLOCKS:
            raise ValueError(
                f"num_blocks must be >= {MIN_NUM_BLOCKS} (or unset: sized from kv_cache_gib), got {self.num_blocks}: "
                f"a pool of one block holds one request of at most block_size ({self.block_size}) tokens, prompt "
                "and output together, and nothing else"
            )
        if not self.kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if self.gpu_memory_fraction is not None and not 0 < self.gpu_memory_fraction < 1:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1) or None, got {self.gpu_memory_fraction}")
        if isinstance(self.num_host_blocks, bool) or not isinstance(self.num_host_blocks, int) or self.num_host_blocks < 0:
            raise ValueError(
                f"num_host_blocks must be an integer >= 0 (0: no host swap space), got {self.num_host_blocks!r}"
            )


SCHEDULES = ("chunked", "prefill-priority", "slo")


@dataclass(frozen=True)
class SchedulerConfig:
    """Local batching limits: sequences per step and tokens per step (the chunked-prefill budget),
    and the schedule: "chunked" (decodes, then prompt chunks filling the budget),
    "prefill-priority" (while prompts wait, whole prompts and no decodes: vllm's other mode) or
    "slo" (EcoServe's iteration, DESIGN §4.1: decodes, then prompt chunks up to the most tokens
    for which `latency_profile` predicts the step within the smallest `tpot_target_ms` of the
    requests decoding; `max_num_batched_tokens` prompt tokens when none decodes)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 1024
    schedule: str = "chunked"
    latency_profile: str | None = None  # "slo": a bundled profile name or a profile file (ecoserve profile)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.schedule == "slo" and not self.latency_profile:
            raise ValueError("the slo schedule needs latency_profile: a bundled profile name or a file from `ecoserve profile`")
        if self.latency_profile:
            from ecoserve.latency.profile import load_profile

            load_profile(self.latency_profile)  # ValueError naming the profiles there are


@dataclass(frozen=True)
class EngineConfig:
    """Root config of the offline engine."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


ROLES = ("prefill", "decode", "mixed")


@dataclass(frozen=True)
class ClusterShape:
    """How many instances of each role, and each role's tensor-parallel degree: the shape of a
    served, simulated or faked cluster, with no policy and no hardware.

    Disaggregated shapes have prefill and decode instances, colocated ones mixed instances; the
    rules of which combinations a command accepts stay with the command (`ClusterSpec` for
    `ecoserve serve`), as does the meaning of TP (the simulator reads it, `serve` has none).
    """

    prefill: int = 0
    tp_prefill: int = 1
    decode: int = 0
    tp_decode: int = 1
    mixed: int = 0
    tp_mixed: int = 1

    def __post_init__(self) -> None:
        for role in ROLES:
            count, tp = getattr(self, role), getattr(self, f"tp_{role}")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"the number of {role} instances must be an integer >= 0, got {count!r}")
            if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
                raise ValueError(f"tp_{role} (the {role} instances' tensor-parallel degree) must be an integer >= 1, got {tp!r}")

    def count(self, role: str) -> int:
        """Instances of `role`."""
        return int(getattr(self, _checked_role(role)))

    def tp(self, role: str) -> int:
        """The tensor-parallel degree of `role`'s instances."""
        return int(getattr(self, f"tp_{_checked_role(role)}"))

    @property
    def num_instances(self) -> int:
        return self.prefill + self.decode + self.mixed

    @property
    def gpus(self) -> int:
        return sum(self.count(role) * self.tp(role) for role in ROLES)

    def roles(self) -> list[str]:
        """One role per instance, in rank order: prefill first, then decode, then mixed."""
        return [role for role in ROLES for _ in range(self.count(role))]

    @property
    def label(self) -> str:
        """`2P TP1 : 2D TP1` (disaggregated), `4x TP1` (mixed) or `1P TP1 : 3x TP1` (prefill beside
        mixed), as tables and JSON print it."""
        if self.mixed:
            both = self.prefill and not self.decode
            return (f"{self.prefill}P TP{self.tp_prefill} : " if both else "") + f"{self.mixed}x TP{self.tp_mixed}"
        return f"{self.prefill}P TP{self.tp_prefill} : {self.decode}D TP{self.tp_decode}"


def _checked_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return role


@dataclass(frozen=True)
class WorkerConfig:
    """One worker rank: its role, its place in the torch.distributed world, and where the
    coordinator's control channel is. Built by the launcher, passed to the worker as JSON."""

    rank: int
    world_size: int
    role: str
    control_addr: str  # coordinator's worker-facing ROUTER, e.g. tcp://127.0.0.1:41000
    dist_init_method: str  # torch.distributed rendezvous, e.g. tcp://127.0.0.1:41001
    engine: EngineConfig = field(default_factory=EngineConfig)
    secret: str = ""
    heartbeat_interval_s: float = 0.5
    dist_timeout_s: float = 300.0
    max_transfers_in_flight_per_pair: int = 4  # KV transfers posted at once per (prefill, decode) pair

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        if not self.heartbeat_interval_s > 0:
            raise ValueError(f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s}")


@dataclass(frozen=True)
class CoordinatorConfig:
    """The coordinator: where clients connect, where workers connect, which policy, and limits."""

    host: str = "127.0.0.1"
    port: int = 5555
    control_host: str = "127.0.0.1"
    control_port: int = 0  # 0: pick a free port
    policy: str = "distserve"
    policy_options: dict[str, Any] = field(default_factory=dict)  # make_policy's knobs (ecoserve)
    secret: str = ""
    # Client socket security (docs/security.md): "curve" makes the front door a CURVE server that
    # accepts only the client keys in `keys_dir`/authorized_clients (made by `ecoserve keys generate`).
    auth: str = "none"
    keys_dir: str | None = None
    # Per client connection, in flight at once; over either, a request gets an "over_limit" error.
    max_inflight_per_client: int = 65536
    max_prompt_tokens_per_client: int = 2**24
    # Per client connection: bytes of token deltas the coordinator keeps for a client that is not
    # reading, beyond what ZeroMQ buffers (coordinator/outbox.py). Past it, the client's requests
    # in flight are aborted and each ends with one ErrorReply "client_too_slow"; terminal events
    # are always kept. Set from ECOSERVE_CLIENT_QUEUE_BYTES by `ecoserve serve` (tests).
    max_queued_bytes_per_client: int = 64 * 2**20
    heartbeat_timeout_s: float = 30.0  # a worker silent this long is declared lost
    transfer_deadline_s: float = 60.0
    max_transfers_in_flight_per_pair: int = 4
    max_prompt_tokens: int | None = None  # None: the model's context
    drain_timeout_s: float = 30.0
    # Times a request goes back to the queue after losing its worker or its KV transfer before
    # it fails with an error naming the lost ranks (0: fail at once).
    max_retries: int = 2
    # A request whose KV transfer failed waits this long before it is queued again: a peer that
    # died fails transfers at once, and this is the time to notice the death before a retry is
    # placed on it again.
    retry_backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0 (0: never retry), got {self.max_retries!r}")
        if not 0 <= self.retry_backoff_s < float("inf"):
            raise ValueError(f"retry_backoff_s must be a number of seconds >= 0, got {self.retry_backoff_s!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        check_host("host", self.host)
        check_host("control_host", self.control_host)
        if not 0 <= self.drain_timeout_s < float("inf"):
            raise ValueError(
                f"drain_timeout_s must be a number of seconds >= 0 (0: fail what is in flight at once), "
                f"got {self.drain_timeout_s!r}"
            )
        if not self.heartbeat_timeout_s > 0 or not self.transfer_deadline_s > 0:
            raise ValueError("heartbeat_timeout_s and transfer_deadline_s must be > 0")
        if self.max_transfers_in_flight_per_pair < 1:
            raise ValueError(f"max_transfers_in_flight_per_pair must be >= 1, got {self.max_transfers_in_flight_per_pair}")
        self._check_security()

    def _check_security(self) -> None:
        if self.auth not in ("none", "curve"):
            raise ValueError(f"auth must be 'none' or 'curve', got {self.auth!r}")
        if (self.auth == "curve") != (self.keys_dir is not None):
            raise ValueError(
                "auth 'curve' needs keys_dir (--keys DIR: a folder made by `ecoserve keys generate --out DIR`), "
                f"and keys_dir needs auth 'curve'; got auth {self.auth!r}, keys_dir {self.keys_dir!r}"
            )
        for name in ("max_inflight_per_client", "max_prompt_tokens_per_client", "max_queued_bytes_per_client"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def client_addr(self) -> str:
        return f"tcp://{self.host}:{self.port}"


def check_host(name: str, host: str) -> None:
    """ValueError unless `host` is a valid IP address, `*`, or a name (resolved when the socket
    binds, where an unknown one is refused). Digits and dots only is an IPv4 address, so it must
    be a valid one: 256.1.1.1 is refused here rather than looked up as a name."""
    import ipaddress

    allowed = ("give an IPv4 or IPv6 address of this machine (127.0.0.1: this machine only, 0.0.0.0: every "
               "interface) or a host name")
    if host == "*":
        return
    if ":" in host or all(part.isdigit() for part in host.split(".")):
        try:
            ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise ValueError(f"{name} {host!r} is not a valid IP address; {allowed}") from None
    elif not host or any(c.isspace() or c in "/[]" for c in host):
        raise ValueError(f"{name} {host!r} is not a valid address; {allowed}")


def parse_option(text: str) -> tuple[str, Any]:
    """One `key=value` of --policy-option or --predictor-option: the value as JSON when it parses
    (numbers, true/false, lists), else a string."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"an option must look like key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
