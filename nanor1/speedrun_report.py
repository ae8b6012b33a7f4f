"""The speedrun's findings: the R1 paper's claims in miniature, each checked on this run's own numbers.

Reads the run's eval results and training logs, writes a findings table (with pass/fail and intervals), the
stage times and peak memory, and hands them to the generic run report (nanor1/report.py).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

from nanor1.common import atomic_write_json, read_json, read_jsonl
from nanor1.evalmath import paired_difference


def _eval(out: Path, name: str) -> dict | None:
    path = out / "eval" / name / "results.json"
    return read_json(path) if path.is_file() else None


def _metric(res: dict, task: str, mode: str, metric: str) -> dict | None:
    return res["tasks"][task]["metrics"][mode].get(metric) if res else None


def _pct(e: dict | None) -> str:
    return "n/a" if e is None else f"{100 * e['value']:.1f}% [{100 * e['lo']:.1f}, {100 * e['hi']:.1f}]"


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else None


def peak_memory_gib() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 ** 3 if sys.platform == "darwin" else 1024 ** 2)


def findings(out: Path, task: str) -> list[dict]:
    from nanor1.evaluate import compare
    rows: list[dict] = []
    base, zero = _eval(out, "base"), _eval(out, "r1zero")
    r1, s_dist, s_rl = _eval(out, "r1"), _eval(out, "student-distill"), _eval(out, "student-rl")
    # 1. RL from a base model alone raises accuracy (R1 section 2.2.4)
    if base and zero:
        b, z = _metric(base, task, "lenient", "pass@1"), _metric(zero, task, "lenient", "pass@1")
        d = compare(zero, base)["tasks"][task]["lenient"]["pass@1"]["diff"]
        ok = d["value"] >= 0.25 and b["value"] < 0.40
        rows.append({"finding": "RL alone lifts a base model (R1-Zero - base, lenient pass@1)",
                     "measured": f"{_pct(b)} -> {_pct(z)}; lift {100 * d['value']:+.1f} pts "
                                 f"[{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]",
                     "target": "lift >= 25 pts, base < 40%", "holds": ok})
    # 2. the "aha" curve: response length grows during R1-Zero training
    zrows = [r for r in read_jsonl(out / "r1zero" / "metrics.jsonl") if "response_len" in r]
    if len(zrows) >= 4:
        k = max(1, len(zrows) // 5)
        first, last = _mean(zrows[:k], "response_len"), _mean(zrows[-k:], "response_len")
        low = min(r["response_len"] for r in zrows)
        rows.append({"finding": "response length grows during R1-Zero (the 'aha' curve)",
                     "measured": f"{first:.1f} -> {last:.1f} tokens (first vs last {k} steps; minimum {low:.1f})",
                     "target": "last > first", "holds": last > first})
    # 3. majority voting helps: cons@k >= pass@1, with the paired difference over the same problems (near the
    # ceiling the two differ by a fraction of a point, so a miss says whether it is more than noise)
    for name, res in (("base", base), ("R1-Zero", zero), ("R1", r1)):
        if res:
            k = res["k"]
            p1, cons = _metric(res, task, "lenient", "pass@1"), _metric(res, task, "lenient", f"cons@{k}")
            if cons is not None:
                per_problem = list(res["problems"][task].values())
                d = paired_difference([p["lenient"][f"cons@{k}"] for p in per_problem],
                                      [p["lenient"]["pass@1"] for p in per_problem]).as_dict()
                rows.append({"finding": f"majority voting helps ({name}: cons@{k} vs pass@1, lenient)",
                             "measured": f"{_pct(cons)} vs {_pct(p1)}; difference {100 * d['value']:+.1f} pts "
                                         f"[{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]",
                             "target": "cons@k >= pass@1", "holds": cons["value"] >= p1["value"],
                             "within_noise": d["lo"] <= 0 <= d["hi"]})
    # 4. the cold start makes RL faster and cleaner (R1 section 2.3.1): over the same number of RL steps, R1's
    # rollouts are at least as well formatted and as accurate as R1-Zero's. "Faster" is the whole curve: the mean
    # over every step, so a run that starts in format and stays there beats one that gets there late.
    crows = [r for r in read_jsonl(out / "r1-rl" / "metrics.jsonl") if "accuracy" in r]
    if zrows and crows:
        n = min(len(zrows), len(crows))
        za, zf = _mean(zrows[:n], "accuracy"), _mean(zrows[:n], "format")
        ca, cf = _mean(crows[:n], "accuracy"), _mean(crows[:n], "format")
        rows.append({"finding": f"the cold start makes RL faster and cleaner (mean over {n} RL steps)",
                     "measured": f"format {100 * cf:.0f}% vs {100 * zf:.0f}%, accuracy {100 * ca:.0f}% vs "
                                 f"{100 * za:.0f}% (R1 vs R1-Zero training rollouts)",
                     "target": "R1 >= R1-Zero on both", "holds": ca >= za and cf >= zf})
    def versus(finding: str, a: dict, a_name: str, b: dict, b_name: str, target: str, tie_holds: bool) -> dict:
        """A row comparing two models' lenient pass@1, with the paired difference and its 95% interval."""
        pa, pb = _metric(a, task, "lenient", "pass@1"), _metric(b, task, "lenient", "pass@1")
        d = compare(a, b)["tasks"][task]["lenient"]["pass@1"]["diff"]
        measured = (f"{a_name} {_pct(pa)} vs {b_name} {_pct(pb)}; difference {100 * d['value']:+.1f} pts "
                    f"[{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]")
        return {"finding": finding, "measured": measured,
                "target": target, "holds": d["value"] >= 0 if tie_holds else d["value"] > 0,
                "within_noise": d["lo"] <= 0 <= d["hi"]}

    # 5. the full pipeline ends at least where RL alone does (R1 section 3: DeepSeek-R1 matches or beats R1-Zero
    # while reading better; the format half is the cold-start row above)
    if zero and r1:
        rows.append(versus("R1 matches or beats R1-Zero (lenient pass@1)", r1, "R1", zero, "R1-Zero",
                           "R1 >= R1-Zero", tie_holds=True))
    # 6. distillation beats RL on the small student (R1 section 4.1), and the student's own base
    if s_dist and s_rl:
        rows.append(versus("distilling R1 beats RL on the same small student, same compute", s_dist, "distilled",
                           s_rl, "RL", "distilled > RL", tie_holds=False))
    s_base = _eval(out, "student-base")
    if s_dist and s_base:
        rows.append(versus("the distilled student beats its own base", s_dist, "distilled", s_base, "base",
                           "distilled > base", tie_holds=False))
    return rows


def base_reasoning_markdown(out: Path, task: str) -> str:
    """What R1-Zero had to work with: how often the base reasons, and how often that reasoning is right.
    RL reinforces what the base already samples; a base whose chains are rarely right gives it nothing."""
    base = _eval(out, "base")
    m = base["tasks"][task]["metrics"] if base else {}
    if not m.get("reasoned") or not m.get("direct"):
        return ""
    r, d = m["reasoned"], m["direct"]
    n = r["samples"] + d["samples"]

    def acc(part):
        return "n/a" if part["lenient_accuracy"] is None else f"{100 * part['lenient_accuracy']:.1f}%"
    return (f"The base reasons before answering in {100 * r['samples'] / n:.0f}% of its {n} evaluation samples; "
            f"those are right {acc(r)} of the time, its direct answers {acc(d)} (lenient). R1-Zero can only "
            f"reinforce reasoning that the base already gets right now and then.\n")


def verification_markdown(out: Path) -> str:
    """Every manifest re-hashed, every parent link checked, and the distilled student's lineage."""
    from nanor1.checkpoint import lineage, verify_run
    from nanor1.common import NanoR1Error
    try:
        v = verify_run(out)
    except NanoR1Error as e:
        return f"**Verification failed:** {e}\n"
    chain = " -> ".join(p.relative_to(out).as_posix() if p.is_relative_to(out) else str(p)
                        for p in lineage(out / "student-distill" / "final"))
    return (f"{len(v['artifacts'])} artifacts verified (every file's SHA-256 against its manifest), "
            f"{v['links']} parent/input links checked.\n\nLineage of the distilled student: {chain}\n")


def _verdict(row: dict) -> str:
    """yes / **no**, and whether the difference's 95% interval includes zero (then neither is established)."""
    return ("yes" if row["holds"] else "**no**") + (" (within noise)" if row.get("within_noise") else "")


def findings_markdown(rows: list[dict]) -> str:
    lines = ["Each row is measured by this run on held-out problems (95% intervals). A row that does not hold "
             "is reported as such, not hidden.", "",
             "| finding | measured | target | holds |", "|---|---|---|---|"]
    lines += [f"| {r['finding']} | {r['measured']} | {r['target']} | {_verdict(r)} |" for r in rows]
    return "\n".join(lines) + "\n"


def times_markdown(times: dict[str, float], peak_gib: float) -> str:
    lines = ["| stage | seconds |", "|---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in times.items()]
    lines.append(f"| **total** | **{sum(times.values()):.1f}** ({sum(times.values()) / 60:.1f} min) |")
    return "\n".join(lines) + f"\n\nPeak resident memory of the run's process: {peak_gib:.2f} GiB.\n"


def write_speedrun_report(out: Path, cfg, times: dict[str, float]) -> Path:
    from nanor1.config import to_dict
    from nanor1.report import write_report
    rows = findings(out, cfg.task)
    peak = peak_memory_gib()
    atomic_write_json(out / "findings.json", {"findings": rows, "stage_seconds": times, "peak_memory_gib": peak,
                                             "config": to_dict(cfg)})
    story = findings_markdown(rows) + "\n" + base_reasoning_markdown(out, cfg.task)
    return write_report(out, extra_sections=[("Findings: the R1 story in miniature", story),
                                             ("Stage times", times_markdown(times, peak)),
                                             ("Run verification", verification_markdown(out))])
