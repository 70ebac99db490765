"""The Triton backend against the torch engine and torch.nn.

Everything but the last class runs the kernels on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set per test; the backend builds its kernels on first use, in whichever mode is
asked for then). Small tensors, since the interpreter is slow; the "small tiles" runs shrink the tiles and
raise the program count so that the same small tensors go through the grid-stride loops, the split
reductions and the long-row kernels. :class:`TestOnCuda` runs only where a CUDA device is present, in a
subprocess without the interpreter.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from triton_interpreter import import_triton_interpreted  # tests/kernels, put on the path by its conftest

import_triton_interpreted()

import normlab.functional as F  # noqa: E402
import normlab.nn as nl  # noqa: E402
from normlab.core.plan import batch_plan, layer_plan  # noqa: E402
from normlab.kernels import BackendError, dispatch, select  # noqa: E402
from normlab.kernels.triton import TritonBackend, launch, runtime  # noqa: E402
from kernel_cases import SHARED_CASES, float32_error_against_float64  # noqa: E402

CL = torch.channels_last
SMALL_TILES = dict(BLOCK=16, ROW_TILE=8, COLUMNS=4, INTERPRETER_PROGRAMS=64)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Triton's interpreter on and the triton backend forced, for the length of one test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("NORMLAB_BACKEND", "triton")
    reason = TritonBackend().unsupported(torch.zeros(2, 2), batch_plan((2, 2)))
    if reason is not None:
        pytest.skip(f"Triton's interpreter cannot be used in this process: {reason}")


@pytest.fixture(params=["default tiles", "small tiles"])
def tiles(request, monkeypatch):
    if request.param == "small tiles":
        for name, value in SMALL_TILES.items():
            monkeypatch.setattr(launch, name, value)
    return request.param


def _eval_bn(x, w, b):
    c = x.shape[1]
    return F.batch_norm(x, torch.linspace(-1, 1, c, dtype=x.dtype), torch.linspace(0.5, 2, c, dtype=x.dtype), w, b,
                        training=False)


CASES = {
    "bn planar": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), (3, 5, 6, 7), 5, None),
    "bn planar eval": (_eval_bn, (3, 5, 6, 7), 5, None),
    "bn 1d rows": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), (37, 7), 7, None),
    "bn 1d (N, C, L)": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), (4, 3, 10), 3, None),
    "bn channels_last": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), (3, 6, 5, 4), 6, CL),
    "bn channels_last eval": (_eval_bn, (3, 6, 5, 4), 6, CL),
    "gn": (lambda x, w, b: F.group_norm(x, 3, w, b), (4, 6, 5, 3), 6, None),
    "gn channels_last": (lambda x, w, b: F.group_norm(x, 3, w, b), (4, 6, 5, 3), 6, CL),
    "gn 2d": (lambda x, w, b: F.group_norm(x, 2, w, b), (5, 24), 24, None),
    "instance": (lambda x, w, b: F.instance_norm(x, weight=w, bias=b), (3, 4, 5, 6), 4, None),
    **SHARED_CASES,
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("need", [(True, True, True), (False, True, False), (True, False, False)], ids=str)
def test_matches_torch_engine(name, need, matches_engine):
    matches_engine(CASES[name], "triton", need)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torch_engine_with_small_tiles(name, monkeypatch, matches_engine):
    for attr, value in SMALL_TILES.items():
        monkeypatch.setattr(launch, attr, value)
    matches_engine(CASES[name], "triton")


class _Spy:
    """Records the grids a kernel is launched with."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("name, kernels", [
    ("bn planar", ("_moments_planar", "_planar_sums")),
    ("bn channels_last", ("_moments_cols", "_cols_sums")),
    ("gn", ("_moments_planar", "_planar_sums")),
    ("ln", ("_moments_planar", "_planar_sums", "_cols_sums")),
    ("gn 2d", ("_cols_sums",)),
])
def test_small_tiles_split_the_reductions(name, kernels, monkeypatch, run_case):
    """With small tiles the statistics and gradient sums are split across several programs per unit (the
    second grid axis), and the per-row plans leave the whole-row kernels for the long-row ones."""
    for attr, value in SMALL_TILES.items():
        monkeypatch.setattr(launch, attr, value)
    built = runtime.kernels()  # jitted, so that they can be wrapped
    grids = {k: [] for k in kernels + ("_row_forward_tile", "_row_backward_tile")}
    for k in grids:
        monkeypatch.setitem(built, k, _Spy(built[k], grids[k]))
    run_case(CASES[name], "triton")
    for k in kernels:
        assert grids[k] and all(len(g) == 2 for g in grids[k]), (k, grids[k])
        assert max(g[1] for g in grids[k]) > 1, (k, grids[k])
    assert not grids["_row_forward_tile"] and not grids["_row_backward_tile"]


def test_default_tiles_keep_short_rows_whole(monkeypatch, run_case):
    built = runtime.kernels()
    grids = {k: [] for k in ("_row_forward_tile", "_row_backward_tile", "_moments_planar")}
    for k in grids:
        monkeypatch.setitem(built, k, _Spy(built[k], grids[k]))
    run_case(CASES["ln"], "triton")
    assert grids["_row_forward_tile"] == [(9,)] and len(grids["_row_backward_tile"]) == 1
    assert not grids["_moments_planar"]


# --- torch.nn -----------------------------------------------------------------------------------------


def _compare_modules(ours, theirs, shapes, fmt=None, steps=(True, True, False), dtype=torch.float32, tol=1e-5):
    gen = torch.Generator().manual_seed(3)
    theirs.load_state_dict(ours.state_dict())
    for train, shape in zip(steps, shapes):
        ours.train(train), theirs.train(train)
        x = torch.randn(shape, generator=gen, dtype=dtype) * 2 + 1
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        dy = torch.randn(shape, generator=gen, dtype=dtype)
        xa, xb = (x.clone().requires_grad_(True) for _ in range(2))
        ya, yb = ours(xa), theirs(xb)
        torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
        if fmt is not None:
            assert ya.is_contiguous(memory_format=fmt)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=tol, atol=tol)
        for pa, pb in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=tol, atol=tol)
            pa.grad = pb.grad = None
        for ba, bb in zip(ours.buffers(), theirs.buffers()):
            torch.testing.assert_close(ba, bb, rtol=tol, atol=tol)


def _randomize(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


@pytest.mark.parametrize("kind", ["1d (N, C)", "1d (N, C, L)", "2d nchw", "2d channels_last"])
def test_batchnorm_matches_torch_nn(kind, tiles):
    """Two training steps (running statistics updated) then one in eval mode, forward and backward."""
    if kind.startswith("1d"):
        ours, theirs = _randomize(nl.BatchNorm1d(5)), torch.nn.BatchNorm1d(5)
        shape = (12, 5) if kind == "1d (N, C)" else (3, 5, 7)
        fmt = None
    else:
        ours, theirs = _randomize(nl.BatchNorm2d(5)), torch.nn.BatchNorm2d(5)
        shape, fmt = (3, 5, 4, 6), (CL if kind == "2d channels_last" else None)
    _compare_modules(ours, theirs, [shape] * 3, fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer", ["layer", "group nchw", "group channels_last", "instance"])
def test_layer_group_instance_match_torch_nn(layer, dtype):
    if layer == "layer":
        ours, theirs, shape, fmt = nl.LayerNorm((4, 6)), torch.nn.LayerNorm((4, 6)), (5, 3, 4, 6), None
    elif layer.startswith("group"):
        ours, theirs, shape = nl.GroupNorm(2, 6), torch.nn.GroupNorm(2, 6), (3, 6, 4, 5)
        fmt = CL if layer.endswith("channels_last") else None
    else:
        ours = nl.InstanceNorm2d(3, affine=True, track_running_stats=True)
        theirs = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
        shape, fmt = (4, 3, 5, 6), None
    ours, theirs = _randomize(ours.to(dtype)), theirs.to(dtype)
    _compare_modules(ours, theirs, [shape] * 3, fmt, dtype=dtype, tol=1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("add", [False, True], ids=["relu", "add_relu"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
def test_fused_matches_torch_composition(add, fmt, tiles):
    """BatchNormReLU2d / BatchNormAddReLU2d: the fused kernels (forward epilogue, masked backward, residual
    gradient) against relu(bn(x) [+ r]) on torch.nn, in training and evaluation."""
    ours = _randomize((nl.BatchNormAddReLU2d if add else nl.BatchNormReLU2d)(4))
    theirs = torch.nn.BatchNorm2d(4)
    theirs.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(1)
    for train in (True, False):
        ours.train(train), theirs.train(train)
        x = torch.randn(3, 4, 5, 6, generator=gen).contiguous(memory_format=fmt)
        r = torch.randn(3, 4, 5, 6, generator=gen).contiguous(memory_format=fmt)
        dy = torch.randn(3, 4, 5, 6, generator=gen)
        xa, xb, ra, rb = (t.clone().requires_grad_(True) for t in (x, x, r, r))
        ya = ours(xa, ra) if add else ours(xa)
        assert type(ya.grad_fn).__name__ == "NormalizeReLUBackward"
        yb = torch.relu(theirs(xb) + rb) if add else torch.relu(theirs(xb))
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        assert ya.is_contiguous(memory_format=fmt)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
        if add:
            torch.testing.assert_close(ra.grad, rb.grad, rtol=1e-5, atol=1e-5)
        for pa, pb in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-5)
            pa.grad = pb.grad = None
        for ba, bb in zip(ours.buffers(), theirs.buffers()):
            torch.testing.assert_close(ba, bb)


def test_fused_residual_gradient_when_the_input_needs_none():
    """A frozen trunk: x needs no gradient, the residual and the affine parameters do."""
    ours = _randomize(nl.BatchNormAddReLU2d(3))
    theirs = torch.nn.BatchNorm2d(3)
    theirs.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(2)
    x, r, dy = (torch.randn(2, 3, 4, 4, generator=gen) for _ in range(3))
    ra, rb = (r.clone().requires_grad_(True) for _ in range(2))
    ours(x, ra).backward(dy)
    torch.relu(theirs(x) + rb).backward(dy)
    torch.testing.assert_close(ra.grad, rb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-5)


# --- precision ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, dtype", [("bn channels_last", torch.float16), ("ln", torch.float16),
                                         ("gn", torch.bfloat16)])
def test_half_precision_matches_torch_engine(name, dtype, monkeypatch, run_case):
    y_ref, grads_ref = run_case(CASES[name], "torch", dtype)
    y, grads = run_case(CASES[name], "triton", dtype)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())


@pytest.mark.parametrize("outlier", [False, True], ids=["", "outlier first"])
@pytest.mark.parametrize("fmt", [None, CL], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_large_mean_tiny_spread(norm, fmt, outlier, tiles):
    """1e4 + N(0, 1e-2) in float32 keeps its variance in every kernel family, also when the first value
    (the shift) lies 50 standard deviations out."""
    gen = torch.Generator().manual_seed(0)
    x64 = 1e4 + 1e-2 * torch.randn(6, 4, 5, 6, generator=gen, dtype=torch.float64)
    if outlier:
        x64[0, 0, 0, 0] += 0.5
        x64[0, 2, 0, 0] += 0.5
    assert float32_error_against_float64(x64, fmt, norm) < 1e-3


@pytest.mark.parametrize("layout", ["(N, C) rows", "channels_last", "planar", "layer rows"])
def test_an_outlier_first_costs_no_precision_elsewhere(layout, tiles, outlier_first_errors):
    """1e-2 · N(0, 1) with a first sample of 1e5, which dominates the variance. The statistics are taken
    about the median of each unit's first, middle and last values, their partials merged in float64, and
    the data normalized about the rounded mean: errors of 3e-9 to 4e-8 away from the outlier (about
    the first value, with float32 merges: 2.7e-5 on (N, C) rows, 2e-6 to 4e-6 on the others; ATen 4e-7
    on the rows). LayerNorm: every row's first value is the outlier."""
    n = 8192 if tiles == "default tiles" else 1024  # small tiles: many more programs for the interpreter
    shape = {"(N, C) rows": (n, 4), "layer rows": (n // 128, n // 16)}.get(layout, (n // 16, 4, 4, 4))
    kind = layout if layout in ("(N, C) rows", "layer rows") else "(N, C, H, W)"
    elsewhere, on_outlier, dx, dw = outlier_first_errors(kind, shape, channels_last=layout == "channels_last")
    assert elsewhere < 1e-7
    assert on_outlier < 5e-5
    assert dx < 1e-6 and dw < 1e-6


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_float64_eps_keeps_float64_precision(norm, monkeypatch):
    """Triton passes Python floats as float32; eps = 1/3 (where it dominates the variance) must still act
    as the float64 1/3."""
    x = torch.randn(6, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e-2
    fn = {"batch": lambda: F.batch_norm(x, None, None, training=True, eps=1 / 3),
          "layer": lambda: F.layer_norm(x, (4, 5), eps=1 / 3)}[norm]
    y = fn()
    monkeypatch.setenv("NORMLAB_BACKEND", "torch")
    torch.testing.assert_close(y, fn(), rtol=1e-12, atol=1e-13)


def test_strided_input_and_expanded_gradient():
    x = torch.randn(6, 5, 4, 3, dtype=torch.float64).permute(0, 3, 2, 1).requires_grad_(True)  # (6, 3, 4, 5)
    y = F.batch_norm(x, None, None, training=True)
    (y * torch.arange(5.0, dtype=torch.float64)).sum().backward()  # dy is a broadcast view
    xr = x.detach().clone().requires_grad_(True)
    yr = torch.nn.functional.batch_norm(xr, None, None, training=True)
    (yr * torch.arange(5.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_empty_batch(norm):
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    if norm == "batch":
        y = F.batch_norm(x, None, None, torch.ones(3), torch.zeros(3), training=True)
    else:
        y = F.layer_norm(x, (3, 4, 4), torch.ones(3, 4, 4), torch.zeros(3, 4, 4))
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


@pytest.mark.parametrize("bad", ["nan", "inf", "fp16 overflow"])
@pytest.mark.parametrize("layer", ["BatchNorm2d", "InstanceNorm2d"])
def test_a_batch_with_non_finite_statistics_leaves_the_running_statistics(layer, bad):
    """Guarded statistics (normlab.core.guard) on the Triton kernels' path: counted, nothing updated."""
    norm = getattr(nl, layer)(3, track_running_stats=True)
    norm(torch.randn(2, 3, 4, 4))
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    x = torch.randn(2, 3, 4, 4)
    x[1, 2, 0, 1] = {"nan": float("nan"), "inf": float("inf"), "fp16 overflow": 1e5}[bad]
    if bad == "fp16 overflow":
        x = x.half()
    with pytest.warns(RuntimeWarning, match="num_batches_skipped"):
        y = norm(x)
    assert all(torch.equal(v, norm.state_dict()[k]) for k, v in before.items())
    assert norm.num_batches_skipped == 1 and torch.isnan(y[:, 2] if layer == "BatchNorm2d" else y[1, 2]).all()


# --- dispatch -----------------------------------------------------------------------------------------


def test_forced_triton_is_selected_under_the_interpreter():
    x = torch.randn(4, 3)
    assert select(x, batch_plan(x.shape)).name == "triton"
    assert select(x, layer_plan(x.shape, (3,)), batch_stats=False).name == "triton"
    x = torch.randn(5, 3, requires_grad=True)
    assert type(F.batch_norm(x, None, None, training=True).grad_fn).__name__ == "NormalizeBackward"


def test_forced_triton_raises_where_it_cannot_run(monkeypatch):
    with pytest.raises(BackendError, match=r"NORMLAB_BACKEND=triton: .*dtype torch.int64"):
        select(torch.ones(4, 3, dtype=torch.int64), batch_plan((4, 3)))
    with pytest.raises(BackendError, match=r"NORMLAB_BACKEND=triton: .*CUDA tensors, got a tensor on meta"):
        F.batch_norm(torch.empty(4, 3, device="meta"), None, None, training=True)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendError, match=r"NORMLAB_BACKEND=triton: .*TRITON_INTERPRET=1"):
        F.batch_norm(torch.randn(4, 3), None, None, training=True)


def test_forced_triton_not_installed_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "available", lambda name: name != "triton")
    with pytest.raises(BackendError, match="not installed"):
        F.batch_norm(torch.randn(4, 3), None, None, training=True)


_FAKE_CUDA = textwrap.dedent("""
    import torch
    from normlab.core.plan import batch_plan
    from normlab.kernels import dispatch, select

    class FakeCudaTensor:  # just enough of a CUDA tensor for dispatch to route it (no kernel runs)
        is_cuda = True
        device = torch.device("cuda", 0)
        dtype = torch.float32

        def numel(self):
            return 12
""")


def test_auto_sends_cuda_tensors_to_triton():
    code = _FAKE_CUDA + textwrap.dedent("""
        x, plan = FakeCudaTensor(), batch_plan((4, 3))
        assert select(x, plan).name == "triton"
        assert select(x, plan, batch_stats=False).name == "triton"
        assert getattr(select(torch.randn(4, 3), plan), "name", None) != "triton"  # CPU: numba or the engine
        dispatch.available = lambda name: name != "triton"
        assert select(x, plan) is None  # no triton: the torch engine
        print("routed")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NORMLAB_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "routed" in out.stdout, out.stdout + out.stderr


def test_cuda_tensors_are_refused_where_the_kernels_are_interpreted(monkeypatch):
    """Under the interpreter (this module's processes) a CUDA tensor would be copied to the host and back at
    every launch: auto sends it to the torch engine, forcing triton says why."""
    namespace: dict = {}
    exec(_FAKE_CUDA, namespace)
    x, plan = namespace["FakeCudaTensor"](), batch_plan((4, 3))
    reason = TritonBackend().unsupported(x, plan)
    assert reason is not None and "TRITON_INTERPRET" in reason and "GPU" in reason
    with pytest.raises(BackendError, match=r"NORMLAB_BACKEND=triton: .*TRITON_INTERPRET"):
        select(x, plan)
    monkeypatch.setenv("NORMLAB_BACKEND", "auto")
    assert select(x, plan) is None


def test_importing_the_backend_imports_no_triton():
    code = (
        "import sys, torch, normlab.kernels.triton as tb, normlab.functional as F; "
        "F.batch_norm(torch.randn(4, 3), None, None, training=True); "
        "assert tb.TritonBackend().unsupported(torch.randn(2, 2), None) is not None; "
        "assert 'triton' not in sys.modules"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NORMLAB_BACKEND")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# --- a real GPU ---------------------------------------------------------------------------------------

_DEVICE_CHECK = textwrap.dedent("""
    import sys
    import torch
    import normlab.nn as nl
    from normlab.core.plan import batch_plan
    from normlab.kernels import select

    dev, expected = sys.argv[1], sys.argv[2]
    if sys.argv[3:] == ["perturb"]:  # a backend off by 1e-3 (relative) in BatchNorm2d's output, to be caught
        forward = nl.BatchNorm2d.forward
        nl.BatchNorm2d.forward = lambda self, x: forward(self, x) * 1.001
    x = torch.randn(8, 16, 12, 12, device=dev)
    assert select(x, batch_plan(x.shape)).name == expected
    torch.manual_seed(0)
    # float64 kernels against float64; the others, computed in float32, to their own dtype's precision
    TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 6e-2}

    def close(a, b, tol, what):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()),
                                   msg=lambda m: f"{what}: {m}")

    def compare(ours, theirs, shape, dtype, fmt=torch.contiguous_format, fused=False):
        # ours in dtype against the torch.nn layer in float64 on the same (rounded) values: two training
        # steps, then one in eval
        tol, name = TOL[dtype], f"{type(ours).__name__} {shape} {dtype} {fmt}"
        ours, theirs = ours.to(dev), theirs.to(dev).double()
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_()
        theirs.load_state_dict(ours.state_dict())
        ours.to(dtype)
        theirs.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in ours.state_dict().items()})
        for train in (True, True, False):
            ours.train(train), theirs.train(train)
            x = (torch.randn(shape, device=dev) * 3 + 100).to(dtype).contiguous(memory_format=fmt)
            dy = torch.randn(shape, device=dev).to(dtype)
            xa, xb = x.clone().requires_grad_(True), x.double().requires_grad_(True)
            ya = ours(xa)
            yb = torch.relu(theirs(xb)) if fused else theirs(xb)
            assert ya.dtype == dtype and ya.is_contiguous(memory_format=fmt), name
            close(ya, yb, tol, f"{name} output")
            ya.backward(dy)
            yb.backward(dy.double())
            close(xa.grad, xb.grad, tol, f"{name} input gradient")
            for pa, pb in zip(ours.parameters(), theirs.parameters()):
                close(pa.grad, pb.grad, tol, f"{name} parameter gradient")
                pa.grad = pb.grad = None
            for ba, bb in zip(ours.buffers(), theirs.buffers()):
                close(ba, bb.to(ba.dtype).double(), tol, f"{name} buffer")

    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            compare(nl.BatchNorm2d(16), torch.nn.BatchNorm2d(16), (32, 16, 28, 28), dtype, fmt)
            compare(nl.BatchNormReLU2d(16), torch.nn.BatchNorm2d(16), (32, 16, 28, 28), dtype, fmt, fused=True)
            compare(nl.GroupNorm(4, 16), torch.nn.GroupNorm(4, 16), (8, 16, 60, 60), dtype, fmt)
        compare(nl.BatchNorm1d(300), torch.nn.BatchNorm1d(300), (4096, 300), dtype)
        compare(nl.LayerNorm(768), torch.nn.LayerNorm(768), (64, 49, 768), dtype)
        compare(nl.LayerNorm((64, 32, 32)), torch.nn.LayerNorm((64, 32, 32)), (4, 64, 32, 32), dtype)
        compare(nl.InstanceNorm2d(8, affine=True), torch.nn.InstanceNorm2d(8, affine=True), (4, 8, 128, 128), dtype)
    print(f"{dev} ok")
""")


def _device_check(device: str, backend: str, *flags: str) -> subprocess.CompletedProcess:
    """Run :data:`_DEVICE_CHECK` in a fresh process (no interpreter, dispatch left to ``auto``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NORMLAB_BACKEND")}
    return subprocess.run([sys.executable, "-c", _DEVICE_CHECK, device, backend, *flags], env=env,
                          capture_output=True, text=True, timeout=900)


def test_the_device_check_passes_on_cpu_kernels():
    """The check :class:`TestOnCuda` runs on a GPU, run here against the numba kernels: it is a check that
    passes on a correct backend, in every dtype it tries (and it fails on a wrong one, below)."""
    if not dispatch.available("numba"):
        pytest.skip("numba is not installed")
    out = _device_check("cpu", "numba")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cpu ok" in out.stdout
    wrong = _device_check("cpu", "numba", "perturb")
    assert wrong.returncode != 0 and "cpu ok" not in wrong.stdout
    assert "BatchNorm2d (32, 16, 28, 28) torch.float32" in wrong.stderr and "output" in wrong.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestOnCuda:
    """Auto dispatch sends CUDA tensors to the compiled kernels, which match torch.nn in every dtype."""

    def test_auto_dispatch_and_torch_nn_on_cuda(self):
        out = _device_check("cuda", "triton")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "cuda ok" in out.stdout
