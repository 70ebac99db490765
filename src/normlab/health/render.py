"""A :class:`~normlab.health.checks.ModelHealth` as a terminal table, a JSON file and one self-contained
HTML page (plots embedded as base64 PNG, no external resource), both written atomically."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from normlab.health.checks import FLAGS, GAP, STALE_SIGMA, VAR_RATIO, ModelHealth

__all__ = ["table", "write_json", "write_html"]

_COLUMNS = ("layer", "kind", "C", "m/ch", "Δμ (σ)", "var ratio", "NaN/inf", "var<0", "batches", "skipped",
            "dead γ", "fold", "flags")


def _num(value, fmt=".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, fmt)


def _row(layer) -> list[str]:
    ratio = "-" if layer.var_ratio_max is None else f"{_num(layer.var_ratio_min)}–{_num(layer.var_ratio_max)}"
    return [layer.name, layer.kind, str(layer.channels), _num(layer.values_per_channel, "d"),
            _num(layer.mean_shift_sigma), ratio, str(layer.nonfinite_channels), str(layer.negative_var_channels),
            _num(layer.batches_tracked, "d"), str(layer.batches_skipped), str(layer.dead_gamma_channels),
            "yes" if layer.foldable else "no", ", ".join(layer.flags) or "ok"]


def table(report: ModelHealth) -> str:
    """The per-layer table, the model's train/eval gap, and what each raised flag means."""
    rows = [list(_COLUMNS)] + [_row(layer) for layer in report.layers]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"train/eval output gap: {_num(report.train_eval_gap, '.3f')} σ (flagged above {GAP})"
                 f" over {report.batches} batch(es)")
    raised = sorted({f for layer in report.layers for f in layer.flags} | set(report.flags))
    lines += [f"  {f}: {FLAGS[f]}" for f in raised]
    lines += [f"note: {n}" for n in report.notes]
    lines.append(f"{len(report.flagged)} issue(s) found" if report.flagged else "all normalization layers healthy")
    return "\n".join(lines)


def write_json(report: ModelHealth, path: Path) -> None:
    from normlab.lab.engine import write_text_atomic

    write_text_atomic(Path(path), json.dumps(report.to_json(), indent=1, sort_keys=True, allow_nan=False))


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(report: ModelHealth) -> list[tuple[str, str]]:
    """(caption, base64 PNG) of the divergence per layer, then batch against running statistics per channel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    measured = [lay for lay in report.layers if lay.mean_shift_sigma is not None]
    if measured:
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(measured) + 2), 3))
        names = [lay.name for lay in measured]
        ax.bar(range(len(measured)), [lay.mean_shift_sigma for lay in measured],
               color=["tab:red" if "stale_stats" in lay.flags else "tab:blue" for lay in measured])
        ax.axhline(STALE_SIGMA, color="gray", linestyle="--", label=f"flagged above {STALE_SIGMA} σ")
        ax.set_xticks(range(len(measured)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("max |Δμ| / σ_running")
        ax.legend(fontsize=8)
        out.append(("Largest mean shift per layer, batch vs running, in running standard deviations", _png(fig)))
        plt.close(fig)
    for lay in measured:
        pc = lay.per_channel
        fig, axes = plt.subplots(1, 2, figsize=(7, 2.8))
        for ax, (b, r, what) in zip(axes, (("batch_mean", "running_mean", "mean"), ("batch_std", "running_std", "std"))):
            xs = [v if v is not None and math.isfinite(v) else math.nan for v in pc[r]]
            ys = [v if v is not None and math.isfinite(v) else math.nan for v in pc[b]]
            ax.scatter(xs, ys, s=12)
            finite = [v for v in xs + ys if not math.isnan(v)]
            if finite:
                lo, hi = min(finite), max(finite)
                ax.plot([lo, hi], [lo, hi], color="gray", linewidth=0.8)
            ax.set_xlabel(f"running {what}")
            ax.set_ylabel(f"batch {what}")
        fig.suptitle(f"{lay.name} ({lay.kind}): per channel, on the diagonal when healthy", fontsize=9)
        fig.tight_layout()
        out.append((f"{lay.name}: batch vs running statistics per channel"
                    f" (variance ratio flagged outside [1/{VAR_RATIO:g}, {VAR_RATIO:g}])", _png(fig)))
        plt.close(fig)
    return out


def write_html(report: ModelHealth, path: Path, title: str = "normlab inspect") -> None:
    """One page: the table, the flags' meanings, and the plots, every image inline."""
    from normlab.lab.engine import write_text_atomic

    head = "".join(f"<th>{html.escape(c)}</th>" for c in _COLUMNS)
    body = "".join(
        "<tr class='{}'>".format("bad" if layer.flags else "ok")
        + "".join(f"<td>{html.escape(cell)}</td>" for cell in _row(layer)) + "</tr>"
        for layer in report.layers
    )
    flags = "".join(f"<li><b>{html.escape(f)}</b>: {html.escape(t)}</li>" for f, t in FLAGS.items())
    figures = "".join(f"<figure><img alt='{html.escape(cap)}' src='data:image/png;base64,{png}'>"
                      f"<figcaption>{html.escape(cap)}</figcaption></figure>" for cap, png in _plots(report))
    summary = html.escape(f"{len(report.flagged)} issue(s): " + "; ".join(report.flagged)
                          if report.flagged else "all normalization layers healthy")
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in report.notes)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:80em}}table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:2px 6px}}tr.bad{{background:#fde2e2}}tr.ok{{background:#e6f4e6}}
figure{{display:inline-block;margin:1em}}img{{max-width:100%}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p><b>{summary}</b></p>
<p>Train/eval output gap: {html.escape(_num(report.train_eval_gap, '.3f'))} σ (flagged above {GAP}),
over {report.batches} batch(es).</p>{notes}
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Flags</h2><ul>{flags}</ul>
<h2>Plots</h2>{figures}
</body></html>
"""
    write_text_atomic(Path(path), page)
