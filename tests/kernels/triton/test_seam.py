"""The Triton backend's statistics seam (normlab.kernels.triton.seam) with small tiles and many programs, so
that every statistic's moments and gradient sums are split over several programs and the seam merges the
split partials itself (_pack_moments): still the fused path's results bit for bit, under Triton's
interpreter. The seam's contract on every backend is tests/kernels/test_seam.py."""

import pytest
import torch

from triton_interpreter import import_triton_interpreted  # tests/kernels, put on the path by its conftest

import_triton_interpreted()

from normlab.core import stats  # noqa: E402
from normlab.core.plan import batch_plan  # noqa: E402
from normlab.kernels.triton import TritonBackend, launch  # noqa: E402

SMALL_TILES = dict(BLOCK=16, COLUMNS=4, INTERPRETER_PROGRAMS=64)
SHAPES = {"planar": ((3, 5, 6, 7), None), "channels_last": ((3, 6, 5, 4), torch.channels_last),
          "2d rows": ((37, 7), None)}


@pytest.fixture
def backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for name, value in SMALL_TILES.items():
        monkeypatch.setattr(launch, name, value)
    backend = TritonBackend()
    reason = backend.unsupported(torch.zeros(2, 2), batch_plan((2, 2)))
    if reason is not None:
        pytest.skip(f"Triton's interpreter cannot be used in this process: {reason}")
    return backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", SHAPES)
def test_split_partials_give_the_fused_results_bit_for_bit(backend, monkeypatch, layout, dtype):
    shape, fmt = SHAPES[layout]
    gen = torch.Generator().manual_seed(5)
    x, dy, res = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    x = x * 0.1 + 1e3  # a large mean and a small spread
    w, b = (torch.randn(shape[1], generator=gen, dtype=dtype) for _ in range(2))
    if fmt is not None:
        x, dy, res = (t.contiguous(memory_format=fmt) for t in (x, dy, res))
    plan = batch_plan(shape)
    spy = []
    kernel = launch.split_programs
    monkeypatch.setattr("normlab.kernels.triton.backend.split_programs",
                        lambda *a: spy.append(kernel(*a)) or spy[-1])
    for relu, residual in ((False, None), (True, res)):
        y1, *st1 = backend.forward(x, w, b, None, None, plan, 1e-5, residual=residual, relu=relu)
        merged = stats.merge_moments(stats.identity(backend.partial_moments(x, plan)))
        y2, *st2 = backend.apply_moments(x, w, b, merged, plan, 1e-5, residual=residual, relu=relu)
        for fused, seam in [(y1, y2), *zip(st1, st2)]:
            assert torch.equal(fused, seam)
        mask = y1 if relu else None
        dx1, dw1, db1, *dres1 = backend.backward(dy, x, w, st1[0], st1[1], st1[3], plan, True, (True, True, True),
                                                 y=mask, residual=residual is not None)
        sums = backend.partial_grad_sums(dy, x, st2[0], st2[1], st2[3], plan, y=mask)
        assert torch.equal(sums[0].to(dtype), db1) and torch.equal(sums[1].to(dtype), dw1)
        out = backend.apply_grad(dy, x, w, st2[0], st2[1], st2[3], stats.identity(sums), plan.count, plan, y=mask,
                                 residual=residual is not None)
        assert torch.equal(out[0] if relu else out, dx1)
        if residual is not None:
            assert torch.equal(out[1], dres1[0])
    assert max(spy) > 1  # the statistics were split over several programs
