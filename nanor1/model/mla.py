"""Multi-head Latent Attention (DeepSeek-V2 section 2.1) and its compressed KV cache.

Keys and values are rebuilt from a small latent c_kv (kv_lora_rank numbers per token) plus one RoPE key
shared by all heads (qk_rope_head_dim numbers). Only those two are cached. Training and prefill expand the
latent into per-head keys and values; single-token decode absorbs the up-projection into the query and the
output instead, so past keys are never re-expanded (section 2.1.2, "absorb" mode of the V3 reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanor1.common import version_key
from nanor1.model.config import ModelConfig
from nanor1.model.layers import RMSNorm, apply_rope, rope_halves


class KVCache:
    """The compressed cache of every layer for a fixed set of slots (one sequence per slot).

    kv: (n_layers, n_slots, max_len, kv_lora_rank + qk_rope_head_dim); lengths: (n_slots,) tokens held.
    The engine owns it and passes it in; the model never keeps state between calls.
    """

    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.kv_lora_rank = cfg.kv_lora_rank
        self.kv = torch.zeros(cfg.n_layers, n_slots, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                              dtype=dtype, device=device)
        self.lengths = torch.zeros(n_slots, dtype=torch.long, device=device)

    @property
    def n_slots(self) -> int:
        return self.kv.shape[1]

    @property
    def max_len(self) -> int:
        return self.kv.shape[2]

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        self.kv[:, dst, :length] = self.kv[:, src, :length]

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0


def _causal_attention(q, k, v, scale: float) -> torch.Tensor:
    """(B, H, T, d) queries and keys, (B, H, T, v_dim) values -> (B, H, T, v_dim); fused kernels on GPUs."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def causal_attention_cpu(q, k, v, scale: float, block: int | None = None) -> torch.Tensor:
    """The same attention as three batched matmuls, for CPUs: scale and causal mask fused into one baddbmm,
    softmax in the scores' dtype (PyTorch's CPU kernels accumulate bf16 in float32, so a float32 copy of the
    scores would only add two casts: ~1.8x slower forward plus backward, same error against float64).
    PyTorch's CPU SDPA falls back to its math path (v_dim != qk dim), which builds the mask and rescales in
    separate passes, and its flash kernel with v padded to the key width is slower still: this is 1.7x
    faster in bf16 at the speedrun shapes, forward plus backward (bench/attention_bench.py).

    Queries run in blocks of `block` rows (default: causal_block), each against the keys up to its last row only,
    which skips most of the masked upper triangle; the kept scores, and so the outputs, are the same."""
    T = q.shape[2]
    mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    block = causal_block(T) if block is None else block
    if not block or block >= T:
        return biased_attention_cpu(q, k, v, scale, mask)
    return torch.cat([biased_attention_cpu(q[:, :, s:s + block], k[:, :, :s + block], v[:, :, :s + block], scale,
                                           mask[s:s + block, :s + block]) for s in range(0, T, block)], dim=2)


def causal_block(T: int) -> int:
    """Query rows per block of `causal_attention_cpu` over T positions (0: one block). n blocks do (n + 1) / 2n of
    the work, but each adds slices and a concatenation, and their gradients' copies, which eager PyTorch runs as
    separate passes and torch.compile fuses. From 256 positions on, eager code runs halves and compiled code 64-row
    blocks: a speedrun-preset training step at 16 x 512 tokens took 1.11x (eager) and 1.23x (compiled) less time;
    at 64 x 128 tokens blocks gained nothing in the whole step (bench/README.md, Attention)."""
    if T < 256:
        return 0
    return 64 if torch.compiler.is_compiling() else -(-T // 2)


def biased_attention_cpu(q, k, v, scale: float, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for (B, H, T, d) queries and (B, H, S, d) keys; bias (T, S) or (B, 1, T, S)
    with -inf where a query may not look."""
    B, H, T, d = q.shape
    S = k.shape[2]
    bias = bias.expand(B * H, T, S) if bias.dim() == 2 else bias.expand(B, H, T, S).reshape(B * H, T, S)
    scores = torch.baddbmm(bias, q.reshape(B * H, T, d), k.reshape(B * H, S, d).transpose(1, 2), alpha=scale)
    return torch.bmm(torch.softmax(scores, dim=-1), v.reshape(B * H, S, -1)).view(B, H, T, -1)


def masked_attention(q, k, v, scale: float, keep: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) v where `keep` (broadcast to (B, 1, T, S)) is True: the bias form above on CPUs,
    SDPA with a boolean mask elsewhere."""
    if q.device.type == "cpu":
        bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, float("-inf"))
        return biased_attention_cpu(q, k, v, scale, bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)


def continuation_keep(prefix_keep: torch.Tensor, g: int, T: int) -> torch.Tensor:
    """(B, 1, T, P + T) mask of what GRPO's continuations may attend to: each of the n prefixes' real positions
    (prefix_keep (n, P), shared by its g = B // n continuations), then their own tokens causally."""
    n, P = prefix_keep.shape
    B = n * g
    causal = torch.ones(T, T, dtype=torch.bool, device=prefix_keep.device).tril()
    return torch.cat((prefix_keep.repeat_interleave(g, 0)[:, None, :].expand(B, T, P),
                      causal.expand(B, T, T)), dim=-1)[:, None]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.scale = self.qk_head_dim ** -0.5
        H = cfg.n_heads
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.dim, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, cfg.dim, bias=False)
        # the rows of the query and latent projections in the order `apply_rope` reads: each RoPE part in halves
        # (a gather of the weight at every use, which is small; the weights keep the checkpoints' layout)
        rope = rope_halves(self.rope_dim)
        head = torch.cat((torch.arange(self.nope_dim), self.nope_dim + rope))
        self.register_buffer("q_rows", (torch.arange(H)[:, None] * self.qk_head_dim + head).flatten(),
                             persistent=False)
        self.register_buffer("kv_rows", torch.cat((torch.arange(self.kv_lora_rank), self.kv_lora_rank + rope)),
                             persistent=False)
        self._inference_rows: dict[str, tuple] = {}  # gathered weights kept for decode, see _rows

    def _rows(self, name: str, w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """w's rows in `rows` order: gathered at every training forward (the gradient flows back through it), and
        at inference kept while w is unchanged, since decode would otherwise gather at every token."""
        if torch.is_grad_enabled():
            return w[rows]
        key = version_key([w])
        hit = self._inference_rows.get(name)
        if hit is None or hit[0] != key:
            hit = self._inference_rows[name] = (key, w[rows])
        return hit[1]

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries split into (nope, rope) parts and the cacheable latent [c_kv ; k_rope], RoPE applied (the RoPE
        parts in `apply_rope`'s halves layout; queries and keys share it, so their dot products are unchanged)."""
        B, T, _ = x.shape
        q_proj = self.q_b_proj if self.q_lora_rank else self.q_proj
        q_in = self.q_a_layernorm(self.q_a_proj(x)) if self.q_lora_rank else x
        q = F.linear(q_in, self._rows("q", q_proj.weight, self.q_rows))
        q = q.view(B, T, self.n_heads, self.qk_head_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        c_kv, k_rope = F.linear(x, self._rows("kv", self.kv_a_proj_with_mqa.weight, self.kv_rows)).split(
            [self.kv_lora_rank, self.rope_dim], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin).squeeze(2)  # one RoPE key for all heads
        latent = torch.cat((self.kv_a_layernorm(c_kv), k_rope), dim=-1)  # (B, T, kv_lora_rank + rope_dim)
        return q_nope, q_rope, latent

    def _expanded_attention(self, q_nope, q_rope, latent) -> torch.Tensor:
        """Causal attention with per-head keys/values expanded from the latent (training and prefill)."""
        B, T, H, _ = q_nope.shape
        c_kv, k_rope = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B, T, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        # q and k assembled straight into (B, H, T, d), one copy each instead of a concatenation and a transpose
        k = torch.cat((k_nope.transpose(1, 2), k_rope.unsqueeze(1).expand(B, H, T, self.rope_dim)), dim=-1)
        q = torch.cat((q_nope.transpose(1, 2), q_rope.transpose(1, 2)), dim=-1)
        attend = causal_attention_cpu if q.device.type == "cpu" else _causal_attention
        out = attend(q, k, v.transpose(1, 2), self.scale)  # (B, H, T, v_dim)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Full causal attention over x: (B, T, dim) -> (B, T, dim)."""
        return self._expanded_attention(*self._project(x, cos, sin))

    def forward_prefix(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, latents: list) -> torch.Tensor:
        """`forward`, also appending x's latents to `latents` for continuations of x to attend to."""
        q_nope, q_rope, latent = self._project(x, cos, sin)
        latents.append(latent)
        return self._expanded_attention(q_nope, q_rope, latent)

    def forward_continuation(self, x, cos, sin, prefix_latent: torch.Tensor, prefix_keep: torch.Tensor) -> torch.Tensor:
        """Causal attention of x (B, T, dim) over a prefix's latents and then itself, with gradients to both.

        prefix_latent: (n, P, latent_dim) from `forward_prefix` on n prefixes, row b of x continuing prefix
        b // (B // n); prefix_keep: (n, P) True on real prefix tokens (prefixes are right-padded); cos/sin:
        (B, T, 1, rope_dim / 2) at each continuation token's own position.
        """
        B, T, _ = x.shape
        n, P, _ = prefix_latent.shape
        H, g = self.n_heads, B // n
        q_nope, q_rope, latent = self._project(x, cos, sin)
        c_kv, k_rope = torch.cat((prefix_latent.repeat_interleave(g, 0), latent), dim=1).split(
            [self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B, P + T, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.unsqueeze(2).expand(B, P + T, H, self.rope_dim)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)
        out = masked_attention(q, k, v, self.scale, continuation_keep(prefix_keep, g, T))
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def prefill(self, x, cos, sin, cache_kv: torch.Tensor, slots) -> torch.Tensor:
        """Attention over right-padded prompts starting at position 0, writing their latents to the cache.

        Padding sits after each prompt, so causal attention never lets a real token see it.
        cache_kv: this layer's (n_slots, max_len, latent_dim); slots: which rows the prompts go to.
        """
        q_nope, q_rope, latent = self._project(x, cos, sin)
        cache_kv[slots, : x.shape[1]] = latent.to(cache_kv.dtype)
        return self._expanded_attention(q_nope, q_rope, latent)

    def decode(self, x, cos, sin, cache_kv: torch.Tensor, slots, positions: torch.Tensor,
               keep: torch.Tensor) -> torch.Tensor:
        """One new token per sequence, attending to the cached latents in absorbed form.

        x: (B, 1, dim); positions: (B,) where the new token goes; keep: (B, 1, L) True for visible keys.
        """
        B = x.shape[0]
        H, r = self.n_heads, self.kv_lora_rank
        q_nope, q_rope, latent = self._project(x, cos, sin)
        rows = torch.arange(slots.start, slots.stop, device=x.device) if isinstance(slots, slice) else slots
        cache_kv[rows, positions] = latent[:, 0].to(cache_kv.dtype)
        keys = cache_kv[slots, : keep.shape[-1]]  # (B, L, r + rope_dim): the only thing read back
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, r)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim:]
        # absorb W_UK into the query: q_nope . (W_UK c) = (q_nope W_UK) . c
        q_latent = torch.einsum("bhd,hdc->bhc", q_nope[:, 0], w_uk.to(q_nope.dtype))
        q = torch.cat((q_latent, q_rope[:, 0]), dim=-1)  # (B, H, r + rope_dim)
        scores = torch.matmul(q, keys.transpose(1, 2).to(q.dtype)) * self.scale  # (B, H, L)
        scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out_latent = torch.matmul(probs, keys[..., :r].to(q.dtype))  # (B, H, r)
        # absorb W_UV into the output: sum_t p_t (W_UV c_t) = W_UV (sum_t p_t c_t)
        out = torch.einsum("bhc,hvc->bhv", out_latent, w_uv.to(out_latent.dtype))
        return self.o_proj(out.reshape(B, 1, H * self.v_dim))
