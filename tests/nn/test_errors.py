"""Every bad input gets a clear error, and a call that raises changes no running statistic."""

import pytest
import torch

import normlab.functional as F
import normlab.nn as nl

# Every test here runs once per backend (tests/conftest.py), forced with NORMLAB_BACKEND.
pytestmark = pytest.mark.usefixtures("backend")


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_unchanged(m, before):
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a call that raised"


@pytest.mark.parametrize(
    "layer,x,match",
    [
        (nl.BatchNorm2d(3), torch.randn(4, 3, 5), r"expected a 4D input .* got a 3D input"),
        (nl.BatchNorm1d(3), torch.randn(4, 3, 5, 5), r"expected a 2D or 3D input"),
        (nl.BatchNorm3d(3), torch.randn(4, 3, 5, 5), r"expected a 5D input"),
        (nl.BatchNorm2d(3), torch.randn(4, 5, 6, 6), r"5 channels .* num_features=3"),
        (nl.BatchNorm1d(3), torch.randn(1, 3), r"more than 1 value .* eval mode"),
        (nl.BatchNorm2d(3), torch.randn(1, 3, 1, 1), r"GroupNorm"),
        (nl.InstanceNorm1d(3, affine=True), torch.randn(2, 4, 5), r"4 channels .* num_features=3"),
        (nl.InstanceNorm2d(3, track_running_stats=True), torch.randn(2, 3, 1, 1), r"more than 1 value"),
        (nl.InstanceNorm2d(3), torch.randn(3, 5), r"3D or 4D input"),
        (nl.GroupNorm(2, 4), torch.randn(2, 6, 3), r"num_channels=4"),
        (nl.GroupNorm(2, 4), torch.randn(4), r"at least 2 dimensions"),
        (nl.LayerNorm(8), torch.randn(2, 7), r"normalized_shape=\[8\] must match"),
    ],
)
def test_bad_shapes(layer, x, match):
    before = _state(layer)
    with pytest.raises(ValueError, match=match):
        layer(x)
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("layer", [nl.BatchNorm2d(2), nl.GroupNorm(1, 2), nl.LayerNorm(3),
                                   nl.InstanceNorm2d(2)])
def test_integer_and_bool_inputs(layer, dtype):
    x = torch.ones(2, 2, 3, 3).to(dtype)
    before = _state(layer)
    with pytest.raises(TypeError, match=r"floating-point .*\.float\(\)"):
        layer(x)
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
def test_bad_eps(eps):
    for make in (lambda: nl.BatchNorm2d(3, eps=eps), lambda: nl.LayerNorm(3, eps=eps),
                 lambda: nl.GroupNorm(1, 3, eps=eps), lambda: nl.InstanceNorm1d(3, eps=eps)):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            make()
    with pytest.raises(ValueError, match="eps"):
        F.batch_norm(torch.randn(4, 3), None, None, training=True, eps=eps)


def test_eps_zero_is_accepted_where_torch_accepts_it():
    """torch accepts eps=0 everywhere but in batch normalization with the batch's statistics."""
    x = torch.randn(4, 3, 5)
    for ours, theirs in ((nl.LayerNorm(5, eps=0.0), torch.nn.LayerNorm(5, eps=0.0)),
                         (nl.GroupNorm(3, 3, eps=0.0), torch.nn.GroupNorm(3, 3, eps=0.0)),
                         (nl.InstanceNorm1d(3, eps=0.0), torch.nn.InstanceNorm1d(3, eps=0.0)),
                         (nl.BatchNorm1d(3, eps=0.0).eval(), torch.nn.BatchNorm1d(3, eps=0.0).eval())):
        torch.testing.assert_close(ours(x), theirs(x))
    bn = nl.BatchNorm1d(3, eps=0.0)
    before = _state(bn)
    with pytest.raises(ValueError, match="eps must be positive during training"):
        bn(x)
    _assert_unchanged(bn, before)


def test_errors_are_instances_of_torchs_exception_types():
    """normlab's ValueErrors for what torch reports as RuntimeError are RuntimeErrors too."""
    x = torch.randn(4, 3, 5)
    for call in (lambda: F.batch_norm(x, torch.zeros(4), torch.ones(4), training=True),
                 lambda: F.group_norm(x, 2), lambda: F.layer_norm(x, (4,)), lambda: nl.LayerNorm(())(x),
                 lambda: nl.BatchNorm1d(4)(x)):
        with pytest.raises(RuntimeError):
            call()
        with pytest.raises(ValueError):
            call()
    with pytest.raises(NotImplementedError):
        nl.BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.long))


def test_group_norm_with_one_value_per_group_is_refused_like_torch():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nl.GroupNorm(10, 10)(torch.randn(1, 10, 1))


def test_unbatched_instance_norm_reports_the_users_shape():
    with pytest.raises(ValueError, match=r"dim 0 of shape \(3, 5\)"):
        nl.InstanceNorm1d(4, affine=True)(torch.randn(3, 5))


def test_layer_norm_of_no_dimensions_suggests_a_valid_shape():
    with pytest.raises(RuntimeError, match=r"at least one dimension.*LayerNorm\(\[5\]\)"):
        nl.LayerNorm(())(torch.randn(4, 5))


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan")])
def test_bad_momentum(momentum):
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\] or None"):
        nl.BatchNorm1d(3, momentum=momentum)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="momentum"):
        F.batch_norm(torch.randn(4, 3), rm, rv, training=True, momentum=momentum)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_momentum_changed_after_construction_is_checked_before_any_update():
    bn = nl.BatchNorm1d(3)
    bn(torch.randn(4, 3))
    before = _state(bn)
    bn.momentum = 2.0
    with pytest.raises(ValueError, match="momentum"):
        bn(torch.randn(4, 3))
    _assert_unchanged(bn, before)


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match=r"num_groups=3 does not divide the 4 channels.*\[1, 2, 4\]"):
        nl.GroupNorm(3, 4)
    with pytest.raises(ValueError, match="does not divide"):
        F.group_norm(torch.randn(2, 4, 3), 3)
    with pytest.raises(ValueError, match="positive integer"):
        F.group_norm(torch.randn(2, 4, 3), 0)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: F.batch_norm(torch.randn(4, 3), None, None, torch.ones(4), training=True),
         r"weight has shape \(4,\), but this input needs shape \(3,\)"),
        (lambda: F.batch_norm(torch.randn(4, 3), None, None, None, torch.ones(2, 3), training=True),
         r"bias has shape \(2, 3\)"),
        (lambda: F.layer_norm(torch.randn(2, 3, 4), (3, 4), torch.ones(4)), r"weight has shape \(4,\)"),
        (lambda: F.group_norm(torch.randn(2, 4, 3), 2, torch.ones(2)), r"weight has shape \(2,\)"),
        (lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=True),
         "given together"),
        (lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(2), torch.ones(2), training=True),
         r"running_mean has shape \(2,\)"),
        (lambda: F.batch_norm(torch.randn(4, 3), None, None, training=False) * 0
         + F.instance_norm(torch.randn(2, 3, 4), use_input_stats=False),
         "running_mean and running_var are needed"),
    ],
)
def test_bad_parameters(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_wrong_weight_shape_on_a_layer_changes_no_running_statistic():
    bn = nl.BatchNorm2d(3)
    bn.weight = torch.nn.Parameter(torch.ones(4))
    before = _state(bn)
    with pytest.raises(ValueError, match="weight has shape"):
        bn(torch.randn(4, 3, 2, 2))
    _assert_unchanged(bn, before)


def test_single_value_error_explains_why_and_what_to_do():
    with pytest.raises(ValueError) as info:
        nl.BatchNorm1d(5)(torch.randn(1, 5))
    message = str(info.value)
    assert message.startswith("BatchNorm1d: ")
    for phrase in ("variance is 0", "model.eval()", "larger batch", "GroupNorm"):
        assert phrase in message
    nl.BatchNorm1d(5).eval()(torch.randn(1, 5))  # eval mode is fine with one sample


def test_single_value_error_fits_the_layer_that_raised_it():
    """In eval mode without running statistics the advice is not "use eval mode"; where no running
    statistics are kept, no running variance is said to become inf."""
    with pytest.raises(ValueError) as info:
        nl.BatchNorm1d(5, track_running_stats=False).eval()(torch.randn(1, 5))
    message = str(info.value)
    assert "track_running_stats=False" in message and "model.eval()" not in message
    assert "running variance" not in message
    with pytest.raises(ValueError, match="track_running_stats=False"):
        nl.BatchNorm1d(5, track_running_stats=False)(torch.randn(1, 5))  # training: eval mode would not help
    with pytest.raises(ValueError) as info:
        nl.InstanceNorm1d(3)(torch.randn(2, 3, 1))
    assert "running variance" not in str(info.value) and "1x1 maps" in str(info.value)
    with pytest.raises(ValueError, match="running variance .* would become inf"):
        nl.InstanceNorm1d(3, track_running_stats=True)(torch.randn(2, 3, 1))


def test_numpy_scalars_are_accepted_where_torch_accepts_them():
    import numpy as np

    x = torch.randn(4, 4, 3, 3)
    pairs = [
        (nl.BatchNorm2d(4, eps=np.float32(1e-3), momentum=np.float64(0.2)),
         torch.nn.BatchNorm2d(4, eps=float(np.float32(1e-3)), momentum=0.2)),
        (nl.GroupNorm(np.int64(2), 4), torch.nn.GroupNorm(2, 4)),
        (nl.LayerNorm(np.int64(3)), torch.nn.LayerNorm(3)),
    ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(pairs[0][0].running_var, pairs[0][1].running_var)
    with pytest.raises(ValueError, match="eps must be"):
        nl.BatchNorm2d(4, eps=np.bool_(True))


def test_expanded_running_statistics_are_refused_before_any_update():
    rm, rv = torch.zeros(3), torch.ones(1).expand(3)
    with pytest.raises(ValueError, match="running_var is an expanded view"):
        F.batch_norm(torch.randn(4, 3), rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(3))


def test_running_statistics_that_require_grad_are_refused_not_silently_ignored():
    x = torch.randn(4, 3, requires_grad=True)
    for training in (False, True):
        rm, rv = torch.zeros(3, requires_grad=True), torch.ones(3, requires_grad=True)
        with pytest.raises(ValueError, match="running_mean requires grad"):
            F.batch_norm(x, rm, rv, training=training)
        with torch.no_grad():
            F.batch_norm(x, rm, rv, training=training)  # nothing to differentiate: fine
    F.batch_norm(x, rm.detach(), rv.detach(), training=False).sum().backward()
