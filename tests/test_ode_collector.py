"""ODEFactorCollector against the float64 oracle (direct trajectory + explicit VJPs on the same
grid), step clipping, accumulation over adjoint calls, gating, hook hygiene, O(1) memory."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("torchdiffeq")

from ocnopt.ode import (  # noqa: E402
    ConcatConv2d,
    ConcatLinear,
    ConcatSquashLinear,
    ODEBlock,
    ODEFactorCollector,
    ode_layers,
)
from ocnopt.ode.block import _ARMED, _CallField  # noqa: E402
from ocnopt.reference.ode import adjoint_factor_oracle  # noqa: E402

D = torch.float64


class TanhField(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = ConcatLinear(3, 5)
        self.l2 = ConcatLinear(5, 3)

    def forward(self, t, x):
        return self.l2(t, torch.tanh(self.l1(t, x)))


class ConvField(nn.Module):
    """SNOpt's image vector field in miniature: in-place ReLU between two ConcatConv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = ConcatConv2d(2, 3)
        self.relu = nn.ReLU(inplace=True)
        self.c2 = ConcatConv2d(3, 2)

    def forward(self, t, x):
        return self.c2(t, self.relu(self.c1(t, x)))


def _assert_match(factors, oracle, layers, rtol=1e-10):
    assert set(factors) == set(layers)
    for m in layers:
        torch.testing.assert_close(factors[m].A, oracle[m].A, rtol=rtol, atol=1e-14)
        torch.testing.assert_close(factors[m].G, oracle[m].G, rtol=rtol, atol=1e-14)
        assert factors[m].samples == oracle[m].samples
        assert float(factors[m].time) == pytest.approx(oracle[m].time, rel=1e-12)


@pytest.mark.parametrize("method", ["euler", "midpoint"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("field", ["linear", "conv"])
def test_factors_equal_the_oracle(method, reverse, field):
    torch.manual_seed(0)
    if field == "linear":
        f = TanhField().to(D)
        layers = [f.l1.linear, f.l2.linear]
        x = torch.randn(4, 3, dtype=D)
    else:
        f = ConvField().to(D)
        layers = [f.c1.conv, f.c2.conv]
        x = torch.randn(3, 2, 4, 4, dtype=D)
    target = torch.randn_like(x)
    t1, h = 0.95, 0.1  # the last step is clipped (0.95 is no multiple of 0.1)
    block = ODEBlock(f, t1=t1, method=method, options={"step_size": h}, reverse=reverse)
    with ODEFactorCollector(block) as col:
        (block(x) - target).square().mean().backward()
    span = (t1, 0.0) if reverse else (0.0, t1)
    oracle = adjoint_factor_oracle(lambda t, y: (f(t, y[0]),), layers, (x,), *span,
                                   lambda y: (y[0] - target).square().mean(), h, method)
    _assert_match(col.factors(), oracle, layers)
    fac = col.factors()[layers[0]]
    assert fac.batch_size == x.shape[0]
    assert fac.locations == (1.0 if field == "linear" else 16.0)
    assert col.calls == 1


def test_tuple_state_with_mask_and_time_hypernetworks_equal_the_oracle():
    """A CNF-like state (z, s) with ConcatSquashLinear (Linear(1, .) hyper-nets read only t)."""

    class Squash(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = ConcatSquashLinear(2, 4)
            self.b = ConcatSquashLinear(4, 2)

        def forward(self, t, state):
            z, s = state
            dz = self.b(t, torch.tanh(self.a(t, z)))
            return dz, (dz * z).sum(1, keepdim=True)

    torch.manual_seed(1)
    f = Squash().to(D)
    z, s = torch.randn(5, 2, dtype=D), torch.zeros(5, 1, dtype=D)
    mask = torch.tensor([True, True, False, True, False])
    layers = [m for m in f.modules() if isinstance(m, nn.Linear)]
    block = ODEBlock(f, method="euler", options={"step_size": 0.125})
    t = torch.tensor([0.0, 0.8], dtype=D)

    def loss(y):
        return y[0].square().mean() + y[1].mean()

    with ODEFactorCollector(block) as col:
        out = block.integrate((z, s), t, mask=mask)
        loss((out[0][-1], out[1][-1])).backward()
    oracle = adjoint_factor_oracle(f, layers, (z, s), 0.0, 0.8, loss, 0.125, "euler", mask)
    _assert_match(col.factors(), oracle, layers)
    assert col.factors()[f.a.gate].locations == 1.0  # a (1, 1) time input: one row


def test_statistics_accumulate_over_all_adjoint_calls():
    """Two solves in one backward (as an ODE-RNN makes): the pooled factors of both."""
    torch.manual_seed(2)
    f = TanhField().to(D)
    layers = [f.l1.linear, f.l2.linear]
    x1, x2 = torch.randn(4, 3, dtype=D), torch.randn(4, 3, dtype=D)
    b1 = ODEBlock(f, t1=0.5, method="euler", options={"step_size": 0.1})
    b2 = ODEBlock(f, t1=0.3, method="euler", options={"step_size": 0.1})
    with ODEFactorCollector(nn.ModuleList([b1, b2])) as col:
        (b1(x1).square().mean() + b2(x2).sin().mean()).backward()
    o1 = adjoint_factor_oracle(lambda t, y: (f(t, y[0]),), layers, (x1,), 0.0, 0.5,
                               lambda y: y[0].square().mean(), 0.1, "euler")
    o2 = adjoint_factor_oracle(lambda t, y: (f(t, y[0]),), layers, (x2,), 0.0, 0.3,
                               lambda y: y[0].sin().mean(), 0.1, "euler")
    assert col.calls == 2
    for m in layers:
        n1, n2 = o1[m].time * 4, o2[m].time * 4  # weighted row counts: W * B * L
        a = (n1 * o1[m].A + n2 * o2[m].A) / (n1 + n2)
        s = o1[m].G * n1 / o1[m].time ** 2 + o2[m].G * n2 / o2[m].time ** 2
        g = s * (o1[m].time + o2[m].time) ** 2 / (n1 + n2)
        fac = col.factors()[m]
        torch.testing.assert_close(fac.A, a, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(fac.G, g, rtol=1e-10, atol=1e-14)
        assert fac.samples == o1[m].samples + o2[m].samples == 8


def test_step_weight_clips_overshooting_steps_to_their_interval():
    f = TanhField().to(D)
    block = ODEBlock(f, method="dopri5")
    y0 = torch.zeros(2, 3, dtype=D)
    call = _CallField(block, torch.tensor([0.0, 0.4, 1.0], dtype=D), y0, None)

    def w(t0, dt):
        return float(call.step_weight(torch.tensor(t0, dtype=D), torch.tensor(dt, dtype=D)))

    assert w(1.0, 0.25) == 0.25  # inside (0.4, 1.0]
    assert w(0.5, 0.3) == pytest.approx(0.1)  # overshoots 0.4: clipped
    assert w(0.4, 0.7) == pytest.approx(0.4)  # second interval (0, 0.4], overshoots 0
    back = _CallField(block, torch.tensor([1.0, 0.0], dtype=D), y0, None)  # decreasing time
    assert back.reversed
    t0 = torch.tensor(-0.9, dtype=D)  # torchdiffeq's internal time is -t; adjoint runs up to 0
    assert float(back.step_weight(t0, torch.tensor(2.0, dtype=D))) == pytest.approx(0.1)
    assert float(back.original_time(t0)) == 0.9


def test_adaptive_solver_weights_sum_to_the_interval():
    torch.manual_seed(0)
    f = TanhField().to(D)
    block = ODEBlock(f, t1=0.7, rtol=1e-6, atol=1e-6)
    with ODEFactorCollector(block) as col:
        block(torch.randn(4, 3, dtype=D)).square().sum().backward()
    fac = col.factors()[f.l1.linear]
    assert fac.samples > 3
    assert float(fac.time) == pytest.approx(0.7, rel=1e-12)  # clipped accepted steps only


@pytest.mark.parametrize("reverse", [False, True])
def test_sample_dt_forces_dense_adjoint_samples(reverse):
    torch.manual_seed(0)
    f = TanhField().to(D)
    block = ODEBlock(f, t1=0.95, rtol=1e-3, atol=1e-3, reverse=reverse)
    x = torch.randn(4, 3, dtype=D)
    with ODEFactorCollector(block) as coarse:
        block(x).square().sum().backward()
    with ODEFactorCollector(block, sample_dt=0.1) as dense:
        block(x).square().sum().backward()
    n_coarse = coarse.factors()[f.l1.linear].samples
    fac = dense.factors()[f.l1.linear]
    assert n_coarse < 10 <= fac.samples  # steps forced at the multiples of 0.1 in [0, 0.95]
    assert float(fac.time) == pytest.approx(0.95, rel=1e-12)
    block(x).square().sum().backward()  # no collector: the adjoint keeps its own steps
    assert block.nfe_backward < 6 * 10
    with pytest.raises(ValueError, match="sample_dt"):
        ODEFactorCollector(block, sample_dt=0.0)


def test_collection_only_inside_the_block_and_hooks_are_removed():
    torch.manual_seed(0)
    f = ConvField().to(D)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1),
                          ODEBlock(f, method="euler", options={"step_size": 0.5})).to(D)
    x = torch.randn(2, 1, 4, 4, dtype=D)
    modules = list(model.modules())

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)

    model(x).sum().backward()  # not armed: nothing recorded, no hook
    col = ODEFactorCollector(model)
    assert hooks() == 0 and col.factors() == {} and not col.active
    with pytest.raises(RuntimeError, match="boom"), col:
        assert col.active and hooks() == 0  # module hooks only during its own evaluations
        raise RuntimeError("boom")
    assert not col.active and not _ARMED
    with ODEFactorCollector(model) as col, ODEFactorCollector(model) as other:
        with pytest.raises(RuntimeError, match="already active"), col:
            pass
        copy.deepcopy(model)(x).sum().backward()  # copies of the model are never armed
        assert col.factors() == {} and other.factors() == {}
        model(x).sum().backward()
        assert hooks() == 0
    assert hooks() == 0 and not _ARMED
    assert set(col.factors()) == {f.c1.conv, f.c2.conv}  # the stem conv is not an ODE layer
    for m, fac in col.factors().items():  # two active collectors sample independently
        assert torch.equal(fac.A, other.factors()[m].A)
        assert torch.equal(fac.G, other.factors()[m].G)
    model(x).sum().backward()  # after exit: the factors no longer change
    assert all(fac.samples == 2 for fac in col.factors().values())
    col.reset()
    assert col.factors() == {} and col.calls == 0


def test_ode_layers_lists_supported_and_skipped_modules():
    f = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, groups=2), nn.Linear(2, 2))
    model = nn.Sequential(nn.Linear(2, 2), ODEBlock(f))
    layers, skipped = ode_layers(model)
    assert [lay.name for lay in layers.values()] == ["1.func.1"]
    assert len(skipped) == 1 and "groups=2" in skipped[0]
    with pytest.raises(ValueError, match="not supported layers"):
        ODEFactorCollector(model, layers=[model[0]])
    with pytest.raises(ValueError, match="no adjoint step callback"):
        ODEFactorCollector(ODEBlock(f, method="scipy_solver"))


def _live_tensors() -> tuple[int, int]:
    """Number of live tensors and bytes of their distinct storages."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on deprecated torch aliases warns
        warnings.simplefilter("ignore", FutureWarning)
        live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    storages, count = {}, 0
    for t in live:
        try:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except RuntimeError:  # fake tensors left behind by torch.compile in another test
            continue
        count += 1
    return count, sum(storages.values())


class _Probe(ODEFactorCollector):
    """Live tensors / storage bytes at every adjoint sample."""

    def __enter__(self):
        self.trace: list[tuple[int, int]] = []
        return super().__enter__()

    def _sample(self, *args):
        super()._sample(*args)
        self.trace.append(_live_tensors())

    def growth(self) -> tuple[int, int]:
        """Peak above the first sample (the first accumulators exist from then on)."""
        n0, b0 = self.trace[0]
        return max(n for n, _ in self.trace) - n0, max(b for _, b in self.trace) - b0


def test_memory_does_not_grow_with_the_number_of_solver_steps():
    growth, samples, retained = [], [], []
    for tol in (1e-4, 1e-10):
        torch.manual_seed(0)
        f = TanhField().to(D)
        block = ODEBlock(f, rtol=tol, atol=tol)
        x = torch.randn(4, 3, dtype=D)
        with _Probe(block) as col:
            block(x).square().sum().backward()
        growth.append(col.growth())
        samples.append(len(col.trace))
        retained.append(col.retained_bytes())
    assert samples[1] >= 4 * samples[0]
    assert growth[1] == growth[0]  # live tensors and bytes: same peak with 4x the steps
    # accumulators only: A, G of Linear(4, 5) and Linear(6, 3) (bias column) + 3 scalars each
    assert retained[0] == retained[1] == (25 + 25 + 49 + 9 + 6) * 8
