"""Compile the Triton backend's kernels for an NVIDIA GPU on a machine that has none.

Triton compiles a kernel the first time it is launched with a new *specialization*: the dtypes of its
pointer arguments, which integer arguments are 1 or multiples of 16, which pointers are 16-byte aligned,
and the values of its ``tl.constexpr`` parameters (tile shapes, flags such as ``TRAIN`` or ``EPI``).
The compiler (Triton's MLIR passes, LLVM, and the ``ptxas`` Triton ships) runs on the host; only loading
and launching a kernel need the GPU. So the question "do these kernels compile for that GPU, and how many
registers do they take?" can be answered anywhere:

1. run the backend's host code (:class:`~normlab.kernels.triton.backend.TritonBackend` ``forward`` and
   ``backward``, unchanged) on CPU tensors of the cases below, with the program counts of a GPU with
   ``sms`` multiprocessors, so that it chooses the tiles, splits and flags it would choose there;
2. where it would launch a kernel, compile that specialization for the target architecture instead
   (Triton's own ``warmup``, with a stand-in for its driver that names the target and nothing else);
3. read what each kernel costs: registers, stack frame and spilled bytes from ``ptxas -v`` (Triton's
   ptxas, Triton's options), shared memory from Triton's metadata.

What it shows: every specialization these cases reach is accepted by Triton's front end, LLVM's NVPTX back
end and ``ptxas`` for that architecture, and what each costs in registers and spills. What it cannot
show: that the kernels compute the right values (the interpreter tests in
``tests/kernels/triton/test_backend.py`` do), or how fast they run (``normlab bench --device cuda``,
on a GPU).

Run it as ``python -m normlab.kernels.triton.compile [--arch 90] [--sms 132] [--quick] [--json]`` in a
process where Triton's interpreter is off (``TRITON_INTERPRET`` unset): the backend builds its kernels
for one mode per process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from normlab.core.conventions import CHANNELS_LAST
from normlab.core.plan import Plan, batch_plan, group_plan, instance_plan, layer_plan
from normlab.kernels.layout import ChannelShape, classify
from normlab.kernels.triton import launch, runtime
from normlab.kernels.triton import backend as host
from normlab.kernels.triton import seam
from normlab.kernels.triton.backend import TritonBackend

__all__ = ["Case", "Compiled", "Failure", "cases", "compile_cases", "launched_kernels", "summarize", "main"]

DEFAULT_ARCH = 90
"""Compute capability ×10 compiled for by default: 90 is the H100/H200 (80: A100, 89: L4/L40, 100: B200)."""
DEFAULT_SMS = 132
"""Multiprocessors assumed by default (an H100 SXM has 132; it only sets how the reductions are split)."""
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Case:
    """One call pattern of the backend: forward on ``shape`` with ``plan``, then its backward once for
    every combination of wanted gradients (dx, dγ, dβ) that autograd can ask for."""

    name: str
    shape: tuple[int, ...]
    plan: Plan
    channels_last: bool = False
    fixed: bool = False  # normalize with given statistics (BatchNorm/InstanceNorm in eval mode)
    relu: bool = False  # BatchNorm with ReLU fused
    residual: bool = False  # BatchNorm with a residual added before the fused ReLU
    affine: bool = True


@dataclasses.dataclass
class Compiled:
    """One compiled specialization: its kernel, the case that first reached it, and what the cubin costs."""

    kernel: str
    case: str
    dtype: str
    signature: str
    constants: str
    num_warps: int
    shared_bytes: int
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    seconds: float
    launches: int = 1

    @property
    def spills(self) -> bool:
        """Whether ptxas spilled registers to local memory."""
        return bool(self.spill_store_bytes or self.spill_load_bytes)


@dataclasses.dataclass
class Failure:
    """A case whose host code or one of whose kernels did not compile."""

    case: str
    dtype: str
    kernel: str | None
    error: str


def launched_kernels() -> tuple[str, ...]:
    """The kernels :class:`~normlab.kernels.triton.backend.TritonBackend` launches (``k["name"][grid]``),
    its statistics seam included, read from their source so that a new kernel is compiled here without
    being listed twice."""
    source = inspect.getsource(host) + inspect.getsource(seam)
    return tuple(sorted(set(re.findall(r'k\["(\w+)"\]\[', source))))


def cases(quick: bool = False) -> list[Case]:
    """The call patterns compiled: every kind of plan and layout the backend handles, BatchNorm with and
    without its fused epilogues, training and fixed statistics, with and without γ/β; on the shapes
    ``normlab bench`` times (their tiles and splits), or on small ones with ``quick``.

    ``quick`` still reaches every kernel and every flag (the tiles differ: fewer values per tile), and
    keeps one LayerNorm row of :data:`~normlab.kernels.triton.launch.ROW_TILE` values, the largest tile a
    kernel holds in registers."""
    cl = dict(channels_last=True)
    n_narrow = 2 if quick else 8
    gn_narrow, gn_narrow_half, gn_narrow_quarter = ((n_narrow, c, 2, 2) for c in (2048, 1024, 512))
    if quick:
        bn2d, bn_small, bn1d = (4, 16, 12, 12), (3, 40, 3, 3), (37, 24)
        gn, ln, ln_tile, ln_long, inst = (4, 16, 6, 6), (6, 20, 48), (3, 8192), (2, 32, 300), (3, 8, 9, 9)
    else:
        bn2d, bn_small, bn1d = (64, 64, 56, 56), (32, 512, 7, 7), (4096, 1024)
        gn, ln, ln_tile, ln_long, inst = (32, 256, 28, 28), (64, 196, 768), (4096, 1024), (8, 64, 256), (8, 64, 32, 32)
    out = []
    for shape in (bn2d, bn_small):
        plan = batch_plan(shape)
        out += [
            Case(f"BatchNorm2d {shape}", shape, plan),
            Case(f"BatchNorm2d {shape} without γ, β", shape, plan, affine=False),
            Case(f"BatchNorm2d {shape} eval", shape, plan, fixed=True),
            Case(f"BatchNormReLU2d {shape}", shape, plan, relu=True),
            Case(f"BatchNormAddReLU2d {shape}", shape, plan, relu=True, residual=True),
            Case(f"BatchNorm2d {shape} channels_last", shape, plan, **cl),
            Case(f"BatchNorm2d {shape} channels_last eval", shape, plan, fixed=True, **cl),
            Case(f"BatchNormReLU2d {shape} channels_last", shape, plan, relu=True, **cl),
            Case(f"BatchNormAddReLU2d {shape} channels_last", shape, plan, relu=True, residual=True, **cl),
        ]
    n, c = bn1d
    out += [
        Case(f"BatchNorm1d {bn1d}", bn1d, batch_plan(bn1d)),
        Case(f"BatchNorm1d {bn1d} eval", bn1d, batch_plan(bn1d), fixed=True),
        Case(f"BatchNorm1d {(n // 16, c, 16)}", (n // 16, c, 16), batch_plan((n // 16, c, 16))),
        Case(f"GroupNorm(8) {gn}", gn, group_plan(gn, 8)),
        Case(f"GroupNorm(8) {gn} channels_last", gn, group_plan(gn, 8), **cl),
        Case(f"GroupNorm(8) {gn} without γ, β", gn, group_plan(gn, 8), affine=False),
        Case(f"GroupNorm(4) {bn1d}", bn1d, group_plan(bn1d, 4)),
        # tall, narrow rows (many channels of a few values): the largest that stay whole in registers in
        # float32 and float64, and one past them
        Case(f"GroupNorm(1) {gn_narrow}", gn_narrow, group_plan(gn_narrow, 1)),
        Case(f"GroupNorm(1) {gn_narrow_half}", gn_narrow_half, group_plan(gn_narrow_half, 1)),
        Case(f"GroupNorm(1) {gn_narrow_quarter}", gn_narrow_quarter, group_plan(gn_narrow_quarter, 1)),
        Case(f"InstanceNorm2d {inst}", inst, instance_plan(inst)),
        Case(f"InstanceNorm2d {inst} eval", inst, instance_plan(inst), fixed=True),
        Case(f"LayerNorm({ln[-1]}) {ln}", ln, layer_plan(ln, ln[-1:])),
        Case(f"LayerNorm({ln_tile[-1]}) {ln_tile}", ln_tile, layer_plan(ln_tile, ln_tile[-1:])),
        Case(f"LayerNorm({ln_long[1:]}) {ln_long}", ln_long, layer_plan(ln_long, ln_long[1:])),
        Case(f"LayerNorm({ln_long[1:]}) {ln_long} without γ, β", ln_long, layer_plan(ln_long, ln_long[1:]),
             affine=False),
        Case(f"LayerNorm({inst[2:]}) {inst} channels_last", inst, layer_plan(inst, inst[2:]), **cl),
    ]
    return out


_NEEDS = ((True, True, True), (True, False, False), (False, True, True))
"""The gradients the backward is asked for: all; dx only (frozen γ/β); dγ/dβ only (an input that needs none)."""


def _exercise(backend: TritonBackend, case: Case, dtype: torch.dtype) -> None:
    """The backend's forward, then its backward for every combination of gradients, on ``case``.

    The tensors are CPU tensors that no kernel reads (the kernels are compiled, not run): only their
    shapes, strides, dtypes and alignment steer the host code, as they would on the GPU."""
    fmt = CHANNELS_LAST[len(case.shape)] if case.channels_last else torch.contiguous_format
    x = torch.empty(case.shape, dtype=dtype, memory_format=fmt)
    w = torch.empty(case.plan.param_shape, dtype=dtype) if case.affine else None
    b = torch.empty(case.plan.param_shape, dtype=dtype) if case.affine else None
    fixed = torch.empty(case.shape[1], dtype=dtype) if case.fixed else None
    residual = torch.empty_like(x) if case.residual else None
    y, shift, mean_shifted, _, rstd = backend.forward(x, w, b, fixed, fixed, case.plan, 1e-5, residual=residual,
                                                      relu=case.relu)
    dy = torch.empty_like(y)
    for need in _NEEDS if case.affine else _NEEDS[:1]:
        backend.backward(dy, x, w, shift, mean_shifted, rstd, case.plan, not case.fixed, need,
                         y=y if case.relu else None, residual=case.residual)
    if not case.fixed and isinstance(classify(case.plan), ChannelShape):  # BatchNorm training: its seam too
        c = case.shape[1]
        backend.partial_moments(x, case.plan)
        merged = torch.ones(4, c, dtype=torch.float64)
        backend.apply_moments(x, w, b, merged, case.plan, 1e-5, residual=residual, relu=case.relu)
        mask = y if case.relu else None
        totals = backend.partial_grad_sums(dy, x, shift, mean_shifted, rstd, case.plan, y=mask)
        backend.apply_grad(dy, x, w, shift, mean_shifted, rstd, totals, float(case.plan.count), case.plan, y=mask,
                           residual=case.residual)


class _TargetOnly:
    """Stands in for Triton's active driver while compiling: names the target, a device key of its own
    (so that Triton's per-device caches keep these kernels apart from a real device's) and no stream."""

    def __init__(self, target, device: str):
        self.target, self.device = target, device

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0


_USED = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas(arch: int) -> tuple[str, str]:
    """Triton's own ptxas for ``arch`` and the architecture name it compiles for (``sm_90a`` for 90)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    return get_ptxas(arch).path, sm_arch_from_capability(arch)


def _resources(ptx: str, ptxas: tuple[str, str]) -> tuple[int, int, int, int]:
    """(registers, stack frame bytes, spill store bytes, spill load bytes) of the kernel in ``ptx``, from
    ``ptxas -v`` run as Triton runs it (FMA contraction on, the same register allocation level)."""
    path, arch = ptxas
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o",
                               os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True)
    log = done.stdout + done.stderr
    used, frame = _USED.search(log), _FRAME.search(log)
    if used is None or frame is None:
        raise RuntimeError(f"ptxas -v printed no register or stack figures:\n{log}")
    return int(used.group(1)), *(int(v) for v in frame.groups())


class _Compiler:
    """Replaces the backend's kernels during :func:`compile_cases`: ``kernel[grid](*args, **kw)`` compiles
    the specialization those arguments select (Triton's ``warmup``) instead of launching it."""

    def __init__(self, kernels: dict, ptxas: tuple[str, str]):
        self.kernels, self.ptxas = kernels, ptxas
        self.compiled: dict[int, Compiled] = {}
        self.context = ("", "")
        self.current: str | None = None

    def proxy(self, name: str):
        compiler = self

        class Launch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: compiler.compile(name, grid, args, kwargs)

        return Launch()

    def compile(self, name, grid, args, kwargs) -> None:
        self.current = name
        fn = self.kernels[name]
        start = time.perf_counter()
        kernel = fn.warmup(*args, grid=grid, **kwargs)
        seconds = time.perf_counter() - start
        seen = self.compiled.get(id(kernel))
        if seen is not None:
            seen.launches += 1
            return
        meta = kernel.metadata
        regs, stack, stores, loads = _resources(kernel.asm["ptx"], self.ptxas)
        signature = ", ".join(f"{k}: {v}" for k, v in kernel.src.signature.items() if v != "constexpr")
        constants = ", ".join(f"{fn.arg_names[path[0]]}={_show(v)}" for path, v in kernel.src.constants.items())
        self.compiled[id(kernel)] = Compiled(
            kernel=name, case=self.context[0], dtype=self.context[1], signature=signature, constants=constants,
            num_warps=meta.num_warps, shared_bytes=meta.shared, registers=regs, stack_bytes=stack,
            spill_store_bytes=stores, spill_load_bytes=loads, seconds=seconds)
        self.current = None


def _show(value) -> str:
    return getattr(value, "name", None) or str(value)


@contextlib.contextmanager
def _compiling_for(arch: int, sms: int) -> Iterator[_Compiler]:
    """The backend's kernels replaced by compilers for ``arch``, its program counts those of ``sms``
    multiprocessors, Triton's driver by a stand-in naming the target; all restored afterwards."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    if os.environ.get("TRITON_INTERPRET") == "1" or runtime.built_for() == "interpreter":
        raise RuntimeError("the Triton kernels can be compiled for a GPU only in a process where Triton's "
                           "interpreter is off: unset TRITON_INTERPRET (this process built them for the "
                           "interpreter)" if runtime.built_for() == "interpreter" else
                           "the Triton kernels can be compiled for a GPU only with Triton's interpreter off: "
                           "unset TRITON_INTERPRET")
    namespace = runtime.kernels()
    names = launched_kernels()
    compiler = _Compiler({n: namespace[n] for n in names}, _ptxas(arch))
    device = f"normlab-compile-sm{arch}"
    saved = {n: namespace[n] for n in names}
    saved_programs = launch.target_programs
    previous = getattr(driver, "_active", None)  # not `driver.active`: that would create a real driver
    driver.set_active(_TargetOnly(GPUTarget("cuda", arch, 32), device))
    try:
        for n in names:
            namespace[n] = compiler.proxy(n)
        launch.target_programs = lambda x: launch.PROGRAMS_PER_SM * sms
        yield compiler
    finally:
        namespace.update(saved)
        launch.target_programs = saved_programs
        driver._active = previous
        for fn in saved.values():  # the compiled kernels are for a device this process does not have
            fn.device_caches.pop(device, None)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception ``exc`` was raised from (itself if none)."""
    seen = {id(exc)}
    while (nxt := exc.__cause__ or exc.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        exc = nxt
    return exc


def compile_cases(case_list: Sequence[Case], dtypes: Sequence[torch.dtype] = DTYPES, arch: int = DEFAULT_ARCH,
                  sms: int = DEFAULT_SMS,
                  progress: Callable[[Iterator], Iterator] | None = None) -> tuple[list[Compiled], list[Failure]]:
    """Compile every kernel specialization that ``case_list`` reaches in each of ``dtypes`` for compute
    capability ``arch`` (×10), with the splits of a GPU with ``sms`` multiprocessors.

    Returns the compiled specializations (each once, with the number of launches that asked for it) and the
    failures (case, dtype, kernel, first lines of the error); a failure stops its case, not the others.
    ``progress`` wraps the iteration over (case, dtype) pairs (e.g. ``tqdm``)."""
    backend = TritonBackend()
    failures = []
    work = [(case, dtype) for case in case_list for dtype in dtypes]
    with _compiling_for(arch, sms) as compiler:
        for case, dtype in progress(iter(work)) if progress is not None else work:
            dname = str(dtype).replace("torch.", "")
            compiler.context = (case.name, dname)
            compiler.current = None
            try:
                _exercise(backend, case, dtype)
            except Exception as exc:  # a kernel that does not compile, reported with its case
                text = "\n".join(str(exc).strip().splitlines()[:12])
                cause = _root_cause(exc)
                if cause is not exc:  # Triton's CompilationError shows where; its cause says what
                    text += f"\ncaused by {type(cause).__name__}: {cause}"
                failures.append(Failure(case.name, dname, compiler.current, f"{type(exc).__name__}: {text}"))
    return list(compiler.compiled.values()), failures


def summarize(compiled: Sequence[Compiled]) -> list[dict]:
    """Per kernel: specializations compiled, launches asking for them, warps, and the most registers, stack
    frame, spilled and shared-memory bytes among them; how many spill, and the compile seconds."""
    rows = []
    for name in sorted({c.kernel for c in compiled}):
        mine = [c for c in compiled if c.kernel == name]
        rows.append({
            "kernel": name, "specializations": len(mine), "launches": sum(c.launches for c in mine),
            "warps": f"{min(c.num_warps for c in mine)}-{max(c.num_warps for c in mine)}",
            **{f"max_{attr}": max(getattr(c, attr) for c in mine)
               for attr in ("registers", "stack_bytes", "spill_store_bytes", "shared_bytes")},
            "spilling": sum(c.spills for c in mine), "seconds": sum(c.seconds for c in mine),
        })
    return rows


_COLUMNS = {"kernel": "kernel", "specializations": "specializations", "launches": "launches", "warps": "warps",
            "max_registers": "max registers", "max_stack_bytes": "max stack B", "max_spill_store_bytes":
            "max spilled B", "max_shared_bytes": "max shared B", "spilling": "spilling", "seconds": "compile s"}


def _table(rows: list[dict]) -> str:
    body = [[f"{r[k]:.1f}" if k == "seconds" else str(r[k]) for k in _COLUMNS] for r in rows]
    head = list(_COLUMNS.values())
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(b) for b in body)])


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if dtype not in DTYPES:
        raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(str(d)[6:] for d in DTYPES)}")
    return dtype


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m normlab.kernels.triton.compile",
        description="Compile normlab's Triton kernels for an NVIDIA GPU architecture without a GPU: every "
                    "specialization the backend's host code reaches on the listed cases, to a cubin, with "
                    "its registers, spills and shared memory. Exit status 1 if any does not compile.")
    parser.add_argument("--arch", type=int, default=DEFAULT_ARCH,
                        help=f"compute capability x10 (default {DEFAULT_ARCH}: H100/H200; 80: A100)")
    parser.add_argument("--sms", type=int, default=DEFAULT_SMS,
                        help=f"multiprocessors of the GPU, which set the reductions' splits (default {DEFAULT_SMS})")
    parser.add_argument("--quick", action="store_true", help="small shapes (every kernel and flag, fewer tiles)")
    parser.add_argument("--dtype", type=_dtype, action="append",
                        help="float32, float64, float16 or bfloat16 (repeat for several; default all four)")
    parser.add_argument("--json", action="store_true", help="print every specialization as JSON instead")
    args = parser.parse_args(argv)
    if args.arch < 50 or args.sms < 1:
        parser.error("--arch is a compute capability x10 such as 80 or 90, --sms a positive count")
    try:
        import triton
    except ImportError:
        print("normlab.kernels.triton.compile: triton is not installed (pip install 'normlab[gpu]')", file=sys.stderr)
        return 2
    from tqdm import tqdm

    dtypes = tuple(args.dtype or DTYPES)
    case_list = cases(args.quick)
    start = time.perf_counter()
    try:
        compiled, failures = compile_cases(
            case_list, dtypes, args.arch, args.sms,
            progress=lambda it: tqdm(it, total=len(case_list) * len(dtypes), desc=f"compiling for sm_{args.arch}",
                                     unit="case", file=sys.stderr, disable=None))
    except RuntimeError as exc:
        print(f"normlab.kernels.triton.compile: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"arch": args.arch, "sms": args.sms, "triton": triton.__version__,
                          "compiled": [dataclasses.asdict(c) for c in compiled],
                          "failures": [dataclasses.asdict(f) for f in failures]}, indent=1))
    else:
        print(f"normlab's Triton kernels compiled for sm_{args.arch} ({args.sms} multiprocessors) with triton "
              f"{triton.__version__}: {len(case_list)} cases x {len(dtypes)} dtypes, "
              f"{len(compiled)} specializations in {time.perf_counter() - start:.0f} s")
        print(_table(summarize(compiled)))
        for f in failures:
            print(f"\nFAILED {f.case} [{f.dtype}]" + (f" in {f.kernel}" if f.kernel else "") + f":\n{f.error}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
