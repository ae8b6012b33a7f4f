"""Small shared utilities: the user-error type, atomic file writes, hashing, devices, logging.

This module imports nothing from the rest of nanor1, so every other module may import it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F


class NanoR1Error(Exception):
    """An error the user caused (bad input, bad config, missing file). The CLI prints it as one line."""


# ----------------------------------------------------------------------------- files

def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_json(path: str | Path) -> Any:
    """Read a JSON file, turning a missing or malformed file into a one-line user error."""
    path = Path(path)
    if not path.is_file():
        raise NanoR1Error(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoR1Error(f"{path}: not valid JSON ({e}); the file is damaged, regenerate it") from None


class JsonlLogger:
    """Appends one JSON object per line; flushed each write so a crash loses at most one line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, **row: Any) -> None:
        row.setdefault("time", time.time())
        self._f.write(json.dumps(row, default=float) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a crash: skip it
    return rows


def code_version() -> str:
    """The git commit of the nanor1 source (with '+dirty'), or the package version outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from nanor1 import __version__
    return __version__


# ----------------------------------------------------------------------------- devices

def resolve_device(name: str | None = None) -> torch.device:
    """'auto' (or None) picks CUDA when present, else CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise NanoR1Error(f"unknown device {name!r}; use 'auto', 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NanoR1Error(f"device {name!r} asked for but CUDA is not available; use device=cpu (--device cpu for "
                          "serve and chat)")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise NanoR1Error(f"unknown dtype {name!r}; use one of {sorted(set(DTYPES))}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on CPU or GPU; a no-op context for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@functools.cache
def compiled(fn):
    """`fn` under torch.compile, wrapped once per function (Dynamo keys its graphs on the code and guards them on
    the arguments' sizes and the modules passed in, so every caller shares them). The first sizes get a static
    graph, the fastest; the first call with other sizes marks every dimension of its tensor arguments symbolic,
    so one more graph serves every later size. Left to itself Dynamo recompiles at the first change of each
    dimension: GRPO's prompt width, completion width and rows changing cost three recompilations of 1.5-2.5 min
    each on 2 CPU cores (measured on a nanor1 model's update, before GRPO refused to compile those). Calls with
    another number of tensors (an optional tuple given or not) are other graphs, each with its own first sizes."""
    graph, first = torch.compile(fn), {}

    def call(*args):
        tensors = [t for a in args for t in (a if isinstance(a, tuple) else (a,)) if isinstance(t, torch.Tensor)]
        sizes = [t.shape for t in tensors]
        if first.setdefault(len(sizes), sizes) != sizes:
            for t in tensors:
                for dim in range(t.dim()):
                    torch._dynamo.maybe_mark_dynamic(t, dim)
        return graph(*args)

    return call


# Dense tensor-core peaks of common GPUs (bf16), for MFU on CUDA.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}
_CPU_PEAK: dict[torch.dtype, float] = {}


def measure_matmul_flops(dtype: torch.dtype, n: int = 2048, reps: int = 3,
                         device: str | torch.device = "cpu") -> float:
    """FLOP/s of an n x n matmul in `dtype` on `device` (best of `reps`): on a CPU, the peak MFU is reported
    against."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b  # warm-up (kernel selection)
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's matmul peak: the table for GPUs; on a CPU, measured once per process (a CPU's bf16 rate
    depends on AMX / AVX-512-BF16 support, so no constant fits every machine)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), 312e12)
        return peak if dtype != torch.float32 else peak / 16
    if dtype not in _CPU_PEAK:
        _CPU_PEAK[dtype] = measure_matmul_flops(dtype)
    return _CPU_PEAK[dtype]


def tune_cpu() -> None:
    """Use every core for intra-op work, and keep freed memory in the process.

    glibc hands allocations over 128 KiB back to the kernel as soon as they are freed, so every training step
    page-faults its activations in again (measured: ~15% of a `speedrun`-preset step). Raising the mmap and
    trim thresholds keeps those pages, as jemalloc/tcmalloc would; it is a no-op off glibc."""
    n = os.cpu_count() or 1
    if torch.get_num_threads() < n:
        torch.set_num_threads(n)
    global _malloc_tuned
    if _malloc_tuned or not sys.platform.startswith("linux"):
        return
    _malloc_tuned = True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # mallopt parameter ids from <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's ceiling on 64-bit; activations here are <= 16 MiB
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 64 << 20)


_malloc_tuned = False


# oneDNN, which runs PyTorch's bf16 matmuls on CPUs, builds a kernel for every new shape: ~0.75 ms, against
# ~0.13 ms for the multiply itself at 1000 x 192 x 128. Lengths that change every step (a batch's longest prompt
# or completion) are padded up to a multiple of this, so a few shapes recur and their kernels are reused.
SHAPE_MULTIPLE = 16


def round_up(n, multiple: int = SHAPE_MULTIPLE):
    """n (an int or an integer tensor) rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def version_key(tensors: Iterable[torch.Tensor]) -> tuple:
    """What changes when any of `tensors` is changed in place (its version counter: in-place ops such as
    load_state_dict's copy_, and the steps of nanor1's optimizers, which bump it because PyTorch's fused AdamW
    does not; see nanor1.train.make_optimizer) or replaced by `.to()` (its storage): the key of a cache derived
    from them."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


def pack_frozen(w: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """A (out, in) weight that sampling will reuse many times, in oneDNN's own blocked layout where that exists
    (bf16 on CPUs): F.linear re-lays the weight out at every call, and a decode step of 64 rows then spends a
    quarter of each small matmul doing so (bench/README.md, GRPO). Results are identical; `batch` is a hint.
    Elsewhere returns `w` detached (the same storage). Use the result with `linear`, for inference only."""
    w = w.detach()
    if w.device.type != "cpu" or w.dtype != torch.bfloat16 or not _can_pack_bf16():
        return w
    return torch.ops.mkldnn._reorder_linear_weight(w, batch)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear that also takes a weight from `pack_frozen`."""
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    return F.linear(x, w, bias)


@functools.cache
def _can_pack_bf16() -> bool:
    ops = ("_is_mkldnn_bf16_supported", "_reorder_linear_weight", "_linear_pointwise")
    try:  # private ops (Inductor's frozen-weight path): a build or version without them gets plain F.linear
        return (torch.backends.mkldnn.is_available() and all(hasattr(torch.ops.mkldnn, op) for op in ops)
                and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    except (AttributeError, RuntimeError):
        return False


def chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False):
    """A tqdm bar with rate and ETA (to stderr)."""
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, smoothing=0.1)
