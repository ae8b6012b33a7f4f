"""Any local Hugging Face causal LM (a folder of safetensors or a .gguf file) as a nanor1 policy.

`HFBackend` runs the model under the engine's `Backend` interface with a `transformers.DynamicCache`, one wave
of requests at a time; `load_hf_causal_lm` / `save_hf_policy` read and write such models (never pickle).
"""

from __future__ import annotations

import importlib.util
import inspect
import shutil
from pathlib import Path
from typing import Any

import torch

from nanor1.common import NanoR1Error

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _cache_kw(model) -> str:
    # transformers 5.x renamed `past_key_values` to `cache` model by model; use whichever this one takes
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class HFBackend:
    """A transformers causal LM behind the engine's Backend protocol.

    A wave of prompts is left-padded into one batch (attention mask + explicit position ids) and prefilled
    into a DynamicCache; each decode feeds one token per row of the wave. Rows whose request finished get a
    pad token with mask 0, so they never influence live rows. The cache cannot take a new row mid-wave, hence
    `continuous = False`: the engine admits the next wave only once this one is done.
    """
    continuous = False

    def __init__(self, model, n_slots: int, max_seq_len: int | None = None, pad_id: int = 0):
        self.model = model.eval()
        self.n_slots = n_slots
        limit = int(getattr(model.config, "max_position_embeddings", None) or 1 << 30)
        self.max_seq_len = min(max_seq_len or limit, limit)
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self._cache_kw = _cache_kw(model)
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._reset()

    def _reset(self) -> None:
        self.cache = None
        self.rows: dict[int, int] = {}  # slot -> row of the wave batch
        self.live: set[int] = set()  # slots whose request has not been released
        self.mask = self.positions = None  # (B, L) attention mask over the cache, (B,) next position

    def _forward(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {self._cache_kw: self.cache, "use_cache": True}
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        with torch.no_grad():
            out = self.model(input_ids=idx, attention_mask=self.mask, position_ids=positions, **kwargs)
        return out.logits[:, -1].float()  # (B, V)

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        from transformers import DynamicCache
        if self.live:
            raise RuntimeError("HFBackend.prefill while a wave is running; the engine must wait (continuous=False)")
        from nanor1.engine import distinct_prompts
        self._reset()
        distinct, inverse = distinct_prompts(prompts)  # a GRPO group's rows share one prompt: run it once
        B, T = len(distinct), max(len(p) for p in distinct)
        idx = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        for i, p in enumerate(distinct):  # left padding: every row's last prompt token sits at column T-1
            idx[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
        # positions count real tokens only, as transformers' generate() does; pads get 0 (masked anyway)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.mask = mask.to(self.device)
        self.cache = DynamicCache(config=self.model.config)
        logits = self._forward(idx.to(self.device), positions.to(self.device))
        inverse = inverse.to(self.device)
        if B < len(prompts):
            self.cache.batch_select_indices(inverse)
            self.mask = self.mask[inverse]
        self.rows = {s: i for i, s in enumerate(slots)}
        self.live = set(slots)
        self.positions = torch.tensor([len(p) for p in prompts], device=self.device)
        return logits[inverse]

    def decode(self, tokens: torch.Tensor, slots: list[int]) -> torch.Tensor:
        B = len(self.rows)
        rows = torch.tensor([self.rows[s] for s in slots], device=self.device)
        idx = torch.full((B,), self.pad_id, dtype=torch.long, device=self.device)
        idx[rows] = tokens.to(self.device)
        step_mask = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        step_mask[rows] = 1
        self.mask = torch.cat([self.mask, step_mask], dim=1)  # (B, L + 1)
        logits = self._forward(idx[:, None], self.positions[:, None])
        self.positions = self.positions + 1
        return logits[rows]

    def release(self, slot: int) -> None:
        self.live.discard(slot)
        if not self.live:
            self._reset()  # drop the wave's cache at once; the next prefill starts a new one


def shared_prompt_logits(model, prompts: torch.Tensor, prompt_lens: torch.Tensor, inputs: torch.Tensor,
                         attention: torch.Tensor) -> torch.Tensor:
    """`Transformer.forward_shared_prompts` for a transformers causal LM: the n right-padded prompts run once
    into a DynamicCache, which is repeated G times (keeping the autograd graph) for the continuations to attend
    to; attention: (B, T) True on the continuations' real tokens. Returns (B, T + 1, V) logits."""
    from transformers import DynamicCache
    n, P = prompts.shape
    B, T = inputs.shape
    if B % n:
        raise ValueError(f"{B} continuations do not split evenly over {n} prompts")
    g = B // n
    cache_kw = _cache_kw(model)
    keep = torch.arange(P, device=prompts.device)[None, :] < prompt_lens[:, None]
    cache = DynamicCache(config=model.config)
    ends, kw = prompt_lens - 1, {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        # only each prompt's last position is scored: the output head runs at those columns, not all P
        kw["logits_to_keep"], ends = torch.unique(ends, return_inverse=True)
    out = model(input_ids=prompts, attention_mask=keep.long(), use_cache=True, **{cache_kw: cache}, **kw)
    first = out.logits[torch.arange(n, device=prompts.device), ends].repeat_interleave(g, 0)[:, None]
    if T == 0:
        return first
    cache.batch_repeat_interleave(g)
    mask = torch.cat((keep.repeat_interleave(g, 0), attention.bool()), dim=1).long()
    pos = prompt_lens.repeat_interleave(g, 0)[:, None] + torch.arange(T, device=inputs.device)
    out = model(input_ids=inputs, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: cache})
    return torch.cat((first, out.logits), dim=1)


# ----------------------------------------------------------------------------- files

def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def _check_safetensors(folder: Path) -> None:
    """Open every safetensors header, so a damaged file is named in a one-line error before loading."""
    from safetensors import safe_open
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # safetensors raises its own (Rust) error types
            raise NanoR1Error(f"{f}: cannot read safetensors ({e}); the file is damaged or truncated") from None


def load_hf_causal_lm(path: str | Path):
    """(model, tokenizer) from a local HF folder (config.json + safetensors) or a .gguf file, float32 on CPU.

    Nothing is downloaded and pickle weights (.bin/.pt) are refused: unpickling runs arbitrary code.
    A folder written by `save_hf_policy` has its manifest hashes checked first.
    """
    from transformers import AutoModelForCausalLM
    from nanor1.checkpoint import MANIFEST, verify_manifest
    from nanor1.tokenizer import load_tokenizer
    path = Path(path)
    if not path.exists():
        raise NanoR1Error(f"{path}: model not found")
    kwargs: dict[str, Any] = {"dtype": torch.float32, "local_files_only": True}
    if _is_gguf(path):
        if importlib.util.find_spec("gguf") is None:  # transformers would raise an ImportError deep in its loader
            raise NanoR1Error(f"{path}: reading a .gguf file needs the gguf package; pip install gguf")
        source, kwargs["gguf_file"] = path.parent, path.name
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise NanoR1Error(f"{path}: no config.json; is this a Hugging Face model folder?")
        if not any(path.glob("*.safetensors")):
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            if pickles:
                raise NanoR1Error(f"{path / pickles[0]}: pickle weights are not loaded (unsafe); convert the "
                                  "model to safetensors first")
            raise NanoR1Error(f"{path}: no .safetensors weights found")
        if (path / MANIFEST).is_file():
            verify_manifest(path)
        _check_safetensors(path)
        source, kwargs["use_safetensors"] = path, True
    else:
        raise NanoR1Error(f"{path}: not a model folder or a .gguf file")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise NanoR1Error(f"{path}: cannot load the model ({first})") from None
    if _is_gguf(path) and getattr(model, "hf_quantizer", None) is not None:
        # transformers dequantizes GGUF tensors to plain float32 weights on load; the quantizer marker it leaves
        # behind would only block save_pretrained (a trained policy must be savable) and .float()
        model.hf_quantizer.remove_quantization_config(model)
    return model.eval(), load_tokenizer(path)


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """nanor1's Tokenizer saves itself; an HFTokenizer saves its wrapped transformers tokenizer."""
    if hasattr(tokenizer, "save"):
        tokenizer.save(folder)
    else:
        tokenizer.hf.save_pretrained(str(folder))


def save_hf_policy(folder: str | Path, model, tokenizer, *, kind: str = "checkpoint", run_config: Any = None,
                   parent: str | Path | None = None, seeds: dict | None = None, optimizer=None,
                   train_state: dict | None = None) -> Path:
    """Write an HF policy atomically: safetensors weights, config, tokenizer, train state, manifest.json last.

    Optimizer and RNG state use the same train_state.{safetensors,json} files as nanor1 checkpoints, so
    `nanor1.checkpoint.load_train_state` resumes from either.
    """
    from nanor1.checkpoint import _commit_folder, _tmp_folder, save_train_state, write_manifest
    final = Path(folder)
    tmp = _tmp_folder(final)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        save_train_state(tmp, optimizer, train_state)
        write_manifest(tmp, kind, config=run_config, parent=parent, seeds=seeds,
                       extra={"hf_architectures": list(getattr(model.config, "architectures", None) or [])})
        _commit_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
