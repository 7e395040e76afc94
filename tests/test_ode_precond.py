"""SNOptPreconditioner: EKFAC on adjoint-collected factors equals a dense float64 EKFAC on the
oracle's factors; schedule, validation, checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("torchdiffeq")

from ocnopt.ode import ConcatLinear, ODEBlock, SNOptPreconditioner  # noqa: E402
from ocnopt.reference.ode import adjoint_factor_oracle, dense_ekfac_direction  # noqa: E402

D = torch.float64


class TanhField(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = ConcatLinear(3, 6)
        self.l2 = ConcatLinear(6, 3)

    def forward(self, t, x):
        return self.l2(t, torch.tanh(self.l1(t, x)))


def _model(seed: int = 0) -> tuple[nn.Sequential, TanhField]:
    torch.manual_seed(seed)
    f = TanhField()
    model = nn.Sequential(nn.Linear(2, 3), ODEBlock(f, t1=0.9, method="euler",
                                                     options={"step_size": 0.2}),
                          nn.Linear(3, 2)).to(D)
    return model, f


def _matrix(lin: nn.Linear) -> torch.Tensor:
    return torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)


def test_preconditioned_gradients_equal_dense_ekfac_on_the_oracle_factors():
    model, f = _model()
    layers = [f.l1.linear, f.l2.linear]
    pre = SNOptPreconditioner(model, damping=0.05, update_freq=3, eigenvalue_decay=0.75)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 2, generator=g, dtype=D), torch.randint(0, 2, (8,), generator=g))
               for _ in range(2)]
    m2 = {}
    for step, (x, y) in enumerate(batches):
        model.zero_grad()
        with pre.collect():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        if step == 0:  # the oracle's factors: same grid, direct trajectory, explicit VJPs
            h0 = model[0](x).detach()

            def head_loss(state, y=y):
                return nn.functional.cross_entropy(model[2](state[0]), y)

            oracle = adjoint_factor_oracle(lambda t, s: (f(t, s[0]),), layers, (h0,), 0.0, 0.9,
                                           head_loss, 0.2, "euler")
        raw = {m: _matrix(m).clone() for m in layers}
        outside = model[0].weight.grad.clone()
        pre.step()
        for m in layers:
            want, m2[m] = dense_ekfac_direction(raw[m], oracle[m].A, oracle[m].G, 1.0, 8, 0.05,
                                                0.75, m2.get(m))
            torch.testing.assert_close(_matrix(m), want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(model[0].weight.grad, outside, rtol=0, atol=0)  # untouched
    assert pre.steps == 2 and pre._collector is None  # no statistic outlives the step
    assert all(len(m._forward_hooks) + len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_factors_are_collected_only_on_refresh_steps():
    model, _ = _model()
    pre = SNOptPreconditioner(model, update_freq=2)
    x, y = torch.randn(4, 2, dtype=D), torch.tensor([0, 1, 0, 1])
    due = []
    for _ in range(5):
        due.append(pre.due)
        with pre.collect():
            nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
    assert due == [True, False, True, False, True]
    fresh = SNOptPreconditioner(model)
    nn.functional.cross_entropy(model(x), y).backward()  # backward outside collect()
    with pytest.raises(RuntimeError, match="no factors were collected"):
        with fresh.collect():
            pass
        fresh.step()


def test_state_dict_round_trip_resumes_bitwise():
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 2, generator=g, dtype=D), torch.randint(0, 2, (6,), generator=g))
            for _ in range(6)]

    def run(batches, saved=None):
        model, _ = _model()
        pre = SNOptPreconditioner(model, update_freq=2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if saved is not None:
            pre_state, model_state, opt_state = copy.deepcopy(saved)
            model.load_state_dict(model_state)
            pre.load_state_dict(pre_state)
            opt.load_state_dict(opt_state)
        for x, y in batches:
            opt.zero_grad()
            with pre.collect():
                nn.functional.cross_entropy(model(x), y).backward()
            pre.step()
            opt.step()
        return model, pre, opt

    straight, pre_straight, _ = run(data)  # step 3 is no refresh step: uses the saved bases
    model, pre, opt = run(data[:3])
    resumed, pre_resumed, _ = run(data[3:], (pre.state_dict(), model.state_dict(),
                                             opt.state_dict()))
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert pre_resumed.steps == 6
    for name, st in pre_straight.state.items():
        for k, v in st.items():
            other = pre_resumed.state[name][k]
            assert torch.equal(v, other) if isinstance(v, torch.Tensor) else v == other
    with pytest.raises(ValueError, match="unknown layers"):
        pre.load_state_dict({"steps": 0, "eigh_failures": 0, "layers": {"nope": {}}})


@pytest.mark.parametrize("kwargs, match", [
    ({"damping": 0.0}, "damping"), ({"update_freq": 0}, "update_freq"),
    ({"eigenvalue_decay": 1.0}, "eigenvalue_decay"), ({"max_rank": 0}, "max_rank"),
])
def test_invalid_hyperparameters_raise(kwargs, match):
    model, _ = _model()
    with pytest.raises(ValueError, match=f"invalid {match}=.*allowed range"):
        SNOptPreconditioner(model, **kwargs)
