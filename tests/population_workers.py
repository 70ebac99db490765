"""The scenarios of tests/test_population.py's distributed tests, each run in every process of a gloo group on
127.0.0.1 by tests/gloo_runner.py (every rank can compute the one-process reference, since all data comes
from one seed); a failed check exits 1 with the traceback."""

from __future__ import annotations

import torch
import torch.distributed as dist

import normlab

torch.set_num_threads(1)

# batches per rank: uneven, and the last rank has none
SHARDS = {3: [[5, 7, 2], [4], []], 2: [[3], [6, 2]]}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)).double()


def _batches(world):
    """Every rank's batches, from one seed: a large mean and a small spread, which E[x²] − E[x]² would lose."""
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(n, 3, 5, 5, generator=gen, dtype=torch.float64) * 1e-3 + 1e4 for n in sizes]
            for sizes in SHARDS[world]]


def exact(rank, world):
    """Every rank ends with one-process precise_bn's statistics over all ranks' batches, bit-identical across ranks."""
    shards = _batches(world)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counts = normlab.precise_bn(model, shards[rank], progress=False)
    reference = _model()
    expected = normlab.precise_bn(reference, [b for shard in shards for b in shard], progress=False,
                                  process_group=False)
    assert counts == expected, (counts, expected)
    # float64 rounding of data whose mean is ~1e6 of its spread: the merge order differs (per rank, then across
    # ranks) and moves the variance by ~1e-16 · 1e6; E[x²] − E[x]² would be off by ~1e-16 · 1e12 of it
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-9, atol=0, msg=lambda m: f"{key}: {m}")
    assert torch.equal(model.state_dict()["1.num_batches_tracked"], before["1.num_batches_tracked"])
    mine = torch.cat([model[1].running_var, model[4].running_mean, model[4].running_var])
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    assert all(torch.equal(mine, other) for other in everyone), "statistics differ between ranks"
    # process_group=False: this rank's shard only (an empty shard raises, as one process does)
    if shards[rank]:
        local = _model()
        normlab.precise_bn(local, shards[rank], progress=False, process_group=False)
        assert not torch.equal(local[1].running_mean, model[1].running_mean)


def one_fails(rank, world):
    """Rank 1's batch raises: it re-raises its error, the others raise that a rank failed; nobody hangs, and
    the running statistics are unchanged everywhere."""
    model = _model()
    before = model[1].running_mean.clone()
    batch = torch.randn(4, 3, 5, 5, dtype=torch.float64) if rank != 1 else torch.randn(4, 2, 5, 5,
                                                                                        dtype=torch.float64)
    try:
        normlab.precise_bn(model, [batch], progress=False)
        raise AssertionError("precise_bn did not fail")
    except RuntimeError as error:
        expected = "precise_bn: batch 0 raised" if rank == 1 else "other rank(s) of the process group failed"
        assert expected in str(error), str(error)
    assert torch.equal(model[1].running_mean, before)
