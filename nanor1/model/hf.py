"""Interchange with the Hugging Face `DeepseekV3ForCausalLM` layout (config.json + safetensors).

Export writes the layout of the released DeepSeek-V3 checkpoints: one tensor per routed expert, MTP modules
as extra layers `model.layers.{num_hidden_layers + k}.*` with their own copies of the embedding and head,
and the config keys vLLM's loader reads. Import takes that layout (or transformers' stacked-expert one).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from nanor1.common import NanoR1Error
from nanor1.model.config import ModelConfig
from nanor1.model.transformer import Transformer


def to_hf_config(cfg: ModelConfig, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, dtype: str = "float32") -> dict:
    n_dense = cfg.n_dense_layers if cfg.n_routed_experts else cfg.n_layers
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "n_shared_experts": cfg.n_shared_experts,
        "n_routed_experts": max(cfg.n_routed_experts, 1),
        "num_experts_per_tok": cfg.n_activated_experts if cfg.n_routed_experts else 1,
        "routed_scaling_factor": cfg.route_scale,
        "n_group": cfg.n_expert_groups,
        "topk_group": cfg.n_limited_groups,
        "first_k_dense_replace": n_dense,
        "norm_topk_prob": cfg.norm_topk_prob,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "moe_layer_freq": 1,
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank or None,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_interleave": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "num_nextn_predict_layers": cfg.n_mtp_layers,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def from_hf_config(hf: dict) -> ModelConfig:
    if hf.get("model_type") not in ("deepseek_v3", "deepseek_v2"):
        raise NanoR1Error(f"config.json has model_type {hf.get('model_type')!r}; only DeepSeek-V3-layout "
                          "models import as nanor1 models (load other HF models as policies instead)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if (rope.get("rope_type") or scaling.get("type") or "default") not in ("default", None):
        raise NanoR1Error("config.json uses scaled RoPE (e.g. YaRN); nanor1 implements plain RoPE only")
    n_layers = hf["num_hidden_layers"]
    first_dense = hf.get("first_k_dense_replace", 0)
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=n_layers,
        n_heads=hf["num_attention_heads"], max_seq_len=hf.get("max_position_embeddings", 4096),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02),
        q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"], rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        inter_dim=hf["intermediate_size"], n_dense_layers=min(first_dense, n_layers),
        n_routed_experts=hf["n_routed_experts"] if first_dense < n_layers else 0,
        n_shared_experts=hf.get("n_shared_experts", 1), n_activated_experts=hf.get("num_experts_per_tok", 1),
        moe_inter_dim=hf["moe_intermediate_size"], n_expert_groups=hf.get("n_group") or 1,
        n_limited_groups=hf.get("topk_group") or 1, route_scale=hf.get("routed_scaling_factor", 1.0),
        norm_topk_prob=hf.get("norm_topk_prob", True), n_mtp_layers=hf.get("num_nextn_predict_layers", 0),
    )


_MTP_RENAMES = {"norm.weight": "shared_head.norm.weight"}


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """nanor1 parameter names -> the released-checkpoint names (contiguous tensors, no shared storage)."""
    cfg, out = model.cfg, {}
    sd = model.state_dict()

    def put_layer(prefix: str, key: str, t: torch.Tensor) -> None:
        m = re.fullmatch(r"mlp\.(w_gate|w_up|w_down)", key)
        if m:
            name = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}[m.group(1)]
            for e in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{e}.{name}.weight"] = t[e].clone()
        else:
            out[prefix + key] = t.clone()

    for key, t in sd.items():
        if key.startswith("layers."):
            i, rest = key.split(".", 2)[1:]
            put_layer(f"model.layers.{i}.", rest, t)
        elif key.startswith("mtp."):
            k, rest = key.split(".", 2)[1:]
            put_layer(f"model.layers.{cfg.n_layers + int(k)}.", _MTP_RENAMES.get(rest, rest), t)
        elif key == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[key] = t.clone()
        else:
            out["model." + key] = t.clone()
    for k in range(cfg.n_mtp_layers):  # released checkpoints give each MTP module its own embedding and head
        p = f"model.layers.{cfg.n_layers + k}."
        out[p + "embed_tokens.weight"] = sd["embed_tokens.weight"].clone()
        out[p + "shared_head.head.weight"] = sd["lm_head.weight"].clone()
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The released-checkpoint names (or transformers' stacked experts) -> nanor1 names."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, t in hf.items():
        if not key.startswith("model.layers."):
            if key.startswith("model."):
                out[key[len("model."):]] = t
            elif key == "lm_head.weight":
                out[key] = t
            continue
        i, rest = key[len("model.layers."):].split(".", 1)
        i = int(i)
        prefix = f"layers.{i}." if i < cfg.n_layers else f"mtp.{i - cfg.n_layers}."
        if i >= cfg.n_layers + cfg.n_mtp_layers:
            continue
        if i >= cfg.n_layers:
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # copies of the shared embedding and head
            rest = {v: k for k, v in _MTP_RENAMES.items()}.get(rest, rest)
        m = re.fullmatch(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", rest)
        if m:
            experts.setdefault((prefix, m.group(2)), {})[int(m.group(1))] = t
        elif rest == "mlp.experts.gate_up_proj":  # transformers' own stacked layout
            gate, up = t.chunk(2, dim=1)
            out[prefix + "mlp.w_gate"], out[prefix + "mlp.w_up"] = gate, up
        elif rest == "mlp.experts.down_proj":
            out[prefix + "mlp.w_down"] = t
        else:
            out[prefix + rest] = t
    names = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}
    for (prefix, name), per_expert in experts.items():
        if sorted(per_expert) != list(range(cfg.n_routed_experts)):
            raise NanoR1Error(f"checkpoint has experts {sorted(per_expert)} for {prefix}, expected "
                              f"0..{cfg.n_routed_experts - 1}")
        out[prefix + "mlp." + names[name]] = torch.stack([per_expert[e] for e in range(cfg.n_routed_experts)])
    if cfg.tie_embeddings or "lm_head.weight" not in out:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def load_hf_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF model folder (single file or sharded), safetensors only."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise NanoR1Error(f"{path}: no .safetensors weights found (nanor1 never loads pickle checkpoints)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise NanoR1Error(f"{f}: cannot read safetensors ({e}); the file is damaged or truncated") from None
    return sd


def import_hf(path: str | Path) -> Transformer:
    """A nanor1 model from a Hugging Face DeepSeek-V3-layout folder."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise NanoR1Error(f"{path}: no config.json; is this a Hugging Face model folder?")
    cfg = from_hf_config(json.loads(cfg_file.read_text()))
    model = Transformer(cfg)
    sd = from_hf_state_dict(load_hf_weights(path), cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise NanoR1Error(f"{path}: weights do not match config.json (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    return model
