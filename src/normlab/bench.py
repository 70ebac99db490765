"""``normlab bench``: normlab's layers against their peers, timed side by side in the same run.

A benchmark is a table of :class:`Case` (which layer, input shape, memory layout and mode) crossed with
a list of :class:`Implementation` (normlab, torch.nn, ...). For every case the inputs and the layer
state are built once from a fixed seed and shared by all implementations; the implementations are then
run interleaved — one call each per repeat, the order reversed on every other repeat — and the median
of the timed repeats is reported per implementation.

Before any timing, the outputs (and, for forward+backward, the input and parameter gradients) of every
implementation are compared with the reference implementation (torch.nn). A case whose answers differ
is reported as ``MISMATCH`` and is not timed: a benchmark must not report speed for wrong answers.

The first implementation is the subject (normlab). For each peer the ratio ``peer_ms / normlab_ms`` is
reported, so a ratio above 1 means normlab is faster. Adding a peer is adding an
:class:`Implementation` to :data:`IMPLEMENTATIONS`; adding a table column is adding a :class:`Column`.
:data:`COMPILE` is the ``torch.compile`` peer: the torch.nn layer compiled once per case, its compile time
spent in the untimed checked call; where compiling fails the record says why and the case goes on
without it.

Memory bandwidth: each case also times ``y.copy_(x)`` on a tensor of the input's size, interleaved with
the implementations; a copy moves 2 × the input's bytes. An implementation's GB/s counts the bytes a
normalization must move (forward: read x, write y; forward+backward adds read x and dy, write dx: 5 ×
the input's bytes), and its "% copy" is that rate over the copy's.

:func:`train_step` times one SGD step of :func:`normlab.demo.small_cnn` built from normlab's layers and
from torch.nn's: the end-to-end number.

From Python::

    >>> from normlab import bench
    >>> records = bench.run_cases(bench.quick_cases(), repeats=1)   # doctest: +SKIP
    >>> print(bench.format_table(records))                          # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import normlab.nn

__all__ = [
    "COMPILE",
    "COMPOSED",
    "Case",
    "Column",
    "Implementation",
    "IMPLEMENTATIONS",
    "MODES",
    "Mode",
    "columns",
    "configure",
    "default_cases",
    "format_table",
    "header",
    "moved_bytes",
    "quick_cases",
    "peers",
    "ratio_key",
    "run",
    "run_cases",
    "select",
    "train_step",
]

RTOL = 1e-3
"""Agreement tolerance, relative to the largest magnitude of the reference tensor (float32)."""

ATOL = 1e-5
"""Absolute floor of the agreement tolerance, for tensors whose reference is (close to) zero."""

DEFAULT_REPEATS = 5
DEFAULT_WARMUP = 1
DEFAULT_STEP_REPEATS = 21


@dataclasses.dataclass(frozen=True)
class Mode:
    """How a case is run: the module's train/eval state, whether autograd records, whether to backprop."""

    name: str
    label: str
    train: bool
    grad: bool
    backward: bool


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("train_fwd", "train fwd", train=True, grad=True, backward=False),
        Mode("train_fwd_bwd", "train fwd+bwd", train=True, grad=True, backward=True),
        Mode("eval", "eval fwd", train=False, grad=False, backward=False),
    )
}
"""The modes a case can be run in, by name. ``eval`` runs under ``torch.no_grad()``."""

_MEMORY_FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark row: ``layer(*args)`` applied to a float32 input of ``shape`` in ``layout``.

    ``layer`` names a class present in both ``torch.nn`` and ``normlab.nn`` (e.g. ``"BatchNorm2d"``);
    ``layout`` is ``"contiguous"`` or ``"channels_last"`` (4D inputs only); ``mode`` a key of
    :data:`MODES`.
    """

    layer: str
    args: tuple[Any, ...]
    shape: tuple[int, ...]
    layout: str = "contiguous"
    mode: str = "train_fwd"
    options: tuple[tuple[str, Any], ...] = ()
    """Keyword arguments of the constructor, as (name, value) pairs."""

    def __post_init__(self) -> None:
        if self.layout not in _MEMORY_FORMATS:
            raise ValueError(f"unknown layout {self.layout!r}; expected one of {sorted(_MEMORY_FORMATS)}")
        if self.layout == "channels_last" and len(self.shape) != 4:
            raise ValueError(f"channels_last applies to 4D inputs only, got shape {self.shape}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {sorted(MODES)}")

    @property
    def module(self) -> str:
        """The constructor call, e.g. ``"GroupNorm(32, 256)"``."""
        return f"{self.layer}({', '.join([*map(str, self.args), *(f'{k}={v}' for k, v in self.options)])})"

    @property
    def shape_text(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def key(self) -> str:
        """The text ``--filter`` matches against: module, shape, layout and mode."""
        return f"{self.module} {self.shape_text} {self.layout} {self.mode}"

    def make(self, layers: ModuleType) -> nn.Module:
        """Build this case's layer from a namespace of layer classes (``torch.nn`` or ``normlab.nn``); a
        fused layer the namespace lacks (``BatchNormReLU2d`` in ``torch.nn``) is built as the composition it
        fuses (see :data:`COMPOSED`)."""
        cls = getattr(layers, self.layer, None)
        if cls is None and self.layer in COMPOSED:
            cls = _composed(self.layer, layers)
        if cls is None:
            raise AttributeError(f"{getattr(layers, '__name__', layers)!s} has no layer {self.layer!r}")
        return cls(*self.args, **dict(self.options))


COMPOSED: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "BatchNormReLU2d": ("BatchNorm2d", torch.relu),
}
"""Fused layers by name, as (the layer they start from, what follows it): where a namespace has no such
layer, its peer is that layer with the rest applied to the output, keeping the layer's parameters,
buffers and ``state_dict`` keys (torch.nn's BatchNorm2d then ``torch.relu``)."""


@functools.cache
def _composed(name: str, layers: Any) -> type[nn.Module]:
    base_name, after = COMPOSED[name]
    base = getattr(layers, base_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return after(base.forward(self, x))

    return type(name, (base,), {"forward": forward, "__doc__": f"{base_name} followed by {after.__name__}."})


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A contender: layers from ``layers`` (a namespace such as ``torch.nn``), optionally wrapped.

    ``wrap`` turns the built module (already holding the case's state and train/eval mode) into the
    callable that is timed, e.g. ``torch.compile``. ``checked=False``: a baseline that computes something
    else at a comparable cost (plain BatchNorm beside its variants), timed without comparing its answers.
    """

    name: str
    layers: Any
    wrap: Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]] = dataclasses.field(default=lambda m: m)
    checked: bool = True


IMPLEMENTATIONS: tuple[Implementation, ...] = (
    Implementation("normlab", normlab.nn),
    Implementation("torch", torch.nn),
)
"""The subject first, then the reference that answers are checked against, then further peers."""


def _compiled(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    # Every case compiles afresh: no graph of an earlier case, no recompilation limit reached.
    torch._dynamo.reset()
    return torch.compile(module)


COMPILE = Implementation("compile", torch.nn, wrap=_compiled)
"""The torch.compile peer (``normlab bench`` adds it unless ``--no-compile``; ``--quick`` leaves it out)."""


def _suite(
    bn_shapes: Sequence[tuple[int, ...]],
    gn: tuple[int, tuple[int, ...]],
    ln_shapes: Sequence[tuple[int, ...]],
    fused_shapes: Sequence[tuple[int, ...]] = (),
) -> list[Case]:
    """BatchNorm in every mode and layout, GroupNorm in both layouts and LayerNorm, train fwd+bwd; the
    fused BatchNormReLU2d (against BatchNorm2d then ReLU) train fwd+bwd and eval."""
    cases: list[Case] = []
    for shape in bn_shapes:
        four_d = len(shape) == 4
        layer = "BatchNorm2d" if four_d else "BatchNorm1d"
        layouts = ("contiguous", "channels_last") if four_d else ("contiguous",)
        cases += [Case(layer, (shape[1],), shape, layout, mode) for layout in layouts for mode in MODES]
    groups, gn_shape = gn
    cases += [
        Case("GroupNorm", (groups, gn_shape[1]), gn_shape, layout, "train_fwd_bwd")
        for layout in ("contiguous", "channels_last")
    ]
    cases += [Case("LayerNorm", (shape[-1],), shape, "contiguous", "train_fwd_bwd") for shape in ln_shapes]
    cases += [Case("BatchNormReLU2d", (shape[1],), shape, "contiguous", mode)
              for shape in fused_shapes for mode in ("train_fwd_bwd", "eval")]
    return cases


def default_cases() -> list[Case]:
    """The full suite: BatchNorm on (64,64,56,56), (256,256,14,14), (32,512,7,7), (4096,1024); GroupNorm(32)
    on (32,256,28,28); LayerNorm on (64,196,768) and (4096,1024); BatchNormReLU2d on (64,64,56,56) and
    (32,512,7,7)."""
    return _suite(
        bn_shapes=[(64, 64, 56, 56), (256, 256, 14, 14), (32, 512, 7, 7), (4096, 1024)],
        gn=(32, (32, 256, 28, 28)),
        ln_shapes=[(64, 196, 768), (4096, 1024)],
        fused_shapes=[(64, 64, 56, 56), (32, 512, 7, 7)],
    )


def quick_cases() -> list[Case]:
    """The same suite on small shapes, for tests and smoke runs (a second or two)."""
    return _suite(
        bn_shapes=[(8, 16, 12, 12), (64, 32)],
        gn=(4, (4, 16, 8, 8)),
        ln_shapes=[(8, 16, 32)],
        fused_shapes=[(8, 16, 12, 12)],
    )


def select(cases: Sequence[Case], filters: Sequence[str] | None) -> list[Case]:
    """The cases whose :attr:`Case.key` contains every filter substring (case-insensitive)."""
    wanted = [f.lower() for f in filters or ()]
    return [c for c in cases if all(f in c.key.lower() for f in wanted)]


_STATE_INIT: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "weight": lambda t, g: 1.0 + 0.5 * torch.randn(t.shape, generator=g),
    "bias": lambda t, g: 0.5 * torch.randn(t.shape, generator=g),
    "running_mean": lambda t, g: 0.5 * torch.randn(t.shape, generator=g),
    "running_var": lambda t, g: 0.5 + torch.rand(t.shape, generator=g),
}


def _random_state(module: nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A state dict for ``module`` with non-trivial γ, β and running statistics."""
    state = module.state_dict()
    for name, tensor in state.items():
        init = _STATE_INIT.get(name.rsplit(".", 1)[-1])
        if init is not None:
            state[name] = init(tensor, gen).to(tensor.dtype)
    return state


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Trial:
    """One implementation set up for one case: its module, its own copy of the input, and the step."""

    def __init__(self, impl: Implementation, case: Case, state: dict, x: torch.Tensor, grad_out: torch.Tensor):
        self.name, self.checked = impl.name, impl.checked
        self.mode = MODES[case.mode]
        self.module = case.make(impl.layers).to(x.device)
        self.module.load_state_dict(state)
        self.module.train(self.mode.train)
        self.fn = impl.wrap(self.module)
        self.x = x.detach().clone().requires_grad_(self.mode.backward)
        self.grad_out = grad_out

    def reset(self) -> None:
        """Drop the gradients of the previous call so that every timed call does the same work."""
        self.x.grad = None
        self.module.zero_grad(set_to_none=True)

    def step(self) -> torch.Tensor:
        """The timed operation: forward, and for forward+backward, ``y.backward(grad_out)``."""
        with torch.set_grad_enabled(self.mode.grad):
            y = self.fn(self.x)
            if self.mode.backward:
                y.backward(self.grad_out)
        return y

    def outputs(self) -> dict[str, torch.Tensor]:
        """The answers to check after one :meth:`step`: the output, and the gradients if any."""
        y = self.step()
        out = {"output": y.detach()}
        if self.mode.backward:
            out["grad_input"] = self.x.grad
            out.update({f"grad_{n}": p.grad for n, p in self.module.named_parameters() if p.grad is not None})
        return out


class _CopyTrial:
    """``y.copy_(x)`` into a tensor made once: the memory bandwidth the normalizations are measured against."""

    name = "copy"

    def __init__(self, x: torch.Tensor):
        self.x = x.detach()
        self.y = torch.empty_like(self.x)

    def reset(self) -> None:
        pass

    def step(self) -> torch.Tensor:
        return self.y.copy_(self.x)


def moved_bytes(case: Case) -> int:
    """Bytes a normalization must move: forward reads x and writes y; backward reads x and dy, writes dx."""
    return _input_bytes(case) * (5 if MODES[case.mode].backward else 2)


def _input_bytes(case: Case) -> int:
    return math.prod(case.shape) * 4  # float32


def _failure(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def _max_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The worst disagreement as a multiple of the tolerance (≤ 1 agrees), and the tensor it is in."""
    worst, where = 0.0, ""
    for name, r in ref.items():
        g = got.get(name)
        if g is None or g.shape != r.shape:
            return float("inf"), name
        r64, g64 = r.double(), g.double()
        tol = ATOL + RTOL * r64.abs().max().item()
        err = (g64 - r64).abs().max().item() / tol if r.numel() else 0.0
        if math.isnan(err):
            return float("inf"), name
        if err > worst:
            worst, where = err, name
    return worst, where


SAMPLE_MS = 20.0
"""A timed sample repeats a call until it has taken at least this long (one call if that call alone does),
and counts the mean: a single call of a fraction of a millisecond is at the mercy of the timer, the
scheduler and whatever ran just before it."""


def _timed_ms(trial, device: torch.device) -> float:
    """Milliseconds of one call of ``trial``, after its ``reset`` (not timed)."""
    trial.reset()
    _synchronize(device)
    start = time.perf_counter()
    trial.step()
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _calls_per_sample(trial, device: torch.device, sample_ms: float) -> int:
    """How many calls of ``trial`` fill ``sample_ms``, from one timed call."""
    return max(1, min(1000, math.ceil(sample_ms / max(_timed_ms(trial, device), 1e-3))))


def _time_case(trials: list[_Trial], warmup: int, repeats: int, device: torch.device,
               sample_ms: float = SAMPLE_MS) -> dict[str, float]:
    """Median over ``repeats`` samples of each trial's milliseconds per call, trials interleaved, the order
    reversed on every other sample; a sample is the mean of as many calls as fill ``sample_ms`` (each
    call timed on its own, after the trial's ``reset``)."""
    samples: dict[str, list[float]] = {t.name: [] for t in trials}
    calls = {t.name: 1 for t in trials}
    for r in range(warmup + repeats):
        if r == warmup:  # calibrate on warm caches and compiled kernels
            calls = {t.name: _calls_per_sample(t, device, sample_ms) for t in trials}
        for trial in trials if r % 2 == 0 else trials[::-1]:
            total = sum(_timed_ms(trial, device) for _ in range(calls[trial.name]))
            if r >= warmup:
                samples[trial.name].append(total / calls[trial.name])
    return {name: statistics.median(s) for name, s in samples.items()}


def ratio_key(name: str, implementations: Sequence[Implementation]) -> str:
    """The record key of a peer's ratio: ``"ratio"`` for the reference, ``"ratio_<name>"`` for others."""
    return "ratio" if name == implementations[1].name else f"ratio_{name}"


def _run_case(
    case: Case,
    implementations: Sequence[Implementation],
    repeats: int,
    warmup: int,
    seed: int,
    device: torch.device,
    threads: int,
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    fmt = _MEMORY_FORMATS[case.layout]
    x = (2.0 * torch.randn(case.shape, generator=gen) + 0.5).to(device).contiguous(memory_format=fmt)
    grad_out = torch.randn(case.shape, generator=gen).to(device).contiguous(memory_format=fmt)
    state = _random_state(case.make(implementations[1].layers), gen)
    trials, answers, failed = [], [], {}
    for i, impl in enumerate(implementations):
        try:
            trial = _Trial(impl, case, state, x, grad_out)
            answers.append(trial.outputs())
            trials.append(trial)
        except Exception as exc:  # a peer that cannot run (e.g. torch.compile without a compiler)
            if i < 2:
                raise
            failed[impl.name] = _failure(exc)
    record: dict[str, Any] = {
        "op": case.layer,
        "module": case.module,
        "shape": list(case.shape),
        "layout": case.layout,
        "mode": case.mode,
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "repeats": repeats,
        "warmup": warmup,
    }

    errors = [_max_error(a, answers[1]) if t.checked else (0.0, "") for t, a in zip(trials, answers)]
    del answers
    # A further peer (torch.compile) whose answers differ from the reference's says nothing about the subject:
    # it is left out of the timing and named under the table, as a peer that cannot run is.
    for i in range(len(trials) - 1, 1, -1):
        peer_err, peer_where = errors[i]
        if not peer_err <= 1.0:
            failed[trials[i].name] = (f"answers differ from {trials[1].name}'s on {case.module} {case.shape_text} "
                                      f"{case.layout} {MODES[case.mode].label} ({peer_where} off by {peer_err:.3g}x "
                                      f"the tolerance), not timed")
            del trials[i], errors[i]
    err, where = max(errors)
    bad = [t.name for t, (e, _) in zip(trials, errors) if not e <= 1.0]
    record.update(status="MISMATCH" if bad else "ok", max_err=err, mismatch=bad, mismatch_in=where if bad else None)

    torch.set_num_threads(threads)
    medians = {} if bad else _time_case([*trials, _CopyTrial(x)], warmup, repeats, device)
    record["threads"] = torch.get_num_threads()
    subject = medians.get(trials[0].name)
    moved = moved_bytes(case)
    copy_ms = medians.get("copy")
    copy_gbps = None if copy_ms is None else 2 * _input_bytes(case) / copy_ms / 1e6
    record.update(bytes=moved, copy_ms=copy_ms, copy_gbps=copy_gbps)
    for impl in implementations:
        ms = medians.get(impl.name)
        record[f"{impl.name}_ms"] = ms
        record[f"{impl.name}_gbps"] = None if ms is None else moved / ms / 1e6
        record[f"{impl.name}_pct_copy"] = None if ms is None else 100 * record[f"{impl.name}_gbps"] / copy_gbps
        if impl.name in failed:
            record[f"{impl.name}_error"] = failed[impl.name]
    for impl in implementations[1:]:
        ms = medians.get(impl.name)
        record[ratio_key(impl.name, implementations)] = None if bad or ms is None else ms / subject
    return record


def run_cases(
    cases: Sequence[Case],
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    implementations: Sequence[Implementation] = IMPLEMENTATIONS,
    threads: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Run every case with every implementation and return one record per case.

    ``implementations[0]`` is the subject, ``implementations[1]`` the reference its answers are checked
    against; at least two are needed. Each case is first run once per implementation to check the
    answers (this call is not timed), then ``warmup`` untimed and ``repeats`` timed interleaved repeats.
    ``threads`` (default: torch's current setting) is applied with ``torch.set_num_threads`` before each
    case is timed, since a library's first call may change it, and restored afterwards; the record's
    ``threads`` is the count in effect after timing. ``progress`` draws a tqdm bar on stderr.

    A record holds ``op``, ``module``, ``shape``, ``layout``, ``mode``, ``device``, ``repeats``,
    ``warmup``, ``threads``, ``<name>_ms`` (median milliseconds) per implementation, ``ratio`` (reference ms /
    subject ms; > 1 means the subject is faster) and ``ratio_<name>`` for further peers, ``status``
    (``"ok"`` or ``"MISMATCH"``), ``max_err`` (worst disagreement in units of the tolerance) and, on a
    mismatch, ``mismatch`` (the implementations that disagree) and ``mismatch_in`` (which tensor).
    Timings and ratios of a mismatching case are ``None``.
    """
    if len(implementations) < 2:
        raise ValueError("run_cases needs a subject and at least one peer to compare it with")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    previous_threads = torch.get_num_threads()
    threads = threads or previous_threads
    records = []
    try:
        bar = tqdm(cases, desc="normlab bench", unit="case", file=sys.stderr, disable=not progress, leave=False)
        for i, case in enumerate(bar):
            bar.set_postfix_str(case.key, refresh=True)
            records.append(
                _run_case(case, implementations, repeats, warmup, seed + i, torch.device(device), threads)
            )
    finally:
        torch.set_num_threads(previous_threads)
    return records


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
    from normlab.demo import small_cnn

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


@dataclasses.dataclass(frozen=True)
class Column:
    """A table column: its header, how to render a record, and whether it is right-aligned."""

    header: str
    render: Callable[[dict[str, Any]], str]
    right: bool = True


def _ms(name: str) -> Callable[[dict[str, Any]], str]:
    def render(r: dict[str, Any]) -> str:
        if r.get(f"{name}_error"):
            return "failed"
        return "-" if r.get(f"{name}_ms") is None else f"{r[f'{name}_ms']:.3f}"

    return render


def _number(key: str, fmt: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: "-" if r.get(key) is None else format(r[key], fmt)


def _ratio(key: str) -> Callable[[dict[str, Any]], str]:
    def render(r: dict[str, Any]) -> str:
        if r["status"] != "ok":
            return f"!! MISMATCH ({', '.join(r['mismatch'])}: {r['mismatch_in']}, err {r['max_err']:.3g}x tol)"
        return "-" if r.get(key) is None else f"{r[key]:.2f}x"

    return render


def columns(implementations: Sequence[Implementation] = IMPLEMENTATIONS) -> list[Column]:
    """The table's columns: the case, each implementation's median ms, the subject's GB/s, the copy's
    GB/s, each implementation's % of it, then each peer's ratio."""
    subject = implementations[0].name
    return [
        Column("module", lambda r: r["module"], right=False),
        Column("shape", lambda r: "x".join(map(str, r["shape"])), right=False),
        Column("layout", lambda r: r["layout"], right=False),
        Column("mode", lambda r: MODES[r["mode"]].label, right=False),
        *(Column(f"{impl.name} ms", _ms(impl.name)) for impl in implementations),
        Column(f"{subject} GB/s", _number(f"{subject}_gbps", ".1f")),
        Column("copy GB/s", _number("copy_gbps", ".1f")),
        *(Column(f"{impl.name} %copy", _number(f"{impl.name}_pct_copy", ".0f")) for impl in implementations),
        *(
            Column(f"{impl.name}/{subject}", _ratio(ratio_key(impl.name, implementations)), right=False)
            for impl in implementations[1:]
        ),
    ]


@functools.cache
def device_name(device: torch.device) -> str:
    """The processor or GPU the benchmark ran on, as the records name it (``""`` where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def header(records: Sequence[dict[str, Any]], implementations: Sequence[Implementation] = IMPLEMENTATIONS) -> str:
    """The lines above the table: what ran, where, and how to read the ratio."""
    subject, ref = implementations[0].name, implementations[1].name
    first = records[0] if records else {"threads": torch.get_num_threads(), "device": "cpu",
                                        "repeats": 0, "warmup": 0}
    where = first["device"] if not first.get("device_name") else f"{first['device']} ({first['device_name']})"
    return "\n".join([
        f"normlab bench: {subject} vs {', '.join(i.name for i in implementations[1:])}, float32, "
        f"{where}, torch {first.get('torch', torch.__version__)}, {first['threads']} threads",
        f"Each case: median of {first['repeats']} timed samples after {first['warmup']} warmup(s), a sample "
        f"being the mean time per call over as many calls as fill {SAMPLE_MS:.0f} ms; implementations "
        f"interleaved, order alternating.",
        f"{ref}/{subject} = {ref} ms / {subject} ms (\"ratio\" in --json): > 1 means {subject} is faster, "
        f"< 1 means {ref} is faster.",
        f"Answers are checked against {ref} first; a case where {subject} disagrees reads MISMATCH and is not "
        f"timed (a further peer that disagrees is left out of that case's timing and named under the table).",
        "GB/s: bytes a normalization must move (fwd: read x, write y; fwd+bwd: also read x and dy, write dx) "
        "per second; %copy: that over the GB/s of y.copy_(x) (2 x the input's bytes), timed in the same run.",
    ])


def format_table(
    records: Sequence[dict[str, Any]], implementations: Sequence[Implementation] = IMPLEMENTATIONS
) -> str:
    """The header and an aligned table of ``records`` (as returned by :func:`run_cases`)."""
    cols = columns(implementations)
    cells = [[c.header for c in cols]] + [[c.render(r) for c in cols] for r in records]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]

    def line(row: list[str]) -> str:
        return "  ".join(
            (s.rjust(w) if c.right else s.ljust(w)) for s, w, c in zip(row, widths, cols)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    failures = sorted({f"{i.name} failed: {r[f'{i.name}_error']}" for r in records for i in implementations
                       if r.get(f"{i.name}_error")})
    return "\n".join([header(records, implementations), "", line(cells[0]), rule, *map(line, cells[1:]), *failures])


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= ``low``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser`` and make :func:`run` its handler."""
    parser.description = (
        "Time normlab's layers against torch.nn side by side (same run, interleaved, median of repeats) "
        "after checking that they give the same answers."
    )
    parser.add_argument("--threads", type=_at_least(1), default=None, metavar="N",
                        help="torch.set_num_threads(N) for the run (default: torch's current setting)")
    parser.add_argument("--repeats", type=_at_least(1), default=None, metavar="N",
                        help=f"timed repeats per case; the median is reported "
                             f"(default {DEFAULT_REPEATS}; 1 with --quick)")
    parser.add_argument("--warmup", type=_at_least(0), default=None, metavar="N",
                        help=f"untimed repeats before timing, after the checked call "
                             f"(default {DEFAULT_WARMUP}; 0 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and a single repeat: a smoke run of a second or two")
    parser.add_argument("--filter", action="append", metavar="SUBSTR",
                        help="only the cases whose 'module shape layout mode' contains SUBSTR "
                             "(case-insensitive; repeat to require several), e.g. --filter BatchNorm2d "
                             "--filter channels_last")
    parser.add_argument("--json", action="store_true",
                        help="print the raw records as a JSON list instead of the table")
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    parser.add_argument("--variants", action="store_true",
                        help="time BatchNorm's variants instead (ghost BN, batch renormalization, masked BN) against "
                             "their torch.nn compositions and against normlab's plain BatchNorm on the same input")
    parser.add_argument("--render", metavar="FILE",
                        help="print the table of records saved earlier with --json (from any machine) and exit; "
                             "nothing is timed")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the tensors live (default cpu); cuda needs a GPU build of torch and a GPU")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="add the torch.compile peer, compiled once per case, compile time not timed "
                             "(default: on, off with --quick)")
    parser.add_argument("--cnn", action=argparse.BooleanOptionalAction, default=None,
                        help="also time a training step of normlab.demo.small_cnn, normlab vs torch.nn layers "
                             "(default: on, off with --quick or --filter)")
    parser.set_defaults(func=run)


def peers(args: argparse.Namespace) -> tuple[tuple[Implementation, ...], bool]:
    """The implementations to time and whether to time the CNN training step, from the options:
    torch.compile and the CNN are on by default and off with ``--quick`` (the CNN also with ``--filter``)."""
    compiled = args.compile if args.compile is not None else not args.quick
    cnn = args.cnn if args.cnn is not None else not (args.quick or args.filter)
    return ((*IMPLEMENTATIONS, COMPILE) if compiled else IMPLEMENTATIONS), cnn


def report(records: Sequence[dict[str, Any]], implementations: Sequence[Implementation],
           steps: Sequence[dict[str, Any]] = ()) -> str:
    """What ``normlab bench`` prints: the table of ``records`` (if any), then each CNN step's line."""
    parts = [format_table(records, implementations)] if records else []
    return "\n\n".join(parts + [format_step(step) for step in steps])


def render(path: str) -> int:
    """Print the table (and the CNN line) of the records ``normlab bench --json`` saved in ``path``, as the
    run that measured them would have printed it; 2 if the file cannot be read as such records."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except OSError as exc:
        print(f"normlab bench: --render {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        print(f"normlab bench: --render {path}: not JSON ({exc}); it takes what normlab bench --json printed",
              file=sys.stderr)
        return 2
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) and "op" in r for r in records):
        print(f"normlab bench: --render {path}: expected the non-empty list of records that normlab bench --json "
              f"prints", file=sys.stderr)
        return 2
    cases = [r for r in records if r["op"] != "small_cnn"]
    steps = [r for r in records if r["op"] == "small_cnn"]
    compiled = any("compile_ms" in r or "compile_error" in r for r in cases)
    try:
        print(report(cases, (*IMPLEMENTATIONS, COMPILE) if compiled else IMPLEMENTATIONS, steps))
    except (KeyError, TypeError) as exc:
        print(f"normlab bench: --render {path}: a record lacks a field the table needs ({exc}); was it written "
              f"by normlab bench --json?", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``normlab bench``; returns 1 if any case gave a MISMATCH (or none was selected), else 0."""
    if args.render:
        return render(args.render)
    if args.variants:
        return _run_variants(args)
    cases = select(quick_cases() if args.quick else default_cases(), args.filter)
    if not cases:
        print(f"normlab bench: no case matches {args.filter}", file=sys.stderr)
        return 1
    if args.list:
        print("\n".join(c.key for c in cases))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"normlab bench: --device cuda, but torch {torch.__version__} sees no CUDA device here "
              f"(torch.cuda.is_available() is False). Run it on a machine with a GPU and a CUDA build of "
              f"torch, or use --device cpu.", file=sys.stderr)
        return 2
    repeats = args.repeats if args.repeats is not None else 1 if args.quick else DEFAULT_REPEATS
    warmup = args.warmup if args.warmup is not None else 0 if args.quick else DEFAULT_WARMUP
    implementations, cnn = peers(args)
    start = time.perf_counter()
    records = run_cases(cases, repeats=repeats, warmup=warmup, implementations=implementations,
                        threads=args.threads, device=args.device, progress=True)
    step = train_step(threads=args.threads, device=args.device,
                      repeats=max(repeats, 1 if args.quick else DEFAULT_STEP_REPEATS)) if cnn else None
    if args.json:
        print(json.dumps(records + ([step] if step else []), indent=1))
    else:
        print(report(records, implementations, [step] if step else []))
        print(f"\n{len(records)} cases in {time.perf_counter() - start:.1f} s")
    mismatches = sum(r["status"] != "ok" for r in records)
    if mismatches:
        print(f"normlab bench: {mismatches} case(s) MISMATCH: their answers differ from "
              f"{IMPLEMENTATIONS[1].name}", file=sys.stderr)
    return 1 if mismatches else 0


def _run_variants(args: argparse.Namespace) -> int:
    """``normlab bench --variants`` (see :mod:`normlab.bench_variants`); 1 on a MISMATCH or no case selected."""
    from normlab import bench_variants as variants

    cases = select(variants.quick_cases() if args.quick else variants.default_cases(), args.filter)
    if not cases:
        print(f"normlab bench: no variant case matches {args.filter}", file=sys.stderr)
        return 1
    if args.list:
        print("\n".join(c.key for c in cases))
        return 0
    repeats = args.repeats if args.repeats is not None else 1 if args.quick else DEFAULT_REPEATS
    warmup = args.warmup if args.warmup is not None else 0 if args.quick else DEFAULT_WARMUP
    records = run_cases(cases, repeats=repeats, warmup=warmup, implementations=variants.IMPLEMENTATIONS,
                        threads=args.threads, device=args.device, progress=True)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(format_table(records, variants.IMPLEMENTATIONS))
        print("\n" + variants.summary(records))
    mismatches = sum(r["status"] != "ok" for r in records)
    if mismatches:
        print(f"normlab bench: {mismatches} variant case(s) MISMATCH: their answers differ from the torch.nn "
              f"composition", file=sys.stderr)
    return 1 if mismatches else 0
