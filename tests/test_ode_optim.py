"""OCNOpt on models with ODE blocks: the ODE layers' EKFAC step equals a dense float64 EKFAC on
the oracle's factors, diagonal curvatures equal torch.optim bitwise, the t1 update equals its
formula, both loops agree, resume is bitwise, NaN inside the solve rolls everything back, no
statistic or hook outlives a step, feedback stops before ODE blocks by default."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("torchdiffeq")

from ocnopt import OCNOpt  # noqa: E402
from ocnopt.ode import ConcatLinear, ODEBlock  # noqa: E402
from ocnopt.ode.block import _ARMED  # noqa: E402
from ocnopt.ode.driver import ODEOptions  # noqa: E402
from ocnopt.reference.ode import adjoint_factor_oracle, dense_ekfac_direction  # noqa: E402

D = torch.float64


class TanhField(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = ConcatLinear(3, 5)
        self.l2 = ConcatLinear(5, 3)
        self.poison = False  # NaN in every evaluation with gradients (the adjoint solve)

    def forward(self, t, x):
        out = self.l2(t, torch.tanh(self.l1(t, x)))
        if self.poison and torch.is_grad_enabled():
            out = out * float("nan")
        return out


def _model(learn_t1: bool = False, dtype=D, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3),
        ODEBlock(TanhField(), t1=0.9, method="euler", options={"step_size": 0.2},
                 learn_t1=learn_t1),
        nn.Linear(3, 3)).to(dtype)


def _batches(n: int, dtype=D, batch: int = 8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 4, generator=g, dtype=dtype),
             torch.randint(0, 3, (batch,), generator=g)) for _ in range(n)]


def _closure(model, x, y):
    return lambda: F.cross_entropy(model(x), y)


def _matrix(lin: nn.Linear, which: str = "grad") -> torch.Tensor:
    w, b = (lin.weight.grad, lin.bias.grad) if which == "grad" else (lin.weight, lin.bias)
    return torch.cat([w, b[:, None]], 1).detach().clone()


def _no_hooks(model: nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)
               for m in model.modules())


def _opt(model, **kw) -> OCNOpt:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return OCNOpt(model, **kw)


# ---------------------------------------------------------------- the preconditioned step
def test_ode_layer_update_equals_ekfac_on_the_oracle_factors():
    model = _model()
    f = model[3].func
    layers = [f.l1.linear, f.l2.linear]
    lr, damping, decay, fdecay = 0.3, 0.05, 0.75, 0.9
    opt = _opt(model, lr=lr, curvature="ekfac", feedback=True, damping=damping,
               eigenvalue_decay=decay, factor_decay=fdecay, max_rank=None,
               factor_update_freq=1)
    factors = {}
    for x, y in _batches(2):
        # independent pieces at the current parameters: the oracle's factors (direct trajectory
        # and explicit VJPs on the adjoint's grid) and the adjoint gradient
        h0 = model[2](torch.tanh(model[0](x))).detach()

        def head_loss(state, y=y):
            return F.cross_entropy(model[4](state[0]), y)

        oracle = adjoint_factor_oracle(lambda t, s: (f(t, s[0]),), layers, (h0,), 0.0, 0.9,
                                       head_loss, 0.2, "euler")
        ref = copy.deepcopy(model)
        F.cross_entropy(ref(x), y).backward()
        ref_f = ref[3].func
        raw = {m: _matrix(r) for m, r in zip(layers, [ref_f.l1.linear, ref_f.l2.linear],
                                             strict=True)}
        before = {m: _matrix(m, "param") for m in layers}
        opt.step(_closure(model, x, y))
        for m in layers:  # EMA of the factors, refresh at steps 0 and 1 (early refreshes)
            a, g = oracle[m].A, oracle[m].G
            if m in factors:
                a = fdecay * factors[m][0] + (1 - fdecay) * a
                g = fdecay * factors[m][1] + (1 - fdecay) * g
            factors[m] = (a, g)
            torch.testing.assert_close(opt.state[m.weight]["A"], a, rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(opt.state[m.weight]["G"], g, rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(_matrix(m), raw[m], rtol=1e-10, atol=1e-14)
            want, _ = dense_ekfac_direction(raw[m], a, g, 1.0, 8, damping, decay)
            torch.testing.assert_close(_matrix(m, "param"), before[m] - lr * want, rtol=1e-9,
                                       atol=1e-12)
    assert opt.layer_names == ["0", "2", "4"]  # the ODE layers are not feedback layers


@pytest.mark.parametrize("curvature, twin, kw", [
    ("identity", torch.optim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("rmsprop", torch.optim.RMSprop, dict(alpha=0.9, centered=True, momentum=0.5)),
    ("adam", torch.optim.Adam, dict(betas=(0.8, 0.99), amsgrad=True, weight_decay=1e-2)),
])
def test_diagonal_curvatures_equal_torch_optimizers_bitwise(curvature, twin, kw):
    model = _model(dtype=torch.float32)
    ref = copy.deepcopy(model)
    classic = copy.deepcopy(model)
    opt = _opt(model, lr=0.05, curvature=curvature, feedback=False, **kw)
    opt_classic = _opt(classic, lr=0.05, curvature=curvature, feedback=False, **kw)
    torch_opt = twin(ref.parameters(), lr=0.05, **kw)
    for x, y in _batches(4, torch.float32):
        opt.step(_closure(model, x, y))
        for m, o in ((ref, torch_opt), (classic, opt_classic)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for a, b, c in zip(model.parameters(), ref.parameters(), classic.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(c, b)


# ---------------------------------------------------------------- the integration time
@pytest.mark.parametrize("mode", ["feedback", "gradient"])
def test_t1_update_equals_the_policy_on_first_pass_gradients_and_the_realised_change(mode):
    model = _model(learn_t1=True)
    block = model[3]
    lr, reg = 0.2, 0.05
    opt = _opt(model, lr=0.1, curvature="ekfac", feedback=True,
               ode=dict(t1_mode=mode, t1_lr=lr, t1_reg=reg, t1_momentum=0.0, t1_update_freq=1))
    params = list(block.func.parameters())
    for x, y in _batches(3):
        ref = copy.deepcopy(model)  # dL/dt1 and dL/dtheta at the step's starting point
        F.cross_entropy(ref(x), y).backward()
        g = float(ref[3].t1_grad)
        p = torch.cat([q.grad.reshape(-1) for q in ref[3].func.parameters()])
        t1 = float(block.t1)
        theta = torch.cat([q.detach().reshape(-1) for q in params])
        opt.step(_closure(model, x, y))
        dtheta = torch.cat([q.detach().reshape(-1) for q in params]) - theta
        assert dtheta.abs().max() > 0
        if mode == "feedback":  # momentum 0: every statistic is this step's value
            want = -lr * (reg * t1 + g + float(8 * g * p @ dtheta)) / (reg + 8 * g * g)
        else:
            want = -lr * (g + reg * t1)
        assert float(block.t1) == pytest.approx(max(0.1, t1 + want), rel=1e-9)
        assert block.t1_grad is None  # no gradient outlives the step


def test_closure_and_classic_loops_give_the_same_step():
    model = _model(learn_t1=True)
    classic = copy.deepcopy(model)
    kw = dict(lr=0.1, curvature="ekfac", feedback=False, factor_update_freq=2, momentum=0.5,
              ode=dict(t1_update_freq=2))
    opt, opt_classic = _opt(model, **kw), _opt(classic, **kw)
    for x, y in _batches(5):
        opt.step(_closure(model, x, y))
        opt_classic.zero_grad()
        F.cross_entropy(classic(x), y).backward()
        opt_classic.step()
    for a, b in zip(model.parameters(), classic.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(model[3].t1, classic[3].t1) and float(model[3].t1) != 0.9
    w = model[3].func.l1.linear.weight
    w_classic = classic[3].func.l1.linear.weight
    for key in ("A", "G", "m2", "in_vectors"):
        assert torch.equal(opt.state[w][key], opt_classic.state[w_classic][key])


def test_resume_is_bitwise_with_ode_layers_and_learn_t1():
    model = _model(learn_t1=True)
    kw = dict(lr=0.1, curvature="ekfac", feedback=True, factor_update_freq=2, momentum=0.9,
              ode=dict(t1_update_freq=2))
    opt = _opt(model, **kw)
    data = _batches(6)
    for x, y in data[:3]:
        opt.step(_closure(model, x, y))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    for x, y in data[3:]:
        opt.step(_closure(model, x, y))
    resumed = _model(learn_t1=True, seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = _opt(resumed, **kw)
    opt2.load_state_dict(saved_opt)
    for x, y in data[3:]:
        opt2.step(_closure(resumed, x, y))
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(model[3].t1, resumed[3].t1)
    s1, s2 = (o.state_dict()["ocnopt"]["ode"]["t1"]["3"] for o in (opt, opt2))
    assert s1.keys() == s2.keys() and s1["count"] == s2["count"] == 6
    for key in ("q_t", "q_tt", "cross"):
        assert torch.equal(s1[key], s2[key])


def test_invalid_ode_settings_and_state_raise():
    model = _model(learn_t1=True)
    for ode, match in ((dict(t1_lr=0.0), "t1_lr=0.0: allowed range is a finite float > 0"),
                       (dict(t1_momentum=1.0), "0 <= t1_momentum < 1"),
                       (dict(t1_update_freq=0), "t1_update_freq=0: allowed range is an int"),
                       (dict(t1_mode="newton"), "t1_mode='newton'"),
                       (dict(min_t1=-1.0), "min_t1"), (dict(sample_dt=0), "sample_dt"),
                       (dict(feedback_after_ode=1), "feedback_after_ode"),
                       (dict(t1_lr_typo=1), "unknown ODE option")):
        with pytest.raises(ValueError, match=match):
            _opt(model, ode=ode)
    assert ODEOptions.of(None) == ODEOptions()
    with pytest.raises(ValueError, match="adjoint solve"):
        _opt(nn.Sequential(ODEBlock(TanhField(), method="scipy_solver")), curvature="kfac")
    _opt(nn.Sequential(ODEBlock(TanhField(), method="scipy_solver")), curvature="adam")

    opt = _opt(model, lr=0.1, curvature="ekfac", ode=dict(t1_update_freq=1))
    x, y = _batches(1)[0]
    opt.step(_closure(model, x, y))
    good = opt.state_dict()
    before = copy.deepcopy(good)
    for corrupt, match in (
            (lambda sd: sd["ocnopt"].pop("ode"), "'t1' dict"),
            (lambda sd: sd["ocnopt"]["ode"]["t1"].pop("3"), "blocks"),
            (lambda sd: sd["ocnopt"]["ode"]["t1"]["3"].update(lr=-1.0), "lr=-1.0"),
            (lambda sd: sd["ocnopt"]["ode"]["t1"]["3"].update(cross=torch.zeros(3, dtype=D)),
             "'cross' must be a float tensor of shape")):
        sd = copy.deepcopy(good)
        corrupt(sd)
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
    after = opt.state_dict()  # a refused state dict changed nothing
    assert after["ocnopt"]["ode"]["t1"]["3"]["count"] == before["ocnopt"]["ode"]["t1"]["3"]["count"]
    assert torch.equal(after["ocnopt"]["ode"]["t1"]["3"]["q_tt"],
                       before["ocnopt"]["ode"]["t1"]["3"]["q_tt"])


# ---------------------------------------------------------------- atomicity and hygiene
def _snapshot(model, opt):
    sd = copy.deepcopy(opt.state_dict())
    return [p.detach().clone() for p in model.parameters()], model[3].t1.clone(), sd


def _assert_unchanged(model, opt, snap):
    params, t1, sd = snap
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert torch.equal(model[3].t1, t1)
    now = opt.state_dict()
    for pid, entries in sd["state"].items():
        for key, v in entries.items():
            w = now["state"][pid][key]
            assert torch.equal(w, v) if isinstance(v, torch.Tensor) else w == v
    for key, v in sd["ocnopt"]["ode"]["t1"]["3"].items():
        w = now["ocnopt"]["ode"]["t1"]["3"][key]
        assert torch.equal(w, v) if isinstance(v, torch.Tensor) else w == v


@pytest.mark.parametrize("loop", ["closure", "classic"])
def test_nan_inside_the_ode_solve_rolls_everything_back(loop):
    model = _model(learn_t1=True)
    opt = _opt(model, lr=0.1, curvature="ekfac", feedback=loop == "closure",
               factor_update_freq=1, ode=dict(t1_update_freq=1))
    data = _batches(3)

    def step(x, y):
        if loop == "closure":
            opt.step(_closure(model, x, y))
        else:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    step(*data[0])
    snap = _snapshot(model, opt)
    model[3].func.poison = True  # the adjoint solve (and the factor samples) turn NaN
    with pytest.warns(RuntimeWarning, match="step skipped"):
        step(*data[1])
    _assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == 1 and opt.num_steps == 1
    model[3].func.poison = False
    step(*data[1])  # the next clean step is the step that was skipped
    assert opt.num_steps == 2 and float(model[3].t1) != float(snap[1])


def test_no_statistics_or_hooks_outlive_a_step():
    model = _model(learn_t1=True)
    opt = _opt(model, lr=0.1, curvature="ekfac", feedback=True, factor_update_freq=1,
               ode=dict(feedback_after_ode=True))
    x, y = _batches(1)[0]
    opt.step(_closure(model, x, y))
    armed = opt._ode._armed  # the classic loop's collector for the next step: empty
    assert _no_hooks(model) and armed is not None and armed.factors() == {}
    assert model[3].t1_grad is None and opt._ode._leaves == {}

    def raises():
        F.cross_entropy(model(x), y).backward()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(raises)
    assert _no_hooks(model) and opt._ode._armed.factors() == {} and model[3].t1_grad is None
    copy.deepcopy(model)(x).sum().backward()  # copies of the model are never armed
    assert opt._ode._armed.factors() == {}
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert opt._ode._armed.factors() != {}
    opt.zero_grad()  # like the gradients, zero_grad() drops what the collector saw
    assert opt._ode._armed.factors() == {} and model[3].t1_grad is None
    opt.close()
    assert not _ARMED
    opt2 = _opt(model, curvature="kfac")
    assert _ARMED
    del opt2
    gc.collect()
    assert not _ARMED  # a dropped optimizer stops sampling


def test_layers_after_an_ode_block_get_open_loop_updates_by_default():
    model = _model()
    calls = {"n": 0}
    x, y = _batches(1)[0]

    def closure(m, x, y):
        def run():
            calls["n"] += 1
            return F.cross_entropy(m(x), y)
        return run

    variants = {}
    for name, kw in (("default", dict(feedback=True)),
                     ("after", dict(feedback=True, ode=dict(feedback_after_ode=True))),
                     ("open", dict(feedback=False))):
        m = copy.deepcopy(model)
        opt = _opt(m, lr=0.5, curvature="identity", **kw)
        calls["n"] = 0
        nfe = m[3].nfe_forward_total
        opt.step(closure(m, x, y))
        variants[name] = (m, calls["n"], m[3].nfe_forward_total - nfe)
    one_solve = variants["open"][2]
    # default: the second pass stops before the block (no re-integration)
    assert variants["default"][1] == 2 and variants["default"][2] == one_solve
    assert variants["after"][1] == 2 and variants["after"][2] == 2 * one_solve
    head = [v[0][4].weight for v in variants.values()]
    assert torch.equal(head[0], head[2]) and not torch.equal(head[0], head[1])
    before = [v[0][2].weight for v in variants.values()]  # before the block: feedback in both
    assert torch.equal(before[0], before[1]) and not torch.equal(before[0], before[2])


def test_ode_rnn_layers_are_found_inside_integrate_calls_and_need_no_second_pass():
    from ocnopt.bench.ode_models import ODERNNClassifier

    torch.manual_seed(0)
    model = ODERNNClassifier(channels=2, num_classes=3, hidden=4, depth=2, method="euler",
                             options={"step_size": 0.5})
    x = torch.randn(5, 4, 3)
    x[..., -1] = 1.0
    x[0, 2:, -1] = 0.0  # a shorter sequence
    y = torch.tensor([0, 1, 2, 0, 1])
    opt = _opt(model, lr=0.1, curvature="ekfac", feedback=True)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        return F.cross_entropy(model(x), y)

    opt.step(closure)
    assert calls["n"] == 1  # the only feedback layer ("out") runs after the ODE: open loop
    inner = [m for m in model.ode.func.modules() if isinstance(m, nn.Linear)]
    assert [n for n, _ in model.named_modules() if _ in opt._ode_layers] == [
        "ode.func.net.0", "ode.func.net.2"]
    assert all("m2" in opt.state[m.weight] for m in inner) and opt.layer_names == ["out"]


@pytest.mark.parametrize("style", ["classic", "closure", "torch_closure"])
def test_grad_scaler_steps_equal_unscaled_steps(style):
    data = _batches(3, torch.float32)
    runs = []
    for use_scaler in (False, True):
        model = _model(learn_t1=True, dtype=torch.float32)
        opt = _opt(model, lr=0.1, curvature="ekfac", feedback=style != "classic",
                   factor_update_freq=1, ode=dict(t1_update_freq=1))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if use_scaler else None
        if scaler:
            scaler.scale(torch.ones(()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            for x, y in data:
                if style == "classic":
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    (scaler.scale(loss) if scaler else loss).backward()
                    scaler.step(opt) if scaler else opt.step()
                else:
                    def closure(x=x, y=y, model=model, opt=opt, scaler=scaler):
                        loss = F.cross_entropy(model(x), y)
                        if style == "closure":
                            return loss
                        opt.zero_grad()
                        (scaler.scale(loss) if scaler else loss).backward()
                        return loss
                    scaler.step(opt, closure) if scaler else opt.step(closure)
                if scaler:
                    scaler.update()
        w = model[3].func.l1.linear.weight
        runs.append([*model.parameters(), model[3].t1, opt.state[w]["G"]])
    assert float(runs[0][-2]) != 0.9
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_field_registered_twice_is_not_weight_tying():
    from ocnopt.bench.ode_models import CNF

    torch.manual_seed(0)
    model = CNF(2, hidden=4, layers=2, method="euler", options={"step_size": 0.5})
    assert model.dynamics is model.ode.func  # the field is reachable under two names
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "shared parameters" fallback
        opt = OCNOpt(model, lr=0.01, curvature="ekfac")
    x = torch.randn(8, 2)
    opt.step(lambda: -model(x).mean())
    linears = [m for m in model.dynamics.modules() if isinstance(m, nn.Linear)]
    assert set(opt._ode_layers) == set(linears) and not opt._other_params
    assert all("m2" in opt.state[m.weight] for m in linears)
