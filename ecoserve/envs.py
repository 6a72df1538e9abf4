"""Every environment variable EcoServe reads, in one place, all prefixed ``ECOSERVE_``.

Other modules call these functions instead of touching ``os.environ`` directly, so the full
set of knobs is visible here.
"""

from __future__ import annotations

import os
from pathlib import Path


def ecoserve_home() -> Path:
    """Cache folder for prepared models and artifacts (``ECOSERVE_HOME``).

    Defaults to ``$XDG_CACHE_HOME/ecoserve`` or ``~/.cache/ecoserve``.
    """
    explicit = os.environ.get("ECOSERVE_HOME")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "ecoserve"


def models_dir() -> Path:
    """Where prepared models live: ``$ECOSERVE_HOME/models``."""
    return ecoserve_home() / "models"


def cpu_kernels() -> bool:
    """Whether the CPU engine may build and use its C kernels (``ECOSERVE_CPU_KERNELS``, default
    1; 0 keeps the pure-torch path). They are built with the system C compiler on first use."""
    value = os.environ.get("ECOSERVE_CPU_KERNELS", "1")
    if value not in ("0", "1"):
        raise ValueError(f"ECOSERVE_CPU_KERNELS must be 0 or 1, got {value!r}")
    return value == "1"


def cpu_prepack() -> bool:
    """Whether a bfloat16 model on the CPU gets its weights prepacked for oneDNN
    (``ECOSERVE_CPU_PREPACK``, default 1; 0 keeps `F.linear` on the weights as loaded)."""
    value = os.environ.get("ECOSERVE_CPU_PREPACK", "1")
    if value not in ("0", "1"):
        raise ValueError(f"ECOSERVE_CPU_PREPACK must be 0 or 1, got {value!r}")
    return value == "1"


def num_threads() -> int | None:
    """Torch intra-op threads for a process (``ECOSERVE_NUM_THREADS``); None keeps torch's default."""
    value = os.environ.get("ECOSERVE_NUM_THREADS")
    if not value:
        return None
    n = int(value)
    if n < 1:
        raise ValueError(f"ECOSERVE_NUM_THREADS must be a positive integer, got {value!r}")
    return n


def set_offline_hub() -> None:
    """Never let transformers or huggingface_hub reach the network: models are local only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def cluster_secret() -> str:
    """The cluster's shared secret for worker registration (``ECOSERVE_CLUSTER_SECRET``).

    The launcher passes it to the workers it starts through the environment, not on their
    command line, where any local user could read it with ``ps``.
    """
    return os.environ.get("ECOSERVE_CLUSTER_SECRET", "")


def launcher_pid() -> int | None:
    """The pid of the launcher that started this worker (``ECOSERVE_LAUNCHER_PID``, set by the
    launcher); None for a process not started by one. A worker exits when that process is gone."""
    value = os.environ.get("ECOSERVE_LAUNCHER_PID", "")
    return int(value) if value.isdigit() else None


def start_error_file() -> Path | None:
    """Where a worker writes its one-line start-up error (``ECOSERVE_START_ERROR_FILE``, set by
    the launcher, which prints the first worker's line only); None: the worker prints it."""
    value = os.environ.get("ECOSERVE_START_ERROR_FILE", "")
    return Path(value) if value else None


def fault_injection() -> str:
    """Faults to inject into worker ranks, for tests only (``ECOSERVE_FAULT``; unset: none).

    ``RANK:FAULT=VALUE`` entries separated by ``;``, e.g. ``2:die_after_tokens=20;0:drop_send=1``.
    A worker reads only its own rank's entries (ecoserve/runtime/faults.py lists the faults);
    the launcher's workers inherit the variable from the environment it was started in.
    """
    return os.environ.get("ECOSERVE_FAULT", "")


def client_queue_bytes() -> int | None:
    """Bytes of token deltas the coordinator keeps per client that is not reading
    (``ECOSERVE_CLIENT_QUEUE_BYTES``; CoordinatorConfig.max_queued_bytes_per_client); None: its default.

    No command-line option sets it: tests lower it to reach the bound quickly.
    """
    value = os.environ.get("ECOSERVE_CLIENT_QUEUE_BYTES")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"ECOSERVE_CLIENT_QUEUE_BYTES must be a positive integer (bytes), got {value!r}")
    return int(value)


def http_api_key() -> str | None:
    """The key the HTTP front door requires as a bearer token (``ECOSERVE_HTTP_API_KEY``, set by
    the launcher from `serve --api-key`); None: no key required."""
    return os.environ.get("ECOSERVE_HTTP_API_KEY") or None


def http_max_body_bytes() -> int:
    """The largest request body the HTTP front door reads (``ECOSERVE_HTTP_MAX_BODY_BYTES``;
    default 4 MiB); a larger one gets 413."""
    value = os.environ.get("ECOSERVE_HTTP_MAX_BODY_BYTES")
    if value is None:
        return 4 * 1024 * 1024
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"ECOSERVE_HTTP_MAX_BODY_BYTES must be a positive integer (bytes), got {value!r}")
    return int(value)


def api_key() -> str | None:
    """`serve --api-key`'s default (``ECOSERVE_API_KEY``): a key kept off the command line; also
    the key `bench serve --backend openai` sends when given no --api-key."""
    return os.environ.get("ECOSERVE_API_KEY") or None
