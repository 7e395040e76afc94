"""Every step is all-or-nothing: faults leave parameters, state, factors, counters and BatchNorm
buffers bitwise as before the step, and the skip is counted with its reason and warned."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocnopt import CURVATURES, OCNOpt
from ocnopt.optim.ocnopt import SKIP_WARN_EVERY
from tests.conftest import batches, tiny_mlp

D = torch.float64


def _kw(curvature):
    kw = dict(curvature=curvature, update_freq=2, factor_update_freq=1)
    kw["lr"] = 0.05 if curvature in ("identity", "kfac", "ekfac") else 1e-2
    if curvature in ("identity", "kfac", "ekfac", "rmsprop"):
        kw["momentum"] = 0.9
    return kw


def _everything(model, opt):
    """Parameters, buffers and optimizer state (without the diagnostic counters)."""
    sd = copy.deepcopy(opt.state_dict())
    sd.pop("ocnopt")
    return copy.deepcopy(model.state_dict()), sd


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    return a == b


def _warm(model, opt, n=3):
    for x, y in batches(model, n=n):
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))


@pytest.mark.parametrize("curvature", CURVATURES)
def test_inf_in_one_input_sample_skips_the_feedback_step(curvature):
    model = tiny_mlp()
    opt = OCNOpt(model, feedback=True, **_kw(curvature))
    _warm(model, opt)
    before = _everything(model, opt)
    (x, y), *_ = batches(model, n=1)
    x = x.clone()
    x[2, 1] = float("inf")  # tanh saturates: the loss stays finite
    with pytest.warns(RuntimeWarning, match="skipped"):
        loss = opt.step(lambda: F.cross_entropy(model(x), y))
    assert torch.isfinite(loss)
    assert _same(before, _everything(model, opt))
    assert opt.skipped_steps == 1 and opt.num_steps == 3
    assert sum(opt.skip_reasons.values()) == 1


@pytest.mark.parametrize("curvature", CURVATURES)
def test_nan_in_a_masked_out_sample_skips_the_step(curvature):
    model = tiny_mlp()
    opt = OCNOpt(model, feedback=True, **_kw(curvature))
    _warm(model, opt)
    before = _everything(model, opt)
    (x, y), *_ = batches(model, n=1)
    x = x.clone()
    x[0] = float("nan")  # padding: the loss only looks at samples 1..
    keep = torch.arange(len(x)) > 0
    with pytest.warns(RuntimeWarning, match="skipped"):
        loss = opt.step(lambda: F.cross_entropy(model(x)[keep], y[keep]))
    assert torch.isfinite(loss)
    assert _same(before, _everything(model, opt))
    assert opt.skipped_steps == 1


def test_divergence_with_a_finite_loss_is_skipped_not_written():
    """ReLU MLP, identity curvature, lr 3, momentum 0.9: the update overflows at step 13 while
    the loss is still finite; the parameters must never become non-finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    opt = OCNOpt(model, lr=3.0, curvature="identity", momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(16):
            opt.step(lambda: F.cross_entropy(model(x), y))
            assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
            assert all(bool(torch.isfinite(t).all()) for st in opt.state.values()
                       for t in st.values() if isinstance(t, torch.Tensor))
    assert opt.skip_reasons.get("nonfinite_update", 0) >= 1


@pytest.mark.parametrize("curvature", ["rmsprop", "adam", "ekfac"])
def test_huge_activation_in_second_pass_cannot_poison_second_moments(curvature):
    """A finite direction whose square overflows float32 would make the second moments Inf."""
    model = tiny_mlp()
    opt = OCNOpt(model, feedback=True, **_kw(curvature))
    _warm(model, opt)
    before = _everything(model, opt)
    (x, y), *_ = batches(model, n=1)
    # the gradient at the logits is bounded, so scale the loss: d ~ 1e30, d^2 overflows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(lambda: 1e30 * F.cross_entropy(model(x), y))
    assert _same(before, _everything(model, opt))
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_one_huge_batch_does_not_poison_the_factors(curvature):
    model = tiny_mlp()
    opt = OCNOpt(model, feedback=False, **_kw(curvature))
    _warm(model, opt)
    before = _everything(model, opt)
    (x, y), (x2, y2), *_ = batches(model, n=2)
    with pytest.warns(RuntimeWarning, match="nonfinite factor"):
        opt.step(lambda: F.cross_entropy(model(x * 1e20), y))
    assert _same(before, _everything(model, opt))
    assert opt.skip_reasons == {"nonfinite_factor": 1}
    # later refreshes still work: the preconditioner is not frozen
    basis = opt.state[model[0].weight]["in_vectors"].clone()
    for _ in range(2):
        opt.step(lambda: F.cross_entropy(model(x2), y2))
    assert not torch.equal(basis, opt.state[model[0].weight]["in_vectors"])
    assert opt.diagnostics["eigh_failures"] == 0


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("when", ["first", "second"])
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, "shape"])
def test_exception_in_either_closure_call_rolls_everything_back(curvature, when, error):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 4),
                          nn.Tanh(), nn.Linear(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OCNOpt(model, feedback=True, **_kw(curvature))
        data = batches(tiny_mlp(), n=4)
        for x, y in data[:3]:
            opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
    before = _everything(model, opt)
    counters = opt.diagnostics
    x, y = data[3]
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        if calls["n"] == (1 if when == "first" else 2):
            if error == "shape":  # a different batch in the second pass
                return F.cross_entropy(model(x[:-1]), y[:-1])
            raise error("boom")
        return F.cross_entropy(model(x), y)

    expected = RuntimeError if error == "shape" else error
    with pytest.raises(expected):
        opt.step(closure)
    assert _same(before, _everything(model, opt))
    assert opt.num_steps == counters["step"]
    assert opt.skip_reasons == {"exception": 1}


def test_skipped_nan_batch_leaves_batchnorm_statistics_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OCNOpt(model, lr=0.1, curvature="ekfac")
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt.step(lambda: F.cross_entropy(model(x), y))
    stats = [b.clone() for b in model.buffers()]
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(lambda: F.cross_entropy(model(bad), y))
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers(), strict=True))


def test_classic_step_with_nonfinite_gradient_is_skipped_without_writes():
    model = tiny_mlp()
    opt = OCNOpt(model, lr=0.1, curvature="ekfac", feedback=False, momentum=0.9)
    for x, y in batches(model, n=2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    before = _everything(model, opt)
    (x, y), *_ = batches(model, n=1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[2].bias.grad[1] = float("nan")
    with pytest.warns(RuntimeWarning, match="nonfinite gradient"):
        opt.step()
    assert _same(before, _everything(model, opt))


def test_a_run_that_skips_every_step_is_warned_again_every_n_skips():
    model = tiny_mlp()
    opt = OCNOpt(model, lr=0.1, curvature="identity")
    (x, y), *_ = batches(model, n=1)
    bad = torch.full_like(x, float("nan"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(2 * SKIP_WARN_EVERY):
            opt.step(lambda: F.cross_entropy(model(bad), y))
    skipped = [w for w in rec if "skipped" in str(w.message)]
    assert len(skipped) == 3  # skips 1, N and 2N
    assert f"{2 * SKIP_WARN_EVERY} in a row" in str(skipped[-1].message)


# ---------------------------------------------------------------- foreign state dicts
def _trained(curvature="ekfac", **kw):
    model = tiny_mlp()
    opt = OCNOpt(model, **_kw(curvature), **kw)
    _warm(model, opt)
    return model, opt


def _unchanged_after_failed_load(opt, model, bad, match):
    before = _everything(model, opt)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                            for g in opt.param_groups])
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert _same(before, _everything(model, opt))
    assert groups == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def test_state_dict_of_another_curvature_is_rejected():
    model, opt = _trained("ekfac")
    other_model, other = _trained("kfac")
    _unchanged_after_failed_load(opt, model, other.state_dict(), "curvature='kfac'")


def test_torch_adam_state_dict_is_rejected():
    model, opt = _trained("adam")
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    for x, y in batches(model, n=2):
        adam.zero_grad()
        F.cross_entropy(model(x), y).backward()
        adam.step()
    _unchanged_after_failed_load(opt, model, adam.state_dict(), "lacks")


def test_state_dict_with_wrong_shapes_is_rejected():
    model, opt = _trained("ekfac")
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["momentum_buffer"] = torch.zeros(3, 3)
    _unchanged_after_failed_load(opt, model, sd, "shape")
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["A"] = torch.zeros(4, 4)
    _unchanged_after_failed_load(opt, model, sd, "Kronecker factor A")


def test_state_dict_with_invalid_hyperparameters_is_rejected():
    model, opt = _trained("identity")
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = -1.0
    _unchanged_after_failed_load(opt, model, sd, "allowed range")
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg"] = torch.zeros_like(model[0].weight)
    _unchanged_after_failed_load(opt, model, sd, "does not keep")


def test_valid_state_dict_still_loads_and_restores_counters():
    model, opt = _trained("ekfac")
    sd = opt.state_dict()
    model2 = tiny_mlp()
    model2.load_state_dict(model.state_dict())
    opt2 = OCNOpt(model2, **_kw("ekfac"))
    opt2.load_state_dict(sd)
    assert opt2.num_steps == opt.num_steps == 3
