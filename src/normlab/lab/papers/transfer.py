"""``transfer``: fine-tuning on new classes with small batches, BN statistics frozen vs live.

Claim (the source documents; the practice of detection and segmentation fine-tuning, e.g. "FrozenBN" in Wu
& Johnson 2021 §5): when a pre-trained model is fine-tuned with small batches, BN's batch statistics are
noisy and its running statistics drift towards them; keeping the pre-trained statistics fixed
(:func:`normlab.freeze_bn`, γ and β still trained) fine-tunes better.

Protocol here: the lab CNN pre-trained on Fashion-MNIST classes 0-4; then copies of it fine-tuned on classes
5-9 with plain SGD at small and larger batch sizes, once with live BN (training mode, running statistics
updated) and once with frozen statistics, and tested on the test images of classes 5-9. The fine-tuning is
done by the ``transfer`` probe at the last pre-training step.

Run it with ``normlab lab run transfer`` (``--suite smoke|quick|standard|full``, ``--seeds N``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F

from normlab.freeze import freeze_bn
from normlab.lab import data as labdata
from normlab.lab.papers.common import CI_RULE, CNN, POINT, accuracy, accuracy_check, cnn_model, cnn_protocol, test_data
from normlab.lab.probes import ProbeContext, probe
from normlab.lab.spec import Check, Experiment, Figure, Panel, Row, Runs, Setup, Trace, pct, run_config, series

SOURCE, TARGET = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
VARIANTS = {"live": "live BN (train mode)", "frozen": "frozen statistics (freeze_bn, γ β trained)"}
GAIN = POINT
"""At the smallest batch, frozen statistics beat live ones by more than this accuracy (raised to the noise floor)."""

BUDGETS: dict[str, dict[str, Any]] = {
    name: {**CNN[name], **extra} for name, extra in {
        "smoke": {"steps": 6, "eval_every": 6, "ft_steps": 4, "ft_batches": [2, 8], "ft_lr": 0.005},
        "quick": {"n_test": None, "steps": 300, "eval_every": 100, "ft_steps": 150, "ft_batches": [4, 32], "ft_lr": 0.005},
        "full": {"steps": 4000, "eval_every": 500, "ft_steps": 2000, "ft_batches": [2, 4, 8, 32], "ft_lr": 0.005},
    }.items()
}


def _finetune(model, x, y, batch: int, steps: int, lr: float, seed: int) -> bool:
    """Fine-tune ``model`` in place; whether every loss stayed finite (a run stops at the first that does not)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(y), (batch,), generator=gen).to(x.device)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if not math.isfinite(float(loss.detach())):
            return False
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return True


@probe("transfer")
def transfer(cfg: dict[str, Any], ctx: ProbeContext) -> dict[str, Any]:
    """Fine-tune copies of the model on ``target`` classes (data as in ``data``, from the run's data folder),
    ``ft_steps`` SGD steps (lr ``ft_lr``, momentum 0.9) per batch size in ``ft_batches``, with live and with
    frozen BN statistics; test accuracy on the target classes under ``{variant}`` (one per batch size),
    whether its fine-tuning stayed finite under ``{variant}_finite``, and ``before`` (the pre-trained model
    on them)."""
    d = cfg["data"]
    ds = labdata.load_images(d["name"], ctx.data_dir, d["n_train"], d["n_test"], d["size"], cfg["seed"])
    ds = ds.only(cfg["target"]).to(ctx.x.device)
    out: dict[str, Any] = {"before": accuracy(ctx.model, ds.test_x, ds.test_y)}
    for variant in VARIANTS:
        out[variant], out[f"{variant}_finite"] = [], []
        for batch in cfg["ft_batches"]:
            model = copy.deepcopy(ctx.model)
            if variant == "frozen":
                model = freeze_bn(model, affine=True)
            finite = _finetune(model, ds.train_x, ds.train_y, batch, cfg["ft_steps"], cfg["ft_lr"], cfg["seed"])
            out[f"{variant}_finite"].append(finite)
            out[variant].append(accuracy(model, ds.test_x, ds.test_y))
    return out


def _build(setup: Setup, b: dict[str, Any]) -> dict[str, Any]:
    data = {**test_data(setup, b), "classes": SOURCE}
    target = {**test_data(setup, b), "classes": TARGET}
    pr = {"kind": "transfer", "steps": [b["steps"]], "data": target, "target": TARGET, "seed": setup.seed,
          "ft_steps": b["ft_steps"], "ft_batches": b["ft_batches"], "ft_lr": b["ft_lr"]}
    return {"cnn": run_config(setup, data, cnn_model(b), lr=0.1, steps=b["steps"], batch=b["batch"],
                              eval_every=b["eval_every"], probes=[pr])}


def _res(runs: Runs) -> dict[str, Any]:
    return {k: v[-1] for k, v in runs["cnn"]["series"].get("transfer", {}).items() if v}


def _evaluate(runs: Runs, b: dict[str, Any]) -> tuple[list[Row], list[Check]]:
    res = _res(runs)
    rows = [Row("pre-training (classes 0-4): final test accuracy", pct(series(runs["cnn"], "eval", "test_acc")[-1]
                                                                       if series(runs["cnn"], "eval", "test_acc")
                                                                       else math.nan), "—"),
            Row("pre-trained model on classes 5-9, before fine-tuning", pct(res.get("before", math.nan)), "—")]
    for variant, label in VARIANTS.items():
        for i, batch in enumerate(b["ft_batches"]):
            acc = res[variant][i] if variant in res else math.nan
            diverged = "" if res.get(f"{variant}_finite", [True] * (i + 1))[i] else " (loss diverged)"
            rows.append(Row(f"fine-tuned on classes 5-9, batch {batch}, {label}", pct(acc) + diverged, "—"))
    frozen, live = (res["frozen"][0], res["live"][0]) if "frozen" in res else (math.nan, math.nan)
    checks = [accuracy_check(f"batch {b['ft_batches'][0]}: frozen statistics beat live BN by more than "
                             f"{100 * GAIN:g} point", frozen, live, ">", GAIN,
                             paper="— (practice: freeze BN when fine-tuning with small batches)")]
    return rows, checks


def _traces(runs: Runs) -> list[Trace]:
    res = _res(runs)
    batches = runs["cnn"]["config"]["probes"][0]["ft_batches"]
    return [Trace(label, list(batches), res[v]) for v, label in VARIANTS.items() if v in res]


EXPERIMENT = Experiment(
    name="transfer",
    title="Fine-tuning on new classes with small batches: frozen vs live BN statistics",
    paper="Fine-tuning practice quoted by the documents (frozen BN; Wu & Johnson 2021 §5)",
    claim="Fine-tuned with small batches, a pre-trained BN model does better with its statistics frozen than live.",
    protocol=lambda b: cnn_protocol(b) + (
        f" Pre-trained {b['steps']} steps at lr 0.1 on classes 0-4 only; then fine-tuned {b['ft_steps']} steps "
        f"(SGD lr {b['ft_lr']}, momentum 0.9) on classes 5-9 at batch sizes {', '.join(map(str, b['ft_batches']))}, "
        f"live vs frozen statistics; tested on the test images of classes 5-9."),
    criterion=(f"At the smallest batch size, frozen statistics' accuracy − live BN's > {100 * GAIN:g} point "
               f"(paired). " + CI_RULE),
    budgets=BUDGETS,
    build=_build,
    evaluate=_evaluate,
    figures=(Figure("transfer", "Fine-tuning on classes 5-9", (
        Panel("test accuracy after fine-tuning", "batch size", "test accuracy (classes 5-9)", (_traces,),
              xlog=True),)),),
)
