"""Streaming stores (normlab.kernels.numba.stream): when the kernels use them, that they do, and that
they change no bit of any result."""

import platform

import numpy as np
import pytest
import torch

import normlab.nn as nl

pytest.importorskip("numba")

from normlab.kernels.numba import backend, columns, primitives, rows, stream  # noqa: E402  (numba first)

X86 = platform.machine().lower() in ("x86_64", "amd64")


def test_threshold_is_half_the_last_level_cache_unless_set(monkeypatch):
    monkeypatch.delenv("NORMLAB_STREAM_MB", raising=False)
    assert stream.threshold() == stream._cache_bytes() // 2 > 0
    for text, expected in (("16", 16 << 20), ("0", 0), ("0.5", 1 << 19), (" 2 ", 2 << 20)):
        monkeypatch.setenv("NORMLAB_STREAM_MB", text)
        assert stream.threshold() == expected
    monkeypatch.setenv("NORMLAB_STREAM_MB", "inf")
    assert stream.threshold() >= 1 << 62


@pytest.mark.parametrize("text", ["lots", "-1", "nan"])
def test_a_bad_threshold_says_what_to_set(monkeypatch, text):
    monkeypatch.setenv("NORMLAB_STREAM_MB", text)
    with pytest.raises(ValueError, match="NORMLAB_STREAM_MB"):
        stream.threshold()




def _run(make, shape, fmt, dtype, train, residual, stream_mb, monkeypatch):
    """Output, running statistics (BatchNorm), parameter gradients, input gradients (and the residual's),
    and the ``streaming`` flags the kernels were called with, for one layer call under NORMLAB_STREAM_MB."""
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    monkeypatch.setenv("NORMLAB_STREAM_MB", stream_mb)
    flags = []
    kernels = backend._kernels()
    for family, pair in list(kernels.items()):
        spied = tuple(lambda *a, _k=k, **kw: (flags.append(a[-1]), _k(*a, **kw))[1] for k in pair)
        monkeypatch.setitem(kernels, family, spied)
    gen = torch.Generator().manual_seed(sum(shape))
    layer = make(shape).to(dtype).train(train)
    stats = [b for n, b in layer.named_buffers() if n in ("running_mean", "running_var")]
    with torch.no_grad():
        layer.weight.normal_(generator=gen)
        layer.bias.normal_(generator=gen)
        for b in stats:
            b.uniform_(0.5, 2.0, generator=gen)
    x = (3 * torch.randn(shape, generator=gen, dtype=dtype) + 1).contiguous(memory_format=fmt).requires_grad_()
    args = [x]
    if residual:
        args.append(torch.randn(shape, generator=gen, dtype=dtype).contiguous(memory_format=fmt).requires_grad_())
    y = layer(*args)
    y.backward(torch.randn(shape, generator=gen, dtype=dtype).contiguous(memory_format=fmt))
    exact = [y.detach(), *stats, layer.weight.grad, layer.bias.grad]
    return exact, [a.grad for a in args], list(flags)


def _bn(cls):
    return lambda shape: cls(shape[1])


CL = torch.channels_last
CASES = {
    "BatchNorm1d rows 8 columns": (_bn(nl.BatchNorm1d), (64, 8), torch.contiguous_format, False),
    "BatchNorm1d rows 37 columns": (_bn(nl.BatchNorm1d), (50, 37), torch.contiguous_format, False),
    "BatchNorm2d 7x7": (_bn(nl.BatchNorm2d), (6, 5, 7, 7), torch.contiguous_format, False),
    "BatchNorm2d 45x45 (two pieces)": (_bn(nl.BatchNorm2d), (2, 3, 45, 45), torch.contiguous_format, False),
    "BatchNorm2d channels_last 11 channels": (_bn(nl.BatchNorm2d), (4, 11, 5, 3), CL, False),
    "BatchNormReLU2d": (_bn(nl.BatchNormReLU2d), (3, 4, 9, 9), torch.contiguous_format, False),
    "BatchNormReLU2d channels_last": (_bn(nl.BatchNormReLU2d), (3, 16, 5, 5), CL, False),
    "BatchNormAddReLU2d": (_bn(nl.BatchNormAddReLU2d), (3, 4, 13, 13), torch.contiguous_format, True),
    "BatchNormAddReLU2d channels_last": (_bn(nl.BatchNormAddReLU2d), (2, 13, 6, 6), CL, True),
    "GroupNorm 5x5": (lambda s: nl.GroupNorm(3, s[1]), (4, 6, 5, 5), torch.contiguous_format, False),
    "GroupNorm channels_last": (lambda s: nl.GroupNorm(4, s[1]), (3, 12, 5, 3), CL, False),
    "InstanceNorm2d 9x9": (lambda s: nl.InstanceNorm2d(s[1], affine=True), (2, 3, 9, 9), torch.contiguous_format,
                           False),
    "LayerNorm 37": (lambda s: nl.LayerNorm(s[-1]), (4, 6, 37), torch.contiguous_format, False),
    "LayerNorm 3x64 (rows of four)": (lambda s: nl.LayerNorm(s[-2:]), (9, 3, 64), torch.contiguous_format, False),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_streaming_gives_the_same_results(case, dtype, train, monkeypatch):
    """Forced on (NORMLAB_STREAM_MB=0) and off (inf), the kernels give bit-identical outputs, running
    statistics and parameter gradients, and input gradients within a few units in the last place (the
    compiler may pair the backward's two multiply-adds the other way), on rows and runs of every length
    against the vector width (heads and tails written ordinarily): BatchNorm plain, with the fused ReLU
    and with the fused add + ReLU, GroupNorm, InstanceNorm and LayerNorm."""
    make, shape, fmt, residual = case
    exact_on, grads_on, flags_on = _run(make, shape, fmt, dtype, train, residual, "0", monkeypatch)
    exact_off, grads_off, flags_off = _run(make, shape, fmt, dtype, train, residual, "inf", monkeypatch)
    assert flags_on == [True, True] and flags_off == [False, False]
    for a, b in zip(exact_on, exact_off):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for a, b in zip(grads_on, grads_off):
        ulp = torch.finfo(dtype).eps * max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=0, atol=4 * ulp)


def test_small_outputs_are_not_streamed(monkeypatch):
    """With the default threshold, a small layer's kernels store ordinarily (the next layer finds its
    output in cache)."""
    _, _, flags = _run(_bn(nl.BatchNorm2d), (4, 3, 8, 8), torch.contiguous_format, torch.float32, True, False, "",
                       monkeypatch)
    assert flags == [False, False]


@pytest.mark.skipif(not X86, reason="the x86 instruction names are checked")
def test_the_streaming_kernels_store_non_temporally():
    """The BatchNorm kernels' writing passes and the LayerNorm kernels, compiled afresh (numba shows no code
    loaded from its cache), hold non-temporal vector stores and the fence that orders them."""
    from numba import njit

    rng = np.random.default_rng(1)
    m, c = 64, 16
    x, dy = (rng.standard_normal((m, c)).astype(np.float32) for _ in range(2))
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    stats, y, dx = np.zeros((4, c), np.float32), np.empty_like(x), np.empty_like(x)
    empty, parts = np.empty(0, np.float32), np.empty((2, 2, c))
    fresh = dict(primitives.PARALLEL, cache=False)
    columns.bn_rows_forward(x, w, b, 1e-5, True, stats, y, x, 0, empty, empty, 0.0, 0.0, parts, True)
    forward = njit(**fresh)(columns.rows_affine.py_func)
    backward = njit(**fresh)(columns.rows_grad_affine.py_func)
    a, k = np.ones(c, np.float32), np.zeros(c, np.float32)
    every_row = np.empty(0, np.bool_)  # no mask: every row valid
    forward(x, y, x, stats[0], a, k, 0, 2, True, every_row)
    backward(x, dy, y, dx, dx, stats[0], k, k, a, k, 0, 2, True, every_row)
    # LayerNorm's row kernels
    row_forward = njit(**fresh)(rows.row_forward.py_func)
    row_backward = njit(**fresh)(rows.row_backward.py_func)
    row_stats = np.zeros((4, m), np.float32)
    row_forward(x, w, b, 1e-5, True, 1, 1, row_stats, y, 2, True)
    row_backward(x, dy, w, row_stats[0], row_stats[1], row_stats[3], True, True, 1, 1, dx, np.empty((2, 2, c)), True)
    for kernel in (forward, backward, row_forward, row_backward):
        asm = "\n".join(kernel.inspect_asm().values())
        assert "movntps" in asm and "sfence" in asm


def test_an_output_not_aligned_to_its_elements_is_written_ordinarily():
    """An output whose address is not a multiple of its element size (a NumPy view at an odd byte
    offset) gets no streaming store, which would fault there, and the right values."""
    rng = np.random.default_rng(0)
    m, c = 40, 24
    x = rng.standard_normal((m, c)).astype(np.float32)
    w, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    empty = np.empty(0, np.float32)
    results = []
    for offset in (0, 4, 2):  # aligned, one element off, two bytes off
        raw = np.zeros(m * c * 4 + 64, np.uint8)
        y = np.ndarray((m, c), np.float32, buffer=raw.data, offset=offset)
        stats = np.zeros((4, c), np.float32)
        columns.bn_rows_forward(x, w, b, 1e-5, True, stats, y, x, 0, empty, empty, 0.0, 0.0, np.empty((2, 2, c)), True)
        results.append(np.array(y))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])
    ref = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * w + b
    np.testing.assert_allclose(results[0], ref, atol=1e-5)
