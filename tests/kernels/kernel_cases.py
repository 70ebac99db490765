"""Kernel test cases that every backend's tests run alike, ``name: (fn, shape, parameter count, memory
format)`` as :func:`run_kernel_case` (tests/kernels/conftest.py) takes them; each backend's test module adds
its own; and the float32-against-float64 check both run on data with a large mean. Importable from the test modules because tests/kernels/conftest.py puts this folder on sys.path."""

import torch

import normlab.functional as F

SHARED_CASES = {
    "instance eval": (
        lambda x, w, b: F.instance_norm(x, torch.zeros(4, dtype=x.dtype), torch.full((4,), 2.0, dtype=x.dtype), w, b,
                                        use_input_stats=False), (3, 4, 5, 6), 4, None),
    "ln": (lambda x, w, b: F.layer_norm(x, (5, 12), w.repeat(10)[:60].reshape(5, 12), b.repeat(10)[:60].reshape(5, 12)),
           (9, 5, 12), 6, None),
    "ln over (H, W) channels_last": (lambda x, w, b: F.layer_norm(x, (5, 6), w.reshape(5, 6), b.reshape(5, 6)),
                                     (3, 4, 5, 6), 30, torch.channels_last),
}


def float32_error_against_float64(x64, fmt, norm):
    """The largest error of normlab's float32 ``norm`` ("batch", "group" with 2 groups, "layer") of ``x64``
    (rounded to float32, in memory format ``fmt``) against the float64 normalization of the same values."""
    x64 = x64.float().double()
    x32 = x64.float() if fmt is None else x64.float().contiguous(memory_format=fmt)
    n, c, *rest = x64.shape
    dims = {"batch": (0, 2, 3), "group": (2, 3, 4), "layer": (1, 2, 3)}[norm]
    xv = x64.reshape(n, 2, c // 2, *rest) if norm == "group" else x64
    truth = ((xv - xv.mean(dims, keepdim=True)) / xv.std(dims, unbiased=False, keepdim=True)).reshape(x64.shape)
    y = {"batch": lambda: F.batch_norm(x32, None, None, training=True, eps=1e-12),
         "group": lambda: F.group_norm(x32, 2, eps=1e-12),
         "layer": lambda: F.layer_norm(x32, tuple(x64.shape[1:]), eps=1e-12)}[norm]()
    return (y.double() - truth).abs().max().item()
