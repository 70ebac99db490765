import pytest
import torch

import normlab.nn as nl


def make_model():
    """A small CNN with two BatchNorm2d after convolutions and one after a ReLU (not foldable)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), nl.BatchNorm2d(8, momentum=None), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3), nl.BatchNorm2d(8, momentum=None), torch.nn.ReLU(),
        nl.BatchNorm2d(8, momentum=None),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 3),
    )


def make_batches(count, seed, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 3, 8, 8, generator=gen) * 2 + 1 + shift for _ in range(count)]


@pytest.fixture
def healthy():
    """make_model() trained (statistics only) on 40 batches of the data make_batches draws, in eval mode."""
    torch.manual_seed(0)
    model = make_model()
    with torch.no_grad():
        for x in make_batches(40, seed=1):
            model(x)
    return model.eval()
