"""Neural-ODE benchmark models and offline data: shapes, ODE-RNN variable-length semantics, the
CNF log-density against a closed form, loaders."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("torchdiffeq")

from ocnopt.bench.ode_data import (  # noqa: E402
    DENSITIES,
    load_density,
    load_timeseries,
    sample_density2d,
)
from ocnopt.bench.ode_models import (  # noqa: E402
    CNF,
    ConvODENet,
    ODERNNClassifier,
    standard_normal_logprob,
)
from ocnopt.ode import ode_layers  # noqa: E402

D = torch.float64


def test_conv_ode_net_shapes_and_ode_layers():
    torch.manual_seed(0)
    model = ConvODENet(width=8, method="euler", options={"step_size": 0.5})
    x = torch.randn(2, 1, 28, 28)
    assert model.stem(x).shape == (2, 8, 6, 6)  # SNOpt's 6x6 feature map
    assert model(x).shape == (2, 10)
    layers, skipped = ode_layers(model)
    assert [lay.name for lay in layers.values()] == ["ode.func.conv1.conv", "ode.func.conv2.conv"]
    assert skipped == []
    assert layers[model.ode.func.conv1.conv].module.in_channels == 9  # + the time channel


def _sequences(lengths: list[int], channels: int = 3, total: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), total, channels + 1, generator=g, dtype=D)
    for i, n in enumerate(lengths):
        x[i, :, -1] = (torch.arange(total) < n).to(D)
    return x


def _rnn() -> ODERNNClassifier:
    torch.manual_seed(0)
    return ODERNNClassifier(3, 4, hidden=5, dt=0.5, method="euler",
                            options={"step_size": 0.25}).to(D)


def test_ode_rnn_evolves_each_sequence_only_over_its_own_observations():
    model = _rnn()
    x = _sequences([3, 8, 5])
    out = model(x)
    for i, n in enumerate([3, 8, 5]):  # alone and cut to its own length: the same logits
        alone = model(x[i:i + 1, :n])
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-12, atol=1e-12)
    padded = x.clone()
    padded[0, 3:, :-1] = 1e3  # values at padded steps are ignored
    torch.testing.assert_close(model(padded), out, rtol=0, atol=0)


def test_ode_rnn_handles_missing_observations_between_the_ends():
    model = _rnn()
    x = _sequences([6])
    gap = x.clone()
    gap[0, 2, -1] = 0.0  # step 2 missing: the GRU skips it, the ODE bridges [0.5, 1.5]
    ref = x[:, [0, 1, 3, 4, 5]].clone()
    times = [0, 1, 3, 4, 5]

    # reference: explicit ODE-RNN loop over the observed times
    h = torch.zeros(1, 5, dtype=D)
    prev = 0
    for k, tk in enumerate(times):
        if tk > 0:
            t = torch.tensor([prev * 0.5, tk * 0.5], dtype=D)
            h = model.ode.integrate(h, t)[-1]
        h = model.cell(ref[:, k, :-1], h)
        prev = tk
    torch.testing.assert_close(model(gap), model.out(h), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_cnf_log_density_of_a_linear_flow_matches_the_closed_form(trace):
    class Linear(nn.Module):
        def __init__(self, m: torch.Tensor) -> None:
            super().__init__()
            self.m = nn.Parameter(m)

        def forward(self, t, z):
            return z @ self.m.t()

    # Hutchinson is exact for a diagonal Jacobian (e^T M e = tr M for Rademacher e)
    m = torch.tensor([[0.3, 0.0], [0.0, -0.5]], dtype=D) if trace == "hutchinson" else \
        torch.tensor([[0.3, 0.4], [-0.2, -0.5]], dtype=D)
    cnf = CNF(2, trace=trace, net=Linear(m), t1=0.8, rtol=1e-10, atol=1e-10)
    x = torch.randn(6, 2, dtype=D)
    z0 = x @ torch.linalg.matrix_exp(-0.8 * m).t()
    expected = standard_normal_logprob(z0) - 0.8 * torch.trace(m)
    torch.testing.assert_close(cnf(x), expected, rtol=1e-7, atol=1e-8)
    (-cnf(x).mean()).backward()  # the adjoint through the trace estimator runs
    assert cnf.dynamics.net.m.grad is not None


def test_standard_normal_logprob():
    z = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=D)
    want = torch.tensor([-math.log(2 * math.pi), -2.5 - math.log(2 * math.pi)], dtype=D)
    torch.testing.assert_close(standard_normal_logprob(z), want)


def test_time_series_loaders(monkeypatch):
    pytest.importorskip("sktime")

    def offline(*args, **kwargs):
        raise AssertionError("a loader tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", offline)
    jv = load_timeseries("japanese-vowels")
    assert jv.sizes == (216, 54, 370) and jv.input_shape == (29, 13) and jv.num_classes == 9
    x = torch.cat([jv.train.tensors[0], jv.val.tensors[0], jv.test.tensors[0]])
    obs = x[..., -1]
    lengths = obs.sum(1)
    assert int(lengths.min()) == 7 and int(lengths.max()) == 29
    assert bool((obs == (torch.arange(29) < lengths[:, None]).float()).all())  # prefixes
    assert bool((x[..., :-1][obs == 0] == 0).all())  # padding holds no values
    train = jv.train.tensors[0]
    vals = train[..., :-1][train[..., -1] == 1]
    mean = vals.mean(0)
    assert float(mean.abs().max()) < 0.05  # train split ~ standardised (val excluded)
    bm = load_timeseries("basic-motions")
    assert bm.sizes == (32, 8, 40) and bm.input_shape == (100, 7) and bm.num_classes == 4
    dropped = load_timeseries("basic-motions", drop=0.3).train.tensors[0][..., -1].mean()
    assert 0.65 < float(dropped) < 0.75
    with pytest.raises(ValueError, match="drop"):
        load_timeseries("basic-motions", drop=1.0)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_timeseries("nope")


def test_density_sets():
    for name in DENSITIES:
        a, b = load_density(name, n_train=50, n_val=20, n_test=30), load_density(name)
        assert torch.equal(a.train.tensors[0][:10], load_density(name, n_train=50, n_val=20,
                                                                  n_test=30).train.tensors[0][:10])
        if name == "breast-cancer":
            assert a.sizes == (343, 113, 113) and a.input_shape == (30,)
            x = b.train.tensors[0].double()
            torch.testing.assert_close(x.mean(0), torch.zeros(30, dtype=D), atol=1e-5, rtol=0)
        else:
            assert a.sizes == (50, 20, 30) and a.input_shape == (2,)
            assert not torch.equal(a.train.tensors[0][:20], a.val.tensors[0])
    board = sample_density2d("checkerboard", 2000, seed=0)
    assert (np.floor(board / 2).sum(1) % 2 == 0).all()  # only the "black" cells
    with pytest.raises(ValueError, match="n_train"):
        load_density("moons", n_train=0)
