"""stat_guard: a training step's running-statistics updates are kept when the optimizer steps and restored
exactly when it does not, with a real GradScaler forced to skip (inf gradients)."""

import pytest
import torch

import normlab
import normlab.nn as nl
from normlab.nn.transaction import running_buffers

NORMS = {
    "torch.nn.BatchNorm2d": lambda: torch.nn.BatchNorm2d(4),
    "BatchNorm2d": lambda: nl.BatchNorm2d(4),
    "BatchNorm2d momentum=None": lambda: nl.BatchNorm2d(4, momentum=None),
    "BatchNormReLU2d": lambda: nl.BatchNormReLU2d(4),
    "InstanceNorm2d": lambda: nl.InstanceNorm2d(4, affine=True, track_running_stats=True),
    "torch.nn.InstanceNorm2d": lambda: torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
    "LpBatchNorm2d": lambda: nl.LpBatchNorm2d(4, p=1),
    "BatchRenorm2d": lambda: nl.BatchRenorm2d(4, warmup_steps=0, r_max_steps=0, d_max_steps=0),
    "BatchRenorm2d warm-up schedule": lambda: nl.BatchRenorm2d(4, warmup_steps=1, r_max_steps=3, d_max_steps=3),
    "GhostBatchNorm2d": lambda: nl.GhostBatchNorm2d(4, virtual_batch_size=3),
    "BatchNorm2d mask=": lambda: _Masked2d(4),
    "MaskedBatchNorm1d": lambda: _Sequence(4),
    "SyncBatchNorm": lambda: nl.SyncBatchNorm(4),
}


def _pad_mask(x):
    """(N, H, W): the last row of every map is padding."""
    mask = torch.ones(x.shape[0], *x.shape[2:], dtype=torch.bool)
    mask[:, -1] = False
    return mask


class _Masked2d(nl.BatchNorm2d):
    def forward(self, x):
        return super().forward(x, mask=_pad_mask(x))


class _Sequence(nl.MaskedBatchNorm1d):
    """(N, C, H, W) maps read as sequences of H·W tokens (N, L, C), the last row's tokens padded."""

    def forward(self, x):
        n, c, h, w = x.shape
        y = super().forward(x.flatten(2).transpose(1, 2), mask=_pad_mask(x).flatten(1))
        return y.transpose(1, 2).reshape(n, c, h, w)


def _model(norm):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), NORMS[norm](), torch.nn.Flatten(), torch.nn.Linear(64, 1))


def _state(model):
    return [b.clone() for b in running_buffers(model)]


def _step(model, opt, scaler, x, poison):
    with normlab.stat_guard(model, opt) as guard:
        loss = model(x).square().mean()
        scaler.scale(loss).backward()
        if poison:  # an overflowed gradient, as fp16 training produces
            model[0].weight.grad[0, 0, 0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return guard


@pytest.mark.parametrize("norm", NORMS)
def test_a_skipped_amp_step_restores_the_statistics_exactly(norm):
    model = _model(norm)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(8, 3, 6, 6)
    assert _step(model, opt, scaler, x, poison=False).committed
    before, weights = _state(model), [p.clone() for p in model.parameters()]
    guard = _step(model, opt, scaler, x + 1, poison=True)
    assert not guard.committed
    assert scaler.get_scale() == 2.0**9  # the scaler did skip: it backed off
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    after = _state(model)
    assert len(after) >= 2 and all(torch.equal(a, b) for a, b in zip(after, before))
    assert _step(model, opt, scaler, x + 1, poison=False).committed
    assert not all(torch.equal(a, b) for a, b in zip(_state(model), before))


def test_a_committed_step_keeps_what_an_unguarded_step_gives():
    guarded, plain = _model("BatchNorm2d"), _model("BatchNorm2d")
    x = torch.randn(8, 3, 6, 6)
    for model, wrap in ((guarded, True), (plain, False)):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        if wrap:
            with normlab.stat_guard(model, opt):
                model(x).sum().backward()
                opt.step()
        else:
            model(x).sum().backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(_state(guarded), _state(plain)))


def test_any_optimizer_counts_without_one_given_and_an_exception_rolls_back():
    model = _model("BatchNorm2d")
    x = torch.randn(8, 3, 6, 6)
    model(x)
    other = torch.optim.SGD(model.parameters(), lr=0.0)
    before = _state(model)
    with normlab.stat_guard(model) as guard:
        model(x)
        other.step()
    assert guard.committed and int(model[1].num_batches_tracked) == 2
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"), normlab.stat_guard(model):
        model(x)
        other.step()
        raise RuntimeError("boom")
    assert all(torch.equal(a, b) for a, b in zip(_state(model), before))


def test_as_a_decorator_each_call_is_one_transaction():
    model = _model("BatchNorm2d")
    x = torch.randn(8, 3, 6, 6)
    model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    @normlab.stat_guard(model, opt)
    def step(stepping):
        model(x)
        if stepping:
            opt.step()

    step(True)
    step(False)
    step(True)
    assert int(model[1].num_batches_tracked) == 3
