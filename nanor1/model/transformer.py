"""The DeepSeek-V3 transformer: embeddings, MLA + (dense | MoE) blocks, final norm, output head, MTP.

One `forward(idx, targets)` serves pretraining, SFT and GRPO log-probs; `prefill` and `decode` serve the
engine with an explicit `KVCache`. Device and dtype come from the caller (`.to(...)`), never from here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nanor1.model.config import ModelConfig
from nanor1.model.layers import MLP, RMSNorm, rope_tables
from nanor1.model.mla import MLA, KVCache
from nanor1.model.moe import MoE

Attend = Callable[[MLA, torch.Tensor], torch.Tensor]  # how a block calls its attention (train/prefill/decode)


class Block(nn.Module):
    """Pre-norm residual block: x + MLA(norm(x)), then + FFN(norm(x)); the FFN is MoE past the dense layers."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        use_moe = cfg.n_routed_experts > 0 and layer_id >= cfg.n_dense_layers
        self.mlp = MoE(cfg) if use_moe else MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        x = x + attend(self.self_attn, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPLayer(Block):
    """Multi-token prediction module k (DeepSeek-V3 section 2.2, eq. 21-22): combine the previous depth's
    representation with the embedding of the token k ahead, run one block, predict one token further.
    The embedding and output head are the main model's (shared); [emb ; h] order follows the checkpoints."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # shared_head.norm in the checkpoint layout

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, attend: Attend) -> torch.Tensor:
        h = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h_prev)), dim=-1))
        return super().forward(h, attend)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab)
    loss: torch.Tensor | None = None  # lm_loss + mtp_loss_weight * mtp_loss + aux_loss
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.n_layers + k) for k in range(cfg.n_mtp_layers))
        cos, sin = rope_tables(cfg.qk_rope_head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # ------------------------------------------------------------------ init and bookkeeping
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "Transformer":
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for m in self.moe_layers():
            m.gate.e_score_correction_bias.zero_()
        return self

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_moe_bias(self) -> dict[str, float]:
        """Apply the auxiliary-loss-free bias update in every MoE layer; returns load-balance stats.

        max_violation = max_i load_i / mean load - 1 (0 is perfectly balanced), as in Wang et al. 2024."""
        fracs = [m.update_bias() for m in self.moe_layers()]
        if not fracs:
            return {}
        viol = [float(f.max() * f.numel() - 1) for f in fracs if f.sum() > 0]
        return {"moe_max_violation": max(viol) if viol else 0.0}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ training / scoring
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                real: torch.Tensor | None = None) -> ModelOutput:
        """idx: (B, T) token ids; targets: (B, T) next-token ids with -100 where no loss is taken; real: (B, T) True
        on real tokens, the only ones the MoE layers (MTP's included) count toward their loads (None: every token)."""
        with self._counting_only(real):
            return self._forward(idx, targets)

    def _forward(self, idx: torch.Tensor, targets: torch.Tensor | None) -> ModelOutput:
        B, T = idx.shape
        cos, sin = self.rope_cos[:T, None], self.rope_sin[:T, None]  # (T, 1, rope/2)
        attend: Attend = lambda attn, h: attn(h, cos, sin)
        h = self.embed_tokens(idx)
        for block in self.layers:
            h = block(h, attend)
        h = self.norm(h)
        logits = self.lm_head(h)
        if targets is None:
            return ModelOutput(logits=logits)
        lm_loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        loss, mtp_loss = lm_loss, None
        if self.mtp and self.cfg.mtp_loss_weight > 0:
            mtp_loss = self._mtp_loss(h, targets)
            if mtp_loss is not None:
                loss = loss + self.cfg.mtp_loss_weight * mtp_loss
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        aux_loss = torch.stack(aux).sum() if aux else None
        if aux_loss is not None:
            loss = loss + aux_loss
            for m in self.moe_layers():
                m.aux_loss = None
        return ModelOutput(logits=logits, loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss, aux_loss=aux_loss)

    def _mtp_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Mean over depths k of the cross-entropy for token i+k+1 (V3 eq. 23-25).

        Depth k at position i sees h^{k-1}_i and the embedding of token i+k (= targets[i+k-1]). Every depth runs
        on all T positions: the last k have no target (padded with -100) and, attention being causal, change
        nothing before them, while a window of T - k positions would make every shape odd (the softmax alone
        runs 2x slower at 127 columns than at 128 on CPUs)."""
        T = h.shape[1]
        cos, sin = self.rope_cos[:T, None], self.rope_sin[:T, None]
        losses, present = [], []
        for k, layer in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            emb_ids = F.pad(targets[:, k - 1:], (0, k - 1)).clamp(min=0)  # ignored targets still need a valid id
            h = layer(h, self.embed_tokens(emb_ids), lambda attn, x: attn(x, cos, sin))
            logits = self.lm_head(layer.norm(h))
            tgt = F.pad(targets[:, k:], (0, k), value=-100)
            # the mean over this depth's real targets, and whether it has any, without branching on the data (a
            # data-dependent branch would split the graph under torch.compile): depths with none count for nothing
            counted = (tgt != -100).sum()
            total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tgt.reshape(-1), ignore_index=-100,
                                    reduction="sum")
            losses.append(total / counted.clamp(min=1))
            present.append((counted > 0).float())
        if not losses:
            return None
        present = torch.stack(present)
        return (torch.stack(losses) * present).sum() / present.sum().clamp(min=1)

    def forward_shared_prompts(self, prompts: torch.Tensor, prompt_lens: torch.Tensor, inputs: torch.Tensor,
                               real: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for G = B // n continuations of each of n prompts, running each prompt once, not G times
        (a GRPO group's completions share their prompt; gradients reach the prompt through its keys and values).

        prompts: (n, P) right-padded, prompt_lens: (n,); inputs: (B, T) right-padded continuation tokens, row b
        continuing prompt b // G; real: (B, T) True on real continuation tokens (None: all). Returns
        (B, T + 1, V): position 0 predicts inputs[:, 0] from the prompt's last token and position t + 1 predicts
        what follows inputs[:, t], as a forward over each whole row would. Only real tokens count toward the MoE
        layers' expert loads.
        """
        n, P = prompts.shape
        B, T = inputs.shape
        if B % n:
            raise ValueError(f"{B} continuations do not split evenly over {n} prompts")
        g = B // n
        cos, sin = self.rope_cos[:P, None], self.rope_sin[:P, None]
        latents: list[torch.Tensor] = []
        keep = torch.arange(P, device=prompts.device)[None, :] < prompt_lens[:, None]  # (n, P)
        h = self.embed_tokens(prompts)
        with self._counting_only(keep):
            for block in self.layers:
                h = block(h, lambda attn, x: attn.forward_prefix(x, cos, sin, latents))
        last = self.norm(h[torch.arange(n, device=h.device), prompt_lens - 1])  # (n, dim)
        first = self.lm_head(last).repeat_interleave(g, 0)[:, None]  # (B, 1, V)
        if T == 0:
            return first
        pos = prompt_lens.repeat_interleave(g, 0)[:, None] + torch.arange(T, device=inputs.device)  # (B, T)
        cos, sin = self.rope_cos[pos][:, :, None], self.rope_sin[pos][:, :, None]
        h = self.embed_tokens(inputs)
        with self._counting_only(real):
            for i, block in enumerate(self.layers):
                h = block(h, lambda attn, x: attn.forward_continuation(x, cos, sin, latents[i], keep))
        return torch.cat((first, self.lm_head(self.norm(h))), dim=1)

    @contextlib.contextmanager
    def _counting_only(self, mask: torch.Tensor | None):
        """Within the block, the MoE layers count only the tokens where `mask` is True toward their loads (every
        token, with no attribute written, when `mask` is None)."""
        if mask is None:
            yield
            return
        layers = self.moe_layers()
        for m in layers:
            m.load_mask = mask
        try:
            yield
        finally:
            for m in layers:
                m.load_mask = None

    # ------------------------------------------------------------------ inference with a KV cache
    def new_cache(self, n_slots: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        max_len = min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        dtype = dtype or self.embed_tokens.weight.dtype
        return KVCache(self.cfg, n_slots, max_len, dtype, self.embed_tokens.weight.device)

    @property
    def max_seq_len(self) -> int:
        return self.cfg.max_seq_len

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, cache: KVCache, slots: torch.Tensor | slice,
                last: torch.Tensor) -> torch.Tensor:
        """Run right-padded prompts (B, T) from position 0, filling the cache rows `slots`; returns (B, V)
        logits at the positions `last` (each prompt's final token). The caller sets cache.lengths."""
        B, T = idx.shape
        cos, sin = self.rope_cos[:T, None], self.rope_sin[:T, None]
        h = self.embed_tokens(idx)
        for i, block in enumerate(self.layers):
            h = block(h, lambda attn, x: attn.prefill(x, cos, sin, cache.kv[i], slots))
        return self.lm_head(self.norm(h[torch.arange(B, device=idx.device), last]))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: KVCache, slots: torch.Tensor | slice,
               positions: torch.Tensor) -> torch.Tensor:
        """One token per sequence: tokens (B,) at `positions` (B,) in cache rows `slots`; returns (B, V)."""
        L = int(positions.max()) + 1
        keep = (torch.arange(L, device=tokens.device)[None, :] <= positions[:, None]).unsqueeze(1)  # (B, 1, L)
        cos, sin = self.rope_cos[positions][:, None, None], self.rope_sin[positions][:, None, None]
        h = self.embed_tokens(tokens[:, None])
        for i, block in enumerate(self.layers):
            h = block(h, lambda attn, x: attn.decode(x, cos, sin, cache.kv[i], slots, positions, keep))
        return self.lm_head(self.norm(h))[:, 0]
