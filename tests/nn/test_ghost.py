"""GhostBatchNorm1d/2d/3d: BatchNorm applied to each virtual batch (the ragged last one included), in outputs,
gradients and running statistics, on every backend and layout; eval is BatchNorm; errors."""

import pytest
import torch

import normlab.functional as F
import normlab.nn as nn

GHOST = {2: nn.GhostBatchNorm1d, 3: nn.GhostBatchNorm1d, 4: nn.GhostBatchNorm2d, 5: nn.GhostBatchNorm3d}
TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}

CASES = [  # (shape, virtual batch size, channels_last)
    ((12, 5), 4, False),          # 3 equal virtual batches
    ((14, 5), 4, False),          # ragged: 4, 4, 4, 2
    ((11, 3, 7), 3, False),       # ragged: 3, 3, 3, 2
    ((10, 4, 3, 5), 4, False),    # ragged: 4, 4, 2
    ((10, 4, 3, 5), 4, True),
    ((8, 4, 3, 5), 2, True),      # equal, channels_last: the output is a view of the kernel's
    ((7, 3, 2, 3, 2), 3, False),  # ragged: 3, 3, 1 (one sample of 12 values)
]


def _layers(shape, v, gen):
    c = shape[1]
    ghost, bn = GHOST[len(shape)](c, v), TORCH_BN[len(shape)](c, dtype=torch.float64)
    with torch.no_grad():
        ghost.weight.copy_(1 + 0.5 * torch.randn(c, generator=gen))
        ghost.bias.copy_(0.5 * torch.randn(c, generator=gen))
        ghost.running_mean.copy_(torch.randn(c, generator=gen))
        ghost.running_var.copy_(1 + torch.rand(c, generator=gen))
    bn.load_state_dict(ghost.state_dict())
    return ghost, bn


@pytest.mark.parametrize("shape, v, channels_last", CASES)
def test_equals_batchnorm_per_virtual_batch(backend, shape, v, channels_last):
    gen = torch.Generator().manual_seed(sum(shape))
    ghost, bn = _layers(shape, v, gen)
    x = 3 * torch.randn(shape, generator=gen) + 2
    dy = torch.randn(shape, generator=gen)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    xs = x.clone().requires_grad_(True)
    y = ghost(xs)
    y.backward(dy)
    # the reference: torch.nn BatchNorm in float64 on each chunk, each from the same starting state
    xr = x.double().requires_grad_(True)
    yr = torch.cat([bn(chunk) for chunk in xr.split(v)])
    yr.backward(dy.double())
    torch.testing.assert_close(y.double(), yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xs.grad.double(), xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ghost.weight.grad.double(), bn.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ghost.bias.grad.double(), bn.bias.grad, atol=1e-4, rtol=1e-5)
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert xs.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape, v, channels_last", CASES[:4])
def test_running_statistics_are_the_merged_virtual_batches(backend, shape, v, channels_last):
    """One update per step with the exact merge of the virtual batches' (count, mean, M2): the full batch's
    statistics, computed here from the per-chunk statistics by the pooled formula in float64, and equal
    to what torch.nn BatchNorm on the whole batch stores."""
    gen = torch.Generator().manual_seed(7)
    ghost, _ = _layers(shape, v, gen)
    ghost.running_var.zero_()  # so that the stored variance is the batch's alone, at full relative precision
    start_mean, start_var = ghost.running_mean.double().clone(), ghost.running_var.double().clone()
    x = 1e3 + 0.1 * torch.randn(shape, generator=gen)  # a large mean, a small spread
    ghost(x)
    dims = [0] + list(range(2, len(shape)))
    chunks = [c.double() for c in x.split(v)]
    counts = torch.tensor([c.numel() / shape[1] for c in chunks], dtype=torch.float64)
    means = torch.stack([c.mean(dims) for c in chunks])
    m2 = torch.stack([c.var(dims, unbiased=False) for c in chunks]) * counts[:, None]
    n = counts.sum()
    mean = (counts[:, None] * means).sum(0) / n
    var = (m2.sum(0) + (counts[:, None] * (means - mean) ** 2).sum(0)) / (n - 1)
    torch.testing.assert_close(ghost.running_mean.double(), 0.9 * start_mean + 0.1 * mean, atol=1e-5, rtol=1e-7)
    torch.testing.assert_close(ghost.running_var.double(), 0.1 * var, atol=0, rtol=1e-4)
    full = TORCH_BN[len(shape)](shape[1], dtype=torch.float64)
    full.running_mean.copy_(start_mean)
    full.running_var.copy_(start_var)
    full(x.double())
    torch.testing.assert_close(ghost.running_var.double(), full.running_var, atol=0, rtol=1e-4)
    assert ghost.num_batches_tracked.item() == 1


def test_eval_and_small_batches_are_batchnorm(backend):
    gen = torch.Generator().manual_seed(3)
    ghost, _ = _layers((8, 4, 3, 3), 8, gen)
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(ghost.state_dict())
    x = torch.randn(8, 4, 3, 3, generator=gen)
    assert torch.equal(ghost(x), bn(x))  # one virtual batch: BatchNorm exactly
    ghost.eval(), bn.eval()
    big = torch.randn(32, 4, 3, 3, generator=gen)
    assert torch.equal(ghost(big), bn(big))
    assert isinstance(ghost, torch.nn.BatchNorm2d)
    assert set(ghost.state_dict()) == set(torch.nn.BatchNorm2d(4).state_dict())


def test_without_running_statistics_normalizes_per_virtual_batch_in_eval_too():
    ghost = nn.GhostBatchNorm1d(3, 2, track_running_stats=False).eval()
    x = torch.randn(6, 3)
    expected = torch.cat([torch.nn.functional.batch_norm(c, None, None, training=True) for c in x.split(2)])
    torch.testing.assert_close(ghost(x), expected)


def test_gradcheck_float64(backend):
    torch.manual_seed(0)
    x = torch.randn(7, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, b: F.ghost_batch_norm(x, 3, None, None, w, b, training=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_half_precision(backend):
    x = torch.randn(12, 4, 3, 3)
    ref = F.ghost_batch_norm(x, 4, training=True)
    got = F.ghost_batch_norm(x.to(torch.bfloat16), 4, training=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=1e-2)


def test_errors_and_empty_batches():
    with pytest.raises(ValueError, match="virtual_batch_size"):
        nn.GhostBatchNorm1d(3, 0)
    layer = nn.GhostBatchNorm1d(3, 4)
    with pytest.raises(ValueError, match="virtual batch"):
        layer(torch.randn(9, 3))  # the last virtual batch: one sample, one value per channel
    assert torch.equal(layer.running_mean, torch.zeros(3)) and layer.num_batches_tracked.item() == 0
    with pytest.raises(ValueError, match="virtual batch"):
        nn.GhostBatchNorm1d(3, 1)(torch.randn(4, 3))
    assert layer(torch.randn(0, 3)).shape == (0, 3)
    assert layer.num_batches_tracked.item() == 0 and not layer.running_var.isnan().any()
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(8, 5))
