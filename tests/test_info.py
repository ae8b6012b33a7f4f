"""`nanor1 info` against a manual count of the built model's parameters and the published DeepSeek-V3 sizes."""

import json

import pytest

from nanor1.checkpoint import save_checkpoint
from nanor1.common import NanoR1Error
from nanor1.info import human, model_info, model_stats
from nanor1.model import ModelConfig, Transformer
from nanor1.model.hf import to_hf_config


def manual_counts(model: Transformer) -> dict[str, int]:
    """Count the module's parameters: MTP modules apart; 'active' leaves out the routed experts a token skips."""
    cfg, total, mtp, inactive = model.cfg, 0, 0, 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            mtp += p.numel()
            continue
        total += p.numel()
        if name.endswith(("mlp.w_gate", "mlp.w_up", "mlp.w_down")):  # (E, ...) stacked routed experts
            inactive += p.numel() // cfg.n_routed_experts * (cfg.n_routed_experts - cfg.n_activated_experts)
    return {"total": total, "active": total - inactive, "mtp": mtp}


def test_tiny_matches_the_built_model():
    cfg = ModelConfig.preset("tiny")
    ref = manual_counts(Transformer(cfg))
    assert model_stats(cfg)["params"] == ref
    text = model_info(preset="tiny")
    for n in ref.values():
        assert f"{n:,}" in text
    # MLA caches kv_lora_rank + rope dim per layer; MHA caches K (nope+rope) and V of every head
    mla, mha = 3 * (16 + 8), 3 * 4 * (8 + 8 + 8)
    assert f"MLA {mla:,} numbers = {2 * mla:,} B bf16 / {4 * mla:,} B fp32" in text
    assert f"MHA of the same width {mha:,} numbers = {2 * mha:,} B bf16 / {4 * mha:,} B fp32" in text
    assert f"MLA saves {mha / mla:.1f}x" in text
    assert "3 = 1 dense + 2 MoE" in text and "8 routed + 1 shared" in text


def test_v3_is_671b_total_37b_active():
    text = model_info(preset="v3")
    p = model_stats(ModelConfig.preset("v3"))["params"]
    assert abs(p["total"] - 671e9) / 671e9 < 0.001 and 37e9 <= p["active"] < 38e9  # DeepSeek-V3 report, sec. 1
    assert "671.0B total" in text and "37.6B active per token" in text
    mla, mha = 61 * (512 + 64), 61 * 128 * (128 + 64 + 128)
    assert f"MLA {mla:,} numbers = {2 * mla:,} B bf16" in text and f"{mha:,} numbers" in text
    assert "61 = 3 dense + 58 MoE" in text and "256 routed + 1 shared" in text and "8 routed active" in text


def test_human_numbers():
    assert [human(x) for x in (671_026_404_352, 37_552_282_624, 1_500_000, 2_048, 12)] == \
        ["671.0B", "37.6B", "1.5M", "2.0K", "12"]


def test_checkpoint_and_hf_folder(tmp_path):
    cfg = ModelConfig.preset("tiny", n_routed_experts=0, n_mtp_layers=0)
    ckpt = save_checkpoint(tmp_path / "ckpt", Transformer(cfg))
    text = model_info(path=str(ckpt))
    assert f"{manual_counts(Transformer(cfg))['total']:,}" in text and "3 = 3 dense + 0 MoE" in text
    assert "experts:" not in text
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(to_hf_config(ModelConfig.preset("tiny"))))
    assert model_info(path=str(hf)).split("\n")[1:] == model_info(preset="tiny").split("\n")[1:]


def test_bad_requests():
    with pytest.raises(NanoR1Error, match="either a preset"):
        model_info()
    with pytest.raises(NanoR1Error, match="either a preset"):
        model_info(preset="tiny", path="x")
    with pytest.raises(NanoR1Error, match="unknown model preset"):
        model_info(preset="huge")


def test_other_architectures_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(NanoR1Error, match="only DeepSeek-V3-layout"):
        model_info(path=str(tmp_path))
    with pytest.raises(NanoR1Error, match="model not found"):
        model_info(path=str(tmp_path / "nope"))
