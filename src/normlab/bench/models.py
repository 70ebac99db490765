"""End-to-end timings: whole training steps and eval passes of models built from torch.nn, the same converted
to normlab's layers (:func:`normlab.nn.convert`), and converted with fusion (``convert(model, fuse=True)``).

:func:`train_step` is the small CNN's step printed under ``normlab bench``'s table; :func:`run_models` is
``normlab bench --models``: the architectures of :data:`ARCHITECTURES` (:mod:`normlab.bench.nets`), each row
timed interleaved in one run, with the share of torch.nn's time that torch.profiler attributes to
normalization (and to ReLU), and the speed-up that share allows: ``1 / (1 - share)``, the step's speed-up if
normalization cost nothing (``limit``), and if normalization and ReLU cost nothing (``limit_fused``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import normlab.nn
from normlab.bench import nets
from normlab.bench.cases import _MEMORY_FORMATS
from normlab.bench.timing import DEFAULT_REPEATS, DEFAULT_STEP_REPEATS, DEFAULT_WARMUP, _time_case, device_name
from normlab.bench.timing import _max_error as _tensor_error
from normlab.demo import small_cnn

__all__ = ["ARCHITECTURES", "Architecture", "MODEL_MODES", "ModelCase", "default_model_cases", "format_step",
           "quick_model_cases", "run_model_case", "run_models", "train_step"]


class _StepTrial:
    """One SGD step of a model on a fixed batch: forward, cross-entropy, backward, update."""

    def __init__(self, name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor):
        self.name, self.model, self.x, self.target = name, model, x, target
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def reset(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> torch.Tensor:
        loss = nn.functional.cross_entropy(self.model(self.x), self.target)
        loss.backward()
        self.optimizer.step()
        return loss


def train_step(
    batch: int = 64,
    repeats: int = DEFAULT_STEP_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    threads: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Time one SGD training step of :func:`normlab.demo.small_cnn` built from ``normlab.nn`` (as a drop-in
    replacement, and with ``fused=True``: BatchNormReLU2d for each BatchNorm2d + ReLU) and from ``torch.nn``
    (same initial weights, same batch of ``batch`` 1x28x28 images), interleaved.

    Returns a record with ``op`` ``"small_cnn"``, ``mode`` ``"train_step"``, ``normlab_ms``, ``fused_ms`` and
    ``torch_ms`` (medians), ``ratio`` (torch ms / normlab ms) and ``ratio_fused`` (torch ms / fused ms),
    besides the fields a case record has.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 28, 28, generator=gen).to(device)
    target = torch.randint(0, 10, (batch,), generator=gen).to(device)
    torch.manual_seed(seed)
    ours = small_cnn(normlab.nn).to(device)
    fused = small_cnn(normlab.nn, fused=True).to(device)
    theirs = small_cnn(torch.nn).to(device)
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():  # same weights: the fused variant's parameters and buffers come in the same order
        for a, b in zip([*fused.parameters(), *fused.buffers()], [*ours.parameters(), *ours.buffers()]):
            a.copy_(b)
    trials = [_StepTrial("normlab", ours, x, target), _StepTrial("fused", fused, x, target),
              _StepTrial("torch", theirs, x, target)]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or previous)
        medians = _time_case(trials, warmup, repeats, device)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    return {
        "op": "small_cnn", "module": "small_cnn train step", "shape": [batch, 1, 28, 28], "layout": "contiguous",
        "mode": "train_step", "device": device.type, "device_name": device_name(device),
        "torch": torch.__version__, "repeats": repeats, "warmup": warmup, "threads": used,
        "status": "ok", "normlab_ms": medians["normlab"], "fused_ms": medians["fused"],
        "torch_ms": medians["torch"], "ratio": medians["torch"] / medians["normlab"],
        "ratio_fused": medians["torch"] / medians["fused"],
    }


def format_step(record: dict[str, Any]) -> str:
    """The end-to-end line printed under the table."""
    batch = record["shape"][0]
    return (f"End to end, one SGD step of normlab.demo.small_cnn (batch {batch} of 1x28x28, median of "
            f"{record['repeats']}): torch.nn {record['torch_ms']:.2f} ms; normlab drop-in layers "
            f"{record['normlab_ms']:.2f} ms, torch/normlab {record['ratio']:.2f}x; with BatchNormReLU2d in place "
            f"of BatchNorm2d + ReLU {record['fused_ms']:.2f} ms, {record['ratio_fused']:.2f}x")


# ------------------------------------------------------------------------------------ normlab bench --models


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A model ``normlab bench --models`` times: its builder (taking a ``scale``, 1 for the full size) and the
    shape of one input (without the batch), at full size and in ``--quick`` runs."""

    label: str
    build: Callable[[int], nn.Module]
    input: tuple[int, ...]
    quick_input: tuple[int, ...]

    @property
    def image(self) -> bool:
        """Whether the input is an NCHW image (and so has a channels_last layout)."""
        return len(self.input) == 3


ARCHITECTURES: dict[str, Architecture] = {
    "resnet18": Architecture("ResNet-18 w32", lambda s: nets.resnet18(32, s), (3, 32, 32), (3, 16, 16)),
    "mobilenet": Architecture("MobileNet v1", lambda s: nets.mobilenet(s), (3, 32, 32), (3, 16, 16)),
    "resnet50": Architecture("ResNet-50 w32", lambda s: nets.resnet50(32, s), (3, 64, 64), (3, 16, 16)),
    "small_cnn": Architecture("small_cnn", lambda s: small_cnn(torch.nn), (1, 28, 28), (1, 28, 28)),
    "transformer": Architecture("Transformer block", lambda s: nets.transformer_block(256, s), (128, 256), (16, 64)),
}
"""The architectures by name (see :mod:`normlab.bench.nets`; the lab CNN is :func:`normlab.demo.small_cnn`)."""

MODEL_MODES = {"train": "train step", "eval": "eval pass"}
"""``train``: forward, cross-entropy, backward and an SGD (momentum) step; ``eval``: a forward in eval mode
under ``torch.no_grad()``."""

QUICK_SCALE = 4
"""``--quick`` divides the models' widths by this (and keeps one block per stage)."""


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One row of ``normlab bench --models``: an architecture at a batch size, layout, thread count and mode."""

    model: str
    batch: int
    layout: str = "contiguous"
    threads: int = 1
    mode: str = "train"

    def __post_init__(self) -> None:
        if self.model not in ARCHITECTURES:
            raise ValueError(f"unknown model {self.model!r}; expected one of {sorted(ARCHITECTURES)}")
        if self.mode not in MODEL_MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {sorted(MODEL_MODES)}")
        if self.layout not in _MEMORY_FORMATS or (self.layout == "channels_last" and not ARCHITECTURES[self.model].image):
            raise ValueError(f"layout {self.layout!r} does not apply to {self.model}")

    @property
    def key(self) -> str:
        """The text ``--filter`` matches against, e.g. ``"resnet18 b32 channels_last 2t train"``."""
        return f"{self.model} b{self.batch} {self.layout} {self.threads}t {self.mode}"


def default_model_cases(threads: Sequence[int] = (1, 2)) -> list[ModelCase]:
    """Every architecture in every layout it has, both modes, at each thread count: ResNet-18 at batch 32
    and 128, MobileNet at 64, ResNet-50 at 16 (64x64), the lab CNN at 64, the Transformer block at 32."""
    cases = []
    for model, batches in (("resnet18", (32, 128)), ("mobilenet", (64,)), ("resnet50", (16,)),
                           ("small_cnn", (64,)), ("transformer", (32,))):
        layouts = ("contiguous", "channels_last") if ARCHITECTURES[model].image else ("contiguous",)
        cases += [ModelCase(model, b, layout, t, mode) for b in batches for layout in layouts for t in threads
                  for mode in MODEL_MODES]
    return cases


def quick_model_cases(threads: Sequence[int] = (1,)) -> list[ModelCase]:
    """Each architecture once per mode at batch 4 (and ResNet-18 channels_last), for smoke runs."""
    cases = [ModelCase(m, 4, "contiguous", t, mode) for m in ARCHITECTURES for t in threads for mode in MODEL_MODES]
    return cases + [ModelCase("resnet18", 4, "channels_last", t, "train") for t in threads]


class _EvalTrial:
    """A forward pass in eval mode under ``torch.no_grad()``."""

    def __init__(self, name: str, model: nn.Module, x: torch.Tensor):
        self.name, self.model, self.x = name, model.eval(), x

    def reset(self) -> None:
        pass

    def step(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model(self.x)


NORM_OPS = re.compile(r"batch_?norm|layer_?norm|group_?norm", re.IGNORECASE)
"""torch.profiler event names that are normalization (forward, backward and their autograd nodes)."""

RELU_OPS = re.compile(r"relu|threshold_backward", re.IGNORECASE)
"""torch.profiler event names that are ReLU (which the fused layers take into the normalization)."""


PROFILE_MS = 100.0
"""The shares are profiled over at least this many milliseconds of calls (and at least two calls)."""


def _shares(trial) -> tuple[float, float]:
    """The fractions of ``trial``'s time (torch.profiler, CPU) spent in normalization and in ReLU: the
    inclusive time of each matching event not inside another matching one, over the time of all top-level
    events."""
    trial.reset()
    start = time.perf_counter()
    trial.step()
    calls = max(2, min(50, math.ceil(PROFILE_MS / max(1e-3, (time.perf_counter() - start) * 1e3))))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            trial.reset()
            trial.step()
    events = prof.events()
    total = sum(e.cpu_time_total for e in events if e.cpu_parent is None)

    def inclusive(pattern: re.Pattern) -> float:
        def inside(e) -> bool:
            parent = e.cpu_parent
            while parent is not None:
                if pattern.search(parent.name):
                    return True
                parent = parent.cpu_parent
            return False

        return sum(e.cpu_time_total for e in events if pattern.search(e.name) and not inside(e))

    return (inclusive(NORM_OPS) / total, inclusive(RELU_OPS) / total) if total else (0.0, 0.0)


def _models(case: ModelCase, quick: bool, seed: int) -> tuple[dict[str, nn.Module], int]:
    """The torch.nn model, its drop-in conversion and its fused conversion (same weights), and how many
    layers the fusion rewrote."""
    arch = ARCHITECTURES[case.model]
    torch.manual_seed(seed)
    base = arch.build(QUICK_SCALE if quick else 1)
    if case.layout == "channels_last":
        base = base.to(memory_format=torch.channels_last)
    fused = normlab.nn.convert(copy.deepcopy(base), fuse=True)
    models = {"torch": base, "normlab": normlab.nn.convert(copy.deepcopy(base)), "fused": fused}
    return models, len(fused.fusion_report.fused)


def run_model_case(case: ModelCase, repeats: int = DEFAULT_REPEATS, warmup: int = DEFAULT_WARMUP,
                   quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Time ``case`` for torch.nn, normlab drop-in and normlab fused (the fused one left out where nothing
    was fused), interleaved, after checking that their outputs agree; profile torch.nn's run for the
    normalization and ReLU shares. Runs at ``case.threads`` threads (restored afterwards)."""
    arch = ARCHITECTURES[case.model]
    previous = torch.get_num_threads()
    torch.set_num_threads(case.threads)
    try:
        gen = torch.Generator().manual_seed(seed)
        shape = (case.batch, *(arch.quick_input if quick else arch.input))
        x = torch.randn(shape, generator=gen).contiguous(memory_format=_MEMORY_FORMATS[case.layout])
        target = torch.randint(0, 10, (case.batch,), generator=gen)
        models, fused_layers = _models(case, quick, seed)
        if not fused_layers:
            del models["fused"]
        train = case.mode == "train"
        with torch.no_grad():
            outputs = {name: m.train(train)(x) for name, m in models.items()}
        err, where = _max_error({n: {"output": y} for n, y in outputs.items()}, outputs["torch"])
        trials = [_StepTrial(n, m, x, target) if train else _EvalTrial(n, m, x) for n, m in models.items()]
        norm, relu = _shares(trials[0])
        medians = _time_case(trials[1:] + trials[:1], warmup, repeats, torch.device("cpu")) if err <= 1 else {}
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    torch_ms = medians.get("torch")
    ratio = lambda name: None if torch_ms is None or medians.get(name) is None else torch_ms / medians[name]
    return {
        "op": "model", "model": case.model, "label": arch.label, "key": case.key, "shape": list(shape),
        "batch": case.batch, "layout": case.layout, "threads": used, "mode": case.mode,
        "device": "cpu", "device_name": device_name(torch.device("cpu")), "torch": torch.__version__,
        "repeats": repeats, "warmup": warmup, "quick": quick,
        "status": "ok" if err <= 1 else "MISMATCH", "max_err": err, "mismatch_in": None if err <= 1 else where,
        "torch_ms": torch_ms, "normlab_ms": medians.get("normlab"), "fused_ms": medians.get("fused"),
        "ratio": ratio("normlab"), "ratio_fused": ratio("fused"), "fused_layers": fused_layers,
        "norm_share": norm, "relu_share": relu, "limit": 1 / (1 - norm),
        "limit_fused": 1 / (1 - norm - relu) if fused_layers else None,
    }


def _max_error(answers: dict[str, dict[str, torch.Tensor]], reference: torch.Tensor) -> tuple[float, str]:
    """The worst disagreement of any implementation's output with torch.nn's, in units of the tolerance."""
    worst = [(_tensor_error(a, {"output": reference})[0], name) for name, a in answers.items()]
    return max(worst)


def run_models(cases: Sequence[ModelCase], repeats: int = DEFAULT_REPEATS, warmup: int = DEFAULT_WARMUP,
               quick: bool = False, seed: int = 0, progress: bool = False) -> list[dict[str, Any]]:
    """One record per case (see :func:`run_model_case`), with a tqdm bar on stderr if ``progress``."""
    bar = tqdm(cases, desc="normlab bench --models", unit="row", file=sys.stderr, disable=not progress, leave=False)
    records = []
    for i, case in enumerate(bar):
        bar.set_postfix_str(case.key, refresh=True)
        records.append(run_model_case(case, repeats, warmup, quick, seed + i))
    return records
