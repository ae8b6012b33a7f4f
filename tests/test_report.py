"""The run report: plots, self-contained HTML, escaped reasoning, Markdown twin, and a headless-Chromium check."""

import base64
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from nanor1.common import NanoR1Error
from nanor1.evaluate import per_problem_metrics, summarize
from nanor1.report import markdown_to_html, write_report

CHROMIUM = Path("/usr/bin/chromium")
EVIL = "<script>window.EVIL=1</script> & <b>not bold</b>"


def _record(correct: list[bool], difficulty):
    return {"difficulty": difficulty, "n_tokens": [10] * len(correct), "truncated": [False] * len(correct),
            "format": correct, "reasoning_tokens": [4] * len(correct), "strict": correct, "lenient": correct,
            "cons_strict": sum(correct) * 2 > len(correct), "cons_lenient": sum(correct) * 2 > len(correct),
            "voted_strict": "1", "voted_lenient": "1"}


def make_run(root: Path) -> Path:
    """A fake run folder with the files the stages write: curves, samples, an evaluation, config, manifest."""
    (root / "pretrain").mkdir(parents=True)
    (root / "grpo").mkdir()
    (root / "eval").mkdir()
    with open(root / "pretrain" / "metrics.jsonl", "w") as f:   # stage taken from the folder name
        for s in range(0, 100, 5):
            row = {"step": s, "loss": 4 * math.exp(-s / 40) + 1.5, "lr": 3e-4, "tokens_per_s": 5e3}
            f.write(json.dumps(row) + "\n")
        f.write('{"step": 100, "loss": 1.')                     # a torn last line from a crash
    with open(root / "grpo" / "metrics.jsonl", "w") as f:
        for s in range(60):
            f.write(json.dumps({"step": s, "stage": "grpo", "reward/accuracy": s / 60, "reward/format": min(1, s / 20),
                                "reward_mean": s / 60 + min(1, s / 20), "accuracy": s / 60, "response_len": 40 + s,
                                "kl": s * 1e-4, "entropy": 1.2 - s * 0.004}) + "\n")
    with open(root / "grpo" / "samples.jsonl", "w") as f:
        for s in (0, 30, 59):
            f.write(json.dumps({"step": s, "prompt": "What is 2+3?", "reward": 1.0,
                                "completion": f"step {s} thinking {EVIL} </think> <answer>5</answer>"}) + "\n")
    (root / "grpo" / "config.yaml").write_text("lr: 1.0e-06\ngroup_size: 8\n")
    manifest = {"kind": "grpo", "files": {"model.safetensors": "ab" * 32}}
    (root / "grpo" / "manifest.json").write_text(json.dumps(manifest))
    records = [_record([True, True, False, True], 1), _record([False, False, False, True], 2)]
    results = {"model": {"name": "tiny", "path": "ckpt/tiny", "fingerprint": "0123abcd"}, "k": 4,
               "sampling": {"template": "r1-zero", "greedy": False, "temperature": 0.6, "top_p": 0.95,
                            "max_new_tokens": 64, "seed": 0},
               "tasks": {"arithmetic": {"metrics": summarize(records, 4, 1.96),
                                        "by_difficulty": {"1": summarize(records[:1], 4, 1.96),
                                                          "2": summarize(records[1:], 4, 1.96)}}},
               "problems": {"arithmetic": {str(i): per_problem_metrics(r, 4) for i, r in enumerate(records)}}}
    (root / "eval" / "results.json").write_text(json.dumps(results))
    return root


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.scripts, self.details, self._in, self._pre = [], [], 0, [], None, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag in ("link", "a") and a.get("href"):
            self.links.append(a["href"])
        if tag == "script":
            self.scripts += 1
            assert "src" not in a, "external script"
        if tag == "details":
            self._in = a.get("class")
            self.details.append([a.get("class"), ""])
        self._pre |= tag == "pre"

    def handle_endtag(self, tag):
        if tag == "details":
            self._in = None
        self._pre &= tag != "pre"

    def handle_data(self, data):
        if self._in is not None and self._pre:   # the text shown in the <pre> of a <details>
            self.details[-1][1] += data


def test_report_files_plots_and_self_contained_html(tmp_path):
    run = make_run(tmp_path / "run")
    page = write_report(run, extra_sections=[("Speedrun findings", "| finding | value |\n|---|---|\n| aha | yes |")])
    out = run / "report"
    assert page == out / "report.html"
    pngs = {p.name for p in out.glob("*.png")}
    assert {"aha.png", "loss.png", "rewards.png", "accuracy.png", "kl_entropy.png", "optim.png",
            "throughput.png"} <= pngs and any(n.startswith("eval_") for n in pngs)
    import matplotlib.image
    img = matplotlib.image.imread(out / "aha.png")
    assert img.shape[0] > 200 and img.shape[1] > 300 and img[..., :3].std() > 0.05   # a real picture, not blank

    text = page.read_text()
    doc = _Collect()
    doc.feed(text)
    # every image is embedded as a PNG data URI holding exactly the bytes of a file in report/
    assert len(doc.imgs) == len(pngs)
    embedded = {base64.b64decode(src.split(",", 1)[1]) for src in doc.imgs}
    assert all(src.startswith("data:image/png;base64,") for src in doc.imgs)
    assert embedded == {(out / n).read_bytes() for n in pngs}
    assert not doc.links and "http://" not in text and "https://" not in text   # no network
    assert doc.scripts == 1                                                      # only the inline load check
    # the reasoning is shown, HTML-escaped, inside a <details class=reasoning>
    reasoning = [body for cls, body in doc.details if cls == "reasoning"]
    assert len(reasoning) == 3 and all(EVIL in body for body in reasoning)
    assert "&lt;script&gt;window.EVIL=1&lt;/script&gt;" in text and "<script>window.EVIL" not in text
    assert [b for cls, b in doc.details if cls == "answer"] == ["5"] * 3
    assert [b for cls, b in doc.details if cls == "prompt"] == ["What is 2+3?"] * 3
    # evaluation table, config, manifest and the extra section
    # pass@1 = (3/4 + 1/4) / 2; n_eff = p(1-p) / SE^2 = 4, so the interval is Wilson(2 of 4) = [0.150, 0.850]
    assert "<td>0.500 [0.150, 0.850]</td>" in text
    assert "group_size: 8" in text and "model.safetensors" in text
    assert "<h2>Speedrun findings</h2>" in text and "<td>aha</td>" in text
    assert "not valid JSON" not in text

    md = (out / "report.md").read_text()
    assert "![The \"aha\" curve](aha.png)" in md and "| arithmetic | lenient | 2 |" in md
    assert "pretrain (20 rows)" in md                             # the torn line was skipped


def test_report_without_data_and_bad_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    page = write_report(tmp_path / "empty")
    assert "stages with curves: none" in page.read_text() and not list((tmp_path / "empty" / "report").glob("*.png"))
    with pytest.raises(NanoR1Error, match="not found"):
        write_report(tmp_path / "missing")


def test_markdown_to_html():
    got = markdown_to_html("## Title\n\nsome `x<1` and **bold**\n\n| a | b |\n|---|---:|\n| 1 | <2 |\n\n- one\n- two\n"
                           "\n```\n<raw>\n```")
    assert got == ("<h3>Title</h3>\n<p>some <code>x&lt;1</code> and <b>bold</b></p>\n"
                   "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td>&lt;2</td></tr>"
                   "</tbody></table>\n<ul><li>one</li><li>two</li></ul>\n<pre>&lt;raw&gt;</pre>")


def _chromium(*args, tmp):
    return subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    run = make_run(tmp_path / "run")
    page = write_report(run)
    n_imgs = len(list((run / "report").glob("*.png")))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", page.as_uri(), tmp=tmp_path / "profile").stdout
    # the page's load handler counts decoded images (complete and naturalWidth > 0)
    assert f'data-images-total="{n_imgs}"' in dom and f'data-images-ok="{n_imgs}"' in dom
    assert 'data-images-loaded="true"' in dom
    assert "&lt;script&gt;window.EVIL=1&lt;/script&gt;" in dom   # shown as text, never run
    shot = tmp_path / "shot.png"
    _chromium("--window-size=1200,2400", f"--screenshot={shot}", page.as_uri(), tmp=tmp_path / "profile")
    import matplotlib.image
    img = matplotlib.image.imread(shot)
    assert img.shape[:2] == (2400, 1200)
    colourful = (img[..., :3].max(axis=2) - img[..., :3].min(axis=2)) > 0.3   # plot lines, not black/grey text
    assert colourful.mean() > 0.002
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def test_many_stages_wrap_into_bands_of_four_columns(tmp_path):
    """Eight stages of a two-panel figure: two bands of four columns (not one row eight panels wide); six
    stages take the same grid, with two places left empty."""
    from PIL import Image
    from nanor1.report import FigureSpec, Panel, plot_figure
    spec = FigureSpec("t", "test", (Panel("loss", ("loss",)), Panel("lr", ("lr",))))
    curves = {f"stage{i}": [{"step": s, "loss": 1.0 / s, "lr": 0.1} for s in range(1, 20)] for i in range(8)}
    w, h = Image.open(plot_figure(spec, curves, tmp_path)).size
    assert w == round((4.6 * 4 + 0.6) * 110) and h == round((3.0 * 4 + 0.6) * 110)
    six = {k: v for k, v in list(curves.items())[:6]}
    assert Image.open(plot_figure(spec, six, tmp_path)).size == (w, h)
