"""`nanor1 export --format hf`: a nanor1 checkpoint as a Hugging Face DeepSeek-V3 folder, and the reverse import.

The export loads in transformers (`AutoModelForCausalLM`, `AutoTokenizer` with the chat template) and has the
config keys and weight names of the released DeepSeek-V3 checkpoints that vLLM and SGLang read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file

from nanor1.checkpoint import MANIFEST, _commit_folder, _tmp_folder, save_checkpoint, verify_manifest, write_manifest
from nanor1.common import NanoR1Error, atomic_write_json
from nanor1.hf_backend import save_tokenizer
from nanor1.model.hf import import_hf, to_hf_config, to_hf_state_dict

# DeepSeek-R1's usage recommendation (model card): temperature 0.5-0.7 (0.6 advised) and top-p 0.95
R1_TEMPERATURE, R1_TOP_P = 0.6, 0.95


def generation_config(tokenizer) -> dict:
    """generation_config.json: special ids and R1's recommended sampling settings."""
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
            "do_sample": True, "temperature": R1_TEMPERATURE, "top_p": R1_TOP_P}


def _parent(folder: Path) -> Path | None:
    """Lineage points at the source only when it has a manifest to hash."""
    return folder if (folder / MANIFEST).is_file() else None


def export_hf(model_path: str | Path, out_dir: str | Path) -> Path:
    """Write config.json, model.safetensors, generation_config.json, tokenizer files and manifest.json.

    `model_path` is a nanor1 checkpoint or run folder (its manifest is verified on load); the folder appears
    in `out_dir` only once complete.
    """
    from nanor1.policy import load_nanor1, resolve_checkpoint
    src = resolve_checkpoint(model_path)
    final = Path(out_dir)
    if final.exists() and final.resolve() == src.resolve():
        raise NanoR1Error(f"{final}: the export folder must differ from the checkpoint it exports")
    model, tok = load_nanor1(src)
    model = model.float().cpu()
    tmp = _tmp_folder(final)
    try:
        atomic_write_json(tmp / "config.json", to_hf_config(model.cfg, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                                            pad_id=tok.pad_id, dtype="float32"))
        save_file(to_hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "generation_config.json", generation_config(tok))
        save_tokenizer(tok, tmp)
        write_manifest(tmp, "export-hf", config={"source": str(src)}, parent=_parent(src),
                       extra={"model_config": model.cfg.to_dict()})
        _commit_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class _TokenizerFiles:
    """Gives any tokenizer the `save(folder)` that save_checkpoint calls (HFTokenizer has none)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def save(self, folder) -> None:
        save_tokenizer(self.tokenizer, folder)


def import_hf_model(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """A DeepSeek-V3-layout Hugging Face folder (e.g. one `export_hf` wrote) as a nanor1 checkpoint."""
    from nanor1.tokenizer import load_tokenizer
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise NanoR1Error(f"{hf_dir}: Hugging Face model folder not found")
    if (hf_dir / MANIFEST).is_file():
        verify_manifest(hf_dir)
    model = import_hf(hf_dir)
    tok = load_tokenizer(hf_dir)
    return save_checkpoint(out_dir, model, tokenizer=_TokenizerFiles(tok), kind="import-hf",
                           run_config={"source": str(hf_dir)}, parent=_parent(hf_dir))
