"""The one engine that runs every experiment: a training loop with probes, results cached by
config hash and written atomically, so an interrupted lab resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from normlab._io import write_atomic
from normlab.lab import data as labdata
from normlab.lab.models import build_model
from normlab.lab.probes import PROBES, ProbeContext, is_due
from normlab.lab.spec import Experiment, Setup, assess

FORMAT_VERSION = 3
RunConfig = dict[str, Any]
RunResult = dict[str, Any]


def config_hash(config: RunConfig) -> str:
    """A stable hash of everything that determines a run's numbers."""
    blob = json.dumps({"format": FORMAT_VERSION, "config": config}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` holds either its old content or the complete new one
    (:func:`normlab._io.write_atomic`)."""
    write_atomic(path, text)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1, sort_keys=True))


def read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def environment(device: torch.device) -> dict[str, Any]:
    """What a run's numbers may depend on besides its config: threads, backend, versions, machine and load."""
    try:
        from importlib.metadata import version

        numba = version("numba")
    except Exception:  # noqa: BLE001 - numba is optional
        numba = None
    return {
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "backend": os.environ.get("NORMLAB_BACKEND", "auto"),
        "torch": torch.__version__,
        "numba": numba,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": str(device),
    }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


@dataclass
class Task:
    """The data of one run on its device, and how it is scored."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classify: bool
    classes: int
    probe_x: torch.Tensor
    probe_y: torch.Tensor

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.classify:
            return F.cross_entropy(out, y)
        return (out - y).pow(2).sum()


def prepare_task(cfg: dict[str, Any], data_dir: Path | None, device: torch.device, seed: int) -> Task:
    """Load a run's data: ``{"name": "gaussian", "n", "dim"}`` (one full batch; test = train) or an
    image dataset ``{"name", "n_train", "n_test", "size", "n_probe"}`` (``"classes"``: only those classes)."""
    if cfg["name"] == "gaussian":
        x, y, _ = labdata.gaussian_regression(cfg["n"], cfg["dim"], seed)
        x, y = x.to(device), y.to(device)
        return Task(x, y, x, y, False, cfg["dim"], x, y)
    ds = labdata.load_images(cfg["name"], data_dir, cfg.get("n_train"), cfg.get("n_test"), cfg.get("size"), seed)
    if cfg.get("classes") is not None:
        ds = ds.only(cfg["classes"])
    ds = ds.to(device)
    n_probe = cfg.get("n_probe", 512)
    return Task(ds.train_x, ds.train_y, ds.test_x, ds.test_y, True, ds.num_classes,
                ds.test_x[:n_probe], ds.test_y[:n_probe])


def evaluate(model: torch.nn.Module, task: Task, chunk: int = 1000) -> tuple[float, float]:
    """Mean loss and accuracy on the test split in evaluation mode (accuracy NaN for regression)."""
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, len(task.test_y)
    with torch.no_grad():
        for start in range(0, n, chunk):
            x, y = task.test_x[start:start + chunk], task.test_y[start:start + chunk]
            out = model(x)
            if task.classify:
                total_loss += float(F.cross_entropy(out, y, reduction="sum"))
                correct += int((out.argmax(1) == y).sum())
            else:
                total_loss += float(task.loss(out, y))
    model.train(was_training)
    if task.classify:
        return total_loss / n, correct / n
    return total_loss, math.nan


def train(config: RunConfig, data_dir: Path | None, device: torch.device, bar: tqdm | None = None) -> RunResult:
    """Train one run and record its evaluations and probes.

    ``config``: ``data`` (see :func:`prepare_task`), ``model`` (see :func:`build_model`),
    ``optim`` (``lr``, ``momentum``, ``batch``, ``steps``, and optionally ``groups``: ``{"size", "classes"}``
    for non-i.i.d. batches, see :func:`labdata.class_batches`), ``eval_every``, ``probes`` and ``seed``.
    Evaluations and probes happen before the optimizer step of the steps they are due at, and once
    more after the last step. A non-finite training loss stops the run and marks it diverged.
    """
    if "ddp" in config:  # a data-parallel run: torchrun's processes train it (normlab.lab.ddp)
        from normlab.lab.ddp import launch

        result = launch(config, data_dir)
        if bar is not None:
            bar.update(config["optim"]["steps"])
        return result
    wall_started = time.perf_counter()
    seed = config["seed"]
    seed_everything(seed)
    task = prepare_task(config["data"], data_dir, device, seed)
    model = build_model(config["model"], tuple(task.train_x.shape[1:]), task.classes, seed).to(device)
    opt_cfg = config["optim"]
    lr, steps = opt_cfg["lr"], opt_cfg["steps"]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=opt_cfg.get("momentum", 0.0))
    if "groups" in opt_cfg:  # non-i.i.d. batches: a few classes per group of the batch
        groups = opt_cfg["groups"]
        order = labdata.class_batches(task.train_y, opt_cfg["batch"], groups["size"], groups["classes"],
                                      torch.Generator().manual_seed(seed))
    else:
        order = labdata.batches(len(task.train_y), opt_cfg["batch"], torch.Generator().manual_seed(seed))
    extra_gen = torch.Generator().manual_seed(seed + 1)
    extra_order = labdata.batches(len(task.train_y), opt_cfg["batch"], extra_gen)

    def extra_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        picks = [next(extra_order) for _ in range(n)]
        return [(task.train_x[i.to(device)], task.train_y[i.to(device)]) for i in picks]

    series: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    run_loss, run_correct, run_n, run_seen, run_max = 0.0, 0, 0, 0, -math.inf
    diverged_at = None
    model.train()
    started = time.perf_counter()
    step = 0
    while True:
        idx = next(order).to(device)
        x, y = task.train_x[idx], task.train_y[idx]
        last = step == steps or diverged_at is not None
        if step % config["eval_every"] == 0 or last:
            test_loss, test_acc = evaluate(model, task)
            ev = series["eval"]
            ev["step"].append(step)
            ev["test_loss"].append(test_loss)
            ev["test_acc"].append(test_acc)
            ev["train_loss"].append(run_loss / run_n if run_n else math.nan)
            ev["train_acc"].append(run_correct / run_seen if run_seen and task.classify else math.nan)
            ev["train_loss_max"].append(run_max if run_n else math.nan)
            run_loss, run_correct, run_n, run_seen, run_max = 0.0, 0, 0, 0, -math.inf
        if diverged_at is None:
            ctx = ProbeContext(model, x, y, task.loss, lr, task.probe_x, task.probe_y, extra_batches, data_dir)
            for pcfg in config.get("probes", []):
                if is_due(pcfg, step, steps):
                    values = PROBES[pcfg["kind"]](pcfg, ctx)
                    rec = series[pcfg.get("name", pcfg["kind"])]
                    rec["step"].append(step)
                    for key, value in values.items():
                        rec[key].append(value)
        if last:
            break
        out = model(x)
        loss = task.loss(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        step += 1
        if not math.isfinite(loss_value):
            diverged_at = step
        run_loss += loss_value
        run_max = max(run_max, loss_value) if math.isfinite(loss_value) else math.inf
        run_n += 1
        run_seen += len(y)
        if task.classify:
            run_correct += int((out.detach().argmax(1) == y).sum())
        if bar is not None:
            bar.update(1)
    return {
        "config": config,
        "hash": config_hash(config),
        "diverged_at": diverged_at,
        "steps_done": step,
        "seconds": time.perf_counter() - started,
        "wall_seconds": time.perf_counter() - wall_started,
        "env": environment(device),
        "series": {name: dict(values) for name, values in series.items()},
    }


@dataclass
class LabSettings:
    out: Path
    suite: str = "quick"
    data_dir: Path | None = None
    device: str = "auto"
    seed: int = 0
    force: bool = False
    seeds: int | None = None


@dataclass
class LabOutcome:
    seconds: float
    ran: int
    reused: int
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_path(out: Path, digest: str) -> Path:
    return out / "results" / "runs" / f"{digest}.json"


def experiment_path(out: Path, name: str) -> Path:
    return out / "results" / f"{name}.json"


def load_cached(path: Path, digest: str) -> RunResult | None:
    """A finished run's result if ``path`` holds one for this exact config hash."""
    if not path.is_file():
        return None
    try:
        result = read_json(path)
    except (OSError, ValueError):
        return None
    return result if result.get("hash") == digest else None


def describe(result: RunResult) -> str:
    ev = result["series"].get("eval", {})
    parts = [f"{result['seconds']:.1f}s"]
    if ev.get("test_acc") and not math.isnan(ev["test_acc"][-1]):
        parts.append(f"test acc {ev['test_acc'][-1]:.3f}")
    elif ev.get("test_loss"):
        parts.append(f"loss {ev['test_loss'][-1]:.4g}")
    if result["diverged_at"] is not None:
        parts.append(f"diverged at step {result['diverged_at']}")
    return ", ".join(parts)


def run_lab(experiments: list[Experiment], settings: LabSettings) -> LabOutcome:
    """Run (or reuse) every run of ``experiments`` and write each experiment's summary JSON.

    Runs are identified by their config hash: a run shared by several experiments is trained once,
    a finished run is reused unless ``settings.force``, and each finished run is written at once."""
    started = time.perf_counter()
    device = resolve_device(settings.device)
    setup = Setup.create(settings.suite, settings.data_dir, settings.seed, device.type, settings.seeds)
    seeds = setup.seed_list()
    planned = [(exp, [exp.runs(replace(setup, seed=s)) for s in seeds]) for exp in experiments]
    todo: dict[str, tuple[str, RunConfig]] = {}
    for exp, per_seed in planned:
        for seed, runs in zip(seeds, per_seed):
            for key, config in runs.items():
                label = f"{exp.name}/{key}" + (f"@seed{seed}" if len(seeds) > 1 else "")
                todo.setdefault(config_hash(config), (label, config))
    results: dict[str, RunResult] = {}
    pending = []
    for digest, (label, config) in todo.items():
        cached = None if settings.force else load_cached(run_path(settings.out, digest), digest)
        if cached is None:
            pending.append((digest, label, config))
        else:
            results[digest] = cached
    reused = len(results)
    if reused:
        print(f"reusing {reused} finished run(s) from {settings.out / 'results' / 'runs'}", file=sys.stderr)
    overall = tqdm(total=len(pending), desc="lab", unit="run", file=sys.stderr, disable=None, position=0)
    try:
        for i, (digest, label, config) in enumerate(pending, 1):
            with tqdm(total=config["optim"]["steps"], desc=label, unit="step", file=sys.stderr,
                      disable=None, leave=False, position=1) as bar:
                result = train(config, settings.data_dir, device, bar)
            write_json_atomic(run_path(settings.out, digest), result)
            results[digest] = result
            overall.update(1)
            tqdm.write(f"[{i}/{len(pending)}] {label}: {describe(result)}", file=sys.stderr)
    finally:
        overall.close()
    outcome = LabOutcome(0.0, len(pending), reused)
    for exp, per_seed in planned:
        by_seed = [{key: results[config_hash(config)] for key, config in runs.items()} for runs in per_seed]
        summary = assess(exp, setup, by_seed)
        write_json_atomic(experiment_path(settings.out, exp.name), summary)
        outcome.summaries[exp.name] = summary
    outcome.seconds = time.perf_counter() - started
    return outcome
