"""A policy is a model plus its tokenizer, whatever it came from: a nanor1 checkpoint, a DeepSeek-V3-layout
Hugging Face folder (imported as a nanor1 model), or any other local Hugging Face causal LM (including a
GGUF file). Training stages, evaluation and serving only see this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nanor1.checkpoint import is_checkpoint, latest_checkpoint, load_model, save_checkpoint
from nanor1.common import NanoR1Error
from nanor1.engine import Engine


# Compiled, a nanor1 model's shared-prompt forward gave the right logits but wrong gradients under bf16 autocast
# (the last MoE layer's ~100% off when only each prompt's last position was read; float32 and Inductor-free
# backends were right), so GRPO's compile=true is for Llama-family policies only (docs/grpo.md).
COMPILE_REFUSED = ("compile=true is not available for nanor1 policies: under torch 2.13 their compiled update gave "
                   "wrong gradients in bf16 (docs/grpo.md); run with compile=false")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or a run folder's `final` (else its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise NanoR1Error(f"{path}: model not found")
    if is_checkpoint(path) or (path / "config.json").is_file() or path.suffix == ".gguf":
        return path
    if is_checkpoint(path / "final"):
        return path / "final"
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise NanoR1Error(f"{path}: not a nanor1 checkpoint, run folder or Hugging Face model folder")


def load_nanor1(path: str | Path):
    """(Transformer, tokenizer) from a nanor1 checkpoint/run folder or a DeepSeek-V3-layout HF folder."""
    from nanor1.tokenizer import load_tokenizer
    path = resolve_checkpoint(path)
    if is_checkpoint(path):
        model = load_model(path)
    elif (path / "config.json").is_file():
        from nanor1.checkpoint import MANIFEST, verify_manifest
        from nanor1.model.hf import import_hf
        if (path / MANIFEST).is_file():
            verify_manifest(path)
        model = import_hf(path)
    else:
        raise NanoR1Error(f"{path}: not a nanor1 model; load it with load_policy instead")
    return model.eval(), load_tokenizer(path)


@dataclass
class Policy:
    model: torch.nn.Module  # nanor1 Transformer, or a transformers PreTrainedModel
    tokenizer: object
    kind: str  # "nanor1" or "hf"
    source: Path

    def logits(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, V) logits of a right-padded batch (padding only after each sequence)."""
        if self.kind == "nanor1":
            return self.model(idx).logits
        return self.model(input_ids=idx, attention_mask=attention_mask).logits

    def continuation_logits(self, prompts: torch.Tensor, prompt_lens: torch.Tensor, inputs: torch.Tensor,
                            attention: torch.Tensor, compile: bool = False,
                            replay: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, T + 1, V) logits for G = B // n right-padded continuations (B, T) of each of n right-padded prompts
        (n, P), each prompt run once; attention: (B, T) True on real continuation tokens. `compile`: under
        torch.compile for Llama-family models (other Hugging Face architectures run transformers' forward; nanor1
        models refuse it, see COMPILE_REFUSED). `replay`: the matmul outputs the rollout recorded for these tokens
        (Llama-family models only, `replays`; nanor1/replay.py)."""
        if self.kind == "nanor1":
            if compile:
                raise NanoR1Error(COMPILE_REFUSED)
            return self.model.forward_shared_prompts(prompts, prompt_lens, inputs, attention)
        from nanor1.hf_llama import FastLlama, supports
        if supports(self.model, prompts.shape[1] + inputs.shape[1], training=self.model.training):
            return FastLlama(self.model).continuation_logits(prompts, prompt_lens, inputs, attention, compile, replay)
        if replay is not None:
            raise ValueError("replay is for policies that FastLlama runs; check Policy.replays first")
        from nanor1.hf_backend import shared_prompt_logits
        return shared_prompt_logits(self.model, prompts, prompt_lens, inputs, attention)

    def replays(self, engine: Engine, max_len: int) -> bool:
        """Whether `engine` (one of this policy's) can record its matmul outputs for `continuation_logits` to
        replay, at up to `max_len` tokens: both run a Llama-family model through FastLlama."""
        from nanor1.hf_llama import FastLlama, supports
        return self.kind == "hf" and isinstance(getattr(engine.backend, "model", None), FastLlama) and \
            supports(self.model, max_len, training=True)

    def engine(self, max_batch: int = 64, max_seq_len: int | None = None, seed: int = 0,
               compile: bool = False) -> Engine:
        """An engine that samples from this policy. `compile`: decode steps under torch.compile, for Llama-family
        models (other Hugging Face architectures sample through transformers' forward; nanor1 models refuse it),
        except where nanor1's CPU decode kernels run them, which is faster (nanor1/cpu_decode.py)."""
        if self.kind == "nanor1":
            if compile:
                raise NanoR1Error("compiled sampling is for Llama-family policies; run with compile=false")
            return Engine(self.model, self.tokenizer, max_batch=max_batch, max_seq_len=max_seq_len, seed=seed)
        from nanor1.engine import ModelBackend
        from nanor1.hf_backend import HFBackend
        from nanor1.hf_llama import FastLlama, supports
        if supports(self.model, min(max_seq_len or self.max_seq_len, self.max_seq_len)):
            backend = ModelBackend(FastLlama(self.model, compile), max_batch, max_seq_len)
        else:  # any other architecture runs through transformers' own forward
            backend = HFBackend(self.model, max_batch, max_seq_len, pad_id=self.tokenizer.pad_id or 0)
        return Engine(None, self.tokenizer, backend=backend, seed=seed)

    def save(self, folder: str | Path, **kwargs) -> Path:
        if self.kind == "nanor1":
            # the live model, not a moved copy: GRPO keeps training it after each checkpoint (on a GPU, a model
            # moved to the CPU here broke every later step)
            return save_checkpoint(folder, self.model, tokenizer=self.tokenizer, **kwargs)
        from nanor1.hf_backend import save_hf_policy
        return save_hf_policy(folder, self.model, self.tokenizer, **kwargs)

    @property
    def max_seq_len(self) -> int:
        if self.kind == "nanor1":
            return self.model.cfg.max_seq_len
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def load_policy(path: str | Path, device: torch.device | None = None) -> Policy:
    """Any supported model folder (or .gguf file) as a Policy on `device` (default CPU)."""
    path = resolve_checkpoint(path)
    device = device or torch.device("cpu")
    if is_checkpoint(path) or _is_deepseek_v3(path):
        model, tok = load_nanor1(path)
        return Policy(model.to(device), tok, "nanor1", path)
    from nanor1.hf_backend import load_hf_causal_lm
    model, tok = load_hf_causal_lm(path)
    if device.type == "cpu":
        # transformers' eager attention beats its SDPA flash kernel on CPUs: the GRPO update of bench/grpo_bench.py's
        # model ran 1.16x faster with it, forward + backward (bench/README.md, GRPO); GPUs keep SDPA
        model.set_attn_implementation("eager")
    return Policy(model.to(device), tok, "hf", path)


def _is_deepseek_v3(path: Path) -> bool:
    import json
    cfg = path / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "deepseek_v3"
