"""Building blocks shared by every part of the model: RMSNorm, the SwiGLU MLP and rotary embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as the reference does), then scaled by a learned weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        out = self.weight * x.to(dtype)
        if torch.is_autocast_enabled(out.device.type):
            # the layers that read a norm's output compute in the autocast dtype: cast once here, not in each
            return out.to(torch.get_autocast_dtype(out.device.type))
        return out


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each (max_len, head_dim // 2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x0, x1), (x2, x3), ... of DeepSeek's checkpoints, given in halves: x holds the pairs' first
    components (x0, x2, ...) in its first half and their second ones in the other (MLA gathers its projection rows
    so, `rope_halves`), as contiguous halves read several times faster on CPUs than every other element.

    x: (B, T, H, D); cos/sin broadcastable to (B, T, 1, D/2). Returns the rotated pairs in the same halves layout.
    """
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_halves(rope_dim: int) -> torch.Tensor:
    """The order that puts interleaved RoPE pairs in `apply_rope`'s halves layout: evens first, then odds."""
    i = torch.arange(rope_dim)
    return torch.cat((i[0::2], i[1::2]))
