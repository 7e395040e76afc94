"""IntegrationTimeController: the feedback step and the first-order baseline equal their formulas
(hand-computed in float64), schedule, clamp, validation, no host syncs, bitwise checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("torchdiffeq")

from ocnopt.ode import ConcatLinear, IntegrationTimeController, ODEBlock  # noqa: E402

D = torch.float64


class TanhField(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = ConcatLinear(2, 4)
        self.l2 = ConcatLinear(4, 2)

    def forward(self, t, x):
        return self.l2(t, torch.tanh(self.l1(t, x)))


def _block(t1: float = 1.0) -> ODEBlock:
    torch.manual_seed(0)
    return ODEBlock(TanhField(), t1=t1, learn_t1=True, method="euler",
                    options={"step_size": 0.25}).to(D)


def _sequence(n: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((), generator=g, dtype=D), torch.randn(size, generator=g, dtype=D))
            for _ in range(n)]


def test_feedback_step_equals_its_formula():
    block = _block(0.8)
    params = list(block.func.parameters())
    size = sum(p.numel() for p in params)
    lr, reg, mom = 0.1, 0.3, 0.9
    ctrl = IntegrationTimeController(block, lr=lr, reg=reg, momentum=mom, update_freq=3)
    q_t = q_tt = 0.0
    cross = [0.0] * size
    deltas = []
    for k, (g, p) in enumerate(_sequence(6, size)):
        grads = list(torch.split(p, [q.numel() for q in params]))
        grads = [gr.reshape(q.shape) for gr, q in zip(grads, params, strict=True)]
        t1 = float(block.t1)
        ctrl.observe(t1_grad=g, param_grads=grads, batch_size=7)
        gv = float(g)
        q_t = mom * q_t + (1 - mom) * (reg * t1 + gv)
        q_tt = mom * q_tt + (1 - mom) * (reg + 7 * gv * gv)
        cross = [mom * c + (1 - mom) * 7 * gv * float(pi) for c, pi in zip(cross, p, strict=True)]
        assert ctrl.due == ((k + 1) % 3 == 0)
        with torch.no_grad():  # the "optimizer step": a known parameter change
            for q in params:
                q.add_(0.01 * (k + 1))
        delta = ctrl.step()
        if not ctrl.due:
            assert delta is None and float(block.t1) == t1
            continue
        dtheta = 0.01 * (k + 1)  # every entry moved by the same amount
        want = -lr * (q_t + sum(c * dtheta for c in cross)) / q_tt
        assert float(delta) == pytest.approx(want, rel=1e-12)
        assert float(block.t1) == pytest.approx(max(0.1, t1 + want), rel=1e-12)
        deltas.append(want)
    assert len(deltas) == 2
    assert ctrl.step() is None  # a second call before the next observe() changes nothing
    d = torch.full((size,), 0.05, dtype=D)  # propose() alone, for an explicit dtheta
    want = -lr * (q_t + sum(c * 0.05 for c in cross)) / q_tt
    assert float(ctrl.propose(d)) == pytest.approx(want, rel=1e-12)


def test_gradient_baseline_equals_its_formula_and_t1_is_clamped():
    block = _block(0.3)
    lr, reg, mom = 0.5, 0.2, 0.5
    ctrl = IntegrationTimeController(block, mode="gradient", lr=lr, reg=reg, momentum=mom,
                                     update_freq=2, min_t1=0.25)
    avg = 0.0
    for k, (g, _) in enumerate(_sequence(4, 1, seed=3)):
        g = g.abs() + 0.5  # positive dL/dt1: t1 shrinks towards the clamp
        t1 = float(block.t1)
        ctrl.observe(t1_grad=g)
        avg = mom * avg + (1 - mom) * (float(g) + reg * t1)
        delta = ctrl.step()
        if (k + 1) % 2 == 0:
            want = -lr * avg / (1 - mom ** (k + 1))  # bias-corrected EMA
            assert float(delta) == pytest.approx(want, rel=1e-12)
            assert float(block.t1) == pytest.approx(max(0.25, t1 + want), rel=1e-12)
    assert float(block.t1) == 0.25


def test_observe_reads_dt1_after_backward_and_clears_it():
    block = _block(0.6)
    ctrl = IntegrationTimeController(block, update_freq=1)
    x = torch.randn(5, 2, dtype=D)
    loss = block(x).square().mean()
    loss.backward()
    g = block.t1_grad.clone()
    grads = [p.grad.clone() for p in block.func.parameters()]
    ctrl.observe()
    assert block.t1_grad is None
    reg, mom = ctrl.reg, ctrl.momentum
    torch.testing.assert_close(ctrl.q_t, (1 - mom) * (reg * 0.6 + g))
    torch.testing.assert_close(ctrl.q_tt, (1 - mom) * (reg + 5 * g * g))  # B = 5 of the call
    flat = torch.cat([gr.reshape(-1) for gr in grads])
    torch.testing.assert_close(ctrl.cross, (1 - mom) * 5 * g * flat)
    with pytest.raises(RuntimeError, match="not available"):
        ctrl.observe()


def test_observe_and_step_do_not_sync_with_the_host(monkeypatch):
    block = _block()
    ctrl = IntegrationTimeController(block, update_freq=1)
    block(torch.randn(3, 2, dtype=D)).sum().backward()

    def sync(*args, **kwargs):
        raise AssertionError("host sync in the t1 hot path")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    ctrl.observe()
    assert ctrl.step() is not None


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "adam"}, "mode"), ({"lr": 0.0}, "lr"), ({"lr": float("inf")}, "lr"),
    ({"reg": 0.0}, "reg"), ({"reg": -1.0, "mode": "gradient"}, "reg"),
    ({"momentum": 1.0}, "momentum"), ({"update_freq": 0}, "update_freq"),
    ({"update_freq": 2.0}, "update_freq"), ({"min_t1": 0.0}, "min_t1"),
])
def test_invalid_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=f"invalid {match}=.*allowed range"):
        IntegrationTimeController(_block(), **kwargs)
    with pytest.raises(ValueError, match="learn_t1=True"):
        IntegrationTimeController(ODEBlock(TanhField()))
    IntegrationTimeController(_block(), mode="gradient", reg=0.0)  # allowed for the baseline
    with pytest.raises(ValueError, match="batch_size"):
        IntegrationTimeController(_block()).observe(torch.ones((), dtype=D), batch_size=0)


def test_state_round_trips_bitwise():
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(6, 2, generator=g, dtype=D) for _ in range(8)]

    def run(batches, saved=None):
        block = _block(0.7)
        model = nn.Sequential(block, nn.Linear(2, 1)).to(D)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        ctrl = IntegrationTimeController(block, reg=1e-2, update_freq=3)
        if saved is not None:
            model_state, opt_state, ctrl_state = copy.deepcopy(saved)
            model.load_state_dict(model_state)
            opt.load_state_dict(opt_state)
            ctrl.load_state_dict(ctrl_state)
        for x in batches:
            opt.zero_grad()
            model(x).square().mean().backward()
            ctrl.observe()
            opt.step()
            ctrl.step()
        return model, opt, ctrl

    straight, _, ctrl_s = run(data)
    model, opt, ctrl = run(data[:4])
    resumed, _, ctrl_r = run(data[4:], (model.state_dict(), opt.state_dict(), ctrl.state_dict()))
    assert float(straight[0].t1) != 0.7  # t1 moved
    for (n, p), q in zip(straight.state_dict().items(), resumed.state_dict().values(),
                         strict=True):
        assert torch.equal(p, q), n
    for k, v in ctrl_s.state_dict().items():
        w = ctrl_r.state_dict()[k]
        assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, k
    bad = ctrl.state_dict() | {"momentum": 2.0}
    with pytest.raises(ValueError, match="momentum"):
        ctrl.load_state_dict(bad)
