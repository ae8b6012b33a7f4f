"""`nanor1 info`: what a model costs, from its config alone (nothing is built, so `--preset v3` is instant).

Parameters total / active per token / MTP (DeepSeek-V3 section 2), the KV cache per token of MLA against
standard multi-head attention of the same width (DeepSeek-V2 section 2.1.4), and the layer/expert layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from nanor1.common import NanoR1Error
from nanor1.model.config import ModelConfig

BYTES = {"bf16": 2, "fp32": 4}


def human(n: float) -> str:
    """671026404352 -> '671.0B'; numbers below a thousand stay as they are."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:g}"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:g} B"


def model_stats(cfg: ModelConfig) -> dict:
    """Every number `nanor1 info` prints, as a dict (pure arithmetic on the config)."""
    params = cfg.param_counts()
    kv = cfg.kv_cache_numbers_per_token()
    n_moe = cfg.n_layers - cfg.n_dense_layers if cfg.n_routed_experts else 0
    return {
        "params": params,
        "active_fraction": params["active"] / params["total"],
        "kv_numbers": kv,
        "kv_bytes": {attn: {dt: n * b for dt, b in BYTES.items()} for attn, n in kv.items()},
        "kv_saving": kv["mha"] / kv["mla"],
        "n_dense_layers": cfg.n_layers - n_moe,
        "n_moe_layers": n_moe,
        "expert_params": 3 * cfg.dim * cfg.moe_inter_dim if cfg.n_routed_experts else 0,
    }


def _layer_ranges(cfg: ModelConfig, n_dense: int) -> str:
    def span(a: int, b: int) -> str:
        return f"layer {a}" if a == b else f"layers {a}-{b}"
    parts = []
    if n_dense:
        parts.append(f"{span(0, n_dense - 1)} dense FFN with inter_dim {cfg.inter_dim}")
    if n_dense < cfg.n_layers:
        parts.append(f"{span(n_dense, cfg.n_layers - 1)} MoE")
    return "; ".join(parts)


def format_info(cfg: ModelConfig, title: str) -> str:
    s = model_stats(cfg)
    p, kvn, kvb = s["params"], s["kv_numbers"], s["kv_bytes"]
    lines = [
        f"model: {title}",
        f"parameters: {human(p['total'])} total ({p['total']:,}), {human(p['active'])} active per token "
        f"({p['active']:,}, {100 * s['active_fraction']:.1f}%), MTP {human(p['mtp'])} more ({p['mtp']:,}, "
        f"{cfg.n_mtp_layers} module{'s' if cfg.n_mtp_layers != 1 else ''})",
        f"shape: dim {cfg.dim}, {cfg.n_heads} heads, vocab {cfg.vocab_size:,}, context {cfg.max_seq_len:,}"
        f"{', tied embeddings' if cfg.tie_embeddings else ''}",
        f"layers: {cfg.n_layers} = {s['n_dense_layers']} dense + {s['n_moe_layers']} MoE "
        f"({_layer_ranges(cfg, s['n_dense_layers'])})",
    ]
    if s["n_moe_layers"]:
        lines.append(
            f"experts: {cfg.n_routed_experts} routed + {cfg.n_shared_experts} shared per MoE layer, "
            f"{cfg.n_activated_experts} routed active per token, {human(s['expert_params'])} parameters each "
            f"(moe_inter_dim {cfg.moe_inter_dim}); routing: sigmoid scores, top {cfg.n_limited_groups} of "
            f"{cfg.n_expert_groups} groups, scale {cfg.route_scale:g}")
    lines += [
        f"attention: MLA, q_lora_rank {cfg.q_lora_rank or 'off'}, kv_lora_rank {cfg.kv_lora_rank}, "
        f"head dims nope {cfg.qk_nope_head_dim} + rope {cfg.qk_rope_head_dim}, v {cfg.v_head_dim}",
        f"KV cache per token: MLA {kvn['mla']:,} numbers = {kvb['mla']['bf16']:,} B bf16 / "
        f"{kvb['mla']['fp32']:,} B fp32; standard MHA of the same width {kvn['mha']:,} numbers = "
        f"{kvb['mha']['bf16']:,} B bf16 / {kvb['mha']['fp32']:,} B fp32; MLA saves {s['kv_saving']:.1f}x",
        f"KV cache for one {cfg.max_seq_len:,}-token sequence (bf16): MLA "
        f"{human_bytes(kvb['mla']['bf16'] * cfg.max_seq_len)}, MHA {human_bytes(kvb['mha']['bf16'] * cfg.max_seq_len)}",
    ]
    return "\n".join(lines)


def _config_of(path: str | Path) -> ModelConfig:
    from nanor1.checkpoint import is_checkpoint
    from nanor1.model.hf import from_hf_config
    from nanor1.policy import resolve_checkpoint
    folder = resolve_checkpoint(path)
    if is_checkpoint(folder):
        return ModelConfig.load(folder / "model_config.json")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise NanoR1Error(f"{folder}: info needs a nanor1 checkpoint or a DeepSeek-V3-layout folder")
    try:
        hf = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoR1Error(f"{cfg_file}: not valid JSON ({e})") from None
    return from_hf_config(hf)


def model_info(preset: str | None = None, path: str | None = None) -> str:
    """`nanor1 info --preset v3` or `nanor1 info MODEL`: the report as text."""
    if (preset is None) == (path is None):
        raise NanoR1Error("give either a preset (--preset NAME) or a model folder, not both or neither")
    if preset is not None:
        return format_info(ModelConfig.preset(preset), f"preset {preset}")
    return format_info(_config_of(path), str(path))
