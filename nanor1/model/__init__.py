"""The DeepSeek-V3-style model: config, MLA, MoE, MTP and the transformer that puts them together."""

from nanor1.model.config import PRESETS, ModelConfig
from nanor1.model.mla import KVCache
from nanor1.model.transformer import ModelOutput, Transformer

__all__ = ["ModelConfig", "PRESETS", "Transformer", "ModelOutput", "KVCache"]
