"""The vocabulary of an experiment spec: budgets per suite, run configs, checks that decide the
verdict, table rows beside the paper's numbers and declarative figures."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normlab.lab import data as labdata

SUITES = ("smoke", "quick", "full")
RunConfig = dict[str, Any]
Runs = dict[str, dict[str, Any]]

PASS, FAIL, UNCLEAR = "pass", "fail", "unclear"
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


@dataclass(frozen=True)
class Setup:
    """What every run of one lab invocation shares."""

    suite: str
    images: str
    seed: int
    device: str

    @classmethod
    def create(cls, suite: str, data_dir: Path | None, seed: int, device: str) -> "Setup":
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
        images = "cifar10" if labdata.locate_cifar(data_dir) is not None else "fashion-mnist"
        if images == "fashion-mnist":
            labdata.locate_fashion(data_dir)  # a missing folder, or one with neither dataset: say so now
        return cls(suite, images, seed, device)


@dataclass(frozen=True)
class Check:
    """One condition of a verdict: ``status`` is pass, fail or unclear (within the noise margin)."""

    text: str
    value: str
    status: str

    @classmethod
    def of(cls, text: str, value: str, passed: bool, failed: bool) -> "Check":
        return cls(text, value, PASS if passed else FAIL if failed else UNCLEAR)


@dataclass(frozen=True)
class Row:
    quantity: str
    ours: str
    paper: str


def verdict(checks: Sequence[Check]) -> str:
    """Reproduced when every check passes, not reproduced when any fails, inconclusive otherwise."""
    if any(c.status == FAIL for c in checks):
        return NOT_REPRODUCED
    if checks and all(c.status == PASS for c in checks):
        return REPRODUCED
    return INCONCLUSIVE


@dataclass(frozen=True)
class Trace:
    """One plotted thing: a line (``x``, ``y``), a band around it (``lo``, ``hi``) or, with
    ``kind="hist"``, bin edges ``x`` and counts ``y``."""

    label: str
    x: list[float]
    y: list[float]
    lo: list[float] | None = None
    hi: list[float] | None = None
    kind: str = "line"


TraceFn = Callable[[Runs], list[Trace]]


@dataclass(frozen=True)
class Panel:
    title: str
    xlabel: str
    ylabel: str
    traces: tuple[TraceFn, ...]
    xlog: bool = False
    ylog: bool = False
    hline: float | None = None


@dataclass(frozen=True)
class Figure:
    name: str
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Experiment:
    """A declarative experiment: its claim, the runs it needs per suite, how the results decide
    the verdict and what is plotted.

    ``build(setup, budget)`` returns the run configs by key; ``evaluate(runs, budget)`` turns the
    finished runs into table rows and checks; the verdict follows from the checks alone."""

    name: str
    title: str
    paper: str
    claim: str
    protocol: Callable[[dict[str, Any]], str]
    criterion: str
    budgets: dict[str, dict[str, Any]]
    build: Callable[[Setup, dict[str, Any]], dict[str, RunConfig]]
    evaluate: Callable[[Runs, dict[str, Any]], tuple[list[Row], list[Check]]]
    figures: tuple[Figure, ...] = field(default_factory=tuple)

    def runs(self, setup: Setup) -> dict[str, RunConfig]:
        return self.build(setup, self.budgets[setup.suite])


def assess(exp: Experiment, setup: Setup, runs: Runs) -> dict[str, Any]:
    """The summary an experiment's JSON holds: its description, rows, checks, verdict and runs."""
    rows, checks = exp.evaluate(runs, exp.budgets[setup.suite])
    return {
        "name": exp.name,
        "title": exp.title,
        "paper": exp.paper,
        "claim": exp.claim,
        "protocol": exp.protocol(exp.budgets[setup.suite]),
        "criterion": exp.criterion,
        "suite": setup.suite,
        "images": setup.images,
        "seed": setup.seed,
        "device": setup.device,
        "budget": exp.budgets[setup.suite],
        "rows": [vars(r) for r in rows],
        "checks": [vars(c) for c in checks],
        "verdict": verdict(checks),
        "runs": {key: run["hash"] for key, run in runs.items()},
        "seconds": sum(run["seconds"] for run in runs.values()),
    }


def run_config(setup: Setup, data: dict[str, Any], model: dict[str, Any], *, lr: float, steps: int,
               batch: int, eval_every: int, probes: Sequence[dict[str, Any]] = (),
               momentum: float = 0.0) -> RunConfig:
    return {
        "data": data,
        "model": model,
        "optim": {"lr": lr, "momentum": momentum, "batch": batch, "steps": steps},
        "eval_every": eval_every,
        "probes": list(probes),
        "seed": setup.seed,
        "device": setup.device,
    }


def series(run: dict[str, Any], probe: str, key: str) -> list:
    return run["series"].get(probe, {}).get(key, [])


def final(run: dict[str, Any], key: str = "test_acc", last: int = 3) -> float:
    """Mean of the last ``last`` evaluations of ``key``; for a diverged run, the evaluation after
    it diverged. NaN when the run has none."""
    if run["diverged_at"] is not None:
        last = 1
    values = [v for v in series(run, "eval", key)[-last:] if v is not None]
    return float(np.mean(values)) if values else math.nan


def layer_mean(run: dict[str, Any], probe: str, key: str, skip: int = 1) -> list[float]:
    """Per probe step, the mean over layers ``skip:`` of a per-layer quantity."""
    return [float(np.mean(v[skip:])) for v in series(run, probe, key)]


def median(values: Sequence[float]) -> float:
    finite = [math.inf if v is None or math.isnan(v) else v for v in values]
    return float(np.median(finite)) if finite else math.nan


def pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def num(x: float) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}"


def ratio(a: float, b: float) -> float:
    if b == 0:
        return math.inf if a > 0 else math.nan
    return a / b


def curve(key: str, label: str, probe: str, field_name: str,
          transform: Callable[[Any], float] | None = None, x_key: str = "step") -> TraceFn:
    """A line of ``series[probe][field_name]`` against ``series[probe][x_key]`` of run ``key``."""
    def make(runs: Runs) -> list[Trace]:
        run = runs[key]
        ys = series(run, probe, field_name)
        if transform is not None:
            ys = [transform(v) for v in ys]
        return [Trace(label, list(series(run, probe, x_key)), list(ys))]
    return make


def curves(labels: dict[str, str], probe: str, field_name: str,
           transform: Callable[[Any], float] | None = None) -> tuple[TraceFn, ...]:
    return tuple(curve(k, lab, probe, field_name, transform) for k, lab in labels.items())


def band(key: str, label: str, probe: str, field_name: str) -> TraceFn:
    """Median line with the band between the first and last tracked percentile."""
    def make(runs: Runs) -> list[Trace]:
        run = runs[key]
        pcts = series(run, probe, field_name)
        return [Trace(label, list(series(run, probe, "step")), [p[len(p) // 2] for p in pcts],
                      [p[0] for p in pcts], [p[-1] for p in pcts])]
    return make


def layer_curves(labels: dict[str, str], probe: str, field_name: str, skip: int = 1) -> tuple[TraceFn, ...]:
    """Per-layer quantity averaged over layers ``skip:``, against steps."""
    def one(key: str, label: str) -> TraceFn:
        return lambda runs: [Trace(label, list(series(runs[key], probe, "step")),
                                   layer_mean(runs[key], probe, field_name, skip))]
    return tuple(one(k, lab) for k, lab in labels.items())
