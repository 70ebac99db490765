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

The package: :mod:`~normlab.bench.cases` (what is timed), :mod:`~normlab.bench.timing` (how: checked, then
interleaved), :mod:`~normlab.bench.models` (whole training steps and eval passes of real models),
:mod:`~normlab.bench.report` (the tables), :mod:`~normlab.bench.variants` (``--variants``) and
:mod:`~normlab.bench.cli` (the command).

From Python::

    >>> from normlab import bench
    >>> records = bench.run_cases(bench.quick_cases(), repeats=1)   # doctest: +SKIP
    >>> print(bench.format_table(records))                          # doctest: +SKIP
"""

from normlab.bench.cases import COMPOSED, MODES, Case, Mode, default_cases, moved_bytes, quick_cases, select
from normlab.bench.cli import configure, peers, run
from normlab.bench.models import format_step, train_step
from normlab.bench.report import Column, columns, format_table, header, render, report
from normlab.bench.timing import (ATOL, COMPILE, DEFAULT_REPEATS, DEFAULT_STEP_REPEATS, DEFAULT_WARMUP,
                                  IMPLEMENTATIONS, RTOL, SAMPLE_MS, Implementation, device_name, ratio_key,
                                  run_cases)

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
