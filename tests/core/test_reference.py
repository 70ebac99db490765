"""The float64 reference: the seeds' worked examples and the five-step backward against autograd."""

import numpy as np
import pytest
import torch

from normlab import reference as ref

HEIGHTS_WEIGHTS_AGES = np.array(
    [
        [150, 54, 26],
        [60, 18, 4],
        [160, 60, 48],
        [177, 53, 16],
        [180, 60, 24],
        [192, 90, 22],
        [172, 76, 38],
        [168, 83, 47],
        [172, 64, 17],
        [180, 90, 25],
    ],
    dtype=np.float64,
)


def test_worked_example_one_to_five():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0]).reshape(5, 1)
    plan = ref.batch_plan(x.shape)
    mean, var = ref.moments(x, plan)
    assert mean.item() == 3.0 and var.item() == 2.0  # biased variance: 10 / 5
    y, _ = ref.forward(x, plan, eps=1e-5)
    np.testing.assert_allclose(y.ravel(), [-1.414, -0.707, 0.0, 0.707, 1.414], atol=1e-3)


def test_heights_column_mean_is_161_1():
    plan = ref.batch_plan(HEIGHTS_WEIGHTS_AGES.shape)
    mean, var = ref.moments(HEIGHTS_WEIGHTS_AGES, plan)
    assert mean.ravel()[0] == pytest.approx(161.1)
    # Each feature column is normalized on its own: zero mean, unit (biased) variance.
    y, _ = ref.forward(HEIGHTS_WEIGHTS_AGES, plan, eps=0.0 + 1e-12)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=0), 1.0, atol=1e-9)


def test_conv_statistics_are_per_channel_over_n_h_w():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 5, 6)) * np.array([1, 10, 100]).reshape(1, 3, 1, 1)
    mean, var = ref.moments(x, ref.batch_plan(x.shape))
    for c in range(3):
        vals = x[:, c].ravel()
        assert mean.ravel()[c] == pytest.approx(vals.mean())
        assert var.ravel()[c] == pytest.approx(vals.var())


PLANS = {
    "batch1d": (lambda s: ref.batch_plan(s), (6, 4)),
    "batch2d": (lambda s: ref.batch_plan(s), (3, 4, 5, 2)),
    "instance": (lambda s: ref.instance_plan(s), (3, 4, 7)),
    "group": (lambda s: ref.group_plan(s, 2), (3, 4, 3, 2)),
    "layer": (lambda s: ref.layer_plan(s, s[-2:]), (3, 4, 5)),
}


CASES = [(k, True) for k in sorted(PLANS)] + [(k, False) for k in ("batch1d", "batch2d", "instance")]


@pytest.mark.parametrize("kind,batch_stats", CASES)
def test_five_step_backward_matches_autograd_through_reference(kind, batch_stats):
    make, shape = PLANS[kind]
    plan = make(shape)
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=shape)
    gamma = rng.normal(size=plan.param_shape)
    beta = rng.normal(size=plan.param_shape)
    dy = rng.normal(size=shape)
    fixed = {}
    if not batch_stats:
        fixed = dict(mean=rng.normal(size=plan.channels), var=rng.uniform(0.5, 2, size=plan.channels))

    _, cache = ref.forward(x, plan, gamma, beta, eps=1e-3, **fixed)
    dx, dgamma, dbeta = ref.backward(dy, cache)

    tx, tg, tb = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    tfixed = {k: torch.tensor(v) for k, v in fixed.items()}
    y, _ = ref.forward(tx, plan, tg, tb, eps=1e-3, **tfixed)
    y.backward(torch.tensor(dy))
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, tg.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta, tb.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_running_update_and_cumulative_average():
    rng = np.random.default_rng(2)
    batches = [rng.normal(5.0, 2.0, size=(8, 3)) for _ in range(4)]
    plan = ref.batch_plan((8, 3))
    rm, rv, t = np.zeros(3), np.ones(3), 0
    for b in batches:
        rm, rv, t = ref.update_running(rm, rv, b, plan, None, t)
    assert t == 4
    # momentum=None: the plain average of the batch statistics, variance unbiased.
    np.testing.assert_allclose(rm, np.mean([b.mean(0) for b in batches], axis=0))
    np.testing.assert_allclose(rv, np.mean([b.var(0, ddof=1) for b in batches], axis=0))

    rm2, rv2, _ = ref.update_running(np.zeros(3), np.ones(3), batches[0], plan, 0.1, 0)
    np.testing.assert_allclose(rm2, 0.1 * batches[0].mean(0))
    np.testing.assert_allclose(rv2, 0.9 + 0.1 * batches[0].var(0, ddof=1))


def test_population_statistics_and_inference_affine():
    rng = np.random.default_rng(3)
    m = 16
    batches = rng.normal(1.0, 2.0, size=(50, m, 4))
    means = batches.mean(axis=1)
    variances = batches.var(axis=1)
    mu, var = ref.population_statistics(means, variances, m)
    np.testing.assert_allclose(mu, means.mean(0))
    np.testing.assert_allclose(var, m / (m - 1) * variances.mean(0))
    with pytest.raises(ValueError, match="m >= 2"):
        ref.population_statistics(means, variances, 1)

    gamma, beta = rng.normal(size=4), rng.normal(size=4)
    a, b = ref.inference_affine(mu, var, gamma, beta, eps=1e-5)
    x = rng.normal(size=(7, 4))
    y, _ = ref.forward(x, ref.batch_plan(x.shape), gamma, beta, 1e-5, mean=mu, var=var)
    np.testing.assert_allclose(a * x + b, y, rtol=1e-12, atol=1e-12)
