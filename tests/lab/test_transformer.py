"""The sequence experiment's model (normlab.lab.transformer) and the batch-statistics probe."""

import pytest
import torch

from normlab.lab.measure import LossFn  # noqa: F401  (the probe context's loss type)
from normlab.lab.probes import PROBES, ProbeContext
from normlab.lab.transformer import RowSequences, SequenceClassifier


def test_row_sequences_crop_pad_and_mask():
    torch.manual_seed(0)
    images = torch.rand(16, 1, 28, 28) + 0.1
    crop = RowSequences(8)
    seq, mask = crop(images)
    lengths = mask.sum(1)
    assert seq.shape == (16, 28, 28) and (lengths >= 8).all() and (lengths <= 28).all()
    assert (seq[~mask] == 0).all() and (seq[mask] != 0).all()
    assert (mask[:, 0]).all() and (mask.int().diff(dim=1) <= 0).all()  # the real rows first
    crop.eval()
    again = crop(images)
    assert torch.equal(crop(images)[0], again[0])  # a fixed crop per image in eval


@pytest.mark.parametrize("norm", ["ln", "bn", "masked-bn", "renorm:warmup=0,rsteps=0,dsteps=0"])
def test_classifier_trains_a_step_with_every_norm(norm):
    torch.manual_seed(0)
    model = SequenceClassifier(28, 28, 10, 16, 1, 2, norm, 8)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    model.eval()
    assert model(x).shape == (8, 10)


def test_batch_stats_probe_reads_the_layers_batch_statistics_and_restores_everything():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), __import__("normlab").nn.BatchNorm1d(3))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model[1].running_var.copy_(torch.tensor([2.0, 0.5, 1.0]))
    x = torch.randn(32, 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    ctx = ProbeContext(model, x, None, None, 0.1, x, None, lambda n: [])
    out = PROBES["batch_stats"]({"kind": "batch_stats"}, ctx)
    h = model[0](x).detach().double()
    rm, rv = model[1].running_mean.double(), model[1].running_var.double()
    expected_mean = ((h.mean(0) - rm).abs() / rv.sqrt()).mean().item()
    expected_var = ((h.var(0) / rv - 1).abs()).mean().item()
    assert out["mean_dev"] == [pytest.approx(expected_mean, rel=1e-5)]
    assert out["var_dev"] == [pytest.approx(expected_var, rel=1e-4)]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(torch.random.get_rng_state(), rng)
