"""Validation, NaN/Inf skipping, eigendecomposition fallback, resume, hook hygiene, API glue."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocnopt import CURVATURES, OCNOpt
from tests.conftest import batches, tiny_cnn, tiny_mlp


def _loss(model, x, y):
    return lambda: F.cross_entropy(model(x), y)


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_same_state(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            _assert_same_state(u, v)
    else:
        assert a == b


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("kw,needle", [
    (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(feedback_scale=-0.5), "feedback"),
    (dict(feedback_clip=-1.0), "feedback_clip"),
    (dict(momentum=1.0), "momentum"), (dict(momentum=-0.1), "momentum"),
    (dict(dampening=2.0), "dampening"), (dict(weight_decay=-1e-3), "weight_decay"),
    (dict(alpha=1.5, curvature="rmsprop"), "alpha"),
    (dict(betas=(0.9, 1.0), curvature="adam"), "betas"),
    (dict(betas=(0.9,), curvature="adam"), "betas"), (dict(eps=-1.0, curvature="adam"), "eps"),
    (dict(fallback_betas=(1.0, 0.9)), "fallback_betas"), (dict(damping=0.0), "damping"),
    (dict(max_grad_norm=0.0), "max_grad_norm"), (dict(maximize=1), "maximize"),
    (dict(foreach="yes"), "foreach"),
    (dict(factor_decay=1.0), "factor_decay"), (dict(eigenvalue_decay=-0.1), "eigenvalue_decay"),
    (dict(max_rank=0), "max_rank"), (dict(factor_update_freq=0), "factor_update_freq"),
    (dict(update_freq=2.5), "update_freq"), (dict(fallback_lr=-1.0), "fallback_lr"),
])
def test_invalid_hyperparameters_raise_with_allowed_range(kw, needle):
    with pytest.raises(ValueError, match=needle) as info:
        OCNOpt(tiny_mlp(), **kw)
    assert "allowed range" in str(info.value)


def test_unknown_curvature_lists_valid_names_and_other_misuse():
    with pytest.raises(ValueError) as info:
        OCNOpt(tiny_mlp(), curvature="newton")
    for name in CURVATURES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="nesterov"):
        OCNOpt(tiny_mlp(), curvature="identity", nesterov=True)
    with pytest.raises(ValueError, match="'momentum' is not a setting of curvature='adam'"):
        OCNOpt(tiny_mlp(), curvature="adam", momentum=0.9)
    with pytest.raises(ValueError, match="'damping' is not a setting of curvature='identity'"):
        OCNOpt(tiny_mlp(), curvature="identity", damping=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'lr_decay'"):
        OCNOpt(tiny_mlp(), lr_decay=0.1)
    with pytest.raises(TypeError, match="model"):
        OCNOpt(list(tiny_mlp().parameters()))
    with pytest.raises(ValueError, match="do not belong"):
        OCNOpt(tiny_mlp(), params=[nn.Parameter(torch.zeros(3))])
    model = tiny_mlp()
    with pytest.raises(ValueError, match="lr"):  # per-group values are validated too
        OCNOpt(model, params=[{"params": list(model.parameters()), "lr": -2.0}])


# ---------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("feedback", [False, True])
def test_nonfinite_loss_skips_step_without_touching_state(curvature, feedback):
    model = tiny_mlp()
    opt = OCNOpt(model, lr=0.05, curvature=curvature, feedback=feedback, update_freq=2,
                 factor_update_freq=1)
    (x, y), *_ = batches(model, n=1)
    for _ in range(3):
        opt.step(_loss(model, x, y))
    before = _snapshot(model, opt)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped") as rec:
        for _ in range(3):  # one burst of three bad steps: one warning
            opt.step(_loss(model, bad, y))
    assert sum("skipped" in str(w.message) for w in rec) == 1
    after = _snapshot(model, opt)
    assert opt.skipped_steps == 3
    assert opt.skip_reasons == {"nonfinite_loss": 3}
    before[1].pop("ocnopt"), after[1].pop("ocnopt")  # the counters: the only difference allowed
    _assert_same_state(before, after)
    opt.step(_loss(model, x, y))  # a good step ends the burst ...
    assert opt.num_steps == 4
    with pytest.warns(RuntimeWarning, match="skipped"):  # ... so the next bad one warns again
        opt.step(_loss(model, bad, y))


def test_nonfinite_gradient_skips_classic_step():
    model = tiny_mlp()
    opt = OCNOpt(model, lr=0.1, curvature="adam", feedback=False)
    (x, y), *_ = batches(model, n=1)
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("inf")
    before = _snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    _assert_same_state(before[0], model.state_dict())
    assert opt.skipped_steps == 1 and opt.num_steps == 0


def test_eigendecomposition_failure_keeps_last_good_basis(monkeypatch):
    model = tiny_mlp()
    opt = OCNOpt(model, lr=0.05, curvature="ekfac", update_freq=2, factor_update_freq=1)
    data = batches(model, n=6)
    for x, y in data[:2]:
        opt.step(_loss(model, x, y))
    basis = opt.state[model[0].weight]["in_vectors"].clone()

    def broken(_m):
        raise torch.linalg.LinAlgError("simulated non-convergence")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.warns(RuntimeWarning, match="eigendecomposition"):
        for x, y in data[2:]:
            opt.step(_loss(model, x, y))
    assert opt.diagnostics["eigh_failures"] > 0
    assert torch.equal(opt.state[model[0].weight]["in_vectors"], basis)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------- resume
@pytest.mark.parametrize("make_model", [tiny_mlp, tiny_cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("curvature,feedback", [
    ("identity", True), ("rmsprop", True), ("adam", True), ("kfac", False), ("kfac", True),
    ("ekfac", True)])
def test_resume_from_state_dict_is_bitwise_identical(make_model, curvature, feedback):
    kw = dict(lr=0.02, curvature=curvature, feedback=feedback, update_freq=3,
              factor_update_freq=2, weight_decay=1e-3)
    if curvature in ("kfac", "ekfac"):
        kw["max_rank"] = 3
    if curvature not in ("adam",):
        kw["momentum"] = 0.9
    data = batches(make_model(), n=9)
    model = make_model()
    opt = OCNOpt(model, **kw)
    for x, y in data[:4]:
        opt.step(_loss(model, x, y))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for x, y in data[4:]:
        opt.step(_loss(model, x, y))
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed = make_model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = OCNOpt(resumed, **kw)
    opt2.load_state_dict(ckpt["opt"])
    for x, y in data[4:]:
        opt2.step(_loss(resumed, x, y))
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt2.num_steps == opt.num_steps == 9


# ---------------------------------------------------------------- hooks
def test_no_hook_outlives_a_step_even_when_the_closure_raises():
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OCNOpt(model, lr=0.1, curvature="ekfac", factor_update_freq=1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt.step(_loss(model, x, y))
    assert _no_hooks(model)

    def raises_first():
        raise RuntimeError("boom in pass 1")

    with pytest.raises(RuntimeError, match="pass 1"):
        opt.step(raises_first)
    assert _no_hooks(model)

    calls = {"n": 0}

    def raises_second():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom in pass 2")
        return F.cross_entropy(model(x), y)

    stats = model[1].running_mean.clone()
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="pass 2"):
        opt.step(raises_second)
    assert _no_hooks(model)
    # the step is all-or-nothing: the first pass's BatchNorm update is rolled back as well
    assert torch.equal(model[1].running_mean, stats)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert opt.skip_reasons == {"exception": 2}

    # the classic loop's statistics hooks are process-wide, never stored on the model
    opt_classic = OCNOpt(model, lr=0.1, curvature="kfac", feedback=False)
    F.cross_entropy(model(x), y).backward()
    opt_classic.step()
    assert _no_hooks(model)
    opt_classic.close()


def test_classic_loop_collects_kronecker_statistics_and_feedback_falls_back_to_open_loop():
    model = tiny_mlp()
    (x, y), *_ = batches(model, n=1)
    opt = OCNOpt(model, lr=0.1, curvature="kfac", feedback=False)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert "in_vectors" in opt.state[model[0].weight] and _no_hooks(model)
    # the factors are exactly those of the batch (first update: no EMA yet)
    a = torch.cat([x, torch.ones(len(x), 1)], 1)
    torch.testing.assert_close(opt.state[model[0].weight]["A"], a.T @ a / len(x))
    fb = OCNOpt(model, lr=0.1, curvature="identity", feedback=True)
    fb.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="open-loop"):
        fb.step()
    assert fb.num_steps == 1


def test_layer_called_twice_gets_open_loop_update_with_warning():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.shared, self.out = nn.Linear(6, 4), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
            return self.out(h)

    torch.manual_seed(0)
    model, plain = Twice(), Twice()
    plain.load_state_dict(model.state_dict())
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    opt = OCNOpt(model, lr=0.3, curvature="identity", feedback=True)
    with pytest.warns(RuntimeWarning, match="ran 2 times"):
        opt.step(_loss(model, x, y))
    sgd = torch.optim.SGD(plain.parameters(), lr=0.3)
    F.cross_entropy(plain(x), y).backward()
    sgd.step()
    torch.testing.assert_close(model.shared.weight, plain.shared.weight)
    torch.testing.assert_close(model.inp.weight, plain.inp.weight)  # first layer: dx = 0
    assert not torch.allclose(model.out.weight, plain.out.weight)  # feedback acted here


def test_unsupported_layers_warn_and_fall_back():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 2))
    with pytest.warns(RuntimeWarning, match="Conv1d"):
        opt = OCNOpt(model, lr=0.05, curvature="ekfac")
    assert opt.layer_names == ["3"]
    x, y = torch.randn(4, 2, 6), torch.randint(0, 2, (4,))
    w0 = model[0].weight.detach().clone()
    opt.step(_loss(model, x, y))
    assert not torch.equal(model[0].weight, w0)


def test_lr_scheduler_and_zero_grad():
    model = tiny_mlp()
    opt = OCNOpt(model, lr=0.1, curvature="identity", feedback=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    (x, y), *_ = batches(model, n=1)
    for expected_lr in (0.1, 0.05, 0.025):
        assert opt.param_groups[0]["lr"] == pytest.approx(expected_lr)
        w0 = model[4].weight.detach().clone()
        opt.step(_loss(model, x, y))
        torch.testing.assert_close(model[4].weight, w0 - expected_lr * model[4].weight.grad)
        sched.step()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
