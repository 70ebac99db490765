"""PyTorch's test/test_modules.py over the normalization ModuleInfos, ported: module inputs in the style of
torch.testing._internal.common_modules (constructor arguments, input shapes, train and eval), checked
on torch.nn's classes and on normlab's."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

DT = torch.float64

# (class name, constructor args, constructor kwargs, input shape)
MODULE_INPUTS = [
    ("BatchNorm1d", (4,), {}, (3, 4)),
    ("BatchNorm1d", (4,), {"eps": 1e-3, "momentum": 0.3, "affine": False}, (3, 4, 2)),
    ("BatchNorm1d", (4,), {"eps": 1e-3, "momentum": 0.3, "affine": True, "track_running_stats": False}, (3, 4)),
    ("BatchNorm1d", (4,), {}, (0, 4, 3)),
    ("BatchNorm2d", (3,), {}, (2, 3, 3, 2)),
    ("BatchNorm2d", (3,), {"momentum": None}, (2, 3, 3, 2)),
    ("BatchNorm2d", (3,), {"affine": False, "track_running_stats": False}, (2, 3, 2, 2)),
    ("BatchNorm3d", (3,), {}, (2, 3, 2, 2, 2)),
    ("InstanceNorm1d", (3,), {"affine": True, "track_running_stats": True}, (2, 3, 5)),
    ("InstanceNorm1d", (3,), {"affine": True}, (3, 5)),  # no batch dimension
    ("InstanceNorm2d", (3,), {"affine": True, "track_running_stats": True}, (2, 3, 3, 2)),
    ("InstanceNorm3d", (3,), {"eps": 1e-3, "momentum": 0.3, "affine": True}, (2, 3, 2, 2, 2)),
    ("LayerNorm", ([5],), {"eps": 1e-3}, (4, 5)),
    ("LayerNorm", ([2, 5],), {"eps": 1e-3}, (3, 2, 5)),
    ("LayerNorm", ([5],), {"bias": False}, (2, 5)),
    ("LayerNorm", ([2, 3],), {}, (2, 3)),  # the whole input
    ("GroupNorm", (3, 6), {"eps": 1e-3}, (2, 6, 4)),
    ("GroupNorm", (6, 6), {}, (2, 6, 3)),
]
IDS = [f"{name}{list(args)}{kwargs}{list(shape)}" for name, args, kwargs, shape in MODULE_INPUTS]
TRAIN_AND_EVAL_DIFFER = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d",
                         "InstanceNorm3d"}


def _build(impl, case, dtype=DT, seed=0):
    name, args, kwargs, shape = case
    torch.manual_seed(seed)
    module = getattr(impl.nn, name)(*args, **kwargs).to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
        for buffer_name, b in module.named_buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5)
    return module, torch.randn(shape, dtype=dtype)


@pytest.fixture(params=MODULE_INPUTS, ids=IDS)
def case(request):
    return request.param


@pytest.mark.parametrize("training", [True, False])
def test_forward(impl, case, training):
    """Output dtype and values against torch.nn's class in float64 (the reference), state included."""
    module, x = _build(impl, case, torch.float32)
    reference, _ = _build(impl, case)
    reference = getattr(torch.nn, case[0])(*case[1], **case[2]).to(DT)
    reference.load_state_dict(module.state_dict())
    module.train(training)
    reference.train(training)
    out, expected = module(x), reference(x.to(DT))
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out.to(DT), expected, rtol=1e-4, atol=1e-5)
    for (name, ours), (_, theirs) in zip(module.state_dict().items(), reference.state_dict().items()):
        if name == "num_batches_tracked" and x.numel() == 0:
            # Deliberate difference: normlab does not count an empty batch (torch.nn does).
            assert ours.item() == theirs.item() - (1 if impl.is_normlab and training else 0)
            continue
        torch.testing.assert_close(ours.to(theirs.dtype), theirs, rtol=1e-4, atol=1e-5)


def _functional(module):
    names = [n for n, p in module.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x,))

    return fn, [p.detach().clone().requires_grad_(True) for p in module.parameters()]


@pytest.mark.parametrize("training", [True, False])
def test_grad(impl, case, training):
    module, x = _build(impl, case)
    module.train(training)
    fn, params = _functional(module)
    assert impl.gradcheck(fn, (x.requires_grad_(True), *params))


@pytest.mark.parametrize("training", [True, False])
def test_gradgrad(impl, case, training):
    module, x = _build(impl, case)
    if x.numel() == 0:
        return  # no output to differentiate twice: the first-order checks cover the empty batch
    module.train(training)
    fn, params = _functional(module)
    assert impl.gradgradcheck(fn, (x.requires_grad_(True), *params))


@pytest.mark.parametrize("training", [True, False])
def test_forward_ad(impl, case, training):
    module, x = _build(impl, case)
    module.train(training)
    fn, params = _functional(module)
    assert impl.gradcheck(fn, (x.requires_grad_(True), *params), check_forward_ad=True, check_backward_ad=False,
                          check_batched_grad=False, check_undefined_grad=False)


def test_non_contiguous_tensors(impl, case):
    module, x = _build(impl, case)
    twin = copy.deepcopy(module)
    strided = x.transpose(0, -1).contiguous().transpose(0, -1)
    assert not strided.is_contiguous() or x.numel() <= 1 or 1 in x.shape
    a, b = x.clone().requires_grad_(True), strided.clone().requires_grad_(True)
    ya, yb = module(a), twin(b)
    torch.testing.assert_close(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g.transpose(0, -1).contiguous().transpose(0, -1))
    torch.testing.assert_close(a.grad, b.grad)
    for pa, pb in zip(module.parameters(), twin.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


@pytest.mark.parametrize("case", [c for c in MODULE_INPUTS if len(c[3]) == 4],
                         ids=[i for c, i in zip(MODULE_INPUTS, IDS) if len(c[3]) == 4])
def test_memory_format(impl, case):
    module, x = _build(impl, case)
    twin = copy.deepcopy(module)
    out = module(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, twin(x))


def test_if_train_and_eval_modes_differ(impl, case):
    module, x = _build(impl, case)
    if x.numel() == 0:
        return  # an empty output is the same in both modes
    train_out = module.train()(x)
    eval_out = module.eval()(x)
    uses_running = getattr(module, "track_running_stats", False)
    if case[0] not in TRAIN_AND_EVAL_DIFFER or not uses_running:
        torch.testing.assert_close(train_out, eval_out)
    else:
        assert not torch.allclose(train_out, eval_out)


def test_pickle_and_save_load(impl, case):
    module, x = _build(impl, case)
    module.eval()
    clone = pickle.loads(pickle.dumps(module))
    assert type(clone) is type(module)
    torch.testing.assert_close(clone(x), module(x))
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh, _ = _build(impl, case, seed=1)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh.eval()(x), module(x))


def test_repr(impl, case):
    module, _ = _build(impl, case)
    theirs = getattr(torch.nn, case[0])(*case[1], **case[2])
    assert repr(module) == repr(theirs)


def test_factory_kwargs(impl, case):
    name, args, kwargs, _ = case
    module = getattr(impl.nn, name)(*args, **kwargs, device="cpu", dtype=DT)
    for p in module.parameters():
        assert p.dtype == DT
    for buffer_name, b in module.named_buffers():
        assert b.dtype == (torch.long if buffer_name == "num_batches_tracked" else DT)


def _per_example(case) -> bool:
    """Cases a per-example gradient is defined for: examples and parameters, and statistics that do not
    come from the batch in eval mode (a BatchNorm without running statistics needs the whole batch)."""
    name, args, kwargs, shape = case
    affine = kwargs.get("affine", name.startswith(("BatchNorm", "GroupNorm"))) and kwargs.get(
        "elementwise_affine", True)
    batch_stats = name.startswith("BatchNorm") and not kwargs.get("track_running_stats", True)
    return shape[0] > 0 and len(shape) > 2 and affine and not batch_stats


@pytest.mark.parametrize("case", [c for c in MODULE_INPUTS if _per_example(c)],
                         ids=[i for c, i in zip(MODULE_INPUTS, IDS) if _per_example(c)])
def test_per_sample_grads_with_torch_func(impl, case):
    """vmap(grad(functional_call)) gives each example's parameter gradients, as a loop does (eval mode:
    a batch norm's running statistics cannot be updated per example, see test_torch_ops)."""
    module, x = _build(impl, case)
    module.eval()
    params = {n: p.detach() for n, p in module.named_parameters()}

    def loss(p, example):
        return torch.func.functional_call(module, p, (example.unsqueeze(0),)).pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        single = torch.func.grad(loss)(params, x[i])
        for n in params:
            torch.testing.assert_close(per_sample[n][i], single[n])
