"""The loops and tools people already use: both closure conventions, the classic loop,
torch.amp.GradScaler, distributed-checkpoint state dicts, maximize, foreach, refused inputs,
copies, clipping, and PyTorch Lightning's automatic optimization."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocnopt import CURVATURES, OCNOpt
from tests.conftest import batches, tiny_cnn, tiny_mlp
from tests.test_feedback import brute_force_closed_loop_step

D = torch.float64
CASES = [(c, fb) for c in CURVATURES for fb in (False, True)]


def _kw(curvature, feedback=True):
    kw = dict(curvature=curvature, feedback=feedback, factor_update_freq=1, update_freq=2)
    kw["lr"] = 0.05 if curvature in ("identity", "kfac", "ekfac") else 1e-2
    if curvature in ("identity", "kfac", "ekfac"):
        kw["momentum"] = 0.9
    return kw


def _ours(model, opt, x, y):
    return lambda: F.cross_entropy(model(x), y)


def _torch_style(model, opt, x, y, zero=True):
    def closure():
        if zero:
            opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("make_model", [tiny_mlp, tiny_cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("curvature,feedback", CASES)
def test_both_closure_conventions_give_the_same_steps(make_model, curvature, feedback):
    data = batches(make_model(), n=4)
    results = []
    for style in (_ours, _torch_style):
        model = make_model(D)
        opt = OCNOpt(model, **_kw(curvature, feedback))
        for x, y in data:
            loss = opt.step(style(model, opt, x.to(D), y))
            assert isinstance(loss, torch.Tensor) and not loss.requires_grad
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_torch_style_feedback_step_equals_brute_force():
    torch.manual_seed(0)
    x, y = torch.randn(5, 6, dtype=D), torch.randint(0, 3, (5,))
    ref, got = tiny_mlp(D), tiny_mlp(D)
    brute_force_closed_loop_step(ref, x, y, lr=0.7, beta=1.5, weight_decay=0.01)
    opt = OCNOpt(got, lr=0.7, curvature="identity", feedback_scale=1.5, weight_decay=0.01)
    opt.step(_torch_style(got, opt, x, y))
    for a, b in zip(ref.parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("feedback", [False, True])
def test_torch_style_closure_may_return_a_float(feedback):
    model = tiny_mlp()
    opt = OCNOpt(model, lr=0.1, curvature="adam", feedback=feedback)
    (x, y), *_ = batches(model, n=1)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.item()

    out = opt.step(closure)
    assert isinstance(out, float) and opt.num_steps == 1


@pytest.mark.parametrize("curvature", CURVATURES)
def test_step_without_gradients_is_a_no_op(curvature):
    model = tiny_mlp()
    opt = OCNOpt(model, **_kw(curvature))
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step() is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.num_steps == 0 and not opt.state


# ---------------------------------------------------------------- GradScaler
def _scaler(scale=2.0**10):
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scaler.scale(torch.ones(()))  # the scale exists before the first scaler.step(opt, closure)
    return scaler


@pytest.mark.parametrize("curvature", ["identity", "adam", "kfac", "ekfac"])
@pytest.mark.parametrize("style", ["classic", "closure", "torch_closure"])
def test_grad_scaler_steps_equal_unscaled_steps_and_infs_are_skipped(curvature, style):
    feedback = style != "classic"
    data = batches(tiny_mlp(), n=3)
    runs = []
    for use_scaler in (False, True):
        model = tiny_mlp()
        opt = OCNOpt(model, **_kw(curvature, feedback))
        scaler = _scaler() if use_scaler else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's note on its own protocol
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
            if scaler:  # a scaled inf: skipped like torch's optimizers, and the scale backs off
                before = [p.detach().clone() for p in model.parameters()]
                x, y = data[0]
                scale = scaler.get_scale()
                if style == "classic":
                    opt.zero_grad()
                    scaler.scale(F.cross_entropy(model(x), y) * 1e38).backward()
                    scaler.step(opt)
                else:
                    scaler.step(opt, lambda m=model, x=x, y=y: F.cross_entropy(m(x), y) * 1e38)
                scaler.update()
                assert scaler.get_scale() == scale / 2
                assert all(torch.equal(a, b)
                           for a, b in zip(before, model.parameters(), strict=True))
                assert opt.skip_reasons == {"grad_scaler": 1}
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- checkpoints and copies
@pytest.mark.parametrize("curvature", CURVATURES)
def test_distributed_checkpoint_optimizer_state_dict_round_trip(curvature):
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    data = batches(tiny_mlp(), n=5)
    model = tiny_mlp()
    opt = OCNOpt(model, **_kw(curvature))
    for x, y in data[:3]:
        opt.step(_ours(model, opt, x, y))
    assert all(isinstance(k, torch.Tensor) for k in opt.state)  # parameter-keyed only
    sd = get_optimizer_state_dict(model, opt)
    assert set(sd["state"]) <= {n for n, _ in model.named_parameters()}
    twin = tiny_mlp()
    twin.load_state_dict(model.state_dict())
    opt2 = OCNOpt(twin, **_kw(curvature))
    set_optimizer_state_dict(twin, opt2, sd)
    for x, y in data[3:]:
        opt.step(_ours(model, opt, x, y))
        opt2.step(_ours(twin, opt2, x, y))
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("curvature", ["adam", "ekfac"])
def test_deepcopy_and_pickle_give_working_independent_optimizers(curvature):
    data = batches(tiny_mlp(), n=4)
    model = tiny_mlp()
    opt = OCNOpt(model, **_kw(curvature))
    for x, y in data[:2]:
        opt.step(_ours(model, opt, x, y))
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        m2 = clone.model
        assert m2 is not model
        for x, y in data[2:]:
            clone.step(_ours(m2, clone, x, y))
        ref = copy.deepcopy(model)
        ref_opt = OCNOpt(ref, **_kw(curvature))
        ref_opt.load_state_dict(opt.state_dict())
        for x, y in data[2:]:
            ref_opt.step(_ours(ref, ref_opt, x, y))
        for a, b in zip(m2.parameters(), ref.parameters(), strict=True):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- maximize, foreach
@pytest.mark.parametrize("curvature,feedback", CASES)
def test_maximize_equals_minimizing_the_negated_loss(curvature, feedback):
    data = batches(tiny_mlp(), n=3)
    runs = []
    for maximize in (False, True):
        model = tiny_mlp(D)
        opt = OCNOpt(model, maximize=maximize, **_kw(curvature, feedback))
        sign = 1.0 if maximize else -1.0
        for x, y in data:
            opt.step(lambda x=x, y=y, m=model, s=sign: s * F.cross_entropy(m(x.to(D)), y))
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("torch_opt,kw,ocn", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2), dict(curvature="identity")),
    (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5, centered=True), dict(curvature="rmsprop")),
    (torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=1e-2), dict(curvature="adam")),
])
def test_foreach_sweep_equals_torch_foreach_implementation(torch_opt, kw, ocn):
    data = batches(tiny_mlp(), n=4)
    model, twin = tiny_mlp(), tiny_mlp()
    opt = OCNOpt(model, feedback=False, foreach=True, **ocn, **kw)
    ref = torch_opt(twin.parameters(), foreach=True, **kw)
    for x, y in data:
        opt.step(_ours(model, opt, x, y))
        ref.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        ref.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- refused inputs
def test_complex_parameters_are_refused_at_construction():
    model = nn.Linear(3, 2).to(torch.complex64)
    with pytest.raises(ValueError, match="complex parameters"):
        OCNOpt(model, curvature="adam")


def test_sparse_gradients_are_refused_before_anything_moves():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match="sparse=False"):
        OCNOpt(model, curvature="adam")

    class Functional(nn.Module):  # sparse gradients the constructor cannot see
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(10, 4))
            self.head = nn.Linear(12, 2)

        def forward(self, t):
            return self.head(F.embedding(t, self.table, sparse=True).flatten(1))

    model = Functional()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OCNOpt(model, curvature="adam", feedback=False)
    before = [p.detach().clone() for p in model.parameters()]
    t, y = torch.randint(0, 10, (5, 3)), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step(lambda: F.cross_entropy(model(t), y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ---------------------------------------------------------------- clipping
def test_clipping_before_a_kronecker_step_shrinks_the_gauss_newton_step():
    """The peer suite's Rosenbrock protocol: a Linear(1, 2) holds the point. The Kronecker
    factors estimate the curvature of the unclipped loss, so clipping the gradient to norm c
    scales the (Gauss-)Newton step by c/|g|: with one sample G = g g^T is rank one with
    eigenvalue |g|^2 ~ 2.7e6 and the step is lr * c / (|g|^2 + damping) per unit direction,
    which rounds away in float32 (documented in the README; max_grad_norm behaves the same)."""
    model = nn.Linear(1, 2, bias=False).to(D)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-2.0], [2.0]], dtype=D))
    opt = OCNOpt(model, lr=0.01, curvature="kfac", feedback=False, momentum=0.9, max_rank=None)
    one = torch.ones(1, 1, dtype=D)

    def rosenbrock(p):
        return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2

    w0 = model.weight.detach().clone()
    rosenbrock(model(one)[0]).backward()
    g = model.weight.grad.clone()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    st = opt.state[model.weight]
    m = torch.kron(st["A"], st["G"]) + 0.05 * torch.eye(2, dtype=D)
    expected = w0 - 0.01 * torch.linalg.solve(m, g / g.norm())
    torch.testing.assert_close(model.weight.detach(), expected, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(st["G"], g @ g.T, rtol=1e-12, atol=0)  # from the raw gradient
    assert (model.weight - w0).norm() < 1e-8  # lr * (c / |g|) / |g| ~ 3.7e-9


# ---------------------------------------------------------------- Lightning
def test_lightning_automatic_optimization_equals_the_manual_closure_loop():
    lightning = pytest.importorskip("lightning")
    from examples.lightning_digits import DigitsMLP, digits_loaders

    torch.manual_seed(0)
    module = DigitsMLP(lr=0.02, curvature="ekfac")
    manual = copy.deepcopy(module.net)
    train, _ = digits_loaders(batch_size=64)
    trainer = lightning.Trainer(max_steps=6, accelerator="cpu", logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train)
    opt = OCNOpt(manual, lr=0.02, curvature="ekfac", momentum=0.9)
    for k, (x, y) in enumerate(train):
        if k == 6:
            break
        opt.step(lambda x=x, y=y: F.cross_entropy(manual(x), y))
    assert trainer.optimizers[0].num_steps == 6
    for a, b in zip(module.net.parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
