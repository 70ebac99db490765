"""convention="keras"/"flax" against hand computations of each framework's documented formulas, the
loaders of exported weights, and, where they are installed (not by the project's set-up), Keras 3 and
Flax themselves."""

import numpy as np
import pytest
import torch

import normlab.nn as nl

pytestmark = pytest.mark.usefixtures("backend")

X1 = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0], [7.0, -2.0]])
X2 = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 3.0], [10.0, 3.0]])
GAMMA, BETA = np.array([1.5, 0.5]), np.array([0.25, -1.0])
MEAN0, VAR0 = np.array([0.5, -0.5]), np.array([2.0, 3.0])


def _documented(momentum, eps):
    """Two training steps and one evaluation by the Keras/Flax formulas, written out with NumPy:
    moving = moving · momentum + batch · (1 − momentum), batch variance biased."""
    mean, var, outputs = MEAN0.copy(), VAR0.copy(), []
    for x in (X1, X2):
        mu, sigma2 = x.mean(axis=0), ((x - x.mean(axis=0)) ** 2).mean(axis=0)
        outputs.append(GAMMA * (x - mu) / np.sqrt(sigma2 + eps) + BETA)
        mean = mean * momentum + mu * (1 - momentum)
        var = var * momentum + sigma2 * (1 - momentum)
    outputs.append(GAMMA * (X1 - mean) / np.sqrt(var + eps) + BETA)
    return mean, var, outputs


def _run(layer):
    outputs = [layer(torch.from_numpy(X1)), layer(torch.from_numpy(X2))]
    layer.eval()
    outputs.append(layer(torch.from_numpy(X1)))
    return [y.detach().numpy() for y in outputs]


def test_keras_two_steps_by_hand():
    # Step 1, channel 0: batch [1, 3, 5, 7], mean 4, biased variance 5:
    # moving_mean = 0.5 · 0.99 + 4 · 0.01 = 0.535, moving_variance = 2 · 0.99 + 5 · 0.01 = 2.03.
    layer = nl.BatchNorm1d(2, convention="keras").double()
    assert layer.eps == 1e-3 and layer.momentum == pytest.approx(0.01)
    nl.load_keras_batchnorm(layer, {"gamma": GAMMA, "beta": BETA, "moving_mean": MEAN0, "moving_variance": VAR0})
    layer(torch.from_numpy(X1))
    assert layer.running_mean[0].item() == pytest.approx(0.535, abs=1e-12)
    assert layer.running_var[0].item() == pytest.approx(2.03, abs=1e-12)
    layer = nl.load_keras_batchnorm(nl.BatchNorm1d(2, convention="keras").double(),
                                    {"gamma": GAMMA, "beta": BETA, "moving_mean": MEAN0, "moving_variance": VAR0})
    outputs = _run(layer)
    mean, var, expected = _documented(0.99, 1e-3)
    np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-12)
    for y, e in zip(outputs, expected):
        np.testing.assert_allclose(y, e, rtol=1e-10, atol=1e-12)


def test_flax_two_steps_by_hand_with_nested_variables():
    layer = nl.BatchNorm1d(2, momentum=0.9, convention="flax").double()
    assert layer.eps == 1e-5
    nl.load_flax_batchnorm(layer, {"params": {"scale": GAMMA, "bias": BETA},
                                   "batch_stats": {"mean": MEAN0, "var": VAR0}})
    outputs = _run(layer)
    mean, var, expected = _documented(0.9, 1e-5)
    np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-12)
    for y, e in zip(outputs, expected):
        np.testing.assert_allclose(y, e, rtol=1e-10, atol=1e-12)


def test_the_torch_convention_is_torch_nn_s():
    ours, theirs = nl.BatchNorm1d(2).double(), torch.nn.BatchNorm1d(2).double()
    for x in (X1, X2):
        ours(torch.from_numpy(x)), theirs(torch.from_numpy(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="convention must be one of"):
        nl.BatchNorm2d(3, convention="tensorflow")


def test_a_ported_channels_last_keras_block_reproduces_its_outputs():
    """Conv2D (3x3, valid, NHWC kernel (3, 3, 2, 4)) then BatchNormalization in inference, by hand in NumPy,
    against normlab's Conv2d + BatchNorm2d built from the exported arrays."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 6, 2))                 # NHWC
    kernel, bias = rng.standard_normal((3, 3, 2, 4)), rng.standard_normal(4)
    bn = {"gamma": rng.uniform(0.5, 2, 4), "beta": rng.standard_normal(4),
          "moving_mean": rng.standard_normal(4), "moving_variance": rng.uniform(0.5, 2, 4)}
    conv = np.zeros((2, 3, 4, 4))
    for i in range(3):
        for j in range(4):
            conv[:, i, j, :] = np.einsum("nabc,abco->no", x[:, i:i + 3, j:j + 3, :], kernel) + bias
    expected = bn["gamma"] * (conv - bn["moving_mean"]) / np.sqrt(bn["moving_variance"] + 1e-3) + bn["beta"]

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), nl.BatchNorm2d(4, convention="keras")).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(nl.keras_kernel(kernel))
        model[0].bias.copy_(torch.from_numpy(bias))
    nl.load_keras_batchnorm(model[1], bn)
    y = model(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    assert tuple(nl.keras_kernel(np.zeros((3, 5))).shape) == (5, 3)


def test_loaders_say_what_does_not_fit():
    with pytest.raises(ValueError, match="does not match"):
        nl.load_keras_batchnorm(nl.BatchNorm1d(3), {"gamma": np.ones(2), "moving_mean": np.zeros(3),
                                                   "moving_variance": np.ones(3)})
    with pytest.raises(ValueError, match="unexpected exported"):
        nl.load_flax_batchnorm(nl.BatchNorm1d(2), {"scale": np.ones(2), "kernel": np.ones(2)})
    layer = nl.load_keras_batchnorm(nl.BatchNorm1d(2), {"moving_mean": MEAN0, "moving_variance": VAR0})
    assert torch.equal(layer.weight, torch.ones(2)) and torch.equal(layer.bias, torch.zeros(2))  # scale/center off


def test_against_keras_itself(monkeypatch):
    """Where Keras 3 is installed (it runs on torch here, KERAS_BACKEND=torch): two training steps and an
    evaluation of a channels-last BatchNormalization against BatchNorm2d(convention="keras") loaded from it."""
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras was imported with the {keras.backend.backend()} backend")
    rng = np.random.default_rng(0)
    xs = [(rng.standard_normal((6, 5, 4, 3)) * s + o).astype("float32") for s, o in ((2, 1), (3, -1), (1, 0))]
    theirs = keras.layers.BatchNormalization()
    theirs.build((None, 5, 4, 3))
    theirs.set_weights([rng.uniform(0.5, 2, 3).astype("float32"), rng.standard_normal(3).astype("float32"),
                        rng.standard_normal(3).astype("float32"), rng.uniform(0.5, 2, 3).astype("float32")])
    names = ["gamma", "beta", "moving_mean", "moving_variance"]
    ours = nl.load_keras_batchnorm(nl.BatchNorm2d(3, convention="keras"), dict(zip(names, theirs.get_weights())))

    def both(x, training):
        ours.train(training)
        y = ours(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
        return keras.ops.convert_to_numpy(theirs(x, training=training)), y

    for x, training in zip(xs, (True, True, False)):
        expected, y = both(x, training)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(ours.running_mean.numpy(), theirs.get_weights()[2], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours.running_var.numpy(), theirs.get_weights()[3], rtol=1e-6, atol=1e-7)


def test_against_flax_itself():
    """Where Flax is installed: two training steps of flax.linen.BatchNorm (variables updated as its
    documentation shows, mutable=["batch_stats"]) and an evaluation, against BatchNorm2d(convention="flax")."""
    fnn = pytest.importorskip("flax.linen")
    import jax

    rng = np.random.default_rng(0)
    xs = [(rng.standard_normal((6, 5, 4, 3)) * s + o).astype("float32") for s, o in ((2, 1), (3, -1), (1, 0))]
    variables = {"params": {"scale": rng.uniform(0.5, 2, 3).astype("float32"),
                            "bias": rng.standard_normal(3).astype("float32")},
                 "batch_stats": {"mean": rng.standard_normal(3).astype("float32"),
                                 "var": rng.uniform(0.5, 2, 3).astype("float32")}}
    ours = nl.load_flax_batchnorm(nl.BatchNorm2d(3, convention="flax"), variables)
    variables = jax.tree_util.tree_map(jax.numpy.asarray, variables)
    nhwc = lambda y: y.permute(0, 2, 3, 1).detach().numpy()  # noqa: E731
    for x in xs[:2]:
        expected, updated = fnn.BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])
        variables = {"params": variables["params"], "batch_stats": updated["batch_stats"]}
        np.testing.assert_allclose(nhwc(ours(torch.from_numpy(x).permute(0, 3, 1, 2))), np.asarray(expected),
                                   rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(ours.running_mean.numpy(), np.asarray(variables["batch_stats"]["mean"]), atol=1e-6)
    np.testing.assert_allclose(ours.running_var.numpy(), np.asarray(variables["batch_stats"]["var"]), atol=1e-6)
    expected = fnn.BatchNorm(use_running_average=True).apply(variables, xs[2])
    np.testing.assert_allclose(nhwc(ours.eval()(torch.from_numpy(xs[2]).permute(0, 3, 1, 2))), np.asarray(expected),
                               rtol=1e-5, atol=2e-6)


def _every_kind(convention, momentum):
    """Each normlab layer kind with running statistics, as ``(layer, call)`` where ``call(layer, x)`` feeds
    it the (N, C) batch ``x`` in its own way (ghost: virtual batches of 2; masked: two extra padded rows)."""
    kw = dict(momentum=momentum, convention=convention)

    def padded(layer, x):
        xp = torch.cat([x, torch.full((2, x.shape[1]), 1e3, dtype=x.dtype)])
        mask = torch.arange(xp.shape[0]) < x.shape[0]
        return layer(xp, mask=mask)[: x.shape[0]]

    def sequence(layer, x):
        return padded(lambda xp, mask: layer(xp[None], mask=mask[None])[0], x)

    plain = lambda layer, x: layer(x)  # noqa: E731
    return {
        "BatchRenorm1d": (nl.BatchRenorm1d(2, warmup_steps=0, r_max_steps=0, d_max_steps=0, **kw), plain),
        "GhostBatchNorm1d": (nl.GhostBatchNorm1d(2, 2, **kw), plain),
        "BatchNorm1d mask=": (nl.BatchNorm1d(2, **kw), padded),
        "MaskedBatchNorm1d": (nl.MaskedBatchNorm1d(2, **kw), sequence),
        "SyncBatchNorm": (nl.SyncBatchNorm(2, **kw), plain),
    }


@pytest.mark.parametrize("convention, momentum", [("keras", 0.99), ("flax", 0.9)])
@pytest.mark.parametrize("kind", ["BatchRenorm1d", "GhostBatchNorm1d", "BatchNorm1d mask=", "MaskedBatchNorm1d",
                                  "SyncBatchNorm"])
def test_every_layer_kind_keeps_the_convention_s_running_statistics(kind, convention, momentum):
    """The running update of each kind reads momentum and stores the biased variance as the framework does:
    two steps give the hand-computed moving statistics (the kinds' batch statistics are the whole batch's)."""
    layer, call = _every_kind(convention, momentum)[kind]
    layer = layer.double()
    assert layer.eps == (1e-3 if convention == "keras" else 1e-5) and layer.momentum == pytest.approx(1 - momentum)
    nl.load_keras_batchnorm(layer, {"gamma": GAMMA, "beta": BETA, "moving_mean": MEAN0, "moving_variance": VAR0})
    for x in (X1, X2):
        call(layer, torch.from_numpy(x))
    mean, var, _ = _documented(momentum, layer.eps)
    np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-12)
    assert int(layer.num_batches_tracked) == 2


def test_every_layer_kind_takes_the_convention_s_defaults_and_keeps_explicit_values():
    for kind, (layer, _) in _every_kind("keras", 0.99).items():
        assert layer.convention == "keras", kind
    ghost = nl.GhostBatchNorm2d(4, 8, convention="keras")
    assert ghost.eps == 1e-3 and ghost.momentum == pytest.approx(0.01)
    renorm = nl.BatchRenorm2d(4, 1e-4, 0.9, convention="flax")
    assert renorm.eps == 1e-4 and renorm.momentum == pytest.approx(0.1)
    assert nl.GhostBatchNorm1d(4, 8).eps == 1e-5 and nl.SyncBatchNorm(4).momentum == 0.1
