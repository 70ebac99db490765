"""``fold``: BN folded into the convolutions of a trained model for inference (PAPERS.md §7).

Claim (the source documents): in eval mode BN is a per-channel affine map, so folding it into the
preceding convolution, W' = W·γ/√(σ²+ε), b' = (b − μ)·γ/√(σ²+ε) + β, gives the same outputs to float
tolerance and removes BN's cost at inference. Measured on the lab's VGG-style CNN and its ResNet-style
net, trained briefly on Fashion-MNIST: the output difference of :func:`normlab.fold` in float64 and
float32, and the eval time of the original, the folded model and the model with its BN layers removed
(nn.Identity: what BN costs), interleaved.

Run it with ``normlab lab run fold`` (``--suite smoke|quick|standard|full``, ``--seeds N``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normlab.folding import fold
from normlab.folding.timing import interleaved_ms
from normlab.lab.papers.common import CI_RULE, CNN, cnn_model, cnn_protocol, test_data
from normlab.lab.probes import ProbeContext, probe
from normlab.lab.spec import Check, Experiment, Figure, Panel, Row, Runs, Setup, Trace, num, run_config, series

UNFOLDED_BELOW = 0.5
"""Every BN layer is folded: the number left unfolded is below this (its CI over the seeds; 0 on every seed)."""
EXACT64 = 1e-10
"""The float64 fold matches the original to below this, relative to the output's size."""
EXACT32 = 1e-4
"""The float32 fold matches the original to below this, relative to the output's size."""
REMOVED = 0.5
"""Folding removes more than this fraction of BN's measured eval cost."""
MODELS = {"cnn": "VGG-style CNN", "resnet": "ResNet-style net"}

BUDGETS: dict[str, dict[str, Any]] = {
    name: {**CNN[name], **extra} for name, extra in {
        "smoke": {"steps": 4, "res_width": 8, "res_blocks": 1, "eval_batch": 32, "repeats": 3},
        "quick": {"steps": 60, "res_width": 32, "res_blocks": 3, "eval_batch": 256, "repeats": 11},
        "full": {"steps": 1000, "res_width": 64, "res_blocks": 6, "eval_batch": 256, "repeats": 31},
    }.items()
}


def _without_bn(model: nn.Module) -> nn.Module:
    """A copy with every BN layer replaced by nn.Identity: the time of the model were BN free."""
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, _BatchNorm):
            parent, _, leaf = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, leaf, nn.Identity())
    return out


@probe("fold")
def fold_probe(cfg: dict[str, Any], ctx: ProbeContext) -> dict[str, Any]:
    """Fold a copy of the model (in eval mode) with :func:`normlab.fold` on the first ``eval_batch`` probe
    images; record what was folded, the output differences and interleaved eval times (ms) of the original,
    the folded model and the model without BN."""
    model = copy.deepcopy(ctx.model).eval()
    x = ctx.probe_x[:cfg["eval_batch"]]
    folded, report = fold(model, x)
    ms = interleaved_ms({"original": model, "folded": folded, "no_bn": _without_bn(model)}, (x,), cfg["repeats"])
    return {"folded": len(report.folded), "unfolded": [list(u) for u in report.unfolded],
            "bn_layers": sum(isinstance(m, _BatchNorm) for m in model.modules()),
            "diff64": report.max_diff_float64, "diff32": report.max_diff_float32, "scale": report.output_scale,
            **{f"ms_{k}": v for k, v in ms.items()}}


def _build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    pr = {"kind": "fold", "steps": [b["steps"]], "eval_batch": b["eval_batch"], "repeats": b["repeats"]}
    models = {"cnn": cnn_model(b),
              "resnet": {"arch": "resnet", "width": b["res_width"], "blocks": b["res_blocks"], "norm": "bn"}}
    return {key: run_config(setup, test_data(setup, b), model, lr=0.05, steps=b["steps"], batch=b["batch"],
                            eval_every=b["steps"], probes=[pr])
            for key, model in models.items()}


def _get(run: dict[str, Any], key: str):
    values = series(run, "fold", key)
    return values[-1] if values else math.nan


def _removed(run: dict[str, Any]) -> float:
    """Fraction of BN's eval cost (original − no BN) that folding removed (original − folded)."""
    cost = _get(run, "ms_original") - _get(run, "ms_no_bn")
    return (_get(run, "ms_original") - _get(run, "ms_folded")) / cost if cost > 0 else math.nan


def _evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    rows, checks = [], []
    for key, label in MODELS.items():
        run = runs[key]
        rel64 = _get(run, "diff64") / max(_get(run, "scale"), 1.0)
        rel32 = _get(run, "diff32") / max(_get(run, "scale"), 1.0)
        speed = _get(run, "ms_original") / _get(run, "ms_folded")
        rows += [
            Row(f"{label}: BN layers folded", f"{_get(run, 'folded')} of {_get(run, 'bn_layers')}", "all"),
            Row(f"{label}: largest output difference, float64 / float32",
                f"{num(_get(run, 'diff64'))} / {num(_get(run, 'diff32'))} (outputs up to {num(_get(run, 'scale'))})",
                "same outputs to float tolerance"),
            Row(f"{label}: eval ms per batch of {b['eval_batch']}: original / folded / without BN",
                f"{num(_get(run, 'ms_original'))} / {num(_get(run, 'ms_folded'))} / {num(_get(run, 'ms_no_bn'))}",
                "—"),
            Row(f"{label}: eval speed-up, and share of BN's cost removed",
                f"{speed:.2f}x, {100 * _removed(run):.0f}%", "BN's cost removed"),
        ]
        checks += [
            Check.level(f"{label}: every BN layer folded (layers left unfolded < {UNFOLDED_BELOW:g})",
                        _get(run, "bn_layers") - _get(run, "folded"), UNFOLDED_BELOW, "<", paper="0 (all)"),
            Check.level(f"{label}: float64 outputs agree to {EXACT64:g} (relative to the output size)", rel64,
                        EXACT64, "<", paper="same outputs to float tolerance"),
            Check.level(f"{label}: float32 outputs agree to {EXACT32:g} (relative to the output size)", rel32,
                        EXACT32, "<", paper="same outputs to float tolerance"),
            Check.level(f"{label}: folding removes more than {100 * REMOVED:g}% of BN's eval cost", _removed(run),
                        REMOVED, ">", unit="percent", paper="100% (BN's cost removed)"),
        ]
    return rows, checks


def _time_traces(runs: Runs) -> list[Trace]:
    """Per model, eval ms of the original (0-1), the folded model (1-2) and the model without BN (2-3)."""
    return [Trace(label, [0, 1, 2, 3], [_get(runs[key], f"ms_{k}") for k in ("original", "folded", "no_bn")],
                  kind="hist") for key, label in MODELS.items()]


def _diff_traces(runs: Runs) -> list[Trace]:
    """Per model, the relative output difference in float64 (0-1) and float32 (1-2)."""
    return [Trace(label, [0, 1, 2], [max(_get(runs[key], d) / max(_get(runs[key], "scale"), 1.0), 1e-17)
                                     for d in ("diff64", "diff32")], kind="hist") for key, label in MODELS.items()]


EXPERIMENT = Experiment(
    name="fold",
    title="Folding BN into the convolutions: same outputs, BN's inference cost removed",
    paper="Inference folding (PAPERS.md §7)",
    claim="Folding BN into the preceding convolution gives the same outputs to float tolerance and removes BN's "
          "cost at inference.",
    protocol=lambda b: cnn_protocol(b) + (
        f" Here {b['steps']} steps at lr 0.05, for the CNN and for a ResNet-style net (stem + {b['res_blocks']} "
        f"residual blocks of width {b['res_width']}). Then normlab.fold on the eval model, outputs compared on "
        f"{b['eval_batch']} test images in float64 and float32, and the original, folded and BN-free models timed "
        f"interleaved ({b['repeats']} samples each, medians)."),
    criterion=(f"Per model, four checks against fixed marks: BN layers left unfolded < {UNFOLDED_BELOW:g}; outputs "
               f"within {EXACT64:g} (float64) and {EXACT32:g} (float32) of the output size; folding removes > "
               f"{100 * REMOVED:g}% of the eval time BN costs (original − BN removed). " + CI_RULE),
    budgets=BUDGETS,
    build=_build,
    evaluate=_evaluate,
    figures=(Figure("fold", "Folded vs original eval model", (
        Panel("eval time per batch: original | folded | without BN", "0-1 original, 1-2 folded, 2-3 BN removed",
              "ms per forward", (_time_traces,)),
        Panel("largest output difference / output size", "0-1 float64, 1-2 float32", "relative difference",
              (_diff_traces,), ylog=True),
    )),),
)
