"""Shared fixtures: tiny seeded models and data (CPU, deterministic)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

# Tiny tensors gain nothing from intra-op threads, and on a loaded 2-core machine extra threads
# make the suite several times slower; one thread also keeps results reproducible.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_mlp(dtype: torch.dtype = torch.float32, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 5), act(), nn.Linear(5, 4), act(), nn.Linear(4, 3)).to(dtype)


def tiny_cnn(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    ).to(dtype)


def batches(model: nn.Module, n: int = 6, batch: int = 8, dtype=torch.float32, classes: int = 3):
    """Deterministic list of (x, y) minibatches matching the model's input."""
    g = torch.Generator().manual_seed(3)
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    shape = (first.in_features,) if isinstance(first, nn.Linear) else (first.in_channels, 6, 6)
    return [(torch.randn(batch, *shape, generator=g, dtype=dtype),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]
