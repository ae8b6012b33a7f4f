"""`nanor1 export --format hf` against transformers: loads as DeepseekV3ForCausalLM with our logits, tokenizer and
chat template; vLLM's config keys; MTP layers; greedy generation; export -> import round trip; damaged inputs."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open

from nanor1.checkpoint import load_model, read_manifest, save_checkpoint
from nanor1.common import NanoR1Error, sha256_bytes
from nanor1.engine import SamplingParams
from nanor1.export import export_hf, import_hf_model
from nanor1.model import ModelConfig, Transformer
from nanor1.policy import load_policy

LINES = ["the quick brown fox jumps over the lazy dog", "what is 2 + 3? it is 5", "hello world, hello nanor1",
         "<think>add them</think><answer>5</answer>"] * 4
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is 2 + 3?"},
            {"role": "assistant", "content": "<think>add</think>5"}, {"role": "user", "content": "and 3 + 4?"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny nanor1 model (every feature: q-LoRA, grouped MoE, MTP) with a trained tokenizer, as a checkpoint."""
    from nanor1.tokenizer import train_tokenizer
    tok = train_tokenizer(LINES, 300)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size)).init_weights(0).eval()
    with torch.no_grad():
        for moe in model.moe_layers():  # a non-zero balancing bias must survive the export
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
        model.lm_head.weight.mul_(20)  # peaked logits: greedy never hinges on float noise
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", model, tokenizer=tok, kind="pretrain")


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    return export_hf(ckpt, tmp_path_factory.mktemp("export") / "hf")


def _hf_model(folder):
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_transformers_loads_it_with_our_logits(ckpt, exported):
    ours, ref = load_model(ckpt).eval(), _hf_model(exported)
    assert type(ref).__name__ == "DeepseekV3ForCausalLM"
    idx = torch.randint(0, ours.cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(idx).logits - ref(idx).logits).abs().max().item() <= 1e-4


def test_tokenizer_and_chat_template(ckpt, exported):
    from transformers import AutoTokenizer
    from nanor1.tokenizer import load_tokenizer
    ours, theirs = load_tokenizer(ckpt), AutoTokenizer.from_pretrained(exported)
    text = ours.apply_chat_template(MESSAGES)
    assert theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == text
    assert "<think>" not in text and text.endswith("<|assistant|>")  # history reasoning dropped, R1 style
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text, allow_special=True)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)


def test_config_has_vllm_keys_and_generation_defaults(exported):
    from transformers import GenerationConfig
    cfg = json.loads((exported / "config.json").read_text())
    tiny = ModelConfig.preset("tiny")
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    assert (cfg["topk_method"], cfg["scoring_func"], cfg["hidden_act"]) == ("noaux_tc", "sigmoid", "silu")
    assert (cfg["moe_layer_freq"], cfg["n_group"], cfg["topk_group"]) == (1, tiny.n_expert_groups,
                                                                          tiny.n_limited_groups)
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["first_k_dense_replace"] == tiny.n_dense_layers
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    gen = GenerationConfig.from_pretrained(exported)
    assert (gen.temperature, gen.top_p, gen.eos_token_id, gen.do_sample) == (0.6, 0.95, 2, True)


def test_mtp_weights_are_extra_layers(exported):
    n = ModelConfig.preset("tiny").n_layers
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    mtp = {k[len(f"model.layers.{n}."):] for k in keys if k.startswith(f"model.layers.{n}.")}
    assert {"eh_proj.weight", "enorm.weight", "hnorm.weight", "embed_tokens.weight", "shared_head.head.weight",
            "shared_head.norm.weight", "self_attn.kv_a_proj_with_mqa.weight", "mlp.experts.7.down_proj.weight",
            "mlp.gate.e_score_correction_bias"} <= mtp
    assert not any(k.startswith(f"model.layers.{n + 1}.") for k in keys)
    assert "model.layers.0.mlp.gate_proj.weight" in keys and "model.layers.1.mlp.experts.0.up_proj.weight" in keys


def test_greedy_through_transformers_and_our_engine(exported):
    ref = _hf_model(exported)
    policy = load_policy(exported)  # a DeepSeek-V3 folder comes back as a nanor1 model
    assert policy.kind == "nanor1"
    tok = policy.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), allow_special=True)
               for q in ("what is 2 + 3?", "hello world")] + [tok.encode("the quick brown")]
    outs = policy.engine(max_batch=4).generate(prompts, SamplingParams(max_new_tokens=10, temperature=0))
    for p, o in zip(prompts, outs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = ref.generate(torch.tensor([p]), do_sample=False, max_new_tokens=10)[0, len(p):].tolist()
        assert o.ids == (hf[:hf.index(tok.eos_id)] if tok.eos_id in hf else hf)


def test_manifest_lineage_and_round_trip(ckpt, exported, tmp_path):
    manifest = read_manifest(exported)
    assert manifest["kind"] == "export-hf"
    assert manifest["parent"] == sha256_bytes((ckpt / "manifest.json").read_bytes())
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(manifest["files"])
    back = import_hf_model(exported, tmp_path / "back")
    assert read_manifest(back)["parent"] == sha256_bytes((exported / "manifest.json").read_bytes())
    a, b = load_model(ckpt), load_model(back)
    assert a.cfg == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_bad_inputs_are_one_line_errors(ckpt, exported, tmp_path):
    def fails(fn, *args, match):
        with pytest.raises(NanoR1Error, match=match) as e:
            fn(*args)
        assert "\n" not in str(e.value)

    fails(export_hf, tmp_path / "missing", tmp_path / "out", match="missing: model not found")
    fails(import_hf_model, tmp_path / "missing", tmp_path / "out", match="missing: Hugging Face model folder not")
    bad_ckpt = _copy(ckpt, tmp_path / "bad_ckpt")
    _truncate(bad_ckpt / "model.safetensors")
    fails(export_hf, bad_ckpt, tmp_path / "out", match="bad_ckpt/model.safetensors: SHA-256 does not match")
    bad_hf = _copy(exported, tmp_path / "bad_hf")
    (bad_hf / "config.json").write_text((bad_hf / "config.json").read_text().replace('"silu"', '"gelu"'))
    fails(import_hf_model, bad_hf, tmp_path / "out", match="bad_hf/config.json: SHA-256 does not match")
    (bad_hf / "manifest.json").unlink()  # without a manifest, a damaged weight file is still named
    _truncate(bad_hf / "model.safetensors")
    fails(import_hf_model, bad_hf, tmp_path / "out", match="bad_hf/model.safetensors: cannot read safetensors")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_export_refuses_to_overwrite_its_source(ckpt):
    with pytest.raises(NanoR1Error, match="must differ"):
        export_hf(ckpt, ckpt)
