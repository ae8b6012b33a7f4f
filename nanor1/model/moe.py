"""DeepSeekMoE (DeepSeek-V3 section 2.1.2): shared experts plus fine-grained routed experts.

Routing uses sigmoid affinities, picks the top-k experts by affinity + a balancing bias (the bias only
chooses; the gate weights come from the unbiased affinities, normalised over the chosen k), optionally
within the best `n_limited_groups` expert groups. Balance comes from the auxiliary-loss-free bias update
(eq. 16 area: bias -= gamma * sign(load - mean load)), plus an optional sequence-wise loss (eq. 17-20).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanor1.common import round_up
from nanor1.model.config import ModelConfig
from nanor1.model.layers import MLP


# Up to this many tokens (a small decode batch) running every expert on every token in three batched
# matmuls beats a Python loop over experts; past it, the wasted (E - k) / k compute costs more (measured in
# bench/engine_bench.py on the speedrun preset).
DENSE_MAX_TOKENS = 8
# Up to this many tokens (a decode step of a big batch), experts run as batched matmuls over per-expert
# buckets padded to the busiest expert's load; past it (prefill, training) an exact-size loop wastes less.
GROUPED_MAX_TOKENS = 256
# Grouped matmuls (training and prefill in bf16) read each expert's rows in whole 16-byte units, and the backward
# pass contracts over those rows, so every expert's block of rows is padded to a multiple of this.
CUDA_EXPERT_ROWS = 16
# On CPUs the blocks are larger: oneDNN builds a bf16 matmul kernel per new shape (nanor1.common.SHAPE_MULTIPLE)
# and an expert's load changes every step, so padding makes shapes recur (the speedrun preset's GRPO update went
# from ~0.9 to ~0.6 s per step; bench/README.md, Training).
CPU_EXPERT_ROWS = 128


HAS_GROUPED_MM = hasattr(F, "grouped_mm")  # PyTorch 2.10 and later


def _cpu_grouped_mm() -> bool:
    """Whether this PyTorch runs grouped bf16 matmuls on CPUs (2.13 does; older versions lack F.grouped_mm or its
    CPU kernel, and their routed experts run as a loop). Decided once, at import: torch.compile reads a constant."""
    if not HAS_GROUPED_MM:
        return False
    try:
        a = torch.ones(8, 8, dtype=torch.bfloat16)  # rows of 16 bytes, as the kernel requires
        F.grouped_mm(a, torch.ones(1, 8, 8, dtype=torch.bfloat16), offs=torch.tensor([8], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True


CPU_GROUPED_MM = _cpu_grouped_mm()


class Gate(nn.Module):
    """Router: (N, dim) tokens -> top-k expert ids and weights, in float32 as the reference does."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.n_activated_experts
        self.n_groups, self.topk_groups = cfg.n_expert_groups, cfg.n_limited_groups
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # the balancing bias is state, not a parameter: it is never trained by gradients
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts), persistent=True)

    def forward(self, x: torch.Tensor):
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E) affinities s_i,t
        choice = scores + self.e_score_correction_bias
        if self.n_groups > 1:
            N, E = choice.shape
            grouped = choice.view(N, self.n_groups, E // self.n_groups)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, groups): sum of each group's best 2
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_groups, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(N, E)
        idx = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, idx, scores


class GatherRows(torch.autograd.Function):
    """src.index_select(0, index) with a backward that gathers too. index_select's own backward adds each gradient
    row into place (index_add_, a scatter): ~0.85 ms on this project's CPU for the 16384 x 192 bf16 rows of a
    speedrun-preset MoE layer, against ~0.25 ms for a gather; under torch.compile, Inductor runs it as ATen's
    scatter_add_. The caller knows which output rows read each source row: `readers` (c, len(src)), row i of src
    read by output rows readers[:, i]; with `missing`, the value len(index) marks "no reader" (a zero gradient)."""

    @staticmethod
    def forward(ctx, src, index, readers, missing: bool):
        ctx.save_for_backward(readers)
        ctx.missing = missing
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        readers, = ctx.saved_tensors
        n, flat = grad.shape[0], readers.flatten()
        if ctx.missing:  # a mask rather than a zero row appended to grad, which torch.compile's gather cannot vectorize
            picked = grad.index_select(0, flat.clamp(max=n - 1)) * (flat < n).unsqueeze(1).to(grad.dtype)
        else:
            picked = grad.index_select(0, flat)
        parts = picked.view(*readers.shape, grad.shape[1]).unbind(0)
        out = parts[0]
        for part in parts[1:]:
            out = out + part
        return out, None, None, None


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, d, I = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.n_experts, self.top_k = E, cfg.n_activated_experts
        self.bias_update_speed = cfg.bias_update_speed
        self.seq_aux_loss_alpha = cfg.seq_aux_loss_alpha
        self.gate = Gate(cfg)
        # routed experts stacked, so small batches run as three batched matmuls
        self.w_gate = nn.Parameter(torch.empty(E, I, d))
        self.w_up = nn.Parameter(torch.empty(E, I, d))
        self.w_down = nn.Parameter(torch.empty(E, d, I))
        self.shared_experts = MLP(d, cfg.n_shared_experts * I) if cfg.n_shared_experts else None
        # grouped-matmul kernels need rows of whole 16-byte units (8 bf16 values)
        self.grouped = d % 8 == 0 and I % 8 == 0
        self.register_buffer("expert_load", torch.zeros(E), persistent=False)  # tokens routed, since last update
        self.aux_loss: torch.Tensor | None = None
        # (N,) True on the tokens of the next forward that count toward expert_load; None counts them all. Set by
        # the Transformer around a forward over padded rows, so padding never steers the balancing bias.
        self.load_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, dim)
        weights, idx, scores = self.gate(flat)
        n = flat.shape[0]
        if torch.is_grad_enabled() or n > GROUPED_MAX_TOKENS:
            routed = self._sparse_experts(flat, weights, idx)
        elif n <= DENSE_MAX_TOKENS:
            routed = self._dense_experts(flat, weights, idx)
        else:
            routed = self._grouped_experts(flat, weights, idx)
        out = routed.view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        if self.training:
            with torch.no_grad():  # a scatter rather than bincount of the masked ids: no data-dependent shape
                counted = torch.ones_like(idx, dtype=self.expert_load.dtype) if self.load_mask is None else \
                    self.load_mask.reshape(-1, 1).expand_as(idx).to(self.expert_load.dtype)
                self.expert_load.scatter_add_(0, idx.flatten(), counted.flatten())
            if self.seq_aux_loss_alpha > 0 and x.dim() == 3:
                self.aux_loss = self._sequence_balance_loss(scores.view(shape[0], shape[1], -1), idx.view(
                    shape[0], shape[1], -1))
        return out

    def _grouped_rows(self, x: torch.Tensor) -> int:
        """Rows per expert block when the routed experts run as grouped matmuls on `x`, or 0 for the loop: bf16
        with widths the kernels take, on CPUs where this PyTorch has the kernel (CPU_GROUPED_MM) and on CUDA where
        it has F.grouped_mm (a CUTLASS kernel on Hopper and later; PyTorch loops on older GPUs)."""
        if not self.grouped or x.dtype != torch.bfloat16:
            return 0
        if x.device.type == "cpu":
            return CPU_EXPERT_ROWS if CPU_GROUPED_MM else 0
        return CUDA_EXPERT_ROWS if x.device.type == "cuda" and HAS_GROUPED_MM else 0

    def _sparse_experts(self, x, weights, idx) -> torch.Tensor:
        """Tokens sorted by expert, each expert's matmul chain on its own rows (training, prefill): grouped
        matmuls over padded blocks in bf16 where the kernels exist, else a loop over the experts that have
        tokens. Rows move to and from the expert-major buffer by gathers both ways (GatherRows)."""
        N, E, k = x.shape[0], self.n_experts, self.top_k
        flat_idx = idx.flatten()  # entry j is token j // k's choice j % k
        order = flat_idx.argsort(stable=True)
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat_idx, torch.ones_like(flat_idx))
        dt, block = x.dtype, self._grouped_rows(x)
        # grouped: each expert's rows at the start of its block. The buffer's size can depend on the batch alone
        # (the last expert's block runs to its end): so under torch.compile the layer has no data-dependent shape
        # and compiles whole, and on GPUs no step waits for the device to say how many rows there are. Eager CPU
        # runs take the exact size. The loop: each expert's rows back to back, no padding.
        sizes = round_up(counts, block) if block else counts
        expert = flat_idx[order]
        rank = torch.arange(N * k, device=x.device) - (counts.cumsum(0) - counts)[expert]
        pos = (sizes.cumsum(0) - sizes)[expert] + rank  # each sorted entry's buffer row
        if not block:
            total = N * k
        elif torch.compiler.is_compiling() or x.device.type != "cpu":
            total = round_up(N * k + E * (block - 1), block)
        else:
            total = int(sizes.sum())
        # entries renumbered choice-major (choice c of token t is c * N + t), so each choice's outputs come back as
        # one contiguous (N, dim) block: the buffer row of every entry, and the entry in every buffer row (k * N
        # on padding rows, which read token 0: nothing reads their outputs, so they get zero gradients)
        choice_major = (order % k) * N + order // k
        row_of = torch.empty_like(pos).index_copy_(0, choice_major, pos)
        entry_of = torch.full((total,), k * N, dtype=pos.dtype, device=x.device).index_copy_(0, pos, choice_major)
        rows = GatherRows.apply(x, entry_of % N, row_of.view(k, N), False)
        if block:
            offs = torch.cat((sizes.cumsum(0)[:-1], sizes.new_full((1,), total))).to(torch.int32)
            w_gate, w_up, w_down = (w.to(dt).transpose(1, 2) for w in (self.w_gate, self.w_up, self.w_down))
            h = F.silu(F.grouped_mm(rows, w_gate, offs=offs)) * F.grouped_mm(rows, w_up, offs=offs)
            ys = F.grouped_mm(h, w_down, offs=offs)
        else:
            # one cast and one unbind per stacked weight, and split rather than slicing: indexing per expert would
            # cast each slice separately and give each slice's backward a full-size zero gradient to add up
            w_gate, w_up, w_down = (w.to(dt).unbind(0) for w in (self.w_gate, self.w_up, self.w_down))
            ys = torch.cat([F.linear(F.silu(F.linear(xe, w_gate[e])) * F.linear(xe, w_up[e]), w_down[e])
                            for e, xe in enumerate(rows.split(counts.tolist())) if xe.shape[0]])
        picked = GatherRows.apply(ys, row_of, entry_of.view(1, -1), True).view(k, N, -1).unbind(0)
        gates = weights.t().to(ys.dtype).unsqueeze(-1).unbind(0)  # k of (N, 1)
        out = (picked[0] * gates[0]).to(dt)
        for y, g in zip(picked[1:], gates[1:]):
            out = out + (y * g).to(dt)
        return out

    def _grouped_experts(self, x, weights, idx) -> torch.Tensor:
        """Inference: tokens bucketed per expert into one (E, capacity, dim) tensor, so every expert runs in
        three batched matmuls instead of a Python loop; capacity is the busiest expert's load, rounded up to
        a multiple of 16 so only a few shapes occur. (Training keeps the exact-size loop: no padded compute.)"""
        E, k = self.n_experts, self.top_k
        flat_idx = idx.flatten()
        order = flat_idx.argsort(stable=True)
        counts = torch.bincount(flat_idx, minlength=E)
        cap = round_up(int(counts.max()), 16)
        expert = flat_idx[order]
        pos = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts)[expert]
        token_of = order // k
        buf = x.new_zeros(E, cap, x.shape[-1])
        buf[expert, pos] = x[token_of]
        dt = x.dtype
        h = F.silu(torch.bmm(buf, self.w_gate.to(dt).transpose(1, 2))) \
            * torch.bmm(buf, self.w_up.to(dt).transpose(1, 2))
        y = torch.bmm(h, self.w_down.to(dt).transpose(1, 2))  # (E, cap, dim)
        ys = y[expert, pos] * weights.flatten()[order, None].to(dt)
        return torch.zeros_like(x).index_add_(0, token_of, ys)

    def _dense_experts(self, x, weights, idx) -> torch.Tensor:
        """Every expert on every token, then a weighted sum: for a handful of tokens (decode) three batched
        matmuls beat a Python loop over experts, and the unchosen experts get weight 0."""
        h = F.silu(torch.einsum("nd,eid->eni", x, self.w_gate.to(x.dtype))) \
            * torch.einsum("nd,eid->eni", x, self.w_up.to(x.dtype))
        y = torch.einsum("eni,edi->end", h, self.w_down.to(x.dtype))  # (E, N, dim)
        dense_w = torch.zeros(x.shape[0], self.n_experts, dtype=x.dtype, device=x.device)
        dense_w.scatter_(1, idx, weights.to(x.dtype))
        return torch.einsum("end,ne->nd", y, dense_w)

    def _sequence_balance_loss(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Complementary sequence-wise balance loss, DeepSeek-V3 eq. 17-20: alpha * sum_i f_i P_i per sequence.

        scores: (B, T, E) sigmoid affinities; idx: (B, T, k) chosen experts.
        """
        B, T, E = scores.shape
        chosen = torch.zeros_like(scores).scatter_(2, idx, 1.0)
        f = chosen.sum(1) * E / (self.top_k * T)  # (B, E) eq. 18
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (B, E) eq. 19-20
        return self.seq_aux_loss_alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self) -> torch.Tensor:
        """Auxiliary-loss-free balancing: lower the bias of overloaded experts, raise it for underloaded ones,
        by speed gamma (V3 section 2.1.2). Returns the load fractions used, then resets the counter."""
        load = self.expert_load
        if load.sum() > 0:
            self.gate.e_score_correction_bias += self.bias_update_speed * torch.sign(load.mean() - load)
        frac = load / load.sum().clamp(min=1)
        self.expert_load.zero_()
        return frac
