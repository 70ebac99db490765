"""Timing implementations side by side: each case's answers checked first, then the implementations run
interleaved (order alternating) and the median of the timed samples reported per implementation."""

from __future__ import annotations

import dataclasses
import functools
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import normlab.nn
from normlab.bench.cases import _MEMORY_FORMATS, MODES, Case, _input_bytes, moved_bytes

__all__ = ["ATOL", "COMPILE", "IMPLEMENTATIONS", "Implementation", "RTOL", "SAMPLE_MS", "device_name",
           "ratio_key", "run_cases"]

RTOL = 1e-3
"""Agreement tolerance, relative to the largest magnitude of the reference tensor (float32)."""

ATOL = 1e-5
"""Absolute floor of the agreement tolerance, for tensors whose reference is (close to) zero."""

DEFAULT_REPEATS = 5
DEFAULT_WARMUP = 1
DEFAULT_STEP_REPEATS = 21


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
