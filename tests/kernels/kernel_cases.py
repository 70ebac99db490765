"""Kernel test cases that every backend's tests run alike, ``name: (fn, shape, parameter count, memory
format)`` as :func:`run_kernel_case` (tests/kernels/conftest.py) takes them; each backend's test module adds
its own. Importable from the test modules because tests/kernels/conftest.py puts this folder on sys.path."""

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
