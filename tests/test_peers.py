"""Tests of the external second-order peers (ocnopt.bench.peers), skipped without the extra."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocnopt.bench.optimizers import OPTIMIZERS, available_optimizers, get_optimizer, train_step

_PEERS = {"soap": "pytorch_optimizer", "shampoo": "pytorch_optimizer", "singd": "singd"}


def _mlp() -> nn.Sequential:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def test_registry_lists_the_peers() -> None:
    avail = available_optimizers()
    for name, module in _PEERS.items():
        spec = OPTIMIZERS[name]
        assert spec.family == "peer" and spec.mode == "backward"
        assert spec.requires == (module,)
        assert len(spec.lr_grid) >= 3
        assert name in avail


@pytest.mark.parametrize("name", sorted(_PEERS))
def test_peer_trains_a_tiny_mlp(name: str) -> None:
    pytest.importorskip(_PEERS[name], reason=f"{name} needs {_PEERS[name]} "
                        "(pip install 'ocnopt[peers]')")
    spec = get_optimizer(name)
    assert spec.available() == (True, "")
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(32, 20, generator=g), torch.randint(0, 4, (32,), generator=g)
    model = _mlp()
    opt = spec.build(model, lr=spec.lr_grid[-1])
    losses = [train_step(opt, spec, model, x, y, F.cross_entropy).item() for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


def test_missing_package_shows_as_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "singd" else real(n, *a))
    ok, why = OPTIMIZERS["singd"].available()
    assert not ok and "singd" in why
