"""The model config: one frozen dataclass for every size, from a test toy to the real DeepSeek-V3.

Grouped by concern as in DeepSeek-V3's inference `ModelArgs`. `ModelConfig.preset(name)` gives the named
sizes; `param_counts()` gives total/active parameters without building the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from nanor1.common import NanoR1Error


@dataclass(frozen=True)
class ModelConfig:
    # trunk
    vocab_size: int = 512
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    # mla (DeepSeek-V2 section 2.1): low-rank queries and a compressed, cached KV latent
    q_lora_rank: int = 0  # 0: queries come from one dense projection, as in V2-Lite
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16  # the decoupled RoPE key, shared across heads
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    # dense feed-forward (the first `n_dense_layers` layers)
    inter_dim: int = 768
    # moe (DeepSeek-V3 section 2.1.2)
    n_dense_layers: int = 1
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    moe_inter_dim: int = 128
    n_expert_groups: int = 1  # group-limited routing: pick `n_limited_groups` groups, then experts in them
    n_limited_groups: int = 1
    route_scale: float = 1.0
    norm_topk_prob: bool = True
    bias_update_speed: float = 1e-3  # gamma of the auxiliary-loss-free balancing bias
    seq_aux_loss_alpha: float = 0.0  # alpha of the complementary sequence-wise balance loss (eq. 17)
    # mtp (DeepSeek-V3 section 2.2)
    n_mtp_layers: int = 1
    mtp_loss_weight: float = 0.3  # lambda

    def __post_init__(self):
        self.validate()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0 and self.n_layers > self.n_dense_layers

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise NanoR1Error(f"model config: {msg}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "kv_lora_rank",
                     "qk_nope_head_dim", "v_head_dim", "inter_dim"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim must be a positive even number, got {self.qk_rope_head_dim}")
        need(self.q_lora_rank >= 0, "q_lora_rank must be >= 0 (0 disables query compression)")
        need(0 <= self.n_dense_layers <= self.n_layers, "n_dense_layers must be between 0 and n_layers")
        if self.n_routed_experts > 0:
            need(0 < self.n_activated_experts <= self.n_routed_experts,
                 "n_activated_experts must be between 1 and n_routed_experts")
            need(self.moe_inter_dim > 0, "moe_inter_dim must be positive")
            need(self.n_routed_experts % self.n_expert_groups == 0,
                 "n_routed_experts must be divisible by n_expert_groups")
            need(1 <= self.n_limited_groups <= self.n_expert_groups,
                 "n_limited_groups must be between 1 and n_expert_groups")
            need(self.n_activated_experts <= self.n_limited_groups * self.n_routed_experts // self.n_expert_groups,
                 "the limited groups hold fewer experts than n_activated_experts")
        need(self.n_mtp_layers >= 0, "n_mtp_layers must be >= 0")

    # ------------------------------------------------------------------ presets and files
    @staticmethod
    def preset(name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise NanoR1Error(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = set(d) - names
        if unknown:
            raise NanoR1Error(f"model config: unknown keys {sorted(unknown)}")
        return ModelConfig(**d)

    def save(self, path: str | Path) -> None:
        from nanor1.common import atomic_write_json
        atomic_write_json(path, self.to_dict())

    @staticmethod
    def load(path: str | Path) -> "ModelConfig":
        from nanor1.common import read_json
        return ModelConfig.from_dict(read_json(path))

    # ------------------------------------------------------------------ accounting
    def param_counts(self) -> dict[str, int]:
        """Parameters of the main model (total, active per token) and of the MTP modules."""
        d, H = self.dim, self.n_heads
        if self.q_lora_rank:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        else:
            q = d * H * self.qk_head_dim
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank \
            + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        attn = q + kv + H * self.v_head_dim * d
        dense_ffn = 3 * d * self.inter_dim
        expert = 3 * d * self.moe_inter_dim
        moe_total = expert * (self.n_routed_experts + self.n_shared_experts) + self.n_routed_experts * d
        moe_active = expert * (self.n_activated_experts + self.n_shared_experts) + self.n_routed_experts * d
        norms = 2 * d
        n_moe = self.n_layers - self.n_dense_layers if self.n_routed_experts else 0
        n_dense = self.n_layers - n_moe
        layers_total = n_dense * (attn + dense_ffn + norms) + n_moe * (attn + moe_total + norms)
        layers_active = n_dense * (attn + dense_ffn + norms) + n_moe * (attn + moe_active + norms)
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        total = embed + layers_total + d + head
        active = embed + layers_active + d + head
        ffn_mtp = moe_total if self.n_routed_experts else dense_ffn
        mtp_layer = attn + ffn_mtp + norms + 3 * d + 2 * d * d  # enorm, hnorm, shared_head.norm, eh_proj
        return {"total": total, "active": active, "mtp": self.n_mtp_layers * mtp_layer}

    def kv_cache_numbers_per_token(self) -> dict[str, int]:
        """Cached numbers per token: MLA keeps (kv_lora_rank + qk_rope_head_dim) per layer; standard MHA of
        the same width keeps every head's key and value."""
        mla = self.n_layers * (self.kv_lora_rank + self.qk_rope_head_dim)
        mha = self.n_layers * self.n_heads * (self.qk_head_dim + self.v_head_dim)
        return {"mla": mla, "mha": mha}


PRESETS: dict[str, ModelConfig] = {
    # for unit tests: every feature on (q compression, MoE with groups, MTP), tiny dimensions
    "tiny": ModelConfig(vocab_size=128, dim=64, n_layers=3, n_heads=4, max_seq_len=64, q_lora_rank=32,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, inter_dim=128,
                        n_dense_layers=1, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                        moe_inter_dim=32, n_expert_groups=2, n_limited_groups=1, route_scale=1.0,
                        n_mtp_layers=1),
    # sized to pretrain in a few minutes on 2 CPU cores (see docs and bench/README.md)
    # (rope 32 + nope 16: copying the question's operands into the reasoning needs positions more than
    # content; a light MTP weight, since two-ahead digits of a random problem are mostly noise)
    "speedrun": ModelConfig(vocab_size=512, dim=192, n_layers=4, n_heads=4, max_seq_len=192, q_lora_rank=0,
                            kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=32, v_head_dim=32,
                            inter_dim=512, n_dense_layers=1, n_routed_experts=8, n_shared_experts=1,
                            n_activated_experts=2, moe_inter_dim=128, n_mtp_layers=1, mtp_loss_weight=0.1,
                            bias_update_speed=0.01),  # a few hundred steps need a faster balancing bias
    # ~100M parameters (about half active): a real small model for a GPU or a long CPU run
    "small": ModelConfig(vocab_size=32768, dim=512, n_layers=12, n_heads=8, max_seq_len=2048, q_lora_rank=256,
                         kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                         inter_dim=1536, n_dense_layers=1, n_routed_experts=12, n_shared_experts=1,
                         n_activated_experts=2, moe_inter_dim=256, n_expert_groups=4, n_limited_groups=2,
                         route_scale=1.0, n_mtp_layers=1),
    # the real DeepSeek-V3 dimensions (config.json of deepseek-ai/DeepSeek-V3)
    "v3": ModelConfig(vocab_size=129280, dim=7168, n_layers=61, n_heads=128, max_seq_len=4096,
                      norm_eps=1e-6, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0, inter_dim=18432,
                      n_dense_layers=3, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8,
                      moe_inter_dim=2048, n_expert_groups=8, n_limited_groups=4, route_scale=2.5,
                      n_mtp_layers=1),
}
