"""PyTorch's OpInfo tests of the functional forms (test_ops_gradients, test_ops_fwd_gradients, the
reference tests of test_ops and functorch's vmap tests), ported: sample inputs in the style of
torch.testing._internal's ``sample_inputs_*`` for F.batch_norm, F.instance_norm, F.layer_norm and
F.group_norm, checked on torch.nn.functional and on normlab.functional.

Gradient checks run in float64 with the harness defaults (batched gradients on, fast mode), as the
OpInfo tests do.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

S = 5
DT = torch.float64


@dataclasses.dataclass
class Sample:
    """One call: ``op(input, *args, **kwargs)``; ``refused_by_normlab``: what normlab refuses on purpose."""

    input: torch.Tensor
    args: tuple
    kwargs: dict
    refused_by_normlab: str | None = None

    def differentiable(self):
        return [t for t in (self.input, *self.args) if isinstance(t, torch.Tensor) and t.requires_grad]


def _arg(*shape, requires_grad=True, low=-9.0, high=9.0, gen):  # make_tensor's range
    t = torch.empty(shape, dtype=DT).uniform_(low, high, generator=gen)
    return t.requires_grad_(requires_grad)


def _refusal(kwargs, updates_running: bool) -> str | None:
    """Deliberate differences: normlab refuses a momentum outside [0, 1] where running statistics would be
    updated with it, and a negative eps (torch computes NaN for a constant channel, or worse)."""
    if kwargs.get("eps", 1.0) < 0:
        return "eps"
    if updates_running and not 0.0 <= kwargs.get("momentum", 0.1) <= 1.0:
        return "momentum"
    return None


def batch_norm_samples(gen):
    cases = (((S, S, S), {"training": True, "momentum": 0.5, "eps": 0.6}),
             ((3, 2, 4), {"training": False, "momentum": -1.2}),
             ((3, 1), {"training": True, "momentum": 0.0}),
             ((0,), {"training": True}),
             ((0,), {"training": False}),
             ((3, 2, 3, 4), {"training": True, "momentum": -1.0, "eps": 0.5}),
             ((3, 2, 3, 4), {"training": False, "momentum": -1.0, "eps": 0.5}),
             ((2, 1), {}))
    for shape, kwargs in cases:
        c = shape[1] if len(shape) > 1 else 0
        weight = _arg(c, gen=gen) if c > 0 else None
        bias = _arg(c, gen=gen) if c > 0 else None
        running = (_arg(c, requires_grad=False, low=0, gen=gen), _arg(c, requires_grad=False, low=0, gen=gen))
        yield Sample(_arg(*shape, gen=gen), (*running, weight, bias), kwargs,
                     _refusal(kwargs, kwargs.get("training", False)))
    # weight and bias each left out
    for with_weight, with_bias, training in ((True, False, True), (False, True, False), (False, False, False)):
        c = 2
        yield Sample(_arg(3, 2, 3, gen=gen),
                     (_arg(c, requires_grad=False, low=0, gen=gen), _arg(c, requires_grad=False, low=0.1, gen=gen),
                      _arg(c, gen=gen) if with_weight else None, _arg(c, gen=gen) if with_bias else None),
                     {"training": training})
    yield Sample(_arg(1, 2, 3, gen=gen), (None, None, None, None), {"training": True})


def instance_norm_samples(gen):
    cases = (((S, S, S), {"momentum": 0.5, "eps": 0.6}),
             ((S, S, S), {"momentum": 0.5, "eps": 0.6, "use_input_stats": True}),
             ((3, 2, 4), {"momentum": -1.2}),
             ((3, 2, 4), {"momentum": 0.0}),
             ((3, 2, 3, 4), {"momentum": -1.0, "eps": 0.5}),
             ((3, 2, 3, 4), {"momentum": 0.8, "eps": 0.5}))
    for shape, kwargs in cases:
        c = shape[1]
        yield Sample(_arg(*shape, gen=gen),
                     (_arg(c, requires_grad=False, low=0, gen=gen), _arg(c, requires_grad=False, low=0, gen=gen),
                      _arg(c, gen=gen), _arg(c, gen=gen)), kwargs, _refusal(kwargs, True))
    yield Sample(_arg(3, 2, 4, gen=gen), (None, None, None, None), {})


def layer_norm_samples(gen):
    cases = (((1, 2, 3), (1, 2, 3), {"eps": 0.5}),
             ((2, 2, 3), (2, 3), {"eps": -0.5}),
             ((1,), (1,), {}),
             ((1, 2), (2,), {}),
             ((0, 1), (1,), {}),
             ((2, 3, 4), (3, 4), {}))
    for shape, normalized, kwargs in cases:
        yield Sample(_arg(*shape, gen=gen), (normalized, _arg(*normalized, gen=gen), _arg(*normalized, gen=gen)),
                     kwargs, _refusal(kwargs, False))
        yield Sample(_arg(*shape, gen=gen), (normalized, None, None), kwargs, _refusal(kwargs, False))


def group_norm_samples(gen):
    cases = (((1, 6, 3), 2, {"eps": 0.5}),
             ((2, 6, 3), 2, {"eps": -0.5}),
             ((1, 3), 1, {}),
             ((0, 2), 1, {}),
             ((5, 5, 5), 1, {}),
             ((2, 4, 2, 3), 4, {}))
    for shape, groups, kwargs in cases:
        c = shape[1]
        yield Sample(_arg(*shape, gen=gen), (groups, _arg(c, gen=gen), _arg(c, gen=gen)), kwargs,
                     _refusal(kwargs, False))
        yield Sample(_arg(*shape, gen=gen), (groups, None, None), kwargs, _refusal(kwargs, False))


OPS = {
    "batch_norm": batch_norm_samples,
    "instance_norm": instance_norm_samples,
    "layer_norm": layer_norm_samples,
    "group_norm": group_norm_samples,
}


def _samples(impl, name):
    """(op, sample) for the samples ``impl`` accepts; normlab's refusals are asserted on the way."""
    op = getattr(impl.F, name)
    for sample in OPS[name](torch.Generator().manual_seed(0)):
        if sample.refused_by_normlab and impl.is_normlab:
            # Deliberate difference (README, "Differences from torch.nn"): refused with a ValueError that
            # says which argument and why, instead of running statistics or outputs that are meaningless.
            with pytest.raises(ValueError, match=sample.refused_by_normlab):
                op(sample.input, *sample.args, **sample.kwargs)
            continue
        yield op, sample


def _as_function(op, sample):
    """``fn(*differentiable tensors)`` calling ``op`` with the sample's other arguments fixed (fresh copies
    of the running statistics at every call, so repeated calls see the same buffers)."""
    positions = [i for i, t in enumerate((sample.input, *sample.args))
                 if isinstance(t, torch.Tensor) and t.requires_grad]
    frozen = [t.clone() if isinstance(t, torch.Tensor) and not t.requires_grad else t
              for t in (sample.input, *sample.args)]

    def fn(*tensors):
        args = [t.clone() if isinstance(t, torch.Tensor) else t for t in frozen]
        for i, t in zip(positions, tensors):
            args[i] = t
        return op(*args, **sample.kwargs)

    return fn


@pytest.mark.parametrize("name", list(OPS))
def test_fn_grad(impl, name):
    for op, sample in _samples(impl, name):
        assert impl.gradcheck(_as_function(op, sample), sample.differentiable(), check_undefined_grad=True,
                              check_grad_dtypes=True)


_TORCH_GRADGRAD_FAILS = pytest.mark.torch_fails(
    "torch's eval-mode F.batch_norm without weight gives the bias gradient a zero derivative with respect to "
    "grad_output (gradgradcheck: analytical 0, numerical 1)")


@pytest.mark.parametrize("name", [pytest.param(n, marks=_TORCH_GRADGRAD_FAILS) if n == "batch_norm" else n
                                  for n in OPS])
def test_fn_gradgrad(impl, name):
    for op, sample in _samples(impl, name):
        if sample.input.numel() == 0:
            continue  # OpInfo's gradgrad test skips empty samples too (no output to differentiate twice)
        assert impl.gradgradcheck(_as_function(op, sample), sample.differentiable())


@pytest.mark.parametrize("name", list(OPS))
def test_forward_mode_AD(impl, name):
    for op, sample in _samples(impl, name):
        assert impl.gradcheck(_as_function(op, sample), sample.differentiable(), check_forward_ad=True,
                              check_backward_ad=False, check_batched_grad=False, check_undefined_grad=True,
                              check_batched_forward_grad=True)


@pytest.mark.parametrize("name", list(OPS))
def test_fn_fwgrad_bwgrad(impl, name):
    for op, sample in _samples(impl, name):
        if sample.input.numel() == 0:
            continue
        assert impl.gradgradcheck(_as_function(op, sample), sample.differentiable(), check_fwd_over_rev=True,
                                  check_rev_over_rev=False, check_batched_grad=False,
                                  check_undefined_grad=False)


def _reference(name, sample):
    """The normalization in NumPy (float64), from its definition."""
    x = sample.input.detach().numpy()
    kw = sample.kwargs
    eps = kw.get("eps", 1e-5)

    def arr(t):
        return None if t is None else t.detach().numpy()

    if name == "layer_norm":
        shape, w, b = sample.args[0], arr(sample.args[1]), arr(sample.args[2])
        axes = tuple(range(x.ndim - len(shape), x.ndim))
        mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
        y, param_shape = (x - mean) / np.sqrt(var + eps), shape
    elif name == "group_norm":
        groups, w, b = sample.args[0], arr(sample.args[1]), arr(sample.args[2])
        g = x.reshape(x.shape[0], groups, -1)
        mean, var = g.mean(axis=-1, keepdims=True), g.var(axis=-1, keepdims=True)
        y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
        param_shape = (x.shape[1],) + (1,) * (x.ndim - 2)
    else:
        rm, rv, w, b = (arr(t) for t in sample.args)
        use_batch = kw.get("training", False) if name == "batch_norm" else kw.get("use_input_stats", True)
        param_shape = (x.shape[1],) + (1,) * (x.ndim - 2) if x.ndim > 1 else (0,)
        if use_batch or rm is None:
            axes = (0,) + tuple(range(2, x.ndim)) if name == "batch_norm" else tuple(range(2, x.ndim))
            mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
        else:
            mean, var = rm.reshape(param_shape), rv.reshape(param_shape)
        y = (x - mean) / np.sqrt(var + eps)
    if w is not None:
        y = y * w.reshape(param_shape)
    if b is not None:
        y = y + b.reshape(param_shape)
    return y


@pytest.mark.parametrize("name", list(OPS))
def test_reference_numerics(impl, name):
    for op, sample in _samples(impl, name):
        if sample.input.numel() == 0:
            continue
        with torch.no_grad():
            got = op(sample.input, *[t.clone() if isinstance(t, torch.Tensor) else t for t in sample.args],
                     **sample.kwargs)
        np.testing.assert_allclose(got.numpy(), _reference(name, sample), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", list(OPS))
def test_vmap_matches_a_loop(impl, name):
    """functorch's vmap test: vmap over a batch of inputs (and of running statistics, which are updated in
    place per example) gives what a loop over the examples gives."""
    for op, sample in _samples(impl, name):
        if sample.input.numel() == 0:
            continue
        xs = torch.stack([sample.input.detach() * k for k in (1.0, 2.0, -0.5)])
        args = [t.detach() if isinstance(t, torch.Tensor) else t for t in sample.args]
        has_running = name in ("batch_norm", "instance_norm") and args[0] is not None
        looped_args = [[a.clone() if isinstance(a, torch.Tensor) else a for a in args] for _ in range(3)]
        looped = torch.stack([op(x, *a, **sample.kwargs) for x, a in zip(xs, looped_args)])
        if has_running:
            batched_running = [torch.stack([a.clone() for _ in range(3)]) for a in args[:2]]
            fn = lambda x, rm, rv: op(x, rm, rv, *args[2:], **sample.kwargs)  # noqa: E731
            out = torch.func.vmap(fn)(xs, *batched_running)
            for i in range(2):
                torch.testing.assert_close(batched_running[i], torch.stack([a[i] for a in looped_args]))
        else:
            out = torch.func.vmap(lambda x: op(x, *args, **sample.kwargs))(xs)
        torch.testing.assert_close(out, looped)


def test_vmap_refuses_unbatched_running_statistics_like_torch(impl):
    """torch.func's documented behaviour ("Patching Batch Norm"): training batch norm under vmap with
    running statistics that are not batched raises, and the statistics are left as they were."""
    rm, rv = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
    xs = torch.randn(2, 4, 3, dtype=DT)
    with pytest.raises(RuntimeError, match="Batch norm got a batched tensor as input while the running_mean"):
        torch.func.vmap(lambda x: impl.F.batch_norm(x, rm, rv, training=True))(xs)
    assert torch.equal(rm, torch.zeros(3, dtype=DT)) and torch.equal(rv, torch.ones(3, dtype=DT))
    bn = impl.nn.BatchNorm1d(3).double()
    with pytest.raises(RuntimeError, match="track_running_stats"):
        torch.func.vmap(bn)(xs)
    out = torch.func.vmap(bn.eval())(xs)  # eval mode reads the statistics only
    torch.testing.assert_close(out, torch.stack([bn(x) for x in xs]))


@pytest.mark.parametrize("name", list(OPS))
def test_batched_grad_of_samples(impl, name):
    """torch.autograd.grad(..., is_grads_batched=True) equals a loop over the grad_outputs."""
    for op, sample in _samples(impl, name):
        if sample.input.numel() == 0:
            continue
        fn = _as_function(op, sample)
        inputs = sample.differentiable()
        out = fn(*inputs)
        vs = torch.randn(3, *out.shape, dtype=DT)
        batched = torch.autograd.grad(out, inputs, vs, is_grads_batched=True, retain_graph=True, allow_unused=True)
        for k in range(3):
            single = torch.autograd.grad(out, inputs, vs[k], retain_graph=True, allow_unused=True)
            for b, s in zip(batched, single):
                if s is not None:
                    torch.testing.assert_close(b[k], s)
