"""Attention for one decode step over a KV cache: a hand-written CPU kernel, with torch ops everywhere else.

At decode's sizes (one query per row, a few hundred cached keys) the attention is a few dot products per key,
and eager torch ops spend most of their time around them (batched matmuls of one row each, a softmax, a mask).
The kernel (decode_attention.c) reads each cached key and value once, with AVX-512 BF16 dot products: GRPO's
eager rollout of the bench ran 1.2x faster with it (bench/README.md, GRPO). It also writes the new key and value
into the cache, where its reads go next, and reads a prompt that several rows repeat (GRPO's group) from one copy
(`LlamaCache.share_prompts`). With both, an eager decode step beats the compiled one (whose graph cannot hold
oneDNN's packed weights, and whose call of this kernel as a custom op cost more than it saved), so FastLlama
decodes eagerly wherever the kernel runs. The kernel is compiled on first use, for this CPU, by the C compiler
that torch.compile needs on CPUs anyway; where it cannot be built (no compiler, a CPU without AVX-512 BF16,
`NANOR1_DECODE_KERNEL=0`), and for other dtypes and devices, `fits` says no and the caller runs the ops.
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

_SOURCE = Path(__file__).with_name("decode_attention.c")
# -ffast-math lets the softmax use glibc's vectorised expf (libmvec). Compiled and linked apart: linked with
# -ffast-math, the library would turn on flush-to-zero for the whole process when it loads.
_COMPILE = ["-c", "-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
_LINK = ["-shared", "-fopenmp"]


def supports(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel runs a cache of this device, dtype and head size: bf16 on a CPU where it was built."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and head_dim % 32 == 0 and head_dim <= 256
            and kernel() is not None)


def fits(keys: torch.Tensor, head_dim: int) -> bool:
    """Whether `attend` can run on a cache's keys (and its values, laid out alike): `supports`, and whole rows of
    head_dim contiguous."""
    return (supports(keys.device, keys.dtype, head_dim) and keys.stride(-1) == 1
            and keys.stride(-2) == head_dim)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
           rows: torch.Tensor, source: torch.Tensor, shared: torch.Tensor, positions: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Writes each row's new key and value k, v (B, KV, 1, D) into its cache slot rows[b] at its position (B,),
    then its queries q (B, KV, G, D) (G query heads per kv head) attend to the slot's keys and values up to that
    position; the first shared[b] positions are read from slot source[b] instead. key_cache, value_cache: one
    layer's (n_slots, KV, capacity, D), laid out alike. Returns (B, KV, G, D). Only where `fits(key_cache)`."""
    assert key_cache.stride() == value_cache.stride(), "keys and values must share a layout"
    B, KV, G, D = q.shape
    out = torch.empty_like(q)
    tensors = [q.contiguous(), key_cache, value_cache, k.contiguous(), v.contiguous(),
               *(t.long().contiguous() for t in (rows, source, shared, positions)), out]
    kernel()(*(t.data_ptr() for t in tensors), B, KV, G, D, key_cache.stride(0), key_cache.stride(1), scale)
    return out


@functools.cache
def kernel():
    """The compiled kernel as a ctypes function, or None where it cannot be built here."""
    if os.environ.get("NANOR1_DECODE_KERNEL", "1") == "0":
        return None
    folder = Path(tempfile.mkdtemp(prefix="nanor1-kernel-"))
    try:
        cc, obj, library = os.environ.get("CC", "cc"), folder / "decode_attention.o", folder / "decode_attention.so"
        for command in ([cc, *_COMPILE, str(_SOURCE), "-o", str(obj)],
                        [cc, *_LINK, str(obj), "-o", str(library), "-lmvec", "-lm"]):
            if subprocess.run(command, capture_output=True, timeout=300, check=False).returncode != 0:
                return None
        function = ctypes.CDLL(str(library)).decode_attention  # loaded: the file itself can go
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    pointer, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    function.argtypes = [pointer] * 10 + [i32] * 4 + [i64, i64, ctypes.c_float]
    function.restype = None
    return function
