"""Layers the batch-norm papers use to take batch normalization apart.

* :class:`CovariateShiftNoise` injects the per-step random shift and scale of Santurkar et al. 2018
  (§2, "noisy BN"): a deliberately unstable distribution of layer inputs.
* :class:`LpBatchNorm1d` / :class:`LpBatchNorm2d` normalize by the batch-average ℓp norm instead of the
  standard deviation (Santurkar et al. 2018, §3.3), for p in {1, 2, inf}.

Both work outside the lab like any ``torch.nn`` module.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from normlab.core import checks
from normlab.core.engine import accumulation_dtype, centre, moments, normalize, update_running_stats
from normlab.core.guard import guard_stats_enabled
from normlab.core.plan import batch_plan
from normlab.nn.base import _GuardedStats
from normlab.nn.once import may_update

__all__ = ["CovariateShiftNoise", "LpBatchNorm1d", "LpBatchNorm2d"]


def _channel_view(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Return ``x`` as ``(C, M)`` where M counts every sample and spatial position, and the
    shape broadcasting a per-channel vector against ``x``."""
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *), got {tuple(x.shape)}")
    channels = x.shape[1]
    flat = x.transpose(0, 1).reshape(channels, -1)
    return flat, (1, channels) + (1,) * (x.dim() - 2)


class CovariateShiftNoise(nn.Module):
    r"""Random per-step shift and scale of every channel: the noise of Santurkar et al.'s "noisy BN".

    At every forward pass in training mode, for each channel :math:`j` draw

    .. math::
        \mu_j \sim U(\mu_{lo}, \mu_{hi}),\quad \sigma_j \sim U(\sigma_{lo}, \sigma_{hi})

    and for each element :math:`i` of that channel (every sample and, for images, every spatial
    position counts as one element)

    .. math::
        m_{ij} \sim U(\mu_j - \delta, \mu_j + \delta),\quad s_{ij} \sim N(\sigma_j, \tau^2),
        \qquad y_{ij} = s_{ij}\, x_{ij} + m_{ij}.

    The paper's values are the defaults: :math:`\mu \in [-0.5, 0.5]`, :math:`\sigma \in [1, 1.25]`,
    :math:`\delta = 0.1`, :math:`\tau = 0.1`. In evaluation mode the layer is the identity.

    Args:
        mean_range: bounds of the per-channel shift :math:`\mu_j`.
        scale_range: bounds of the per-channel scale :math:`\sigma_j`.
        mean_jitter: half-width :math:`\delta` of the per-element shift around :math:`\mu_j`.
        scale_std: standard deviation :math:`\tau` of the per-element scale around :math:`\sigma_j`.
        generator: optional ``torch.Generator`` (on the input's device, or on the CPU: the draws
            then move to the input's device) that makes the noise reproducible.

    Shape:
        input ``(N, C, *)``; output the same shape.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> noisy_bn = nn.Sequential(nn.BatchNorm2d(8), CovariateShiftNoise(generator=g))
        >>> y = noisy_bn(torch.randn(4, 8, 5, 5))
    """

    def __init__(
        self,
        mean_range: tuple[float, float] = (-0.5, 0.5),
        scale_range: tuple[float, float] = (1.0, 1.25),
        mean_jitter: float = 0.1,
        scale_std: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if mean_range[0] > mean_range[1] or scale_range[0] > scale_range[1]:
            raise ValueError("ranges must be given as (low, high) with low <= high")
        if mean_jitter < 0 or scale_std < 0:
            raise ValueError("mean_jitter and scale_std must be non-negative")
        self.mean_range = tuple(mean_range)
        self.scale_range = tuple(scale_range)
        self.mean_jitter = float(mean_jitter)
        self.scale_std = float(scale_std)
        self.generator = generator

    def _uniform(self, shape: tuple[int, ...], low: Tensor | float, high: Tensor | float, like: Tensor) -> Tensor:
        device = self.generator.device if self.generator is not None else like.device
        u = torch.rand(shape, generator=self.generator, device=device, dtype=like.dtype).to(like.device)
        return low + (high - low) * u

    def _normal(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        device = self.generator.device if self.generator is not None else like.device
        return torch.randn(shape, generator=self.generator, device=device, dtype=like.dtype).to(like.device)

    def draw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Draw the per-element scale ``s`` and shift ``m`` for an input shaped like ``x``."""
        flat, _ = _channel_view(x)
        channels = flat.shape[0]
        mu = self._uniform((channels, 1), self.mean_range[0], self.mean_range[1], x)
        sigma = self._uniform((channels, 1), self.scale_range[0], self.scale_range[1], x)
        m = self._uniform(tuple(flat.shape), mu - self.mean_jitter, mu + self.mean_jitter, x)
        s = sigma + self.scale_std * self._normal(tuple(flat.shape), x)
        unflat = (x.shape[1], x.shape[0]) + tuple(x.shape[2:])
        return s.reshape(unflat).transpose(0, 1), m.reshape(unflat).transpose(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        s, m = self.draw(x)
        return s * x + m

    def extra_repr(self) -> str:
        return (
            f"mean_range={self.mean_range}, scale_range={self.scale_range}, "
            f"mean_jitter={self.mean_jitter}, scale_std={self.scale_std}"
        )


class _LpBatchNorm(_GuardedStats, nn.Module):
    r"""Batch normalization by the batch-average ℓp norm (Santurkar et al. 2018, §3.3).

    For each channel :math:`c`, over the :math:`M` elements of the batch (samples times spatial
    positions):

    .. math::
        \mu_c = \frac1M \sum_i x_{ic},\qquad
        s_c = \Big(\frac1M \sum_i |x_{ic} - \mu_c|^p\Big)^{1/p}
        \quad(p = \infty:\ s_c = \max_i |x_{ic} - \mu_c|),

    or, with ``centered=False``, the norm of the values before the mean is subtracted,
    :math:`s_c = (\frac1M \sum_i |x_{ic}|^p)^{1/p}` (:math:`\max_i |x_{ic}|`): the paper's "average of their
    ℓp-norm (before shifting the mean)",

    .. math::
        y_{ic} = \gamma_c \frac{x_{ic} - \mu_c}{s_c + \epsilon} + \beta_c .

    With p = 2 and ``centered=True``, :math:`s_c` is the biased standard deviation, so the layer is batch
    norm with :math:`\epsilon` added to the deviation instead of the variance; p = 1 uses the mean absolute
    deviation and p = inf the largest deviation.

    The axes, the mean (:func:`normlab.core.engine.moments`, exact for a large mean with a tiny spread), the
    affine map and the running update are the engine's (:mod:`normlab.core.plan`, :mod:`normlab.core.engine`);
    only :math:`s_c` is this layer's own.

    In training mode the running estimates follow an exponential moving average,
    ``running = (1 - momentum) * running + momentum * batch`` for both :math:`\mu_c` and
    :math:`s_c`; evaluation mode uses them (or the batch statistics when
    ``track_running_stats=False``).

    Args:
        num_features: number of channels C.
        p: 1, 2 or ``math.inf`` (``float("inf")``; the string ``"inf"`` is accepted too).
        eps: added to :math:`s_c`.
        centered: the norm of x − μ (default) or, ``False``, of x itself.
        momentum: weight of the newest batch in the running estimates.
        affine: learn :math:`\gamma, \beta` (initialized to 1 and 0).
        track_running_stats: keep running estimates for evaluation.
        guard_stats: skip the running update of a batch whose statistics are not finite, as the
            BatchNorm layers do (``None``: follow :class:`normlab.set_guard_stats`); checkpointed
            recomputations and repeated calls inside :class:`normlab.update_once` do not update either.
    """

    _expected_dims: tuple[int, ...] = ()
    _layout = ""

    def __init__(
        self,
        num_features: int,
        p: float | str = 2,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        guard_stats: bool | None = None,
        centered: bool = True,
    ) -> None:
        super().__init__(guard_stats=guard_stats)
        name = type(self).__name__
        try:
            value = float(p)
        except (TypeError, ValueError):
            value = math.nan
        if value not in (1.0, 2.0, math.inf):
            raise ValueError(f"{name}: p must be 1, 2 or inf (float('inf')), got {p!r}.")
        p = value
        checks.check_eps(eps, name, added_to_scale=True)
        checks.check_momentum(momentum, name)
        self.num_features = num_features
        self.p = p
        self.centered = bool(centered)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_scale", torch.ones(num_features))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_scale", None)

    def batch_statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel batch mean :math:`\\mu_c` and ℓp scale :math:`s_c` of ``x``."""
        plan = batch_plan(tuple(x.shape))
        shift, mean_shifted, _, xc = moments(x, plan)
        return (shift + mean_shifted).reshape(-1), self._scale(xc if self.centered else x, plan.reduce)

    def _scale(self, values: Tensor, dims: tuple[int, ...]) -> Tensor:
        """(mean |v|^p)^(1/p) over ``dims``, per channel (p = inf: max |v|)."""
        dev = values.abs()
        if self.p == math.inf:
            return dev.amax(dim=dims)
        if self.p == 1.0:
            return dev.mean(dim=dims)
        return dev.square().mean(dim=dims).sqrt()

    def forward(self, x: Tensor) -> Tensor:
        """Checked as normlab's BatchNorm checks its input; half precision is computed in float32."""
        name = type(self).__name__
        checks.check_eps(self.eps, name, added_to_scale=True)
        checks.check_momentum(self.momentum, name)
        checks.check_floating(x, name)
        checks.check_ndim(x, name, self._expected_dims, self._layout)
        checks.check_channels(x, self.num_features, name)
        batch_stats = self.training or not self.track_running_stats
        if batch_stats and x.numel() > 0:
            advice = checks.BN_SUGGESTION if self.track_running_stats else checks.BN_NO_RUNNING_SUGGESTION
            checks.check_enough_values(x.numel() // x.shape[1], name, tuple(x.shape), advice, running=False)
        xa = x.to(accumulation_dtype(x.dtype))
        plan = batch_plan(tuple(xa.shape))
        if batch_stats:
            shift, mean_shifted, _, xc = moments(xa, plan)
            mean, scale = (shift + mean_shifted).reshape(-1), self._scale(xc if self.centered else xa, plan.reduce)
            if self.training and self.track_running_stats and x.numel() > 0 and may_update(self):
                self._update_running(mean, scale, name, plan.count)
        else:
            mean, scale = self.running_mean, self.running_scale
            xc = centre(xa, mean.reshape(plan.param_view).to(xa.dtype), None)
        rstd = 1.0 / (scale.reshape(plan.param_view).to(xa.dtype) + self.eps)
        weight = None if self.weight is None else self.weight.reshape(plan.param_view).to(xa.dtype)
        bias = None if self.bias is None else self.bias.reshape(plan.param_view).to(xa.dtype)
        return normalize(xc, rstd, weight, bias).to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: Tensor, scale: Tensor, name: str, count: int) -> None:
        """running ← (1 − momentum) · running + momentum · batch for μ and s (the engine's update; s is stored
        as it is, without Bessel's correction), unless guarded and a statistic is not finite."""
        guarded = guard_stats_enabled(getattr(self, "guard_stats", None))
        if not update_running_stats(self.running_mean, self.running_scale, mean.detach(), scale.detach(), count,
                                    self.momentum, guarded=guarded, unbiased=False):
            self._skipped_batch(name)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, p={self.p}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
            + ("" if self.centered else ", centered=False")
        )


class LpBatchNorm1d(_LpBatchNorm):
    __doc__ = (_LpBatchNorm.__doc__ or "") + """
    Shape:
        input ``(N, C)`` or ``(N, C, L)``; output the same shape.

    Example::

        >>> norm = LpBatchNorm1d(100, p=1)
        >>> y = norm(torch.randn(32, 100))
    """
    _expected_dims = (2, 3)
    _layout = "of shape (N, C) or (N, C, L)"


class LpBatchNorm2d(_LpBatchNorm):
    __doc__ = (_LpBatchNorm.__doc__ or "") + """
    Shape:
        input ``(N, C, H, W)``; output the same shape.

    Example::

        >>> norm = LpBatchNorm2d(16, p=float("inf"))
        >>> y = norm(torch.randn(8, 16, 10, 10))
    """
    _expected_dims = (4,)
    _layout = "of shape (N, C, H, W)"
