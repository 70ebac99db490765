"""Mistakes of the kind PyTorch's tests and ErrorModuleInputs exercise, each raising the exception type torch raises:
on torch.nn, that type; on normlab, an instance of it (normlab's InputError is a ValueError and a
RuntimeError, its DTypeError a TypeError and a NotImplementedError), so code catching torch's exception
catches normlab's."""

from __future__ import annotations

import pytest
import torch

X = (4, 3, 5)

MISTAKES = {  # name: (call(impl, x), the type torch raises)
    "running_mean of the wrong size": (
        lambda i, x: i.F.batch_norm(x, torch.zeros(4), torch.ones(4), training=True), RuntimeError),
    "weight of the wrong size": (
        lambda i, x: i.F.batch_norm(x, torch.zeros(3), torch.ones(3), torch.ones(4), training=True), RuntimeError),
    "one value per channel in training": (
        lambda i, x: i.F.batch_norm(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=True), ValueError),
    "BatchNorm1d built for other channels": (lambda i, x: i.nn.BatchNorm1d(4)(x), RuntimeError),
    "BatchNorm2d given a 3-D input": (lambda i, x: i.nn.BatchNorm2d(3)(x), ValueError),
    "BatchNorm eps=0 in training": (lambda i, x: i.nn.BatchNorm1d(3, eps=0.0)(x), ValueError),
    "running_mean without running_var": (
        lambda i, x: i.F.batch_norm(x, torch.zeros(3), None, training=True), ValueError),
    "running_mean requiring grad": (
        lambda i, x: i.F.batch_norm(x, torch.zeros(3, requires_grad=True), torch.ones(3), training=True),
        RuntimeError),
    "group_norm groups not dividing channels": (lambda i, x: i.F.group_norm(x, 2), RuntimeError),
    "GroupNorm groups not dividing channels": (lambda i, x: i.nn.GroupNorm(2, 3), ValueError),
    "group_norm weight of the wrong size": (lambda i, x: i.F.group_norm(x, 3, torch.ones(4)), RuntimeError),
    "GroupNorm one value per group": (lambda i, x: i.nn.GroupNorm(10, 10)(torch.randn(1, 10, 1)), ValueError),
    "InstanceNorm channels with affine": (lambda i, x: i.nn.InstanceNorm1d(4, affine=True)(x), ValueError),
    "unbatched InstanceNorm channels": (
        lambda i, x: i.nn.InstanceNorm1d(4, affine=True)(torch.randn(3, 5)), ValueError),
    "InstanceNorm2d given a 1-D input": (lambda i, x: i.nn.InstanceNorm2d(3)(torch.randn(5)), ValueError),
    "InstanceNorm one spatial value in training": (
        lambda i, x: i.nn.InstanceNorm1d(3)(torch.randn(4, 3, 1)), ValueError),
    "instance_norm running_mean of the wrong size": (
        lambda i, x: i.F.instance_norm(x, torch.zeros(4), torch.ones(4)), RuntimeError),
    "LayerNorm(())": (lambda i, x: i.nn.LayerNorm(())(x), RuntimeError),
    "layer_norm shape not trailing": (lambda i, x: i.F.layer_norm(x, (4,)), RuntimeError),
    "layer_norm weight of the wrong shape": (lambda i, x: i.F.layer_norm(x, (5,), torch.ones(4)), RuntimeError),
    "integer input": (lambda i, x: i.nn.BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.long)), NotImplementedError),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_raises_torchs_exception_type(impl, mistake):
    call, expected = MISTAKES[mistake]
    with pytest.raises(expected):
        call(impl, torch.randn(X))


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_normlab_errors_also_keep_their_own_type(impl, mistake):
    """normlab's more specific types stay catchable as they always were (ValueError, TypeError)."""
    if impl.is_torch:
        return  # torch's types are checked above
    call, expected = MISTAKES[mistake]
    with pytest.raises(Exception) as info:
        call(impl, torch.randn(X))
    own = TypeError if expected is NotImplementedError else ValueError
    assert isinstance(info.value, own) and isinstance(info.value, expected)


def test_deliberately_different_outcomes(impl):
    """The differences listed in the README: torch.nn's outcome, and normlab's documented one."""
    x = torch.randn(X)
    if impl.is_torch:
        with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
            impl.F.batch_norm(x, None, None, training=False)
        with pytest.raises(IndexError):
            impl.F.batch_norm(torch.randn(3), None, None, training=True)
        impl.nn.BatchNorm1d(3, momentum=2.0)(x)
    else:
        torch.testing.assert_close(impl.F.batch_norm(x, None, None, training=False),
                                   torch.nn.functional.batch_norm(x, None, None, training=True))
        with pytest.raises(ValueError, match="at least 2 dimensions"):
            impl.F.batch_norm(torch.randn(3), None, None, training=True)
        with pytest.raises(ValueError, match="momentum"):
            impl.nn.BatchNorm1d(3, momentum=2.0)
