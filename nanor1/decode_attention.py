"""Attention for one decode step over a KV cache: a hand-written CPU kernel, with torch ops everywhere else.

At decode's sizes (one query per row, a few hundred cached keys) the attention is a few dot products per key,
and eager torch ops spend most of their time around them (batched matmuls of one row each, a softmax, a mask).
The kernel (decode_attention.c) reads each cached key and value once, with AVX-512 BF16 dot products: GRPO's
eager rollout of the bench ran 1.2x faster with it (bench/README.md, GRPO). A compiled decode step keeps the ops:
Inductor fuses them into a kernel about as fast in a real rollout, and called from the graph (as a custom op) this
one cost more than it saved. The kernel is compiled on first use, for this
CPU, by the C compiler that torch.compile needs on CPUs anyway; where it cannot be built (no compiler, a CPU
without AVX-512 BF16, `NANOR1_DECODE_KERNEL=0`), and for other dtypes and devices, `fits` says no and the caller
runs the ops.
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


def fits(keys: torch.Tensor, head_dim: int) -> bool:
    """Whether `attend` can run on a cache layer's keys (and its values, laid out alike): bf16 on a CPU with the
    kernel built, whole rows of head_dim contiguous."""
    return (keys.device.type == "cpu" and keys.dtype == torch.bfloat16 and head_dim % 32 == 0 and head_dim <= 256
            and keys.stride(-1) == 1 and keys.stride(-2) == head_dim and kernel() is not None)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Each row's queries q (B, KV, G, D) (G query heads per kv head) attend to its cached keys and values
    (B, KV, capacity, D) up to its position (B,), where its new key and value are already written.
    Returns (B, KV, G, D). Only where `fits(keys)`, with values laid out as keys."""
    assert keys.stride() == values.stride(), "keys and values must share a layout"
    B, KV, G, D = q.shape
    q, positions = q.contiguous(), positions.long().contiguous()
    out = torch.empty_like(q)
    kernel()(*(t.data_ptr() for t in (q, keys, values, positions, out)), B, KV, G, D,
             keys.stride(0), keys.stride(1), scale)
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
    function.argtypes = [pointer] * 5 + [i32] * 4 + [i64, i64, ctypes.c_float]
    function.restype = None
    return function
