import math

import pytest
import torch

from normlab.lab.papers import loss_surface as ls


def test_filter_normalization_gives_every_filter_the_weights_norm_and_leaves_1d_parameters_alone():
    w = [torch.randn(4, 3, 3, 3), torch.randn(5, 7), torch.randn(4)]
    d = ls.filter_normalized([torch.randn_like(t) for t in w], w)
    for dn, wn in zip(d[:2], w[:2]):
        torch.testing.assert_close(dn.reshape(dn.shape[0], -1).norm(dim=1), wn.reshape(wn.shape[0], -1).norm(dim=1))
    assert torch.count_nonzero(d[2]) == 0


def test_barrier_and_flatness_known_answers():
    alphas = [-0.25, 0.0, 0.5, 1.0, 1.25]
    assert ls.barrier(alphas, [3.0, 2.0, 2.0, 1.0, 1.2]) == pytest.approx(0.0)  # a plateau, then down: no barrier
    assert ls.barrier(alphas, [3.0, 2.0, 2.5, 1.0, 1.2]) == pytest.approx(0.5 / 2.0)  # a bump of 0.5 from 2.0
    assert ls.flatness([-1, 0, 1], [[2, 2, 2], [2, 1, 2], [2, 2, 2]]) == pytest.approx(17 / 9)


def test_probe_keeps_theta0_then_draws_the_path_and_the_slice(context, snapshot):
    ctx = context()
    unchanged = snapshot(ctx.model)
    assert ls.loss_surface({"alphas": 7, "grid": 3}, ctx) == {"stored": True}
    opt = torch.optim.SGD(ctx.model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(ctx.model(ctx.x), ctx.y).backward()
    opt.step()
    unchanged = snapshot(ctx.model)
    out = ls.loss_surface({"alphas": 7, "grid": 3}, ctx)
    assert unchanged() and len(out["path"]) == 7 and out["alphas"][5] == pytest.approx(1.0) and len(out["plane"]) == 3 and len(out["plane"][0]) == 3
    assert all(math.isfinite(v) for v in out["path"])
    # α = 1 and the slice's centre are both the trained weights: the same loss
    assert out["path"][5] == pytest.approx(out["plane"][1][1], rel=1e-5)


def test_the_path_has_grid_points_at_theta0_and_theta1_in_every_suite():
    for b in ls.BUDGETS.values():
        assert (b["alphas"] - 1) % 6 == 0  # α = 0 and α = 1 lie on the grid of [−0.25, 1.25]
