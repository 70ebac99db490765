"""The one report writer: plots (matplotlib, Agg) and a self-contained HTML page plus Markdown,
rendered from the results JSON of every experiment."""

from __future__ import annotations

import base64
import html
import math
import warnings
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import sys  # noqa: E402

from normlab.lab.engine import experiment_path, read_json, run_path, write_json_atomic, write_text_atomic  # noqa: E402
from normlab.lab.spec import Experiment, Figure, Panel, Runs, Setup, Trace, assess  # noqa: E402

DECISION_RULE = (
    "How verdicts are decided: each check compares two arms of the same seed (or one arm with the paper's mark). "
    "Over n paired seeds its quantity (a difference, or a log-ratio for multiplicative quantities) gets a 95% "
    "t-interval; the check passes when the interval lies wholly on the paper's side of its margin, fails when it "
    "lies wholly on the other side and is unclear when it straddles it; a 'matches' claim passes when the 90% "
    "interval lies inside ±margin (two one-sided tests). Margins are the spec's constants, raised to the measured "
    "noise floor (the seed-to-seed SD of one arm, shown beside every check) when that is larger. An experiment is reproduced when every "
    "check passes, not reproduced when any fails, inconclusive otherwise. With one seed the point decides: "
    "such verdicts are marked indicative.")
VERDICT_COLORS = {"reproduced": "#1a7f37", "not reproduced": "#cf222e", "inconclusive": "#9a6700"}
STATUS_MARKS = {"pass": "✔ pass", "fail": "✘ fail", "unclear": "~ unclear"}


def _clean(values: list[Any]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _seed_spread(traces: list[Trace]) -> tuple[list[float], list[float], list[float]] | None:
    """Mean, min and max over the seeds' traces of one label, when they share their x values."""
    if len(traces) < 2 or any(_clean(t.x) != _clean(traces[0].x) for t in traces):
        return None
    ys = np.array([_clean(t.y) for t in traces], dtype=float)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return list(np.nanmean(ys, 0)), list(np.nanmin(ys, 0)), list(np.nanmax(ys, 0))


def _contour(ax: plt.Axes, trace: Trace) -> None:
    """Filled contours of log10 of ``trace.z`` (a loss surface spans decades), seed 0's."""
    if not trace.z:
        return
    z = np.log10(np.clip(np.asarray(trace.z, dtype=float), 1e-12, None))
    z = np.where(np.isfinite(z), z, np.nanmax(np.where(np.isfinite(z), z, np.nan)))
    filled = ax.contourf(_clean(trace.x), _clean(trace.y), z, levels=20, cmap="viridis")
    ax.contour(_clean(trace.x), _clean(trace.y), z, levels=10, colors="k", linewidths=0.4)
    ax.figure.colorbar(filled, ax=ax, label="log10 loss")
    ax.plot([0], [0], marker="*", color="w", markersize=9, label=f"{trace.label}: trained weights")


def draw_panel(ax: plt.Axes, panel: Panel, runs: Runs | list[Runs]) -> None:
    """Draw ``panel`` from one seed's runs, or from several seeds' runs: then each line is the mean over
    the seeds with a band from their minimum to their maximum (a percentile band is seed 0's, with every
    seed's median drawn thin)."""
    per_seed = runs if isinstance(runs, list) else [runs]
    for make in panel.traces:
        made = [make(r) for r in per_seed]
        for i, trace in enumerate(made[0]):
            if trace.kind == "hist":
                ax.stairs(trace.y, trace.x, label=trace.label, fill=False, linewidth=1.5)
                continue
            if trace.kind == "contour":
                _contour(ax, trace)
                continue
            same = [m[i] for m in made if i < len(m) and m[i].label == trace.label]
            x, y = _clean(trace.x), _clean(trace.y)
            spread = _seed_spread(same) if trace.lo is None else None
            label = trace.label + (f" (mean of {len(same)} seeds, band min–max)" if spread else "")
            if spread:
                y = spread[0]
            (line,) = ax.plot(x, y, label=label, linewidth=1.4, marker="o" if len(x) <= 12 else None,
                              markersize=3)
            if spread:
                ax.fill_between(x, spread[1], spread[2], alpha=0.2, color=line.get_color())
            elif trace.lo is not None and trace.hi is not None:
                ax.fill_between(x, _clean(trace.lo), _clean(trace.hi), alpha=0.25, color=line.get_color())
                for other in same[1:]:
                    ax.plot(_clean(other.x), _clean(other.y), linewidth=0.6, alpha=0.6, color=line.get_color())
    if panel.hline is not None:
        ax.axhline(panel.hline, color="grey", linestyle=":", linewidth=1)
    if panel.xlog:
        ax.set_xscale("log")
    if panel.ylog:
        ax.set_yscale("log")
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def render_figure(figure: Figure, runs: Runs | list[Runs], path: Path) -> Path:
    """Draw ``figure`` into a PNG at ``path``."""
    n = len(figure.panels)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, figure.panels):
        draw_panel(ax, panel, runs)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(figure.title, fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def load_runs(out: Path, summary: dict[str, Any]) -> Runs:
    return {key: read_json(run_path(out, digest)) for key, digest in summary["runs"].items()}


def load_seed_runs(out: Path, summary: dict[str, Any]) -> list[Runs]:
    """Every seed's runs (one seed for a summary written before seeds were recorded)."""
    mappings = summary.get("seed_runs") or [summary["runs"]]
    return [{key: read_json(run_path(out, digest)) for key, digest in m.items()} for m in mappings]


def _table_md(header: list[str], rows: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _table_html(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def verdict_reason(summary: dict[str, Any]) -> str:
    """One plain sentence naming the checks that decided the verdict."""
    failed = [c["text"] for c in summary["checks"] if c["status"] == "fail"]
    unclear = [c["text"] for c in summary["checks"] if c["status"] == "unclear"]
    if failed:
        return "Not reproduced: " + "; ".join(failed) + " — failed."
    if unclear:
        return "Inconclusive: the measurement straddles the margin for " + "; ".join(unclear) + "."
    return "Reproduced: every check passed."


def _sections(summary: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    n = len(summary.get("seeds", [summary.get("seed")]))
    measured = "ours, seed 0 (indicative)" if n == 1 else f"ours, mean [95% CI] over {n} paired seeds"
    checks = [[c["text"], c.get("paper", "—"), c["value"], c.get("margin_text", "—"), c.get("floor_text", "—"),
               STATUS_MARKS.get(c["status"], c["status"])] for c in summary["checks"]]
    rows = [[r["quantity"], r["ours"], r["paper"]] for r in summary["rows"]]
    ours = "ours" if n == 1 else f"ours (mean ± SD, {n} seeds)"
    return (["quantity", ours, "paper"], rows,
            ["check", "paper", measured, "margin", "noise floor (seed-to-seed SD)", "status"], checks)


README_HEADER = ["experiment", "headline check", "paper", "ours (mean ± SD over seeds)", "95% CI", "verdict"]


def headline(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The check an experiment's one-line summary shows: its first CI-decided check (else its first)."""
    checks = summary["checks"]
    return next((c for c in checks if c.get("claim") is not None), checks[0] if checks else None)


def readme_table(summaries: list[dict[str, Any]]) -> str:
    """The README's lab table, one row per experiment: its headline check, the paper's number beside ours (mean ±
    SD over the seeds), the 95% CI and the verdict with how many of its checks passed."""
    rows = []
    for s in summaries:
        c = headline(s)
        passed = sum(ch["status"] == "pass" for ch in s["checks"])
        verdict = f"{_label(s)} ({passed}/{len(s['checks'])} checks pass)"
        if c is None:
            rows.append([f"`{s['name']}`", "—", "—", "—", "—", verdict])
            continue
        rows.append([f"`{s['name']}`", c["text"], c.get("paper", "—"), c.get("summary", c["value"]),
                     c.get("ci_text", "—"), verdict])
    return _table_md(README_HEADER, rows)


def reassess(out: Path, exp: Experiment, summary: dict[str, Any], per_seed: list[Runs]) -> dict[str, Any]:
    """``summary`` decided afresh from its saved runs by the current spec (rows, checks, verdict), and written
    back; the saved summary, with a warning, when the spec needs a run the results do not hold."""
    setup = Setup(summary["suite"], summary["images"], summary["seed"], summary["device"], len(per_seed))
    try:
        fresh = assess(exp, setup, per_seed)
    except KeyError as exc:
        print(f"warning: {exp.name}: its saved runs lack {exc} that the current spec reads; verdicts as saved",
              file=sys.stderr)
        return summary
    write_json_atomic(experiment_path(out, exp.name), fresh)
    return fresh


def environment_line(runs: list[dict[str, Any]]) -> str:
    """Threads, backend, versions and load of the runs, as recorded when each was trained."""
    envs = [r["env"] for r in runs if "env" in r]
    if not envs:
        return "environment not recorded"
    def values(key: str) -> str:
        return "/".join(sorted({str(e.get(key)) for e in envs}))
    loads = [e["load_1min"] for e in envs if e.get("load_1min") is not None]
    load = f", 1-min load {min(loads):.1f}–{max(loads):.1f}" if loads else ""
    return (f"torch {values('torch')}, numba {values('numba')}, backend {values('backend')}, "
            f"{values('threads')} thread(s), {values('cpus')} CPU(s){load}")


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1f2328;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0 1.2em 0;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f6f8fa}
.verdict{display:inline-block;padding:.15em .6em;border-radius:1em;color:#fff;font-weight:600}
img{max-width:100%;border:1px solid #d0d7de;margin:.4em 0}
section{border-top:2px solid #d0d7de;margin-top:2em;padding-top:.5em}
.meta{color:#57606a;font-size:.9em}
"""


def _label(summary: dict[str, Any]) -> str:
    """The verdict, marked "indicative" when it rests on one seed."""
    return summary["verdict"] + (" (indicative)" if summary.get("indicative", True) else "")


def _badge(verdict: str, summary: dict[str, Any] | None = None) -> str:
    color = VERDICT_COLORS.get(verdict, "#57606a")
    text = verdict if summary is None else _label(summary)
    return f"<span class='verdict' style='background:{color}'>{html.escape(text)}</span>"


def write_report(out: Path, experiments: list[Experiment], redecide: bool = False) -> tuple[Path, Path]:
    """Render every experiment that has a results JSON under ``out`` into ``out/report.html`` (self-contained),
    ``out/report.md`` (with the PNGs beside it) and ``out/readme-table.md`` (the README's lab table).
    ``redecide``: decide each experiment afresh from its saved runs with the current spec first."""
    out = Path(out)
    entries = []
    run_seconds: dict[str, float] = {}
    all_runs: dict[str, dict[str, Any]] = {}
    for exp in experiments:
        path = experiment_path(out, exp.name)
        if not path.is_file():
            continue
        summary = read_json(path)
        per_seed = load_seed_runs(out, summary)
        if redecide:
            summary = reassess(out, exp, summary, per_seed)
        for runs in per_seed:
            run_seconds.update((run["hash"], run["seconds"]) for run in runs.values())
            all_runs.update((run["hash"], run) for run in runs.values())
        pngs = [render_figure(fig, per_seed if len(per_seed) > 1 else per_seed[0], out / f"{fig.name}.png")
                for fig in exp.figures]
        entries.append((summary, pngs))
    if not entries:
        raise FileNotFoundError(f"no experiment results under {out / 'results'}; run `normlab lab run --out {out}` first")
    total = sum(run_seconds.values())  # a run shared by several experiments counts once
    first = entries[0][0]
    seeds = first.get("seeds", [first["seed"]])
    seed_text = (f"one seed ({seeds[0]}): verdicts are indicative" if len(seeds) == 1 else
                 f"{len(seeds)} paired seeds ({seeds[0]}–{seeds[-1]}): every check decided from the 95% CI "
                 "of the paired difference")
    meta = (f"suite {first['suite']}, images {first['images']}, {seed_text}, device {first['device']}; "
            f"{len(entries)} experiment(s); {len(run_seconds)} training runs, {total:.0f} s of training; "
            f"{environment_line(list(all_runs.values()))}")

    md = ["# normlab lab report", "", meta, "", DECISION_RULE, "", "| experiment | verdict |", "| --- | --- |"]
    md += [f"| [{s['name']}](#{s['name']}) | **{_label(s)}** |" for s, _ in entries]
    overview = "".join(
        f"<tr><td><a href='#{html.escape(s['name'])}'>{html.escape(s['name'])}</a></td>"
        f"<td>{html.escape(s['title'])}</td><td>{_badge(s['verdict'], s)}</td></tr>" for s, _ in entries)
    body = [f"<h1>normlab lab report</h1><p class='meta'>{html.escape(meta)}</p>",
            f"<p>{html.escape(DECISION_RULE)}</p>"
            "<table><thead><tr><th>experiment</th><th>what</th><th>verdict</th></tr></thead>"
            f"<tbody>{overview}</tbody></table>"]
    for summary, pngs in entries:
        num_head, num_rows, chk_head, chk_rows = _sections(summary)
        md += ["", f"## {summary['name']}", "", f"**{summary['title']}** — {summary['paper']}", "",
               f"**Verdict: {_label(summary)}.** {verdict_reason(summary)}", "", f"**Claim.** {summary['claim']}", "",
               f"**Our protocol.** {summary['protocol']}", "", f"**Criterion.** {summary['criterion']}", "",
               _table_md(chk_head, chk_rows), "", _table_md(num_head, num_rows), ""]
        md += [f"![{p.stem}]({p.name})" for p in pngs]
        images = "".join(
            f"<img alt='{html.escape(p.stem)}' src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
            for p in pngs)
        body.append(
            f"<section id='{html.escape(summary['name'])}'><h2>{html.escape(summary['name'])}: "
            f"{html.escape(summary['title'])}</h2><p class='meta'>{html.escape(summary['paper'])}</p>"
            f"<p>{_badge(summary['verdict'], summary)} "
            f"{html.escape(verdict_reason(summary))}</p>"
            f"<p><b>Claim.</b> {html.escape(summary['claim'])}</p>"
            f"<p><b>Our protocol.</b> {html.escape(summary['protocol'])}</p>"
            f"<p><b>Criterion.</b> {html.escape(summary['criterion'])}</p>"
            f"<h3>Checks</h3>{_table_html(chk_head, chk_rows)}"
            f"<h3>Our numbers beside the paper's</h3>{_table_html(num_head, num_rows)}{images}</section>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>normlab lab report</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    html_path, md_path = out / "report.html", out / "report.md"
    write_text_atomic(html_path, page)
    write_text_atomic(md_path, "\n".join(md) + "\n")
    write_text_atomic(out / "readme-table.md", readme_table([s for s, _ in entries]) + "\n")
    return html_path, md_path

