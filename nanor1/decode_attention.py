"""Attention for one decode step over a KV cache: a hand-written CPU kernel, with torch ops everywhere else.

At decode's sizes (one query per row, a few hundred cached keys) the attention is a few dot products per key,
and eager torch ops spend most of their time around them (batched matmuls of one row each, a softmax, a mask).
The kernel (decode_attention.c) reads each cached key and value once, with AVX-512 BF16 dot products: GRPO's
eager rollout of the bench ran 1.2x faster with it (bench/README.md, GRPO). A compiled decode step keeps the ops,
which Inductor fuses into a kernel about as fast in a real rollout. The kernel is compiled on first use, for this
CPU, by the C compiler that torch.compile needs on CPUs anyway; where it cannot be built (no compiler, a CPU
without AVX-512 BF16, `NANOR1_DECODE_KERNEL=0`), and for other dtypes and devices, `attend` runs the ops.
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
import torch.nn.functional as F

_SOURCE = Path(__file__).with_name("decode_attention.c")
# -ffast-math lets the softmax use glibc's vectorised expf (libmvec). Compiled and linked apart: linked with
# -ffast-math, the library would turn on flush-to-zero for the whole process when it loads.
_COMPILE = ["-c", "-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
_LINK = ["-shared", "-fopenmp"]


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Each row's queries q (B, KV, G, D) (G query heads per kv head) attend to its cached keys and values
    (B, KV, capacity, D) below its position (B,) and to its own new key and value k, v (B, KV, 1, D), which are
    kept apart (the caller writes them into the cache). Returns (B, KV, G, D) in q's dtype. The kernel where it
    fits, else `attend_with_ops`."""
    D = q.shape[-1]
    fits = (q.device.type == "cpu" and q.dtype == keys.dtype == values.dtype == torch.bfloat16
            and D % 32 == 0 and D <= 256 and keys.stride() == values.stride()
            and keys.stride(-1) == 1 and keys.stride(-2) == D)
    if not fits or kernel() is None:
        return attend_with_ops(q, keys, values, k, v, positions, scale)
    B, KV, G, _ = q.shape
    q, k, v, positions = q.contiguous(), k.contiguous(), v.contiguous(), positions.long().contiguous()
    out = torch.empty_like(q)
    kernel()(*(t.data_ptr() for t in (q, keys, values, k, v, positions, out)), B, KV, G, D,
             keys.stride(0), keys.stride(1), scale)
    return out


def attend_with_ops(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    positions: torch.Tensor, scale: float) -> torch.Tensor:
    """`attend` as torch ops: masked scores over the whole capacity, the new key's score appended."""
    below = torch.arange(keys.shape[2], device=q.device)[None, :] < positions[:, None]
    bias = torch.zeros(below.shape, device=q.device).masked_fill_(~below, float("-inf"))[:, None, None]
    scores = torch.cat((torch.matmul(q, keys.transpose(-1, -2)).float(),
                        (q.float() * k.float()).sum(-1, keepdim=True)), dim=-1)
    p = torch.softmax(scores * scale + F.pad(bias, (0, 1)), dim=-1).to(values.dtype)
    return torch.matmul(p[..., :-1], values) + p[..., -1:] * v


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
            if subprocess.run(command, capture_output=True, timeout=300).returncode != 0:
                return None
        function = ctypes.CDLL(str(library)).decode_attention  # loaded: the file itself can go
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    pointer, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    function.argtypes = [pointer] * 7 + [i32] * 4 + [i64, i64, ctypes.c_float]
    function.restype = None
    return function
