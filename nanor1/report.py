"""`nanor1 report RUN_DIR`: one self-contained HTML page (and a Markdown twin) describing a run.

Reads every metrics.jsonl, results.json, samples.jsonl, config.* and manifest.json under the run folder,
plots the training curves with matplotlib into RUN_DIR/report/*.png and embeds them as data URIs.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from nanor1.common import NanoR1Error, atomic_write_text, read_json, read_jsonl

REPORT_DIR = "report"


@dataclass(frozen=True)
class Panel:
    ylabel: str
    keys: tuple[str, ...]          # a key ending in "/" matches every key with that prefix


@dataclass(frozen=True)
class FigureSpec:
    slug: str
    title: str
    panels: tuple[Panel, ...]      # one row per panel present, one column per stage that has data (4 per band)


FIGURES = (
    FigureSpec("loss", "Training loss", (Panel("loss", ("loss",)),)),
    FigureSpec("rewards", "Reward per reward function", (Panel("mean reward", ("reward/", "reward_mean")),)),
    FigureSpec("accuracy", "Accuracy on the training prompts", (Panel("accuracy", ("accuracy",)),)),
    FigureSpec("kl_entropy", "KL to the reference policy and policy entropy",
               (Panel("KL (k3)", ("kl",)), Panel("entropy (nats/token)", ("entropy",)))),
    FigureSpec("optim", "Optimisation diagnostics",
               (Panel("learning rate", ("lr",)), Panel("grad norm", ("grad_norm",)),
                Panel("fraction", ("clip_frac", "zero_std_frac")))),
    FigureSpec("throughput", "Throughput", (Panel("tokens / s", ("tokens_per_s",)), Panel("MFU", ("mfu",)))),
)


# ----------------------------------------------------------------------------- reading the run

def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def _files(run_dir: Path, pattern: str) -> list[Path]:
    """Files matching `pattern` anywhere under the run, except in the report's own folder."""
    return sorted(p for p in run_dir.rglob(pattern) if p.is_file() and p.relative_to(run_dir).parts[0] != REPORT_DIR)


def load_curves(run_dir: Path) -> dict[str, list[dict]]:
    """Metric rows grouped by stage (the row's "stage", else its folder's name), sorted by step."""
    stages: dict[str, list[dict]] = {}
    for path in _files(run_dir, "metrics.jsonl"):
        default = path.parent.name if path.parent != run_dir else run_dir.name
        for row in read_jsonl(path):
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
                stages.setdefault(str(row.get("stage") or default), []).append(row)
    return {s: sorted(rows, key=lambda r: r["step"]) for s, rows in stages.items()}


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _keys(rows: list[dict], panel: Panel) -> list[str]:
    present = sorted({k for r in rows for k in r})
    out = []
    for want in panel.keys:
        out += [k for k in present if k.startswith(want)] if want.endswith("/") else [want] * (want in present)
    return [k for k in out if _series(rows, k)[0]]


def _ema(ys: list[float], span: int) -> list[float]:
    """Exponential moving average; RL curves are noisy, so the smoothed line is drawn over the raw one."""
    a, out, m = 2.0 / (span + 1), [], ys[0]
    for y in ys:
        m = a * y + (1 - a) * m
        out.append(m)
    return out


def _plot_line(ax, xs, ys, label, **kw):
    if len(ys) >= 30:
        (line,) = ax.plot(xs, ys, alpha=0.25, linewidth=1, **kw)
        ax.plot(xs, _ema(ys, max(3, len(ys) // 20)), color=line.get_color(), linewidth=2, label=label)
    else:
        ax.plot(xs, ys, marker="o" if len(ys) < 15 else None, markersize=3, linewidth=2, label=label, **kw)


# ----------------------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    # keep ~0.4 inch at the top for the figure's title, which tight_layout does not see
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()) if fig._suptitle is not None else None)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_figure(spec: FigureSpec, curves: dict[str, list[dict]], out: Path, max_cols: int = 4) -> Path | None:
    """One figure for one concept: each stage that logged its keys gets a column of panels; past `max_cols`
    stages the columns wrap into another band below, so a long pipeline stays readable on a screen."""
    stages = [s for s in curves if any(_keys(curves[s], p) for p in spec.panels)]
    panels = [p for p in spec.panels if any(_keys(curves[s], p) for s in stages)]
    if not stages:
        return None
    plt = _plt()
    cols = min(max_cols, len(stages))
    bands = -(-len(stages) // cols)
    fig, axes = plt.subplots(bands * len(panels), cols, figsize=(4.6 * cols + 0.6, 3.0 * bands * len(panels) + 0.6),
                             squeeze=False)
    for j in range(len(stages), bands * cols):  # the empty places after the last stage
        band, col = divmod(j, cols)
        for i in range(len(panels)):
            axes[band * len(panels) + i][col].set_visible(False)
    for j, stage in enumerate(stages):
        band, col = divmod(j, cols)
        for i, panel in enumerate(panels):
            ax = axes[band * len(panels) + i][col]
            keys = _keys(curves[stage], panel)
            for k in keys:
                _plot_line(ax, *_series(curves[stage], k), label=k)
            if not keys:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_ylabel(panel.ylabel)
            ax.grid(alpha=0.3)
            if len(keys) > 1:
                ax.legend(fontsize=8)
            if i == 0:
                ax.set_title(stage)
            if i == len(panels) - 1:
                ax.set_xlabel("step")
    fig.suptitle(spec.title, fontsize=13, fontweight="bold")
    return _save(fig, out / f"{spec.slug}.png")


def plot_aha(curves: dict[str, list[dict]], out: Path) -> Path | None:
    """Response length vs RL step with accuracy on a twin axis: R1-Zero's "aha" curve (R1 paper, fig. 3)."""
    stages = [s for s in curves if _series(curves[s], "response_len")[0]]
    if not stages:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(stages), figsize=(6.0 * len(stages), 4.0), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        _plot_line(ax, *_series(curves[stage], "response_len"), label="response length", color="tab:blue")
        ax.set_xlabel("step")
        ax.set_ylabel("mean response length (tokens)", color="tab:blue")
        ax.set_title(stage)
        ax.grid(alpha=0.3)
        xs, ys = _series(curves[stage], "accuracy")
        if xs:
            ax2 = ax.twinx()
            _plot_line(ax2, xs, ys, label="accuracy", color="tab:orange")
            ax2.set_ylabel("accuracy", color="tab:orange")
            ax2.set_ylim(-0.02, 1.02)
    fig.suptitle("Response length and accuracy during RL (the \"aha\" curve)", fontsize=13, fontweight="bold")
    return _save(fig, out / "aha.png")


def plot_eval(results: dict, out: Path, name: str) -> Path | None:
    """Grouped bars per task: lenient pass@1, cons@k, pass@k with their confidence intervals."""
    tasks = results.get("tasks") or {}
    if not tasks:
        return None
    k = results.get("k", 1)
    names = ["pass@1"] + ([f"cons@{k}", f"pass@{k}"] if k > 1 else [])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(tasks) * len(names) / 2 + 2), 3.8))
    width = 0.8 / len(names)
    for j, metric in enumerate(names):
        vals, errs = [], [[], []]
        for t in tasks.values():
            e = t["metrics"]["lenient"].get(metric, {"value": 0.0, "lo": 0.0, "hi": 0.0})
            vals.append(e["value"])
            errs[0].append(e["value"] - e["lo"])
            errs[1].append(e["hi"] - e["value"])
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(tasks))]
        ax.bar(xs, vals, width, yerr=errs, capsize=3, label=metric)
    ax.set_xticks(range(len(tasks)), list(tasks), rotation=15)
    ax.set_ylim(0, 1.18)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("accuracy (lenient)")
    ax.set_title(f"Evaluation: {results.get('model', {}).get('name', name)} (95% intervals)")
    ax.legend(fontsize=8, ncol=len(names), loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / f"eval_{re.sub(r'[^A-Za-z0-9_]+', '_', name)}.png")


# ----------------------------------------------------------------------------- markdown -> html

def _inline(text: str) -> str:
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)


def markdown_to_html(md: str) -> str:
    """The Markdown subset this project writes: headings, pipe tables, lists, code fences, paragraphs.

    Raw HTML blocks (lines starting with '<', e.g. <details>) pass through; all other text is escaped.
    """
    out, lines, i = [], md.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1:j])) + "</pre>")
            i = j + 1
        elif m := re.match(r"(#{1,6}) (.*)", line):
            n = min(6, len(m.group(1)) + 1)   # the page's <h1> is the report title
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                    rows.append(cells)
                i += 1
            head, body = rows[0], rows[1:]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table>")
        elif re.match(r"[-*] ", line):
            items = []
            while i < len(lines) and re.match(r"[-*] ", lines[i]):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        elif line.startswith("<"):
            out.append(line)
            i += 1
        elif line.strip():
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"(```|#|\||[-*] |<)", lines[i]):
                para.append(lines[i])
                i += 1
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
        else:
            i += 1
    return "\n".join(out)


# ----------------------------------------------------------------------------- sections

def _examples(run_dir: Path, per_file: int) -> list[tuple[str, str, str]]:
    """Example completions from each samples.jsonl: the earliest and the latest rows, reasoning split off.

    Returns (markdown, html) pairs per example, plus the source path.
    """
    from nanor1.templates import split_reasoning
    out = []
    for path in _files(run_dir, "samples.jsonl"):
        rows = [r for r in read_jsonl(path) if isinstance(r, dict) and "completion" in r]
        head = max(1, per_file // 2)
        picked = rows if len(rows) <= per_file else rows[:head] + rows[-(per_file - head):]
        for r in picked:
            reasoning, answer = split_reasoning(str(r["completion"]))
            tags = " · ".join(f"{k} {r[k]:.3g}" if isinstance(r[k], float) else f"{k} {r[k]}"
                              for k in ("stage", "step", "reward") if k in r)
            title = f"{_rel(path, run_dir)} · {tags}" if tags else _rel(path, run_dir)
            body = [("prompt", str(r.get("prompt", ""))), ("reasoning", reasoning or ""), ("answer", answer or "")]
            md = f"#### {title}\n\n" + "".join(
                f"<details{' open' if name != 'reasoning' else ''}><summary>{name} ({len(text)} chars)</summary>"
                f"\n\n```\n{text.replace('```', '` ` `')}\n```\n\n</details>\n\n" for name, text in body)
            htm = f"<div class='example'><h4>{html.escape(title)}</h4>" + "".join(
                f"<details class='{name}'{' open' if name != 'reasoning' else ''}><summary>{name} ({len(text)} chars)"
                f"</summary><pre>{html.escape(text)}</pre></details>" for name, text in body) + "</div>"
            out.append((md, htm))
    return out


def _text_files(run_dir: Path, max_lines: int = 300) -> list[tuple[str, str]]:
    """(relative path, text) of every config.* and manifest.json, pretty-printed and capped in length."""
    paths = sorted(set(_files(run_dir, "config.*")) | set(_files(run_dir, "manifest.json")))
    out = []
    for p in paths:
        if p.suffix not in (".json", ".yaml", ".yml", ".toml", ".txt"):
            continue
        text = json.dumps(read_json(p), indent=2, default=str) if p.suffix == ".json" else p.read_text(errors="replace")
        lines = text.splitlines()
        if len(lines) > max_lines:
            lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more lines in {p.name})"]
        out.append((_rel(p, run_dir), "\n".join(lines)))
    return out


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #ccc;margin-top:2em}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;white-space:pre-wrap;font-size:.85em;max-height:30em}
details{margin:.3em 0}summary{cursor:pointer;font-weight:600}
.example{border-left:3px solid #69c;padding-left:.8em;margin:1em 0}details.reasoning pre{background:#fffbe8}"""

# Marks <body data-images-loaded="true"> once every <img> decoded: the browser test reads this flag.
_SCRIPT = """window.addEventListener('load',function(){var im=document.images,ok=0;
for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}
document.body.setAttribute('data-images-total',im.length);document.body.setAttribute('data-images-ok',ok);
document.body.setAttribute('data-images-loaded',ok===im.length?'true':'false');});"""


def write_report(run_dir: str | Path, extra_sections: list[tuple[str, str]] | None = None,
                 examples_per_file: int = 4) -> Path:
    """Write RUN_DIR/report/{report.html, report.md, *.png}; returns the HTML path.

    `extra_sections` are (title, body) pairs appended as sections; a body starting with '<' is HTML,
    anything else Markdown.
    """
    from nanor1.evaluate import format_results_markdown
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NanoR1Error(f"{run_dir}: run folder not found; pass the folder a stage wrote (its out_dir)")
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    curves = load_curves(run_dir)
    results = [(_rel(p, run_dir), read_json(p)) for p in _files(run_dir, "results.json")]
    sections: list[tuple[str, list[str], list[str]]] = []   # (title, markdown parts, html parts)

    def add(title: str, md: str, htm: str | None = None):
        sections.append((title, [md], [htm if htm is not None else markdown_to_html(md)]))

    def add_png(title: str, png: Path | None):
        if png is not None:
            data = base64.b64encode(png.read_bytes()).decode()
            add(title, f"![{title}]({png.name})",
                f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")

    summary = [f"- run folder: `{run_dir.resolve()}`",
               f"- stages with curves: {', '.join(f'{s} ({len(r)} rows)' for s, r in curves.items()) or 'none'}",
               f"- evaluations: {len(results)}"]
    add("Summary", "\n".join(summary))
    add_png("The \"aha\" curve", plot_aha(curves, out))
    for spec in FIGURES:
        add_png(spec.title, plot_figure(spec, curves, out))
    for name, res in results:
        add(f"Evaluation: {name}", format_results_markdown(res))
        add_png(f"Evaluation chart: {name}", plot_eval(res, out, name))
    examples = _examples(run_dir, examples_per_file)
    if examples:
        sections.append(("Example completions", [m for m, _ in examples], [h for _, h in examples]))
    for rel, text in _text_files(run_dir):
        add(f"File: {rel}", f"```\n{text}\n```")
    for title, body in extra_sections or []:
        add(title, body, body if body.lstrip().startswith("<") else None)

    title = f"nanor1 run report: {run_dir.resolve().name}"
    md = f"# {title}\n\n" + "\n\n".join(f"## {t}\n\n" + "\n\n".join(parts) for t, parts, _ in sections) + "\n"
    body = "\n".join(f"<section><h2>{html.escape(t)}</h2>\n" + "\n".join(parts) + "</section>"
                     for t, _, parts in sections)
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style><script>{_SCRIPT}</script></head>\n<body><h1>{html.escape(title)}</h1>\n{body}\n"
            f"</body></html>\n")
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", page)
    return out / "report.html"
