"""`nanor1 speedrun --quick` end to end (what CI runs): every stage leaves its artifact, the run verifies,
the report is written, and a rerun resumes by skipping finished stages."""

import json
import subprocess
import sys

import pytest

from nanor1.checkpoint import lineage, verify_run


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speedrun")
    r = subprocess.run([sys.executable, "-m", "nanor1.cli", "speedrun", "--quick", f"out_dir={out}"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_every_stage_leaves_its_artifact(quick_run):
    out, _ = quick_run
    for stage in ("base", "r1zero", "r1-cold", "r1-rl", "r1", "student-base", "student-distill", "student-rl"):
        assert (out / stage / "final" / "manifest.json").is_file(), stage
    for name in ("base", "r1zero", "r1", "student-base", "student-distill", "student-rl"):
        assert (out / "eval" / name / "results.json").is_file(), name
    assert (out / "r1-rs" / "data.jsonl").is_file() and (out / "distill-traces" / "data.jsonl").is_file()
    times = json.loads((out / "stage_times.json").read_text())
    assert len(times) == 14 and all(t >= 0 for t in times.values())


def test_report_and_findings(quick_run):
    out, r = quick_run
    html = (out / "report" / "report.html").read_text()
    assert "Findings" in html and "Stage times" in html and "<img" in html
    findings = json.loads((out / "findings.json").read_text())
    names = " ".join(f["finding"] for f in findings["findings"])
    for claim in ("RL alone lifts", "response length", "majority voting", "cold start", "R1 matches or beats R1-Zero",
                  "distilling"):
        assert claim in names
    assert findings["peak_memory_gib"] < 4.0
    # majority voting rows carry the paired difference over the same problems: its mean is cons@k - pass@1
    base_res = json.loads((out / "eval" / "base" / "results.json").read_text())
    lenient = base_res["tasks"]["chain_sum"]["metrics"]["lenient"]
    diff = lenient[f"cons@{base_res['k']}"]["value"] - lenient["pass@1"]["value"]
    row = next(f for f in findings["findings"] if f["finding"].startswith("majority voting helps (base"))
    assert f"difference {100 * diff:+.1f} pts" in row["measured"] and "within_noise" in row
    assert "report:" in r.stdout and "overall ETA" in r.stdout
    # what R1-Zero had to work with: the base's reasoning split, with the evaluation's own numbers
    m = json.loads((out / "eval" / "base" / "results.json").read_text())["tasks"]["chain_sum"]["metrics"]
    n = m["reasoned"]["samples"] + m["direct"]["samples"]
    assert n == m["n_samples"]
    md = (out / "report" / "report.md").read_text()
    said = f"The base reasons before answering in {100 * m['reasoned']['samples'] / n:.0f}% of its {n}"
    assert said in md
    assert said in r.stdout.split("R1-Zero: GRPO from the base")[0]  # printed as soon as the base is evaluated


def test_run_verifies_with_lineage_from_tokenizer_to_student(quick_run):
    out, _ = quick_run
    v = verify_run(out)
    assert v["links"] >= 10
    chain = [p.relative_to(out).as_posix() for p in lineage(out / "student-distill" / "final")]
    assert chain == ["student-distill/final", "student-base/final", "base/tokenizer"]
    sft_manifest = json.loads((out / "student-distill" / "final" / "manifest.json").read_text())
    assert sft_manifest["inputs"]["data"]["path"].endswith("distill-traces")  # the traces' lineage: from R1
    traces = json.loads((out / "distill-traces" / "manifest.json").read_text())
    assert traces["parent_path"].endswith("r1/final")


def test_rerun_skips_finished_stages(quick_run):
    out, _ = quick_run
    r = subprocess.run([sys.executable, "-m", "nanor1.cli", "speedrun", "--quick", f"out_dir={out}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("done already, skipped") == 14


# seconds per stage of the default speedrun on the development machine (runs/sr15, docs/speedrun.md)
SR15_SECONDS = {"base": 390.4, "eval-base": 8.2, "r1zero": 66.3, "eval-r1zero": 10.4, "r1-cold": 29.2,
                "r1-rl": 53.9, "r1-rs": 7.0, "r1": 9.7, "eval-r1": 9.9, "student-base": 35.8,
                "distill-traces": 12.5, "student-distill": 81.3, "student-rl": 81.7, "eval-students": 12.1}


def test_stage_weights_give_an_eta_that_follows_the_measured_times():
    from nanor1.speedrun import Speedrun, SpeedrunConfig
    weights = {s.name: s.weight for s in Speedrun(SpeedrunConfig()).stages()}
    assert weights.keys() == SR15_SECONDS.keys()
    share = {k: w / sum(weights.values()) for k, w in weights.items()}
    measured = {k: t / sum(SR15_SECONDS.values()) for k, t in SR15_SECONDS.items()}
    for name in weights:  # every stage's share of the run within 2 points of the measured share
        assert abs(share[name] - measured[name]) < 0.02, (name, share[name], measured[name])
    # and the weights follow the sizes, so an overridden run keeps a sensible ETA
    longer = {s.name: s.weight for s in Speedrun(SpeedrunConfig(pretrain_steps=900, rl_steps=80)).stages()}
    assert longer["base"] == pytest.approx(2 * weights["base"])
    assert longer["r1zero"] == pytest.approx(2 * weights["r1zero"])
    assert longer["eval-base"] == weights["eval-base"]


def test_a_difference_whose_interval_includes_zero_is_marked_within_noise():
    from nanor1.speedrun_report import findings_markdown
    rows = [{"finding": "a", "measured": "+0.5 [-0.2, +1.2]", "target": "> 0", "holds": True, "within_noise": True},
            {"finding": "b", "measured": "+4.8 [+2.1, +7.4]", "target": "> 0", "holds": True, "within_noise": False},
            {"finding": "c", "measured": "-0.1 [-0.9, +0.6]", "target": "> 0", "holds": False, "within_noise": True},
            {"finding": "d", "measured": "1 vs 2", "target": ">=", "holds": False}]
    verdicts = [line.rsplit("|", 2)[1].strip() for line in findings_markdown(rows).splitlines()[-4:]]
    assert verdicts == ["yes (within noise)", "yes", "**no** (within noise)", "**no**"]


def test_rejection_that_keeps_nothing_names_the_speedrun_settings_to_raise(tmp_path):
    """A policy that answers nothing right (here: random weights) stops the run with the speedrun's own knobs named,
    for R1's rejection sampling and for the distillation traces alike."""
    from nanor1.checkpoint import save_checkpoint
    from nanor1.common import NanoR1Error
    from nanor1.corpus import pretrain_documents
    from nanor1.model import ModelConfig, Transformer
    from nanor1.speedrun import Speedrun, SpeedrunConfig
    from nanor1.tasks import get_task
    from nanor1.tokenizer import train_tokenizer
    tok = train_tokenizer(pretrain_documents(get_task("chain_sum"), 200, 0), 300, merge_across_words=True)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256)).init_weights(0)
    ckpt = save_checkpoint(tmp_path / "random" / "final", model, tokenizer=tok)
    run = Speedrun(SpeedrunConfig(out_dir=str(tmp_path / "run"), max_new_tokens=8, device="cpu"))
    with pytest.raises(NanoR1Error, match=r"r1-rs: rejection sampling kept nothing .* raise rs_k or rs_problems"):
        run.rejection("r1-rs", ckpt, n_problems=4, k=2)
    with pytest.raises(NanoR1Error, match=r"distill-traces: .* raise distill_k or distill_problems"):
        run.rejection("distill-traces", ckpt, n_problems=4, k=2)
