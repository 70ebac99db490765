"""The exact merge of partial statistics and the split into virtual batches (normlab.core.ghost)."""

import torch

from normlab.core.engine import moments
from normlab.core.ghost import _partials, virtual_batches
from normlab.core.plan import batch_plan
from normlab.core.stats import merge_moments


def test_partials_of_virtual_batches_merge_into_the_whole_batch():
    """The virtual batches' statistics as the seam's partial moments merge to the whole batch's statistics."""
    gen = torch.Generator().manual_seed(0)
    x = 1e4 + 1e-2 * torch.randn(14, 3, 5, generator=gen)  # a large mean, a tiny spread
    parts = []
    for chunk in x.split(4):
        xv = chunk
        plan = batch_plan(tuple(xv.shape))
        shift, mean_shifted, var, _ = moments(xv, plan)
        parts.append(_partials(shift, mean_shifted, var, plan.count, 3))
    total, common, mean, var = merge_moments(torch.cat(parts))
    whole = x.double()
    assert total.tolist() == [70.0] * 3
    torch.testing.assert_close(common + mean, whole.mean((0, 2)), rtol=0, atol=1e-9)
    torch.testing.assert_close(var, whole.var((0, 2), unbiased=False), rtol=1e-4, atol=0)


def test_virtual_batches():
    assert virtual_batches(14, 4) == (3, 2)
    assert virtual_batches(12, 4) == (3, 0)
    assert virtual_batches(3, 4) == (0, 3)


def test_numba_runs_ghost_batch_norm_through_the_seam_per_group(numba_seam_calls):
    """On the numba backend the virtual batches are groups of the statistics seam (group_size=), not instance
    plans of the fused kernels; the result is BatchNorm per virtual batch (ragged last one included)."""
    import normlab.functional as F

    x = torch.randn(10, 3, 4, 4, requires_grad=True)
    y = F.ghost_batch_norm(x, 4, training=True)
    y.backward(torch.ones_like(y))
    assert [name for name, _ in numba_seam_calls] == ["partial_moments", "partial_grad_sums"]
    assert all(kwargs.get("group_size") == 4 for _, kwargs in numba_seam_calls)
    expected = torch.cat([torch.nn.functional.batch_norm(c, None, None, training=True) for c in x.detach().split(4)])
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
