"""Data-parallel training of the lab's CNN: DistributedDataParallel with SyncBatchNorm (or per-rank BatchNorm,
or GroupNorm), as a user runs it, and the ``scaling`` measurement.

One process per rank, started by torchrun::

    torchrun --nproc-per-node 2 -m normlab.lab.ddp --norm sync --batch 64 --steps 300 --out ddp.json

Every rank draws the same global batch (one seeded order) and takes its slice (``torch.tensor_split``; uneven
slices allowed); the loss is scaled so that DDP's gradient average is the gradient of the mean loss over the
global batch. With ``--norm sync`` the run is therefore one-process training on the global batch, spread over
the ranks: accuracy should not depend on the number of processes, only the speed. Rank 0 evaluates (eval
mode, its running statistics) and writes the result. gloo on CPU, NCCL on CUDA (``--device cuda``, one GPU
per rank, ``LOCAL_RANK``).

``normlab lab run --nproc N [--suite smoke|quick|full]`` launches the same training in N local processes
(:func:`lab_run`), at the suite's size, and writes rank 0's result under ``--out``.

``python -m normlab.lab.ddp --scaling 1 2 4`` launches torchrun once per process count and prints steps/s,
final accuracy and the communication share of a step (1 − time of a step without any collective / time of
a synchronized step, both measured in the same run). Several machines: the same command on each, with
``--nnodes 2 --node-rank i --rdzv-backend c10d --rdzv-endpoint HOST:29400`` in place of ``--standalone``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import normlab.nn as nnl
from normlab.core import stats
from normlab.core.plan import batch_plan
from normlab.lab import data as labdata
from normlab.lab.engine import config_hash, evaluate, prepare_task, seed_everything, write_json_atomic
from normlab.lab.models import build_model

NORMS = {"sync": "SyncBatchNorm over every rank", "bn": "BatchNorm per rank", "gn": "GroupNorm"}
COMM_ROUNDS = 8  # fwd+bwd steps timed with and without collectives for the communication share
TRACED_STEPS = 10  # the first steps, whose global training loss is recorded and which are not timed


def ddp_config(norm: str, nproc: int, batch: int, steps: int, lr: float, widths: list[int], pool_after: list[int],
               n_train: int | None, n_test: int | None, size: int | None, seed: int, device: str = "cpu",
               eval_every: int | None = None, images: str = "fashion-mnist") -> dict[str, Any]:
    """A lab run config (see :func:`normlab.lab.spec.run_config`) for a data-parallel run: ``batch`` is the
    global batch, split over ``nproc`` ranks."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    return {
        "data": {"name": images, "n_train": n_train, "n_test": n_test, "size": size, "n_probe": 16},
        "model": {"arch": "vgg", "widths": widths, "pool_after": pool_after, "norm": "bn"},
        "optim": {"lr": lr, "momentum": 0.9, "batch": batch, "steps": steps},
        "eval_every": eval_every or steps,
        "probes": [],
        "seed": seed,
        "device": device,
        "ddp": {"nproc": nproc, "norm": norm},
    }


def _to_group_norm(model: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm2d of ``model`` replaced by a GroupNorm of min(32, C) groups (C when fewer)."""
    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.BatchNorm2d):
            groups = math.gcd(child.num_features, 32)
            setattr(model, name, nnl.GroupNorm(groups, child.num_features))
        else:
            _to_group_norm(child)
    return model


def build(config: dict[str, Any], in_shape: tuple[int, ...], classes: int) -> torch.nn.Module:
    """The run's CNN with the normalization its ``ddp.norm`` asks for."""
    model = build_model(config["model"], in_shape, classes, config["seed"])
    norm = config["ddp"]["norm"]
    if norm == "sync":
        return nnl.convert_sync_batchnorm(model)
    if norm == "gn":
        return _to_group_norm(model)
    return model


@torch.no_grad()
def running_error(model: torch.nn.Module, x: torch.Tensor, chunk: int = 500) -> tuple[float, float]:
    """How far the running statistics of ``model``'s BatchNorm layers are from the population statistics
    of their inputs over ``x`` (the network in eval mode, merged exactly over chunks): the mean over layers
    and channels of |running_mean − μ| / σ and of |log(running_var / σ²)|. NaN without BatchNorm layers."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return math.nan, math.nan
    partials: dict[int, list[torch.Tensor]] = {id(m): [] for m in layers}
    hooks = [m.register_forward_pre_hook(
        lambda m, args: partials[id(m)].append(stats.partial_moments(args[0].double(), batch_plan(args[0].shape))))
        for m in layers]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), chunk):
            model(x[start:start + chunk])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    mean_err, var_err = [], []
    for m in layers:
        total, shift, mean, var = stats.merge_moments(torch.cat(partials[id(m)]))
        mu, var = shift + mean, var * total / (total - 1)
        mean_err.append(((m.running_mean.double() - mu).abs() / var.sqrt()).mean())
        var_err.append((m.running_var.double() / var).log().abs().mean())
    return float(torch.stack(mean_err).mean()), float(torch.stack(var_err).mean())


def _local_step_time(net, model, x, y, world, n, rounds: int) -> tuple[float, float]:
    """Seconds per forward+backward with the collectives (SyncBatchNorm's, DDP's gradient all-reduce) and
    without them (``no_sync`` and per-rank BatchNorm, on the backend SyncBatchNorm's per-rank steps run on),
    alternated after one untimed step of each; the model's state is restored after."""
    state = copy.deepcopy(model.state_dict())
    synced = any(isinstance(m, nnl.SyncBatchNorm) for m in model.modules())
    times = {True: 0.0, False: 0.0}
    for timed in (0, rounds // 2, rounds // 2):
        for communicate in (True, False):
            if not communicate and synced:
                nnl.revert_sync_batchnorm(model)
            quiet = contextlib.nullcontext() if communicate or net is model else net.no_sync()
            start = time.perf_counter()
            with quiet:
                for _ in range(max(timed, 1)):
                    (F.cross_entropy(net(x), y, reduction="sum") * world / n).backward()
            times[communicate] += (time.perf_counter() - start) if timed else 0.0
            if not communicate and synced:
                nnl.convert_sync_batchnorm(model)
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    return times[True] / rounds, times[False] / rounds


def train_rank(config: dict[str, Any], data_dir: Path | None) -> dict[str, Any] | None:
    """Train this rank's share of a data-parallel run (inside an initialised process group, or alone);
    rank 0 returns the run's result (the lab's run-result layout), the other ranks ``None``."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    seed = config["seed"]
    seed_everything(seed)
    device = torch.device(config["device"])
    task = prepare_task(config["data"], data_dir, device, seed)
    model = build(config, tuple(task.train_x.shape[1:]), task.classes).to(device)
    net = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False) if world > 1 else model
    opt = config["optim"]
    optimizer = torch.optim.SGD(net.parameters(), lr=opt["lr"], momentum=opt["momentum"])
    order = labdata.batches(len(task.train_y), opt["batch"], torch.Generator().manual_seed(seed))
    series: dict[str, dict[str, list]] = {"eval": {"step": [], "test_loss": [], "test_acc": [], "train_loss": [],
                                                   "train_acc": []}}
    model.train()
    stepping, diverged_at, last_loss, first_losses = 0.0, None, math.nan, []
    traced = min(TRACED_STEPS, opt["steps"] // 2)
    for step in range(1, opt["steps"] + 1):
        idx = torch.tensor_split(next(order), world)[rank].to(device)
        x, y = task.train_x[idx], task.train_y[idx]
        start = time.perf_counter()
        loss = F.cross_entropy(net(x), y, reduction="sum") * world / opt["batch"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step > traced:  # the first steps build buffers and kernels, and all-reduce the loss below
            stepping += time.perf_counter() - start
        last_loss = float(loss.detach()) / world
        if step <= traced:  # the loss over the global batch, which must not depend on the number of ranks
            total = loss.detach().double().reshape(1) / world
            if world > 1:
                dist.all_reduce(total)
            first_losses.append(float(total))
        if not math.isfinite(last_loss) and diverged_at is None:
            diverged_at = step
        if rank == 0 and (step % config["eval_every"] == 0 or step == opt["steps"]):
            test_loss, test_acc = evaluate(model, task)
            for key, value in (("step", step), ("test_loss", test_loss), ("test_acc", test_acc),
                               ("train_loss", last_loss), ("train_acc", math.nan)):
                series["eval"][key].append(value)
    x = task.train_x[:max(opt["batch"] // world, 1)]
    with_comm, without = (_local_step_time(net, model, x, task.train_y[:len(x)], world, opt["batch"], COMM_ROUNDS)
                          if world > 1 else (1.0, 1.0))  # one process: no collective to take out
    if rank != 0:
        return None
    mean_err, var_err = running_error(model, task.train_x[:2000])
    timed = max(opt["steps"] - traced, 1)
    series["ddp"] = {"step": [opt["steps"]], "world": [world],
                     "steps_per_s": [timed / stepping if stepping else math.nan],
                     "comm_share": [max(0.0, 1.0 - without / with_comm)], "first_losses": [first_losses],
                     "running_mean_error": [mean_err],
                     "running_var_error": [var_err]}
    return {"config": config, "hash": config_hash(config), "diverged_at": diverged_at, "steps_done": opt["steps"],
            "seconds": 0.0, "series": series}


def launch(config: dict[str, Any], data_dir: Path | None, timeout: float = 1800.0) -> dict[str, Any]:
    """Run ``config`` (a :func:`ddp_config`) with torchrun in ``config["ddp"]["nproc"]`` local processes and
    return rank 0's result, ``seconds`` being the wall time of the whole launch."""
    nproc = config["ddp"]["nproc"]
    with tempfile.TemporaryDirectory(prefix="normlab-ddp-") as tmp:
        cfg_path, out_path = Path(tmp) / "config.json", Path(tmp) / "result.json"
        cfg_path.write_text(json.dumps(config), encoding="utf-8")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "normlab.lab.ddp", "--config", str(cfg_path), "--out", str(out_path)]
        if data_dir is not None:
            cmd += ["--data-dir", str(data_dir)]
        # one thread per process, whatever the count: N processes use N cores, none oversubscribed
        env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
        # the processes import the normlab this one runs, wherever it was imported from
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parents[2]), env.get("PYTHONPATH")) if p)
        started = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"torchrun with {nproc} processes failed (exit {done.returncode}):\n"
                               f"{done.stderr[-4000:]}")
        result = json.loads(out_path.read_text(encoding="utf-8"))
    result["seconds"] = time.perf_counter() - started
    return result


def scaling(nprocs: list[int], base: dict[str, Any], data_dir: Path | None) -> list[dict[str, Any]]:
    """``base`` (a :func:`ddp_config`) run with each process count: rows of processes, steps/s, final
    accuracy and communication share."""
    rows = []
    for n in nprocs:
        cfg = copy.deepcopy(base)
        cfg["ddp"]["nproc"] = n
        result = launch(cfg, data_dir)
        d = result["series"]["ddp"]
        rows.append({"processes": n, "steps_per_s": d["steps_per_s"][0], "test_acc": result["series"]["eval"]
                     ["test_acc"][-1], "comm_share": d["comm_share"][0], "seconds": result["seconds"]})
        print(f"{n} process(es): {rows[-1]['steps_per_s']:.2f} steps/s, test accuracy {rows[-1]['test_acc']:.3f}, "
              f"communication {100 * rows[-1]['comm_share']:.0f}% of a step ({result['seconds']:.0f} s)",
              file=sys.stderr)
    return rows


# The size of ``normlab lab run --nproc N`` per suite (a suite the table lacks runs as "quick").
SUITES = {
    "smoke": dict(batch=16, steps=6, widths=[4, 8], n_train=320, n_test=160, size=12),
    "quick": dict(batch=64, steps=300, widths=[8, 16, 32, 32], n_train=10000, n_test=2000, size=16),
    "full": dict(batch=128, steps=3000, widths=[16, 32, 64, 64], n_train=None, n_test=None, size=28),
}


def lab_run(args: argparse.Namespace) -> int:
    """``normlab lab run --nproc N``: the data-parallel training of the lab's CNN (SyncBatchNorm) in N local
    processes under torchrun, at ``args.suite``'s size; rank 0's result goes to ``OUT/ddp-N.json``."""
    if args.experiments:
        print("error: --nproc runs the data-parallel training of the lab's CNN; give it no experiment names",
              file=sys.stderr)
        return 2
    if args.nproc < 1:
        print(f"error: --nproc must be at least 1, got {args.nproc}", file=sys.stderr)
        return 2
    size = SUITES.get(args.suite, SUITES["quick"])
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    config = ddp_config("sync", args.nproc, size["batch"], size["steps"], 0.05, size["widths"],
                        list(range(1, len(size["widths"]), 2)), size["n_train"], size["n_test"], size["size"],
                        args.seed, device)
    try:
        result = launch(config, args.data_dir)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) / f"ddp-{args.nproc}.json"
    write_json_atomic(out, result)
    print(summary(result))
    print(f"result: {out} ({result['seconds']:.1f} s)")
    return 0


def summary(result: dict[str, Any]) -> str:
    """One line: processes, norm, final test accuracy, steps/s and the communication share."""
    acc = result["series"]["eval"]["test_acc"][-1]
    d = result["series"]["ddp"]
    return (f"{d['world'][0]} process(es), norm={result['config']['ddp']['norm']}: test accuracy {acc:.3f}, "
            f"{d['steps_per_s'][0]:.2f} steps/s, communication {100 * d['comm_share'][0]:.0f}% of a step")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m normlab.lab.ddp", description=__doc__.split("\n\n")[0])
    p.add_argument("--norm", choices=sorted(NORMS), default="sync")
    p.add_argument("--batch", type=int, default=64, help="global batch, split over the ranks")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--widths", default="8,16,32,32", help="channels of the convolutions")
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--size", type=int, default=16, help="image side (Fashion-MNIST resized)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait for a rank")
    p.add_argument("--config", type=Path, help="a run config (JSON) instead of the options above")
    p.add_argument("--out", type=Path, help="where rank 0 writes the result (JSON)")
    p.add_argument("--scaling", type=int, nargs="+", metavar="N",
                   help="launch torchrun with each of these process counts and compare them")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.config is not None:
        config = json.loads(args.config.read_text(encoding="utf-8"))
    else:
        widths = [int(w) for w in args.widths.split(",")]
        config = ddp_config(args.norm, int(os.environ.get("WORLD_SIZE", 1)), args.batch, args.steps, args.lr,
                            widths, list(range(1, len(widths), 2)), args.n_train, args.n_test, args.size, args.seed,
                            args.device)
    if args.scaling:
        rows = scaling(args.scaling, config, args.data_dir)
        if args.out is not None:
            write_json_atomic(args.out, rows)
        return 0
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        cuda = config["device"] == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            config["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    try:
        result = train_rank(config, args.data_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result is not None:
        print(summary(result))
        if args.out is not None:
            write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
