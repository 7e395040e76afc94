"""The layer-wise feedback step against brute-force float64 per-sample computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocnopt import OCNOpt
from ocnopt.layers import helper_for
from tests.conftest import tiny_cnn, tiny_mlp

D = torch.float64


def _parametric(model: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(model) if isinstance(m, (nn.Linear, nn.Conv2d))]


def brute_force_closed_loop_step(model, x, y, lr, beta=1.0, weight_decay=0.0):
    """Sequential closed-loop identity-curvature step with explicit per-sample gradients.

    For every parametric layer t, in order: ds = xhat_t - x_t, s_i = beta <dl_i/dx_t_i, dx_i>,
    u_t <- u_t - lr [ (1/B) sum_i (1 + s_i) dl_i/du_t + weight_decay u_t ].
    """
    idx = _parametric(model)
    bsz = x.shape[0]
    # nominal per-sample quantities (one forward/backward per sample; float64)
    states, p_in, q = {}, {}, {}
    for i in range(bsz):
        h = x[i : i + 1].clone().requires_grad_(True)
        inputs = {}
        for j, m in enumerate(model):
            if j in idx:
                h.retain_grad()
                inputs[j] = h
            h = m(h)
        li = F.cross_entropy(h, y[i : i + 1])
        model.zero_grad()
        li.backward()
        for j in idx:
            states.setdefault(j, []).append(inputs[j].detach()[0])
            p_in.setdefault(j, []).append(inputs[j].grad[0].clone())
            m = model[j]
            q.setdefault(j, []).append((m.weight.grad.clone(), m.bias.grad.clone()))
    with torch.no_grad():
        h = x
        for j, m in enumerate(model):
            if j in idx:
                dx = h - torch.stack(states[j])
                s = beta * (torch.stack(p_in[j]) * dx).reshape(bsz, -1).sum(1)
                dw = sum((1 + s[i]) * q[j][i][0] for i in range(bsz)) / bsz
                db = sum((1 + s[i]) * q[j][i][1] for i in range(bsz)) / bsz
                m.weight -= lr * (dw + weight_decay * m.weight)
                m.bias -= lr * (db + weight_decay * m.bias)
            h = m(h)


@pytest.mark.parametrize("make_model,shape", [(tiny_mlp, (6,)), (tiny_cnn, (1, 6, 6))],
                         ids=["tanh-mlp", "cnn"])
@pytest.mark.parametrize("beta,wd", [(1.0, 0.0), (2.5, 0.01)])
def test_identity_feedback_step_equals_brute_force(make_model, shape, beta, wd):
    torch.manual_seed(0)
    x, y = torch.randn(5, *shape, dtype=D), torch.randint(0, 3, (5,))
    ref, got = make_model(D), make_model(D)
    brute_force_closed_loop_step(ref, x, y, lr=0.7, beta=beta, weight_decay=wd)
    opt = OCNOpt(got, lr=0.7, curvature="identity", feedback=True, feedback_scale=beta,
                 weight_decay=wd)
    opt.step(lambda: F.cross_entropy(got(x), y))
    sgd = make_model(D)
    torch.optim.SGD(sgd.parameters(), lr=0.7, weight_decay=wd).zero_grad()
    for a, b in zip(ref.parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    # the first layer has dx = 0 (equals SGD) and a later layer differs from SGD
    plain = make_model(D)
    opt_sgd = torch.optim.SGD(plain.parameters(), lr=0.7, weight_decay=wd)
    F.cross_entropy(plain(x), y).backward()
    opt_sgd.step()
    first, last = _parametric(got)[0], _parametric(got)[-1]
    torch.testing.assert_close(got[first].weight, plain[first].weight, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got[last].weight, plain[last].weight, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "adam"])
def test_feedback_direction_goes_through_the_curvature(curvature):
    """Last layer: d == (1/B) sum_i (1 + s_i) q_i (brute force) and delta u == -lr M^-1 d."""
    torch.manual_seed(1)
    model, nominal = tiny_mlp(D), tiny_mlp(D)
    x, y = torch.randn(7, 6, dtype=D), torch.randint(0, 3, (7,))
    last = model[4]
    helper, _ = helper_for(last)
    u0 = helper.to_matrix(last.weight.detach().clone(), last.bias.detach().clone())
    kw = dict(damping=0.2) if curvature != "adam" else {}
    opt = OCNOpt(model, lr=0.3, curvature=curvature, feedback=True, factor_update_freq=1, **kw)
    opt.step(lambda: F.cross_entropy(model(x), y))
    d = helper.to_matrix(last.weight.grad, last.bias.grad)  # .grad holds the direction d_t
    # independent d from per-sample gradients at the nominal point and the realised dx
    with torch.no_grad():
        x_hat = model[3](model[2](model[1](model[0](x))))  # earlier layers already updated
        x_nom = nominal[3](nominal[2](nominal[1](nominal[0](x))))
    terms = []
    for i in range(7):
        xi = x_nom[i : i + 1].clone().requires_grad_(True)
        nominal.zero_grad()
        F.cross_entropy(nominal[4](xi), y[i : i + 1]).backward()
        s_i = (xi.grad[0] * (x_hat[i] - x_nom[i])).sum()
        terms.append((1 + s_i) * helper.to_matrix(nominal[4].weight.grad, nominal[4].bias.grad))
    torch.testing.assert_close(d, sum(terms) / 7, rtol=1e-9, atol=1e-12)
    step = u0 - helper.to_matrix(last.weight.detach(), last.bias.detach())
    st = opt.state[last.weight]
    if curvature == "adam":  # first Adam step: lr * d / (|d| + eps), elementwise
        expected = 0.3 * d / (d.abs() + 1e-8)
    elif curvature == "kfac":  # brute-force Kronecker solve, column-major vec
        m = st["locations"] * torch.kron(st["A"], st["G"]) + 0.2 * torch.eye(d.numel(), dtype=D)
        expected = 0.3 * torch.linalg.solve(m, d.T.reshape(-1)).reshape(d.shape[1], -1).T
    else:  # ekfac: eigenbasis of the factors, this step's running second moments m2
        u, w = st["out_vectors"], st["in_vectors"]
        expected = 0.3 * u @ ((u.T @ d @ w) / (st["m2"] + 0.2)) @ w.T
    torch.testing.assert_close(step, expected, rtol=1e-8, atol=1e-11)


def test_dropout_masks_are_replayed_and_rng_stream_is_unchanged():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).to(D)
    x, y = torch.randn(9, 6, dtype=D), torch.randint(0, 3, (9,))
    # reference: the same network with the dropout mask drawn once and applied as a constant
    # (if the second pass drew a new mask, dx and hence the last layer's update would differ)
    torch.manual_seed(5)
    mask = F.dropout(torch.ones(9, 8, dtype=D), 0.5, training=True)  # the draw Dropout makes
    after_one_draw = torch.get_rng_state()
    fixed = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Identity(), nn.Linear(8, 3)).to(D)
    fixed.load_state_dict(model.state_dict())

    class Mask(nn.Module):
        def forward(self, h):
            return h * mask

    fixed[2] = Mask()
    OCNOpt(fixed, lr=0.5, curvature="identity").step(lambda: F.cross_entropy(fixed(x), y))
    torch.manual_seed(5)
    opt = OCNOpt(model, lr=0.5, curvature="identity", feedback=True)
    opt.step(lambda: F.cross_entropy(model(x), y))
    for a, b in zip(fixed.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    # the second pass consumed no randomness: the global stream continues after ONE draw
    assert torch.equal(torch.get_rng_state(), after_one_draw)


def test_batchnorm_running_stats_untouched_by_feedback_pass():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    twin = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with pytest.warns(RuntimeWarning, match="1.weight"):
        opt = OCNOpt(model, lr=0.1, curvature="identity", feedback=True)
    opt.step(lambda: F.cross_entropy(model(x), y))
    twin(x)  # exactly one training-mode forward
    assert torch.equal(model[1].running_mean, twin[1].running_mean)
    assert torch.equal(model[1].running_var, twin[1].running_var)
    assert int(model[1].num_batches_tracked) == 1


def test_momentum_acts_on_the_closed_loop_direction():
    torch.manual_seed(4)
    x, y = torch.randn(6, 6, dtype=D), torch.randint(0, 3, (6,))
    model = tiny_mlp(D)
    opt = OCNOpt(model, lr=0.1, curvature="identity", feedback=True, momentum=0.9)
    opt.step(lambda: F.cross_entropy(model(x), y))
    last = model[4]
    assert torch.equal(opt.state[last.weight]["momentum_buffer"], last.weight.grad)
    g1 = last.weight.grad.clone()
    w_before = last.weight.detach().clone()
    opt.step(lambda: F.cross_entropy(model(x), y))
    expected = w_before - 0.1 * (0.9 * g1 + last.weight.grad)
    torch.testing.assert_close(last.weight.detach(), expected)


@pytest.mark.parametrize("make_model,shape", [(tiny_mlp, (6,)), (tiny_cnn, (1, 6, 6))],
                         ids=["tanh-mlp", "cnn"])
def test_identity_feedback_step_equals_reference_ddp_closed_loop(make_model, shape):
    """Against ocnopt.reference: explicit Jacobians, GN, per-sample V_xx = beta V_x V_x^T."""
    from ocnopt.reference import closed_loop_gn_step

    torch.manual_seed(6)
    x, y = torch.randn(4, *shape, dtype=D), torch.randint(0, 3, (4,))
    ref, got = make_model(D), make_model(D)
    closed_loop_gn_step(ref, x, y, "cross_entropy", lr=0.9, feedback_scale=1.5,
                        weight_decay=0.02)
    opt = OCNOpt(got, lr=0.9, curvature="identity", feedback=True, feedback_scale=1.5,
                 weight_decay=0.02)
    opt.step(lambda: F.cross_entropy(got(x), y))
    for a, b in zip(ref.parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_feedback_clip_is_a_trust_region_on_the_sample_weights():
    torch.manual_seed(7)
    x, y = torch.randn(6, 6, dtype=D), torch.randint(0, 3, (6,))
    runs = {}
    for clip in (None, 0.0, 1e-3, 1e9):
        model = tiny_mlp(D)
        opt = OCNOpt(model, lr=2.0, curvature="identity", feedback_clip=clip)
        opt.step(lambda model=model: F.cross_entropy(model(x), y))
        runs[clip] = [p.detach().clone() for p in model.parameters()]
    plain = tiny_mlp(D)
    OCNOpt(plain, lr=2.0, curvature="identity", feedback=False).step(
        lambda: F.cross_entropy(plain(x), y))
    for a, b in zip(runs[0.0], plain.parameters(), strict=True):  # clip 0: open loop, bitwise
        assert torch.equal(a, b)
    for a, b in zip(runs[1e9], runs[None], strict=True):  # a loose clip changes nothing
        assert torch.equal(a, b)
    # a tight clip moves the last layer only slightly away from the open-loop result
    open_loop = list(plain.parameters())[-2].detach()
    tight = (runs[1e-3][-2] - open_loop).abs().max()
    assert 0 < tight < (runs[None][-2] - open_loop).abs().max()


@pytest.mark.parametrize("curvature,kw", [("identity", dict(momentum=0.9)),
                                          ("identity", dict(momentum=0.8, dampening=0.5)),
                                          ("ekfac", dict(momentum=0.9)),
                                          ("rmsprop", dict(momentum=0.75))])
def test_feedback_enters_momentum_buffer_with_unit_total_gain(curvature, kw):
    """First step (buffer = direction): momentum mu with beta equals no momentum with
    beta * (1 - mu) / (1 - dampening) (RMSprop: beta * (1 - mu))."""
    torch.manual_seed(8)
    x, y = torch.randn(6, 6, dtype=D), torch.randint(0, 3, (6,))
    mu, damp = kw["momentum"], kw.get("dampening", 0.0)
    corr = (1 - mu) if curvature == "rmsprop" else (1 - mu) / (1 - damp)
    with_momentum, without = tiny_mlp(D), tiny_mlp(D)
    OCNOpt(with_momentum, lr=0.5, curvature=curvature, **kw).step(
        lambda: F.cross_entropy(with_momentum(x), y))
    OCNOpt(without, lr=0.5, curvature=curvature, feedback_scale=corr).step(
        lambda: F.cross_entropy(without(x), y))
    for a, b in zip(with_momentum.parameters(), without.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)
