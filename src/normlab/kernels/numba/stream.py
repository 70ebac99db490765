"""Streaming (non-temporal) stores for the numba kernels' outputs.

An ordinary store first reads the cache line it writes into (the line must be owned before it is
changed), so writing an output that no cache holds moves its bytes twice: BatchNorm's evaluation, which
reads ``x`` and writes ``y``, then moves three tensors' worth of bytes rather than two, and its training
forward, four rather than three. A streaming store writes whole lines straight to memory without reading
them, and without evicting the input the next pass reads again. It pays off only where the output would
have left the cache anyway, so the kernels stream outputs of at least :func:`threshold` bytes (half the
last-level cache) and store ordinarily below, where the next layer finds ``y`` in cache
(benchmarks/README.md, "Streaming stores").

numba has no streaming store, so each map below is one vector of the output computed and stored in LLVM
IR (``!nontemporal`` on an aligned vector store: ``vmovntps``/``vmovntpd`` on x86). The maps are the
kernels' own formulas with the same rounding (the multiply-adds contracted as the scalar loops'
``fastmath={"contract"}`` contracts them); :func:`fence` orders the streamed lines before another thread
reads them and ends every parallel block that streams.

Each map is ``store(out, j, *operands)``: ``out[j:j + W] = formula(operands)`` for the vector width
``W = lanes(out)`` (32 bytes: 8 float32 or 4 float64), where an array operand contributes its elements
``[j:j + W]`` and a scalar operand the same value in every lane. ``out`` at ``j`` must be aligned to 32
bytes: :func:`head` gives the elements to write ordinarily first.
"""

from __future__ import annotations

import functools
import os
import platform

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

__all__ = ["VECTOR_BYTES", "threshold", "fence", "head", "lanes", "span", "affine", "affine_relu", "affine_add_relu",
           "centred_affine", "centred_scaled_affine", "grad", "grad_relu", "weighted_grad", "mask"]

VECTOR_BYTES = 32
_CONTRACT = ("contract",)
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
_FALLBACK_CACHE_BYTES = 32 << 20


@functools.lru_cache(maxsize=1)
def _cache_bytes() -> int:
    """The last-level cache's size in bytes where the system says (Linux), else 32 MiB."""
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError, AttributeError):
            continue
        if size and size > 0:
            return int(size)
    return _FALLBACK_CACHE_BYTES


def threshold() -> int:
    """Outputs of at least this many bytes are written with streaming stores: half the last-level cache,
    or ``NORMLAB_STREAM_MB`` MiB where that is set (``inf`` never streams, ``0`` always does); read at
    every call."""
    text = os.environ.get("NORMLAB_STREAM_MB", "").strip()
    if not text:
        return _cache_bytes() // 2
    try:
        mib = float(text)
    except ValueError:
        raise ValueError(f"NORMLAB_STREAM_MB={text!r} is not a number of MiB; set e.g. 16, 0 (always stream) "
                         f"or inf (never), or unset it for half the last-level cache") from None
    if mib != mib or mib < 0:
        raise ValueError(f"NORMLAB_STREAM_MB={text!r} must be 0 or more (inf: never stream)")
    return int(min(mib * (1 << 20), 1 << 62))


def _lanes_of(dtype) -> int:
    return VECTOR_BYTES // (dtype.bitwidth // 8)


def _store(name, formula, out, operands):
    """The signature and code generator of an intrinsic ``store(out, j, *operands)`` that writes ``formula``
    of the operands' vectors at ``out[j:j + W]`` with an aligned streaming store (module docstring)."""
    if not isinstance(out, types.Array) or out.ndim != 1 or out.dtype not in (types.float32, types.float64):
        raise TypingError(f"{name}: the output must be a 1D float32 or float64 array, got {out}")
    for op in operands:
        dtype = op.dtype if isinstance(op, types.Array) else op
        if dtype != out.dtype or (isinstance(op, types.Array) and op.ndim != 1):
            raise TypingError(f"{name}: every operand must be a 1D array or a scalar of {out.dtype}, got {op}")
    sig = types.void(out, types.intp, *operands)

    def codegen(context, builder, signature, args):
        elem = context.get_value_type(out.dtype)
        width = _lanes_of(out.dtype)
        vec = ir.VectorType(elem, width)
        index = args[1]

        def pointer(aryty, value):
            ary = context.make_array(aryty)(context, builder, value)
            ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [index], wraparound=False,
                                           boundscheck=False)
            return builder.bitcast(ptr, vec.as_pointer())

        values = []
        for ty, value in zip(signature.args[2:], args[2:]):
            if isinstance(ty, types.Array):
                values.append(builder.load(pointer(ty, value), align=out.dtype.bitwidth // 8))
            else:  # the scalar in every lane
                lane0 = builder.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
                every = ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width)
                values.append(builder.shuffle_vector(lane0, ir.Constant(vec, ir.Undefined), every))
        result = formula(builder, vec, *values)
        store = builder.store(result, pointer(signature.args[0], args[0]), align=VECTOR_BYTES)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return sig, codegen


def _relu(builder, vec, v):
    """v < 0 ? 0 : v, keeping NaN (as the scalar loops' ``zero if v < zero else v``)."""
    zero = ir.Constant(vec, [0.0] * vec.count)
    return builder.select(builder.fcmp_ordered("<", v, zero), zero, v)


def _positive(builder, vec, y, g):
    """y > 0 ? g : 0."""
    zero = ir.Constant(vec, [0.0] * vec.count)
    return builder.select(builder.fcmp_ordered(">", y, zero), g, zero)


def _affine_ir(builder, vec, x, sh, a, b):
    return builder.fadd(builder.fmul(builder.fsub(x, sh), a, flags=_CONTRACT), b, flags=_CONTRACT)


def _grad_ir(builder, vec, g, x, sh, d, c, k1, k2):
    first = builder.fmul(builder.fsub(g, c, flags=_CONTRACT), k1, flags=_CONTRACT)
    second = builder.fmul(builder.fsub(builder.fsub(x, sh), d), k2, flags=_CONTRACT)
    return builder.fadd(first, second, flags=_CONTRACT)


@intrinsic
def affine(typingctx, y, j, x, sh, a, b):
    """``affine(y, j, x, sh, a, b)``: y = (x − sh) · a + b."""
    return _store("affine", _affine_ir, y, (x, sh, a, b))


@intrinsic
def affine_relu(typingctx, y, j, x, sh, a, b):
    """``affine_relu(y, j, x, sh, a, b)``: y = relu((x − sh) · a + b)."""
    return _store("affine_relu", lambda bd, vec, *v: _relu(bd, vec, _affine_ir(bd, vec, *v)), y, (x, sh, a, b))


@intrinsic
def affine_add_relu(typingctx, y, j, x, sh, a, b, r):
    """``affine_add_relu(y, j, x, sh, a, b, r)``: y = relu((x − sh) · a + b + r)."""
    def formula(bd, vec, x, sh, a, b, r):
        return _relu(bd, vec, bd.fadd(_affine_ir(bd, vec, x, sh, a, b), r, flags=_CONTRACT))

    return _store("affine_add_relu", formula, y, (x, sh, a, b, r))


@intrinsic
def grad(typingctx, dx, j, dy, x, sh, d, c, k1, k2):
    """``grad(dx, j, dy, x, sh, d, c, k1, k2)``: dx = (dy − c) · k1 + ((x − sh) − d) · k2."""
    return _store("grad", _grad_ir, dx, (dy, x, sh, d, c, k1, k2))


@intrinsic
def grad_relu(typingctx, dx, j, y, dy, x, sh, d, c, k1, k2):
    """``grad_relu(dx, j, y, dy, x, sh, d, c, k1, k2)``: dx as :func:`grad` with dy masked by y > 0."""
    def formula(bd, vec, y, dy, *rest):
        return _grad_ir(bd, vec, _positive(bd, vec, y, dy), *rest)

    return _store("grad_relu", formula, dx, (y, dy, x, sh, d, c, k1, k2))


def _centred_ir(builder, vec, x, sh, d):
    return builder.fsub(builder.fsub(x, sh), d)


@intrinsic
def centred_affine(typingctx, y, j, x, sh, d, a, b):
    """``centred_affine(y, j, x, sh, d, a, b)``: y = ((x − sh) − d) · a + b."""
    def formula(bd, vec, x, sh, d, a, b):
        return bd.fadd(bd.fmul(_centred_ir(bd, vec, x, sh, d), a, flags=_CONTRACT), b, flags=_CONTRACT)

    return _store("centred_affine", formula, y, (x, sh, d, a, b))


@intrinsic
def centred_scaled_affine(typingctx, y, j, x, sh, d, r, w, b):
    """``centred_scaled_affine(y, j, x, sh, d, r, w, b)``: y = ((x − sh) − d) · (r · w) + b."""
    def formula(bd, vec, x, sh, d, r, w, b):
        scale = bd.fmul(r, w)
        return bd.fadd(bd.fmul(_centred_ir(bd, vec, x, sh, d), scale, flags=_CONTRACT), b, flags=_CONTRACT)

    return _store("centred_scaled_affine", formula, y, (x, sh, d, r, w, b))


@intrinsic
def weighted_grad(typingctx, dx, j, dy, w, x, sh, d, c, k1, k2):
    """``weighted_grad(dx, j, dy, w, x, sh, d, c, k1, k2)``: dx = (dy · w − c) · k1 + ((x − sh) − d) · k2."""
    def formula(bd, vec, dy, w, *rest):
        return _grad_ir(bd, vec, bd.fmul(dy, w, flags=_CONTRACT), *rest)

    return _store("weighted_grad", formula, dx, (dy, w, x, sh, d, c, k1, k2))


@intrinsic
def mask(typingctx, dres, j, y, dy):
    """``mask(dres, j, y, dy)``: dres = y > 0 ? dy : 0."""
    return _store("mask", _positive, dres, (y, dy))


@intrinsic
def _fence(typingctx):
    def codegen(context, builder, signature, args):
        if _X86:  # orders streaming stores; a locked instruction alone need not on every x86
            sfence = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                    "llvm.x86.sse.sfence")
            builder.call(sfence, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@njit(inline="always", cache=True)
def fence():
    """Make this thread's streamed lines visible before others read them: end every block that streams."""
    _fence()


@njit(inline="always", cache=True)
def lanes(out):
    """Elements per vector of ``out``'s dtype."""
    return VECTOR_BYTES // out.itemsize


@njit(inline="always", cache=True)
def head(out):
    """How many leading elements of ``out`` come before its first 32-byte boundary (to be written
    ordinarily), at most ``len(out)``; ``len(out)`` when ``out`` is not aligned to its element size,
    so that nothing is streamed to it."""
    address = out.ctypes.data
    size = out.itemsize
    if address % size:
        return out.shape[0]
    return min(((VECTOR_BYTES - address % VECTOR_BYTES) % VECTOR_BYTES) // size, out.shape[0])


@njit(inline="always", cache=True)
def span(out):
    """``(lo, hi)``: the elements of ``out`` to stream a vector at a time, from its first 32-byte boundary
    (:func:`head`) to the end of its last whole vector; those before ``lo`` and from ``hi`` on are written
    ordinarily."""
    lo = head(out)
    return lo, lo + (out.shape[0] - lo) // lanes(out) * lanes(out)
