"""Checkpoints and artifact manifests: safetensors + JSON only, written atomically, verified on load.

A checkpoint is a folder: model.safetensors, model_config.json, tokenizer files, optionally
train_state.safetensors + train_state.json (optimizer, RNG and data position for exact resume), and
manifest.json written last (SHA-256 of every file, config, code version, seeds, parent's manifest hash).
The folder is built under a temporary name and renamed into place, so a crash leaves the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanor1.common import NanoR1Error, atomic_write_json, atomic_write_text, code_version, read_json, sha256_bytes, \
    sha256_file
from nanor1.model import ModelConfig, Transformer

MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------- manifests

def write_manifest(folder: str | Path, kind: str, config: Any = None, parent: str | Path | None = None,
                   seeds: dict | None = None, extra: dict | None = None) -> dict:
    """Hash every file in `folder` and write manifest.json last. `parent` is the parent artifact's folder."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    manifest = {
        "kind": kind,
        "files": files,
        "config": config,
        "code_version": code_version(),
        "torch_version": torch.__version__,
        "seeds": seeds or {},
        # a parent without a manifest (e.g. a Hugging Face folder) is still named, just not hashed
        "parent": manifest_hash(parent) if parent and (Path(parent) / MANIFEST).is_file() else None,
        "parent_path": str(parent) if parent else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def input_hashes(inputs: dict | None) -> dict:
    if not inputs:
        return {}
    return {"inputs": {name: {"path": str(p), "manifest": manifest_hash(p)} for name, p in inputs.items()}}


def manifest_hash(folder: str | Path) -> str:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise NanoR1Error(f"{folder}: no {MANIFEST}; the artifact is incomplete (was its write interrupted?)")
    return sha256_bytes(path.read_bytes())


def verify_manifest(folder: str | Path) -> dict:
    """Check every file named in the manifest exists and has its recorded hash; return the manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NanoR1Error(f"{folder}: not found")
    manifest = read_json(folder / MANIFEST) if (folder / MANIFEST).exists() else None
    if manifest is None:
        raise NanoR1Error(f"{folder}: no {MANIFEST}; the artifact is incomplete (was its write interrupted?)")
    for name, digest in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise NanoR1Error(f"{path}: missing (listed in {MANIFEST})")
        if sha256_file(path) != digest:
            raise NanoR1Error(f"{path}: SHA-256 does not match {MANIFEST}; the file was changed or truncated")
    return manifest


# ----------------------------------------------------------------------------- atomic folders

def _commit_folder(tmp: Path, final: Path) -> None:
    """Move a fully written temp folder into place; an existing folder is replaced only after success."""
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _tmp_folder(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    return tmp


# ----------------------------------------------------------------------------- optimizer state <-> safetensors

def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_train_state(folder: Path, optimizer=None, train_state: dict | None = None) -> None:
    """Optimizer tensors + torch RNG as safetensors, the rest (step, data position) as JSON; nothing when
    there is no state to resume."""
    if optimizer is None and train_state is None:
        return
    tensors, meta = _flatten_optimizer(optimizer) if optimizer is not None else ({}, {})
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(folder / "train_state.safetensors"))
    atomic_write_json(folder / "train_state.json", {"optimizer": meta, **(train_state or {})})


# ----------------------------------------------------------------------------- save / load

def save_checkpoint(folder: str | Path, model: Transformer, *, tokenizer=None, optimizer=None,
                    train_state: dict | None = None, kind: str = "checkpoint", run_config: Any = None,
                    parent: str | Path | None = None, seeds: dict | None = None, inputs: dict | None = None) -> Path:
    """Write a complete checkpoint folder atomically and return its path. The model stays where it is (copies
    of its weights are written from the CPU). `inputs` names other artifacts the result was made from
    ({"data": folder}); their manifest hashes are recorded beside the parent's, so lineage covers data as well
    as weights."""
    final = Path(folder)
    tmp = _tmp_folder(final)
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                   if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt", "nanor1": "1"})
        model.cfg.save(tmp / "model_config.json")
        if tokenizer is not None:
            tokenizer.save(tmp)
        save_train_state(tmp, optimizer, train_state)
        write_manifest(tmp, kind, config=run_config, parent=parent, seeds=seeds,
                       extra={"model_config": model.cfg.to_dict(), **input_hashes(inputs)})
        _commit_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def is_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / "model_config.json").is_file()


def load_model(folder: str | Path, *, verify: bool = True, expect: ModelConfig | None = None) -> Transformer:
    """A nanor1 model from a checkpoint folder, after checking the manifest hashes (and config if given)."""
    folder = Path(folder)
    if verify:
        verify_manifest(folder)
    cfg = ModelConfig.load(folder / "model_config.json")
    if expect is not None and cfg != expect:
        diff = {k: (v, getattr(cfg, k)) for k, v in expect.to_dict().items() if getattr(cfg, k) != v}
        raise NanoR1Error(f"{folder}: model config does not match the run's (expected, found): {diff}")
    try:
        sd = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise NanoR1Error(f"{folder / 'model.safetensors'}: cannot read ({e})") from None
    model = Transformer(cfg)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise NanoR1Error(f"{folder / 'model.safetensors'}: weights do not match model_config.json "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def load_train_state(folder: str | Path, optimizer=None) -> dict:
    """Restore optimizer and torch RNG from a checkpoint; returns the saved train_state dict."""
    folder = Path(folder)
    path = folder / "train_state.safetensors"
    if not path.is_file():
        raise NanoR1Error(f"{folder}: no train_state.safetensors; it cannot be resumed (was it an export?)")
    tensors = load_file(str(path))
    meta = read_json(folder / "train_state.json")
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    torch.set_rng_state(tensors["rng.torch"])
    return {k: v for k, v in meta.items() if k != "optimizer"}


# ----------------------------------------------------------------------------- run folders

def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (`ckpt/latest` names it), or None."""
    pointer = Path(run_dir) / "ckpt" / "latest"
    if not pointer.is_file():
        return None
    path = Path(run_dir) / "ckpt" / pointer.read_text().strip()
    return path if (path / MANIFEST).is_file() else None


def save_run_checkpoint(run_dir: str | Path, step: int, model: Transformer | None = None, keep: int = 2,
                        save=None, **kwargs) -> Path:
    """Save ckpt/step_<7-digit step> (with `save(folder)` if given, else save_checkpoint of `model`), point
    ckpt/latest at it, and keep only the newest `keep` checkpoints."""
    ckpt_dir = Path(run_dir) / "ckpt"
    folder = ckpt_dir / f"step_{step:07d}"
    path = save(folder) if save is not None else save_checkpoint(folder, model, **kwargs)
    atomic_write_text(ckpt_dir / "latest", path.name + "\n")
    steps = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def read_manifest(folder: str | Path) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())


def verify_run(run_dir: str | Path) -> dict:
    """Verify every artifact's manifest under a run folder (checkpoints in ckpt/ excluded) and that each
    recorded parent/input hash equals the current manifest hash of that artifact. Returns
    {"artifacts": {path: kind}, "links": n_checked}; raises NanoR1Error naming the first problem."""
    run_dir = Path(run_dir)
    artifacts, links = {}, 0
    for m in sorted(run_dir.rglob(MANIFEST)):
        folder = m.parent
        if "ckpt" in folder.relative_to(run_dir).parts:
            continue
        manifest = verify_manifest(folder)
        artifacts[str(folder.relative_to(run_dir))] = manifest["kind"]
        refs = [(manifest.get("parent_path"), manifest.get("parent"))]
        refs += [(v["path"], v["manifest"]) for v in manifest.get("inputs", {}).values()]
        for path, digest in refs:
            if path and digest:
                if manifest_hash(path) != digest:
                    raise NanoR1Error(f"{folder}: its parent {path} changed after it was made (manifest hash differs)")
                links += 1
    if not artifacts:
        raise NanoR1Error(f"{run_dir}: no artifacts with a {MANIFEST}")
    return {"artifacts": artifacts, "links": links}


def lineage(folder: str | Path) -> list[Path]:
    """The chain of parents from an artifact back to its root (e.g. distilled student -> ... -> tokenizer)."""
    chain, folder = [], Path(folder)
    while folder is not None and (folder / MANIFEST).is_file() and folder not in chain:
        chain.append(folder)
        parent = read_manifest(folder).get("parent_path")
        folder = Path(parent) if parent else None
    return chain
