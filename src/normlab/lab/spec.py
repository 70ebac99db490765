"""The vocabulary of an experiment spec: budgets per suite, run configs, checks that decide the
verdict, table rows beside the paper's numbers and declarative figures."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from normlab.lab import data as labdata
from normlab.lab import stats

SUITES = ("smoke", "quick", "standard", "full")
SEEDS = {"smoke": 1, "quick": 1, "standard": 5, "full": 5}
"""Seeds per suite unless ``--seeds`` says otherwise: quick is one seed ("indicative"), standard and full
decide every check from a confidence interval over paired seeds."""
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
    seeds: int = 1

    @classmethod
    def create(cls, suite: str, data_dir: Path | None, seed: int, device: str, seeds: int | None = None) -> "Setup":
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
        seeds = SEEDS[suite] if seeds is None else seeds
        if seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {seeds}")
        images = "cifar10" if labdata.locate_cifar(data_dir) is not None else "fashion-mnist"
        if images == "fashion-mnist":
            labdata.locate_fashion(data_dir)  # a missing folder, or one with neither dataset: say so now
        return cls(suite, images, seed, device, seeds)

    def seed_list(self) -> list[int]:
        """The paired seeds: every arm runs once with each, so arms compare within a seed."""
        return [self.seed + i for i in range(self.seeds)]


def _transform(v: float | None, log: bool) -> float:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return math.nan
    if not log:
        return float(v)
    if v <= 0:
        return -math.inf if v == 0 else math.nan
    return math.log(v)


@dataclass(frozen=True)
class Check:
    """One condition of a verdict: ``status`` is pass, fail or unclear.

    Made by :meth:`compare` or :meth:`level`, a check carries its seed's paired quantity ``x`` (``a − b``,
    or ``log a − log b`` with ``log``), the arms ``a``, ``b`` it came from, its ``claim`` (see
    :data:`normlab.lab.stats.CLAIMS`) and ``margin``; over several seeds :func:`combine_checks` decides it
    from the confidence interval of ``x``. ``paper`` is the paper's number for the same quantity, shown beside
    ours in the report. Made by :meth:`of`, it is a yes/no condition per seed."""

    text: str
    value: str
    status: str
    claim: str | None = None
    x: float | None = None
    a: float | None = None
    b: float | None = None
    margin: float = 0.0
    floor: bool = True
    log: bool = False
    unit: str = ""
    level_of: float | None = None
    paper: str = "—"

    @classmethod
    def of(cls, text: str, value: str, passed: bool, failed: bool) -> "Check":
        return cls(text, value, PASS if passed else FAIL if failed else UNCLEAR)

    @classmethod
    def compare(cls, text: str, a: float, b: float, claim: str, margin: float, *, log: bool = False,
                unit: str = "", floor: bool = True, paper: str = "—") -> "Check":
        """Arm ``a`` against arm ``b`` of the same seed: ``claim`` about ``a − b`` (``log``: about ``a / b``,
        the margin then in natural-log units); ``unit="points"`` shows a fraction as percentage points.
        ``floor``: the margin is raised to the measured seed-to-seed noise floor of the arms."""
        fa, fb = _transform(a, log), _transform(b, log)
        x = fa - fb
        status, ci = stats.decide([x], claim, margin)
        check = cls(text, "", status, claim, x, fa, fb, margin, floor, log, unit, paper=paper)
        return replace(check, value=check.render(ci.mean, ci.lo, ci.hi, 1))

    @classmethod
    def level(cls, text: str, a: float, threshold: float, claim: str, *, log: bool = False,
              unit: str = "", paper: str = "—") -> "Check":
        """One arm's quantity against a fixed ``threshold`` (the paper's number): ``claim`` about ``a`` vs it."""
        check = cls.compare(text, a, threshold, claim, 0.0, log=log, unit=unit, floor=False, paper=paper)
        check = replace(check, level_of=_transform(threshold, log))
        return replace(check, value=check.render(check.x, check.x, check.x, 1))

    def show(self, v: float) -> str:
        """``v`` (a value of ``x``) in the check's own units."""
        if self.level_of is not None:
            v = v + self.level_of
            v = math.exp(v) if self.log else v
            return f"{100 * v:.1f}%" if self.unit == "percent" else num(v)
        if self.log:
            return f"×{num(math.exp(v))}"
        if self.unit == "points":
            return f"{100 * v:+.1f} points"
        return f"{v:+.3g}" if math.isfinite(v) else num(v)

    def render(self, mean: float, lo: float, hi: float, n: int) -> str:
        if n <= 1:
            return self.show(mean)
        return f"{self.show(mean)} [{self.show(lo)}, {self.show(hi)}]"


@dataclass(frozen=True)
class Row:
    """One line of "our numbers beside the paper's"; ``value`` (a number, shown as ``fmt``: "pct" or "num")
    lets several seeds be summarized as mean ± SD."""

    quantity: str
    ours: str
    paper: str
    value: float | None = None
    fmt: str = "num"


def verdict(statuses: Sequence[str]) -> str:
    """Reproduced when every check passes, not reproduced when any fails, inconclusive otherwise."""
    if any(s == FAIL for s in statuses):
        return NOT_REPRODUCED
    if statuses and all(s == PASS for s in statuses):
        return REPRODUCED
    return INCONCLUSIVE


def combine_checks(per_seed: Sequence[Sequence[Check]]) -> list[dict[str, Any]]:
    """One entry per check over the seeds: a :meth:`Check.compare`/:meth:`Check.level` check is decided from
    the t-interval of its paired quantity, with its margin raised to the arms' measured noise floor; a
    yes/no check passes when it passes on every seed and fails when it fails on every seed."""
    out = []
    for group in zip(*per_seed):
        first, n = group[0], len(group)
        if first.claim is None:
            statuses = [c.status for c in group]
            status = statuses[0] if n == 1 else (PASS if all(s == PASS for s in statuses) else
                                                  FAIL if all(s == FAIL for s in statuses) else UNCLEAR)
            value = first.value if n == 1 else (f"{statuses.count(PASS)}/{n} seeds pass "
                                                f"(seed {0}: {first.value})")
            out.append({"text": first.text, "value": value, "status": status, "n": n, "paper": first.paper})
            continue
        xs = [c.x for c in group]
        floor = stats.noise_floor([c.a for c in group], [c.b for c in group]) if first.floor else math.nan
        margin = stats.effective_margin(first.margin, floor)
        status, ci = stats.decide(xs, first.claim, margin)
        out.append({"text": first.text, "value": first.render(ci.mean, ci.lo, ci.hi, ci.n), "status": status,
                    "claim": first.claim, "n": ci.n, "mean": ci.mean, "sd": ci.sd, "lo": ci.lo, "hi": ci.hi,
                    "margin": margin, "stated_margin": first.margin, "noise_floor": floor, "log": first.log,
                    "margin_text": _margin_text(first, margin), "floor_text": _floor_text(first, floor),
                    "paper": first.paper, "summary": _summary_text(first, ci),
                    "ci_text": "—" if ci.n < 2 else f"[{first.show(ci.lo)}, {first.show(ci.hi)}]", "per_seed": xs})
    return out


def _size_text(check: Check, v: float) -> str:
    """A margin or a spread (a size, not a position) in the check's units."""
    return (f"{100 * v:.1f} points" if check.unit == "points" else
            f"×{math.exp(v):.3g}" if check.log else f"{v:.3g}")


def _margin_text(check: Check, margin: float) -> str:
    if check.level_of is not None:
        return f"threshold {check.show(0.0)}"
    return _size_text(check, margin)


def _floor_text(check: Check, floor: float) -> str:
    """The measured noise floor the margin was raised to ("—" where none applies: one seed, or a level check)."""
    return "—" if math.isnan(floor) else _size_text(check, floor)


def _summary_text(check: Check, ci: stats.Interval) -> str:
    """Ours as mean ± SD over the seeds (the point with one seed), in the check's units."""
    if ci.n == 0:
        return "n/a"
    if ci.n == 1 or math.isnan(ci.sd):
        return check.show(ci.mean)
    if check.log:  # a spread of logs is a factor
        return f"{check.show(ci.mean)} (SD ×{math.exp(ci.sd):.3g})"
    return f"{check.show(ci.mean)} ± {_size_text(check, ci.sd)}"


def combine_rows(per_seed: Sequence[Sequence[Row]]) -> list[dict[str, Any]]:
    """One row per quantity: mean ± SD over the seeds where the rows carry numbers, else seed 0's text."""
    out = []
    for group in zip(*per_seed):
        first = group[0]
        ours = first.ours
        if len(group) > 1 and all(r.value is not None for r in group):
            ci = stats.interval([r.value for r in group])
            show = pct if first.fmt == "pct" else num
            spread = f"{100 * ci.sd:.1f} pts" if first.fmt == "pct" else num(ci.sd)
            ours = "n/a" if ci.n == 0 else f"{show(ci.mean)} ± {spread} (n={ci.n})"
        elif len(group) > 1:
            ours = f"{first.ours} (seed 0)"
        out.append({"quantity": first.quantity, "ours": ours, "paper": first.paper})
    return out


@dataclass(frozen=True)
class Trace:
    """One plotted thing: a line (``x``, ``y``), a band around it (``lo``, ``hi``), with ``kind="hist"`` bin
    edges ``x`` and counts ``y``, or with ``kind="contour"`` the values ``z[j][i]`` at (``x[i]``, ``y[j]``)."""

    label: str
    x: list[float]
    y: list[float]
    lo: list[float] | None = None
    hi: list[float] | None = None
    kind: str = "line"
    z: list[list[float]] | None = None


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

    def budget(self, suite: str) -> dict[str, Any]:
        """The budget of ``suite``; ``standard`` is the quick budget over more seeds unless it has its own."""
        if suite == "standard" and suite not in self.budgets:
            suite = "quick"
        return self.budgets[suite]

    def runs(self, setup: Setup) -> dict[str, RunConfig]:
        return self.build(setup, self.budget(setup.suite))


def assess(exp: Experiment, setup: Setup, per_seed: Sequence[Runs]) -> dict[str, Any]:
    """The summary an experiment's JSON holds: its description, rows and checks combined over the paired
    seeds (``per_seed[i]``: the runs of seed ``setup.seed + i``), the verdict and the runs."""
    budget = exp.budget(setup.suite)
    evaluated = [exp.evaluate(runs, budget) for runs in per_seed]
    checks = combine_checks([c for _, c in evaluated])
    seconds = {run["hash"]: run["seconds"] for runs in per_seed for run in runs.values()}
    return {
        "name": exp.name,
        "title": exp.title,
        "paper": exp.paper,
        "claim": exp.claim,
        "protocol": exp.protocol(budget),
        "criterion": exp.criterion,
        "suite": setup.suite,
        "images": setup.images,
        "seed": setup.seed,
        "seeds": setup.seed_list()[:len(per_seed)],
        "indicative": len(per_seed) == 1,
        "device": setup.device,
        "budget": budget,
        "rows": combine_rows([r for r, _ in evaluated]),
        "checks": checks,
        "verdict": verdict([c["status"] for c in checks]),
        "runs": {key: run["hash"] for key, run in per_seed[0].items()},
        "seed_runs": [{key: run["hash"] for key, run in runs.items()} for runs in per_seed],
        "seconds": sum(seconds.values()),
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
    """Mean of the last ``last`` evaluations of ``key`` that have a value (the training metrics have none at
    step 0); for a diverged run, the evaluation after it diverged. NaN when the run has none."""
    if run["diverged_at"] is not None:
        last = 1
    values = [v for v in series(run, "eval", key) if v is not None and not math.isnan(v)][-last:]
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
