"""``normlab bench --variants``: BatchNorm's variants for small and unusual batches, timed beside plain BatchNorm.

torch.nn has no ghost batch norm, batch renormalization or masked BatchNorm, so each case runs three
implementations, interleaved as in :mod:`normlab.bench.timing`:

* ``normlab`` — the variant (:class:`~normlab.nn.GhostBatchNorm2d`, :class:`~normlab.nn.BatchRenorm2d`,
  :class:`~normlab.nn.MaskedBatchNorm1d`, ...), the subject;
* ``torch`` — the same function written with torch.nn (:data:`REFERENCE`): torch.nn BatchNorm applied to
  each virtual batch, Ioffe's formula in torch operations, torch.nn BatchNorm1d on the valid positions
  gathered. The subject's answers (output, input and parameter gradients) are checked against it;
* ``bn`` — normlab's plain BatchNorm on the same input (:data:`BASELINE`; for the masked case, on all
  N·L positions), not checked (it computes something else): the cost the variant is measured against.

The line under the table gives each variant's time over plain BatchNorm's (``bn_ms / normlab_ms`` is the
``ratio_bn`` of the records), beside the goal of :data:`GOAL`.

The masked cases use a fixed mask, :func:`bench_mask`: sequence n of L positions holds
``L − (7n mod L/2)`` valid ones (about 3/4 of the positions).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

import torch
from torch import nn

import normlab.nn
from normlab.bench.cases import Case
from normlab.bench.timing import Implementation

__all__ = ["BASELINE", "GOAL", "IMPLEMENTATIONS", "REFERENCE", "bench_mask", "default_cases", "quick_cases",
           "summary"]

GOAL = 1.5
"""A variant should take at most this many times plain BatchNorm's time on the same input."""

RENORM_NOW = (("warmup_steps", 0), ("r_max_steps", 0), ("d_max_steps", 0))
"""Batch renormalization with its final limits from the first step (else the first 5k steps are BatchNorm)."""


def bench_mask(shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed (N, L) mask of a sequence-major (N, L, C) case: about 3/4 of the positions valid."""
    n, length = shape[0], shape[1]
    lengths = length - (7 * torch.arange(n)) % max(1, length // 2)
    return torch.arange(length) < lengths[:, None]


def _ghost_reference(base: type[nn.Module]) -> type[nn.Module]:
    class Ghost(base):
        """torch.nn BatchNorm applied to each virtual batch in turn."""

        def __init__(self, num_features: int, virtual_batch_size: int) -> None:
            super().__init__(num_features)
            self.virtual_batch_size = virtual_batch_size

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([base.forward(self, chunk) for chunk in x.split(self.virtual_batch_size)])

    return Ghost


def _renorm_reference(base: type[nn.Module]) -> type[nn.Module]:
    class Renorm(base):
        """Ioffe 2017's formula in torch operations (training), torch.nn BatchNorm otherwise."""

        def __init__(self, num_features: int, r_max: float = 3.0, d_max: float = 5.0, **schedule: int) -> None:
            super().__init__(num_features)
            self.r_max, self.d_max = r_max, d_max

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                return super().forward(x)
            dims = [0, *range(2, x.dim())]
            view = (1, -1) + (1,) * (x.dim() - 2)
            var, mean = torch.var_mean(x, dims, correction=0)
            sigma_b = torch.sqrt(var + self.eps)
            sigma = torch.sqrt(self.running_var + self.eps)
            r = (sigma_b / sigma).clamp(1 / self.r_max, self.r_max).detach()
            d = ((mean - self.running_mean) / sigma).clamp(-self.d_max, self.d_max).detach()
            xhat = (x - mean.reshape(view)) / sigma_b.reshape(view) * r.reshape(view) + d.reshape(view)
            with torch.no_grad():
                n = x.numel() // x.shape[1]
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)
            return xhat * self.weight.reshape(view) + self.bias.reshape(view)

    return Renorm


class _TorchMasked(nn.BatchNorm1d):
    """torch.nn BatchNorm1d on the valid positions of (N, L, C) gathered, scattered into zeros."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = bench_mask(tuple(x.shape))
        y = torch.zeros_like(x)
        y[mask] = super().forward(x[mask])
        return y


class _NormlabMasked(normlab.nn.MaskedBatchNorm1d):
    """normlab's MaskedBatchNorm1d with the case's fixed mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x, mask=bench_mask(tuple(x.shape)))


def _baseline(base: type[nn.Module], rows: bool = False) -> type[nn.Module]:
    class Plain(base):
        """normlab's plain BatchNorm of the same input (``rows``: of its N·L rows of C channels)."""

        def __init__(self, num_features: int, *args: Any, **kwargs: Any) -> None:
            super().__init__(num_features)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if rows:
                return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)
            return super().forward(x)

    return Plain


REFERENCE = SimpleNamespace(
    __name__="torch.nn (reference compositions)",
    GhostBatchNorm1d=_ghost_reference(nn.BatchNorm1d),
    GhostBatchNorm2d=_ghost_reference(nn.BatchNorm2d),
    BatchRenorm1d=_renorm_reference(nn.BatchNorm1d),
    BatchRenorm2d=_renorm_reference(nn.BatchNorm2d),
    MaskedBatchNorm1d=_TorchMasked,
)
"""Each variant written with torch.nn: the reference the answers are checked against."""

BASELINE = SimpleNamespace(
    __name__="normlab.nn BatchNorm",
    GhostBatchNorm1d=_baseline(normlab.nn.BatchNorm1d),
    GhostBatchNorm2d=_baseline(normlab.nn.BatchNorm2d),
    BatchRenorm1d=_baseline(normlab.nn.BatchNorm1d),
    BatchRenorm2d=_baseline(normlab.nn.BatchNorm2d),
    MaskedBatchNorm1d=_baseline(normlab.nn.BatchNorm1d, rows=True),
)
"""Plain normlab BatchNorm on each variant's input: the cost each variant is measured against."""

_SUBJECT = SimpleNamespace(
    __name__="normlab.nn",
    GhostBatchNorm1d=normlab.nn.GhostBatchNorm1d,
    GhostBatchNorm2d=normlab.nn.GhostBatchNorm2d,
    BatchRenorm1d=normlab.nn.BatchRenorm1d,
    BatchRenorm2d=normlab.nn.BatchRenorm2d,
    MaskedBatchNorm1d=_NormlabMasked,
)

IMPLEMENTATIONS: tuple[Implementation, ...] = (
    Implementation("normlab", _SUBJECT),
    Implementation("torch", REFERENCE),
    Implementation("bn", BASELINE, checked=False),
)


def _suite(image: tuple[int, ...], rows: tuple[int, ...], sequence: tuple[int, ...], virtual: int,
           virtual_rows: int) -> list[Case]:
    """Ghost BN and batch renormalization on an image batch (both layouts) and on rows, masked BatchNorm on
    a sequence batch; training forward and forward+backward."""
    cases: list[Case] = []
    for mode in ("train_fwd", "train_fwd_bwd"):
        for layout in ("contiguous", "channels_last"):
            cases.append(Case("GhostBatchNorm2d", (image[1], virtual), image, layout, mode))
            cases.append(Case("BatchRenorm2d", (image[1],), image, layout, mode, RENORM_NOW))
        cases.append(Case("GhostBatchNorm1d", (rows[1], virtual_rows), rows, "contiguous", mode))
        cases.append(Case("BatchRenorm1d", (rows[1],), rows, "contiguous", mode, RENORM_NOW))
        cases.append(Case("MaskedBatchNorm1d", (sequence[-1],), sequence, "contiguous", mode))
    return cases


def default_cases() -> list[Case]:
    """On the shapes of ``normlab bench``: (64, 64, 56, 56) in virtual batches of 16, (4096, 1024) in virtual
    batches of 256, and the LayerNorm shape (64, 196, 768) as padded sequences."""
    return _suite((64, 64, 56, 56), (4096, 1024), (64, 196, 768), 16, 256)


def quick_cases() -> list[Case]:
    """The same cases on small shapes, for tests and smoke runs."""
    return _suite((8, 16, 12, 12), (64, 32), (8, 16, 32), 4, 16)


def summary(records: Sequence[dict[str, Any]]) -> str:
    """One line per timed case: the variant's time over plain BatchNorm's, against :data:`GOAL`."""
    lines = [f"Each variant's time over normlab's plain BatchNorm on the same input (goal <= {GOAL}x):"]
    for r in records:
        ratio = r.get("ratio_bn")
        if ratio is None:
            continue
        slower = 1.0 / ratio
        verdict = "met" if slower <= GOAL else "missed"
        lines.append(f"  {r['module']} {'x'.join(map(str, r['shape']))} {r['layout']} {r['mode']}: "
                     f"{slower:.2f}x ({verdict})")
    return "\n".join(lines)
