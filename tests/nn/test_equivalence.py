"""normlab.nn against torch.nn: outputs, gradients and running statistics over training steps, then eval."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import normlab.nn as nl

# Every test here runs once per backend (tests/conftest.py), forced with NORMLAB_BACKEND.
pytestmark = pytest.mark.usefixtures("backend")

DTYPES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


@st.composite
def layer_cases(draw):
    kind = draw(st.sampled_from(["bn1d", "bn1d_seq", "bn2d", "bn3d", "in1d", "in2d", "in3d", "gn", "ln"]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    n = draw(st.integers(2, 5))
    c = draw(st.integers(1, 6))
    spatial_rank = {"bn1d": 0, "bn1d_seq": 1, "bn2d": 2, "bn3d": 3, "in1d": 1, "in2d": 2, "in3d": 3,
                    "gn": draw(st.integers(0, 2)), "ln": draw(st.integers(0, 2))}[kind]
    spatial = tuple(draw(st.lists(st.integers(2, 4), min_size=spatial_rank, max_size=spatial_rank)))
    shape = (n, c) + spatial
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    affine = draw(st.booleans())
    # channels_last for every 4D input, LayerNorm included (over W, (H, W) or (C, H, W) of NHWC memory).
    channels_last = kind in ("bn2d", "in2d", "gn", "ln") and len(spatial) == 2 and draw(st.booleans())
    if kind.startswith("bn") or kind.startswith("in"):
        momentum = draw(st.sampled_from([0.1, 0.5, None, 1.0, 0.0]))
        track = draw(st.booleans())
        cls = {"bn1d": "BatchNorm1d", "bn1d_seq": "BatchNorm1d", "bn2d": "BatchNorm2d",
               "bn3d": "BatchNorm3d", "in1d": "InstanceNorm1d", "in2d": "InstanceNorm2d",
               "in3d": "InstanceNorm3d"}[kind]
        args = (c,)
        kwargs = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    elif kind == "gn":
        cls = "GroupNorm"
        groups = draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
        args, kwargs = (groups, c), dict(eps=eps, affine=affine)
    else:
        cls = "LayerNorm"
        k = draw(st.integers(1, len(shape) - 1))
        args = (list(shape[-k:]),)
        kwargs = dict(eps=eps, elementwise_affine=affine, bias=draw(st.booleans()))
    return cls, args, kwargs, shape, dtype, channels_last, draw(st.integers(0, 2**31 - 1))


def _pair(cls, args, kwargs, dtype, seed):
    torch.manual_seed(seed)
    theirs = getattr(torch.nn, cls)(*args, **kwargs).to(dtype)
    with torch.no_grad():  # non-trivial affine parameters
        for p in theirs.parameters():
            p.normal_()
    ours = getattr(nl, cls)(*args, **kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _exact(theirs, x, dy):
    """torch.nn's output and gradients in float64 (input first, then the parameters): the exact answers
    to float32's."""
    exact = copy.deepcopy(theirs).double()
    x64 = x.double().requires_grad_(True)
    y64 = exact(x64)
    y64.backward(dy.double())
    return y64.detach(), [x64.grad] + [p.grad for p in exact.parameters()]


def _grad_tol(tol, got, exact):
    """``tol``, widened to twice torch.nn's own distance from the exact output or gradient (normlab's own
    are held to ``tol`` against the exact ones).

    Where a statistic's variance is near eps or below (two close values, one value per group), the
    gradients are ill-conditioned: rounding is amplified by up to 1/sqrt(eps), and torch.nn's float32
    gradients can be 1e-4 away from the exact ones while normlab's are 1e-6 away."""
    if got.dtype == torch.float64:
        return tol
    return dict(tol, atol=max(tol["atol"], 2 * (got.double() - exact).abs().max().item()))


def _conditioned_tol(tol, got, dy, layer):
    """``tol``, widened to the rounding bound of a float32 input gradient: dx = rstd · (g − mean(g) − …)
    carries rounding of order eps_f32 · |g| times rstd ≤ 1/sqrt(eps), large only where a statistic's
    variance is near eps (e.g. one value per group, where dx is exactly 0 and rounding is all there is)."""
    if got.dtype == torch.float64:
        return tol
    weight = getattr(layer, "weight", None)
    g = dy.abs().max().item() * (1.0 if weight is None else weight.detach().abs().max().item())
    bound = 8 * torch.finfo(torch.float32).eps * g / layer.eps ** 0.5
    return dict(tol, atol=max(tol["atol"], bound))


def _compare_step(ours, theirs, shape, dtype, channels_last, gen, tol, train):
    x = torch.randn(shape, dtype=dtype, generator=gen) * 2.0 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, dtype=dtype, generator=gen)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours.train(train)
    theirs.train(train)
    y_exact, exact = _exact(copy.deepcopy(theirs), x, dy)
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb.detach(), **_grad_tol(tol, yb.detach(), y_exact))
    torch.testing.assert_close(ya.detach().double(), y_exact, **tol, msg=lambda m: f"output vs float64: {m}")
    ya.backward(dy)
    yb.backward(dy)
    # Against torch.nn: either one's rounding may be the larger (normlab's is bounded as below).
    torch.testing.assert_close(xa.grad, xb.grad, **_grad_tol(_conditioned_tol(tol, xa.grad, dy, ours), xb.grad,
                                                               exact[0]))
    torch.testing.assert_close(xa.grad.double(), exact[0], **_conditioned_tol(tol, xa.grad, dy, ours),
                               msg=lambda m: f"input grad vs float64: {m}")
    for ((name, pa), (_, pb)), e in zip(zip(ours.named_parameters(), theirs.named_parameters()), exact[1:]):
        torch.testing.assert_close(pa.grad, pb.grad, **_grad_tol(tol, pb.grad, e), msg=lambda m: f"{name}.grad: {m}")
        torch.testing.assert_close(pa.grad.double(), e, **tol, msg=lambda m: f"{name}.grad vs float64: {m}")
        pa.grad = pb.grad = None
    for (name, ba), (_, bb) in zip(ours.named_buffers(), theirs.named_buffers()):
        torch.testing.assert_close(ba, bb, **tol, msg=lambda m: f"buffer {name}: {m}")


@given(layer_cases())
def test_training_steps_then_eval_match_torch(case):
    cls, args, kwargs, shape, dtype, channels_last, seed = case
    ours, theirs = _pair(cls, args, kwargs, dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    tol = DTYPES[dtype]
    for _ in range(3):
        _compare_step(ours, theirs, shape, dtype, channels_last, gen, tol, train=True)
    _compare_step(ours, theirs, shape, dtype, channels_last, gen, tol, train=False)
    assert ours.state_dict().keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("cls", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d",
                                 "InstanceNorm2d", "InstanceNorm3d"])
def test_running_stat_layers_share_torch_state_dict(cls):
    theirs = getattr(torch.nn, cls)(5, affine=True, track_running_stats=True)
    ours = getattr(nl, cls)(5, affine=True, track_running_stats=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert isinstance(ours, getattr(torch.nn, cls))
    theirs.running_mean.fill_(3.0)
    ours.load_state_dict(theirs.state_dict())
    back = getattr(torch.nn, cls)(5, affine=True, track_running_stats=True)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.running_mean, torch.full((5,), 3.0))


def test_unbatched_instance_norm_matches_torch():
    x = torch.randn(3, 10)
    torch.testing.assert_close(nl.InstanceNorm1d(3)(x), torch.nn.InstanceNorm1d(3)(x))


def test_momentum_none_is_cumulative_average():
    bn = nl.BatchNorm1d(2, momentum=None)
    batches = [torch.randn(16, 2) * (i + 1) + i for i in range(5)]
    for b in batches:
        bn(b)
    assert bn.num_batches_tracked.item() == 5
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([b.var(0) for b in batches]).mean(0))


def _small_cnn(norm):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), norm.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), norm.GroupNorm(2, 8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 16), norm.BatchNorm1d(16), torch.nn.ReLU(),
        norm.LayerNorm(16), torch.nn.Linear(16, 3),
    ).double()


def test_model_trains_identically_to_torch():
    theirs = _small_cnn(torch.nn)
    ours = nl.convert(copy.deepcopy(theirs))
    assert sum(isinstance(m, (nl.BatchNorm2d, nl.GroupNorm, nl.BatchNorm1d, nl.LayerNorm))
               for m in ours.modules()) == 4
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        x = torch.randn(12, 1, 6, 6, generator=gen, dtype=torch.float64)
        t = torch.randint(0, 3, (12,), generator=gen)
        for model, opt in ((ours, opt_a), (theirs, opt_b)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), t).backward()
            opt.step()
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{k}: {m}")
    ours.eval(), theirs.eval()
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-9, atol=1e-10)


def test_empty_batch_is_not_counted():
    bn = nl.BatchNorm2d(3, momentum=None)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = bn(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert bn.num_batches_tracked.item() == 0
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))


def test_eval_backward_survives_a_later_running_statistics_update():
    """The graph of an eval-mode call must not hold views of the buffers a later training call updates."""
    bn = nl.BatchNorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = bn(x)
    bn.train()
    bn(torch.randn(2, 3, 4, 4))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x) / torch.sqrt(torch.tensor(1.0 + 1e-5)))


@pytest.mark.parametrize("normalized", [(7,), (5, 7), (3, 5, 7)])
def test_layernorm_of_channels_last_input_matches_torch(normalized):
    """LayerNorm over trailing axes of an NHWC tensor: statistics per (n, c) for (H, W), as InstanceNorm's,
    but γ and β vary along H and W, not along the channels."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 7).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    ours, theirs = _pair("LayerNorm", (list(normalized),), {}, torch.float32, 0)
    ya, yb = ours(x), theirs(x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(yb)
    ga = torch.autograd.grad(ya, (x, *ours.parameters()), dy)
    gb = torch.autograd.grad(yb, (x, *theirs.parameters()), dy)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_running_statistics_updated_in_a_kernel_are_seen_by_autograd():
    """A graph that saved a running statistic must refuse to backpropagate after a training step changed
    it, whichever backend updated it (as torch.nn's in-place update does), not use the new value."""
    bn = nl.BatchNorm2d(3)
    w = torch.ones(3, requires_grad=True)
    z = (w * bn.running_mean).sum()  # saves running_mean for the backward of w
    bn(torch.randn(4, 3, 2, 2))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()
