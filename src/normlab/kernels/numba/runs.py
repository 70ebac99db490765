"""Maps over one contiguous run of values, with ordinary stores or streaming ones (:mod:`.stream`).

A run is a row of a layout (a channel's spatial map, a row of (M, C), a group's values); its factors are
scalars over the run or arrays along it (:func:`~.primitives.at`). Every loop here computes a formula of
:mod:`.primitives` (:func:`~.primitives.normalized`, :func:`~.primitives.relu`,
:func:`~.primitives.masked`, :func:`~.primitives.dx_value`) and spells none of its own. A streaming map
writes the values before the output's first 32-byte boundary and after its last whole vector
ordinarily, the rest a vector at a time; the caller ends its block with :func:`.stream.fence`.
"""

from __future__ import annotations

from numba import njit

from normlab.kernels.numba import stream
from normlab.kernels.numba.primitives import ADD_RELU, FLAGS, NONE, RELU, at, dx_value, masked, normalized, relu


@njit(inline="always", **FLAGS)
def centred_run(xr, yr, sh, d, a, b):
    """y = ((x − sh) − d) · a + b over one run, in the input dtype."""
    for j in range(xr.shape[0]):
        yr[j] = normalized(xr[j] - sh, d, a, b)


@njit(inline="always", **FLAGS)
def run_affine(xr, yr, rr, sh, a, b, epilogue):
    """y = (x − sh) · a + b over one run, ``sh``, ``a``, ``b`` scalars over the run or arrays along it,
    followed in the same loop by the epilogue: ReLU (1) or adding ``rr`` then ReLU (2).

    One loop with the select in it: a second pass for the ReLU, even over a run still in L1, cost as much
    as the affine map itself (benchmarks/README.md, "Fused epilogue").
    """
    zero = yr.dtype.type(0.0)
    if epilogue == NONE:
        for j in range(xr.shape[0]):
            yr[j] = normalized(xr[j], at(sh, j), at(a, j), at(b, j))
    elif epilogue == RELU:
        for j in range(xr.shape[0]):
            yr[j] = relu(normalized(xr[j], at(sh, j), at(a, j), at(b, j)), zero)
    else:
        for j in range(xr.shape[0]):
            yr[j] = relu(normalized(xr[j], at(sh, j), at(a, j), at(b, j)) + rr[j], zero)


@njit(inline="always", **FLAGS)
def affine_values(xr, yr, rr, sh, a, b, epilogue, lo, hi):
    """:func:`run_affine` on values [lo, hi) of a run, ``sh``, ``a``, ``b`` scalars or arrays over the run."""
    zero = yr.dtype.type(0.0)
    for j in range(lo, hi):
        v = normalized(xr[j], at(sh, j), at(a, j), at(b, j))
        if epilogue == ADD_RELU:
            v = v + rr[j]
        yr[j] = v if epilogue == NONE else relu(v, zero)


@njit(inline="always", **FLAGS)
def stream_affine(xr, yr, rr, sh, a, b, epilogue):
    """:func:`run_affine` written with streaming stores (module docstring)."""
    n = xr.shape[0]
    w = stream.lanes(yr)
    lo, hi = stream.span(yr)
    affine_values(xr, yr, rr, sh, a, b, epilogue, 0, lo)
    if epilogue == NONE:
        for j in range(lo, hi, w):
            stream.affine(yr, j, xr, sh, a, b)
    elif epilogue == RELU:
        for j in range(lo, hi, w):
            stream.affine_relu(yr, j, xr, sh, a, b)
    else:
        for j in range(lo, hi, w):
            stream.affine_add_relu(yr, j, xr, sh, a, b, rr)
    affine_values(xr, yr, rr, sh, a, b, epilogue, hi, n)


@njit(inline="always", **FLAGS)
def grad_values(xr, dyr, yr, dxr, dresr, sh, d, c, k1, k2, epilogue, lo, hi):
    """dx = (dy' − c) · k1 + ((x − sh) − d) · k2 on values [lo, hi) of a run (and dres = dy' after a fused
    add), the factors scalars or arrays over the run."""
    zero = dxr.dtype.type(0.0)
    for j in range(lo, hi):
        g = dyr[j] if epilogue == NONE else masked(dyr[j], yr[j], zero)
        dxr[j] = dx_value(g, xr[j], at(sh, j), at(d, j), at(c, j), at(k1, j), at(k2, j))
        if epilogue == ADD_RELU:
            dresr[j] = g


@njit(inline="always", **FLAGS)
def stream_grad(xr, dyr, yr, dxr, dresr, sh, d, c, k1, k2, epilogue):
    """:func:`grad_values` over a whole run with streaming stores, as :func:`stream_affine`. ``dxr`` and
    ``dresr`` are runs of arrays laid out alike, so one head fits both."""
    n = xr.shape[0]
    w = stream.lanes(dxr)
    lo, hi = stream.span(dxr)
    grad_values(xr, dyr, yr, dxr, dresr, sh, d, c, k1, k2, epilogue, 0, lo)
    if epilogue == NONE:
        for j in range(lo, hi, w):
            stream.grad(dxr, j, dyr, xr, sh, d, c, k1, k2)
    else:
        for j in range(lo, hi, w):
            stream.grad_relu(dxr, j, yr, dyr, xr, sh, d, c, k1, k2)
        if epilogue == ADD_RELU and stream.head(dresr) == lo:
            for j in range(lo, hi, w):
                stream.mask(dresr, j, yr, dyr)
        elif epilogue == ADD_RELU:  # laid out unlike dx: written ordinarily
            zero = dresr.dtype.type(0.0)
            for j in range(lo, hi):
                dresr[j] = masked(dyr[j], yr[j], zero)
    grad_values(xr, dyr, yr, dxr, dresr, sh, d, c, k1, k2, epilogue, hi, n)


@njit(inline="always", **FLAGS)
def stream_centred(xr, yr, sh, d, a, b):
    """:func:`centred_run` over one run (y = ((x − sh) − d) · a + b, scalars) with streaming stores, as
    :func:`stream_affine`."""
    w = stream.lanes(yr)
    lo, hi = stream.span(yr)
    centred_run(xr[:lo], yr[:lo], sh, d, a, b)
    for j in range(lo, hi, w):
        stream.centred_affine(yr, j, xr, sh, d, a, b)
    centred_run(xr[hi:], yr[hi:], sh, d, a, b)


@njit(inline="always", **FLAGS)
def layer_values(xr, yr, sh, d, r, wr, br, lo, hi):
    """y = ((x − sh) − d) · (r · w) + b on values [lo, hi) of a row whose every value has its own
    parameters ``wr``, ``br`` (LayerNorm)."""
    for j in range(lo, hi):
        yr[j] = normalized(xr[j] - sh, d, r * wr[j], br[j])


@njit(inline="always", **FLAGS)
def stream_layer(xr, yr, sh, d, r, wr, br):
    """:func:`layer_values` over a whole row with streaming stores, as :func:`stream_affine`."""
    n = xr.shape[0]
    w = stream.lanes(yr)
    lo, hi = stream.span(yr)
    layer_values(xr, yr, sh, d, r, wr, br, 0, lo)
    for j in range(lo, hi, w):
        stream.centred_scaled_affine(yr, j, xr, sh, d, r, wr, br)
    layer_values(xr, yr, sh, d, r, wr, br, hi, n)


@njit(inline="always", **FLAGS)
def weighted_grad_values(xr, dyr, dxr, wt, sh, d, c, k1, k2, lo, hi):
    """dx = (dy · w − c) · k1 + ((x − sh) − d) · k2 on values [lo, hi) of a run, every factor a scalar or
    an array over the run."""
    for j in range(lo, hi):
        dxr[j] = dx_value(dyr[j] * at(wt, j), xr[j], at(sh, j), at(d, j), at(c, j), at(k1, j), at(k2, j))


@njit(inline="always", **FLAGS)
def stream_weighted_grad(xr, dyr, dxr, wt, sh, d, c, k1, k2):
    """:func:`weighted_grad_values` over a whole run with streaming stores, as :func:`stream_affine`."""
    n = xr.shape[0]
    w = stream.lanes(dxr)
    lo, hi = stream.span(dxr)
    weighted_grad_values(xr, dyr, dxr, wt, sh, d, c, k1, k2, 0, lo)
    for j in range(lo, hi, w):
        stream.weighted_grad(dxr, j, dyr, wt, xr, sh, d, c, k1, k2)
    weighted_grad_values(xr, dyr, dxr, wt, sh, d, c, k1, k2, hi, n)

