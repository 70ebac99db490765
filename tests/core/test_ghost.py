"""The exact merge of partial statistics and the split into virtual batches (normlab.core.ghost)."""

import torch

from normlab.core.ghost import merge_moments, virtual_batches


def test_merge_moments_is_the_statistics_of_the_union():
    gen = torch.Generator().manual_seed(0)
    sizes = [5, 1, 17, 3]
    parts = [1e4 + 1e-2 * torch.randn(n, 3, generator=gen) for n in sizes]  # a large mean, a tiny spread
    counts = torch.tensor(sizes)
    origin = parts[0][0]  # the means relative to a sample of the data, as the engine's shifted statistics
    means = torch.stack([(p - origin).mean(0) for p in parts])
    m2s = torch.stack([((p - origin - (p - origin).mean(0)) ** 2).sum(0) for p in parts])
    n, mean, m2 = merge_moments(counts, means, m2s)
    whole = torch.cat(parts).double()
    assert n.item() == sum(sizes) and mean.dtype == m2.dtype == torch.float32
    torch.testing.assert_close(mean.double(), (whole - origin.double()).mean(0), rtol=1e-5, atol=1e-9)
    # M2 from float32 partials keeps the spread: E[x²] − E[x]² in float32 would lose every digit of it
    torch.testing.assert_close(m2.double(), whole.var(0, unbiased=False) * n.item(), rtol=1e-4, atol=0)
    naive = (torch.cat(parts) ** 2).mean(0) - torch.cat(parts).mean(0) ** 2
    assert ((naive.double() - whole.var(0, unbiased=False)).abs() > 1e-2).any()


def test_virtual_batches():
    assert virtual_batches(14, 4) == (3, 2)
    assert virtual_batches(12, 4) == (3, 0)
    assert virtual_batches(3, 4) == (0, 3)
