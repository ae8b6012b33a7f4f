"""Checkpoints: safetensors + manifest, atomic writes, and one clear line for every kind of damage."""

import json
import subprocess
import sys

import pytest
import torch

from nanor1.checkpoint import (latest_checkpoint, load_model, manifest_hash, save_checkpoint, save_run_checkpoint,
                               verify_manifest)
from nanor1.common import NanoR1Error
from nanor1.model import ModelConfig, Transformer


@pytest.fixture
def ckpt(tmp_path):
    model = Transformer(ModelConfig.preset("tiny")).init_weights(0)
    return save_checkpoint(tmp_path / "ckpt", model, kind="test", seeds={"seed": 0}), model


def test_roundtrip_and_manifest(ckpt, tmp_path):
    path, model = ckpt
    manifest = verify_manifest(path)
    assert set(manifest["files"]) == {"model.safetensors", "model_config.json"}
    assert manifest["kind"] == "test" and manifest["seeds"] == {"seed": 0} and manifest["code_version"]
    loaded = load_model(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    child = save_checkpoint(tmp_path / "child", loaded, parent=path)
    assert verify_manifest(child)["parent"] == manifest_hash(path)  # lineage


def test_no_pickle_anywhere(ckpt):
    path, _ = ckpt
    for f in path.iterdir():
        assert f.suffix in (".safetensors", ".json"), f


def test_truncated_weights_are_named(ckpt):
    path, _ = ckpt
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(NanoR1Error, match="model.safetensors: SHA-256 does not match"):
        load_model(path)
    with pytest.raises(NanoR1Error, match="model.safetensors: cannot read"):
        load_model(path, verify=False)


def test_missing_and_mismatched(ckpt, tmp_path):
    path, _ = ckpt
    with pytest.raises(NanoR1Error, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(NanoR1Error, match="model config does not match"):
        load_model(path, expect=ModelConfig.preset("tiny", dim=32))
    (path / "model_config.json").write_text(json.dumps({"dim": 3}))
    with pytest.raises(NanoR1Error, match="model_config.json: SHA-256"):
        load_model(path)
    (path / "manifest.json").unlink()
    with pytest.raises(NanoR1Error, match="incomplete"):
        load_model(path)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    model = Transformer(ModelConfig.preset("tiny")).init_weights(0)
    first = save_run_checkpoint(tmp_path, 1, model)

    class Boom(Exception):
        pass

    class BadTokenizer:
        def save(self, folder):
            raise Boom  # the process dies half-way through writing step 2

    with pytest.raises(Boom):
        save_run_checkpoint(tmp_path, 2, model, tokenizer=BadTokenizer())
    assert latest_checkpoint(tmp_path) == first and verify_manifest(first)
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_cli_prints_one_line_for_a_bad_checkpoint(ckpt, tmp_path):
    path, _ = ckpt
    (path / "model.safetensors").write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-m", "nanor1.cli", "export", str(path), str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv", [["tokenizer", "vocab_size=1024"], ["export", "model=ckpt", "out_dir=x"],
                                  ["info", "model=ckpt"], ["report", "run_dir=runs/x"],
                                  ["export", "ckpt", "out", "format=hf"]])
def test_path_commands_refuse_settings_written_as_paths(argv, tmp_path, monkeypatch, capsys):
    """`nanor1 tokenizer vocab_size=1024`, written like the stage commands, must neither train into a folder
    named "vocab_size=1024" nor say "model not found" about "model=ckpt"."""
    from nanor1.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "looks like a key=value setting" in err and f"nanor1 {argv[0]} --help" in err
    assert not list(tmp_path.iterdir())


def test_saving_a_policy_leaves_the_live_model_as_it_was(tmp_path):
    """GRPO checkpoints the policy it keeps training: the save must not move or cast that model (it once did
    `.float().cpu()`, which on a GPU put the model on the CPU for every later step)."""
    from nanor1.policy import Policy
    model = Transformer(ModelConfig.preset("tiny")).init_weights(0).to(torch.bfloat16)
    params = list(model.parameters())
    Policy(model, None, "nanor1", tmp_path).save(tmp_path / "ckpt")
    assert all(p is q and p.dtype == torch.bfloat16 for p, q in zip(model.parameters(), params))
    loaded = load_model(tmp_path / "ckpt")
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b.to(a.dtype)), name
