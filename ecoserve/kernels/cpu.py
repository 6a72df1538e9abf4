"""C kernels for the CPU engine, built on first use with the system C compiler, called through ctypes.

Built into `$ECOSERVE_HOME/kernels/<source hash>/` (seconds: one small C file, no torch headers),
so a fresh machine builds its own and a changed source is never served from a stale build.
`available()` is False when there is no compiler, the build fails, or ECOSERVE_CPU_KERNELS=0:
the engine then keeps its pure-torch path. Each kernel has a pure-torch reference in
kernels/reference.py and a test against it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ecoserve.envs import cpu_kernels, ecoserve_home

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "paged_decode_attention.c", CSRC / "elementwise_bf16.c")
HEADERS = (CSRC / "cpu_common.h",)
# -fopenmp-simd honours the `omp simd` pragmas without linking an OpenMP runtime (torch has its own).
# gnu11: the kernel uses GNU vector extensions, and lets multiply-adds fuse (FMA). On x86, 512-bit
# vectors where the CPU has them (GCC otherwise prefers 256-bit ones on AVX-512 machines).
CFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared", "-std=gnu11") + (
    ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()
)


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not cpu_kernels():
        return None
    return build(CFLAGS)


def build(cflags: tuple[str, ...]) -> ctypes.CDLL | None:
    """Build (or reuse) the kernels with these flags and load them; None without a compiler or
    when the build fails. The engine uses CFLAGS; the tests also build variants (e.g. without a
    CPU feature the kernel has a faster path for) to check the portable paths on this machine."""
    cc = compiler()
    if cc is None:
        return None
    digest = hashlib.sha256(" ".join(cflags).encode())
    for f in SOURCES + HEADERS:
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    lib = ecoserve_home() / "kernels" / digest.hexdigest()[:16] / "libecoserve_cpu.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        # Build beside it, then rename: a concurrent process never loads a half-written file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        done = subprocess.run([cc, *cflags, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            os.unlink(tmp)
            return None
        os.replace(tmp, lib)
    dll = ctypes.CDLL(str(lib))
    p, i, fl, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int64
    signatures = {
        "paged_decode_attention": [p, p, p, p, p, p, i, i, i, i, i, i, fl, i],
        "rms_norm_bf16": [p, p, p, i, i, fl],
        "silu_mul_bf16": [p, p, i, i],
        "rope_bf16": [p, p, p, i, i, i, i64],
    }
    for name, argtypes in signatures.items():
        fn = getattr(dll, name)
        fn.argtypes = argtypes
        fn.restype = i if name in ("paged_decode_attention", "rope_bf16") else None
    return dll


def available() -> bool:
    """True when the C kernels are built (or build now) and enabled."""
    return _library() is not None


_DTYPES = (torch.float32, torch.bfloat16)


def paged_decode_attention(
    query: Tensor,  # [batch, num_q_heads, head_dim]
    k_cache: Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: Tensor,
    block_tables: Tensor,  # [batch, max_blocks] int32
    context_lens: Tensor,  # [batch] int32, each >= 1
    scale: float,
) -> Tensor:
    """Decode attention reading each sequence's blocks in place; equals
    reference.paged_decode_attention_ref. Checks shapes, dtypes, devices and strides first
    (index values are the caller's: the runner builds them from its own block tables)."""
    lib = _lib_or_raise()
    batch, num_q_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, kv_dim = k_cache.shape
    problems = []
    if query.dtype not in _DTYPES or k_cache.dtype != query.dtype or v_cache.dtype != query.dtype:
        problems.append(f"query/k/v dtypes must be one of {_DTYPES} and equal, got {query.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if any(t.device.type != "cpu" for t in (query, k_cache, v_cache, block_tables, context_lens)):
        problems.append("every tensor must be on the CPU")
    if v_cache.shape != k_cache.shape or kv_dim != head_dim or num_q_heads % num_kv_heads:
        problems.append(f"shapes disagree: query {tuple(query.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        problems.append("block_tables and context_lens must be int32")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or tuple(context_lens.shape) != (batch,):
        problems.append(f"block_tables must be [{batch}, max_blocks] and context_lens [{batch}]")
    if not all(t.is_contiguous() for t in (query, k_cache, v_cache, block_tables, context_lens)):
        problems.append("query, caches, block_tables and context_lens must be contiguous")
    if problems:
        raise ValueError("paged_decode_attention (CPU kernel): " + "; ".join(problems))
    out = torch.empty_like(query)
    if batch == 0:
        return out
    rc = lib.paged_decode_attention(
        query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(),
        out.data_ptr(), batch, num_q_heads, num_kv_heads, head_dim, block_size, block_tables.shape[1], scale,
        int(query.dtype == torch.bfloat16),
    )
    if rc != 0:
        raise ValueError(f"paged_decode_attention (CPU kernel): head_dim {head_dim} is beyond its limit of 512, "
                         "or scratch memory could not be allocated")
    return out


def _lib_or_raise() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available (no C compiler, a failed build, or ECOSERVE_CPU_KERNELS=0)")
    return lib


def _check_bf16(name: str, **tensors: Tensor) -> None:
    bad = [f"{k} is {t.dtype} on {t.device.type}{'' if t.is_contiguous() else ', not contiguous'}"
           for k, t in tensors.items() if t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous()]
    if bad:
        raise ValueError(f"{name} (CPU kernel) takes contiguous bfloat16 CPU tensors: " + "; ".join(bad))


def rms_norm_bf16(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of x [rows, dim] with weight [dim], as model.llama.RMSNorm computes it in bfloat16, in one pass."""
    _check_bf16("rms_norm_bf16", x=x, weight=weight)
    if x.dim() != 2 or tuple(weight.shape) != (x.shape[1],):
        raise ValueError(f"rms_norm_bf16: x must be [rows, dim] and weight [dim], got {tuple(x.shape)} and {tuple(weight.shape)}")
    out = torch.empty_like(x)
    _lib_or_raise().rms_norm_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
    return out


def silu_mul_bf16(gate_up: Tensor) -> Tensor:
    """F.silu(gate) * up for gate_up [rows, 2 * inter] (gate first), in bfloat16, in one pass."""
    _check_bf16("silu_mul_bf16", gate_up=gate_up)
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul_bf16: gate_up must be [rows, 2 * inter], got {tuple(gate_up.shape)}")
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, inter)
    _lib_or_raise().silu_mul_bf16(gate_up.data_ptr(), out.data_ptr(), rows, inter)
    return out


def rope_bf16_(x: Tensor, heads: int, head_dim: int, cos: Tensor, signed_sin: Tensor) -> None:
    """Rotate, in place, the first `heads` heads of each row of x [tokens, width] (heads of head_dim
    side by side from column 0; the row may hold more, e.g. the fused qkv projection's v), as
    model.rope.apply_rope computes it in bfloat16. cos/signed_sin [tokens, head_dim]."""
    _check_bf16("rope_bf16_", cos=cos, signed_sin=signed_sin)
    problems = []
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1:
        problems.append(f"x must be a bfloat16 CPU [tokens, width] tensor with unit column stride, got {x.dtype} {tuple(x.shape)}")
    elif heads * head_dim > x.shape[1] or head_dim % 2 or head_dim > 512:
        problems.append(f"{heads} heads of {head_dim} do not fit a row of {x.shape[1]} (head_dim even, at most 512)")
    if tuple(cos.shape) != (x.shape[0], head_dim) or cos.shape != signed_sin.shape:
        problems.append(f"cos and signed_sin must be [{x.shape[0]}, {head_dim}], got {tuple(cos.shape)} and {tuple(signed_sin.shape)}")
    if problems:
        raise ValueError("rope_bf16_ (CPU kernel): " + "; ".join(problems))
    if _lib_or_raise().rope_bf16(x.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), x.shape[0], heads, head_dim, x.stride(0)):
        raise ValueError(f"rope_bf16_ (CPU kernel): head_dim {head_dim} refused (even, at most 512)")
