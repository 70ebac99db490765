import copy

import pytest
import torch

from normlab.lab.models import build_model
from normlab.lab.probes import ProbeContext


@pytest.fixture
def context():
    """``context()``: a ProbeContext on a small BN CNN after a few training steps on random images."""

    def make(seed: int = 0) -> ProbeContext:
        torch.manual_seed(seed)
        model = build_model({"arch": "vgg", "widths": [4, 4, 8, 8], "pool_after": [1, 3], "norm": "bn"},
                            (1, 8, 8), 10, seed)
        x, y = torch.randn(96, 1, 8, 8), torch.randint(10, (96,))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for i in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[32 * i:32 * i + 32]), y[32 * i:32 * i + 32]).backward()
            opt.step()
        probe_x, probe_y = torch.randn(64, 1, 8, 8) * 0.3 + 0.1, torch.randint(10, (64,))
        return ProbeContext(model, x[:32], y[:32], torch.nn.functional.cross_entropy, 0.1, probe_x, probe_y,
                            lambda n: [(x[16 * i:16 * i + 16], y[16 * i:16 * i + 16]) for i in range(n)])

    return make


@pytest.fixture
def snapshot():
    """``unchanged = snapshot(model)``; later ``unchanged()`` is whether its state_dict is still the same."""

    def take(model):
        before = copy.deepcopy(model.state_dict())
        return lambda: all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    return take


@pytest.fixture
def decide():
    """``decide(exp, per_seed_runs)``: the experiment's check statuses and verdict over the seeds, decided from the
    paired CIs as a lab run decides them (:func:`normlab.lab.spec.combine_checks`)."""
    from normlab.lab.spec import combine_checks, verdict

    def run(exp, per_seed, suite: str = "quick"):
        budget = exp.budget(suite)
        checks = combine_checks([exp.evaluate(runs, budget)[1] for runs in per_seed])
        return [c["status"] for c in checks], verdict([c["status"] for c in checks]), checks

    return run


class Fabricated:
    """Fabricated per-seed results for the verdict tests."""

    JITTER = (0.0, 0.002, -0.002, 0.001, -0.001)
    """Seed-to-seed jitter of an arm, well below every margin: a difference built on it has a tight CI."""
    STRADDLE = (-0.02, 0.04, 0.0, 0.03, -0.01)
    """A paired difference whose 95% CI (about [−2, +4] points) straddles a 1-point margin."""

    @staticmethod
    def accuracy_run(acc: float, **series) -> dict:
        """A finished run whose evaluations all read test accuracy ``acc`` (and the given extra series)."""
        return {"diverged_at": None, "series": {"eval": {"step": [0, 1, 2], "test_acc": [acc] * 3}, **series}}


@pytest.fixture
def fab() -> type[Fabricated]:
    return Fabricated
