"""Hand-written CPU kernels for one decode step of a Llama-family model in bf16 (FastLlama's `decode`).

At GRPO's sizes (64 rows, a few hundred cached keys) an eager decode step spends most of its time, besides its
matmuls, around small ops: their launches, allocations and casts. cpu_decode.c does the attention (rotary
embedding of q and k, the cache write, scores, softmax, values; a prompt that several rows repeat read from one
copy, `LlamaCache.share_prompts`), each residual add with the RMSNorm after it, and SwiGLU's product, one call
each, with AVX-512 BF16 dot products and torch's bf16 roundings. With them an eager step beats the compiled one
(whose graph cannot hold oneDNN's packed weights, nor call this attention for less than it saves), so FastLlama
decodes through them wherever they run: bench/README.md, GRPO. They are compiled on first use, for this CPU, by
the C compiler that torch.compile needs on CPUs anyway; where they cannot be built (no compiler, a CPU without
AVX-512 BF16, `NANOR1_DECODE_KERNEL=0`), and for other dtypes and devices, `supports` says no and FastLlama runs
torch ops.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("cpu_decode.c")
# -ffast-math lets the softmax use glibc's vectorised expf (libmvec). Compiled and linked apart: linked with
# -ffast-math, the library would turn on flush-to-zero for the whole process when it loads.
_COMPILE = ["-c", "-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
_LINK = ["-shared", "-fopenmp"]


def supports(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel runs a cache of this device, dtype and head size: bf16 on a CPU where it was built."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and head_dim % 32 == 0 and head_dim <= 256
            and library() is not None)


def attend(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_cache: torch.Tensor,
           value_cache: torch.Tensor, rows: torch.Tensor, source: torch.Tensor, shared: torch.Tensor,
           positions: torch.Tensor, scale: float, n_kv: int) -> torch.Tensor:
    """One decode step's attention for B rows. qkv (B, H + 2 * n_kv, D): each row's query heads, new keys and
    values, q and k not yet rotated; cos, sin (B, D) the rotary embedding at each row's position (B,). Writes the
    rotated keys and the values into the row's cache slot rows[b] at its position, then its rotated queries attend
    to the slot's keys and values up to there, the first shared[b] positions read from slot source[b] instead.
    key_cache, value_cache: one layer's (n_slots, n_kv, capacity, D), laid out alike with whole rows contiguous.
    Returns (B, n_kv, H // n_kv, D), as the ops round it. Only where `supports` the cache."""
    B, heads, D = qkv.shape
    G = (heads - 2 * n_kv) // n_kv
    assert key_cache.stride() == value_cache.stride() and key_cache.stride()[2:] == (D, 1), "a cache's layout"
    assert qkv.dtype == cos.dtype == sin.dtype == key_cache.dtype == value_cache.dtype == torch.bfloat16
    out = qkv.new_empty(B, n_kv, G, D)
    tensors = [qkv.contiguous(), cos.reshape(B, D).contiguous(), sin.reshape(B, D).contiguous(), key_cache,
               value_cache, *(t.long().contiguous() for t in (rows, source, shared, positions)), out]
    library().decode_attention(*(t.data_ptr() for t in tensors), B, n_kv, G, D, key_cache.stride(0),
                              key_cache.stride(1), scale)
    return out


@functools.cache
def library():
    """The compiled kernels (a ctypes library), or None where they cannot be built here."""
    if os.environ.get("NANOR1_DECODE_KERNEL", "1") == "0":
        return None
    folder = Path(tempfile.mkdtemp(prefix="nanor1-kernel-"))
    try:
        cc, obj, library = os.environ.get("CC", "cc"), folder / "cpu_decode.o", folder / "cpu_decode.so"
        for command in ([cc, *_COMPILE, str(_SOURCE), "-o", str(obj)],
                        [cc, *_LINK, str(obj), "-o", str(library), "-lmvec", "-lm"]):
            if subprocess.run(command, capture_output=True, timeout=300, check=False).returncode != 0:
                return None
        library = ctypes.CDLL(str(library))  # loaded: the file itself can go
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    pointer, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    for name, types in (("decode_attention", [pointer] * 10 + [i32] * 4 + [i64, i64, f32]),
                        ("add_rms_norm", [pointer] * 4 + [i32] * 2 + [f32]), ("silu_mul", [pointer] * 2 + [i32] * 2)):
        getattr(library, name).argtypes, getattr(library, name).restype = types, None
    return library


def add_rms_norm(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += y in place (when y is given), then the Llama family's RMSNorm of x, as its bf16 ops round it. x, y
    (..., C) contiguous bf16, weight (C,) bf16."""
    assert x.dtype == weight.dtype == torch.bfloat16 and (y is None or y.dtype == x.dtype), "bf16 tensors only"
    assert x.is_contiguous() and (y is None or y.is_contiguous()), "contiguous tensors only"
    out = torch.empty_like(x)
    library().add_rms_norm(x.data_ptr(), None if y is None else y.data_ptr(), weight.data_ptr(), out.data_ptr(),
                          x.numel() // x.shape[-1], x.shape[-1], eps)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up (..., 2F) contiguous bf16, as torch's bf16 ops round it; returns (..., F)."""
    assert gate_up.dtype == torch.bfloat16 and gate_up.is_contiguous(), "contiguous bf16 tensors only"
    F = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], F)
    library().silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * F), F)
    return out
