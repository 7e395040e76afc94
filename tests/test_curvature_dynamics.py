"""Curvature dynamics pinned against independent float64 computations: factor EMAs (decays,
batch and location scaling, conv with strides/dilation, a layer run twice), EKFAC second
moments at refresh, the truncated basis's isotropic remainder, weight decay under Kronecker
preconditioning, fallback_lr, feedback_clip bounds, non-finite feedback terms, resume."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocnopt import OCNOpt
from tests.conftest import batches, tiny_mlp

D = torch.float64


def _per_sample_output_grads(model, x, y, layer, calls=1):
    """Rows of per-sample loss gradients w.r.t. ``layer``'s outputs (one backward per sample),
    stacked over samples then calls, in the layer's output layout."""
    rows = []
    for i in range(len(x)):
        outs = []

        def keep(m, a, o, outs=outs):
            o.retain_grad()
            outs.append(o)

        h = layer.register_forward_hook(keep)
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        h.remove()
        loss.backward()
        rows.append([o.grad[0].detach() for o in outs])
    return [torch.stack([r[c] for r in rows]) for c in range(calls)]


def test_linear_factor_emas_over_three_updates():
    torch.manual_seed(0)
    model = tiny_mlp(D)
    rho = 0.7
    opt = OCNOpt(model, lr=0.05, curvature="kfac", feedback=False, factor_decay=rho,
                 factor_update_freq=1, update_freq=100)
    layer = model[2]
    a_ref = g_ref = None
    for k, (x, y) in enumerate(batches(model, n=3, batch=5, dtype=D)):
        ref = tiny_mlp(D)
        ref.load_state_dict(model.state_dict())
        with torch.no_grad():
            inp = ref[1](ref[0](x))
        a = torch.cat([inp, torch.ones(len(x), 1, dtype=D)], 1)
        (g,) = _per_sample_output_grads(ref, x, y, ref[2])
        fa, fg = a.T @ a / len(x), g.T @ g / len(x)
        a_ref = fa if k == 0 else rho * a_ref + (1 - rho) * fa
        g_ref = fg if k == 0 else rho * g_ref + (1 - rho) * fg
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
        st = opt.state[layer.weight]
        torch.testing.assert_close(st["A"], a_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(st["G"], g_ref, rtol=1e-12, atol=1e-14)
        assert st["batch_size"] == 5 and st["locations"] == 1.0


@pytest.mark.parametrize("stride,dilation,padding", [(1, 1, 1), (2, 2, 0), (1, 2, 2)])
def test_conv_factors_use_every_output_location(stride, dilation, padding):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, stride=stride, dilation=dilation, padding=padding).to(D)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(4).to(D))
    x = torch.randn(4, 2, 7, 7, dtype=D)
    y = torch.randint(0, 4, (4,))
    model(x)  # materialise the lazy layer
    ref = nn.Sequential(nn.Conv2d(2, 3, 3, stride=stride, dilation=dilation, padding=padding),
                        nn.Tanh(), nn.Flatten(), nn.Linear(model[3].in_features, 4)).to(D)
    ref.load_state_dict(model.state_dict())
    opt = OCNOpt(model, lr=0.05, curvature="ekfac", feedback=False, factor_update_freq=1)
    opt.step(lambda: F.cross_entropy(model(x), y))
    # explicit patches, one row per (sample, output location), bias column last
    xp = F.pad(x, (padding,) * 4)
    h_out = (7 + 2 * padding - dilation * 2 - 1) // stride + 1
    rows = []
    for n in range(4):
        for i in range(h_out):
            for j in range(h_out):
                r0, c0 = i * stride, j * stride
                patch = xp[n, :, r0 : r0 + 2 * dilation + 1 : dilation,
                           c0 : c0 + 2 * dilation + 1 : dilation]
                rows.append(torch.cat([patch.reshape(-1), torch.ones(1, dtype=D)]))
    a = torch.stack(rows)
    (g,) = _per_sample_output_grads(ref, x, y, ref[0])
    g_rows = g.permute(0, 2, 3, 1).reshape(-1, 3)  # same (sample, location) order
    st = opt.state[conv.weight]
    torch.testing.assert_close(st["A"], a.T @ a / len(a), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(st["G"], g_rows.T @ g_rows / len(g_rows), rtol=1e-12, atol=1e-14)
    assert st["locations"] == h_out * h_out
    # EKFAC's initial second moments: L * lambda_G lambda_A^T, then one EMA update at alpha
    lam_a = torch.linalg.eigvalsh(st["A"]).flip(0).clamp_min(0)
    lam_g = torch.linalg.eigvalsh(st["G"]).flip(0).clamp_min(0)
    torch.testing.assert_close(st["in_values"], lam_a, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(st["out_values"], lam_g, rtol=1e-9, atol=1e-12)


def test_layer_run_twice_feeds_both_calls_into_its_factors():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.shared, self.out = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            return self.out(torch.tanh(self.shared(torch.tanh(self.shared(h)))))

    torch.manual_seed(2)
    model, ref = Twice().to(D), Twice().to(D)
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(6, 5, dtype=D), torch.randint(0, 3, (6,))
    opt = OCNOpt(model, lr=0.05, curvature="kfac", feedback=False, factor_update_freq=1)
    opt.step(lambda: F.cross_entropy(model(x), y))
    with torch.no_grad():
        h1 = torch.tanh(ref.inp(x))
        h2 = torch.tanh(ref.shared(h1))
    ones = torch.ones(6, 1, dtype=D)
    a = torch.cat([torch.cat([h1, ones], 1), torch.cat([h2, ones], 1)])
    g1, g2 = _per_sample_output_grads(ref, x, y, ref.shared, calls=2)
    g = torch.cat([g1, g2])
    st = opt.state[model.shared.weight]
    torch.testing.assert_close(st["A"], a.T @ a / 12, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(st["G"], g.T @ g / 12, rtol=1e-12, atol=1e-14)
    assert st["locations"] == 1.0


@pytest.mark.parametrize("early,refreshes", [(True, {0, 1, 2, 4, 5}), (False, {0, 5})])
def test_ekfac_second_moments_are_reset_at_each_refresh(early, refreshes):
    torch.manual_seed(3)
    model = tiny_mlp(D)
    alpha = 0.6
    opt = OCNOpt(model, lr=0.05, curvature="ekfac", feedback=False, eigenvalue_decay=alpha,
                 factor_update_freq=1, update_freq=5, max_rank=None, early_refresh=early)
    layer = model[4]
    for k, (x, y) in enumerate(batches(model, n=7, dtype=D)):
        prev = dict(opt.state[layer.weight])
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
        st = opt.state[layer.weight]
        d = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
        proj2 = (st["out_vectors"].T @ d @ st["in_vectors"]) ** 2
        if k in refreshes:  # refresh: m2 restarts from L * lambda_G lambda_A^T
            start = torch.outer(st["out_values"], st["in_values"])
        else:
            start = prev["m2"]
        torch.testing.assert_close(st["m2"], alpha * start + (1 - alpha) * 8 * proj2,
                                   rtol=1e-10, atol=1e-14)


def test_truncated_basis_keeps_the_isotropic_remainder_after_warm_started_refreshes():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3)).to(D)
    opt = OCNOpt(model, lr=0.05, curvature="ekfac", feedback=False, factor_update_freq=1,
                 update_freq=2, max_rank=4)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):  # refreshes at steps 0 (full eigh), 2 and 4 (warm-started)
        x, y = torch.randn(16, 12, generator=g, dtype=D), torch.randint(0, 3, (16,), generator=g)
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
    st = opt.state[model[0].weight]
    for side, f in (("in", st["A"]), ("out", st["G"])):
        vec, val, rest = st[f"{side}_vectors"], st[f"{side}_values"], st[f"{side}_rest"]
        d, k = f.shape[0], vec.shape[1]
        assert k == 4 < d
        torch.testing.assert_close(vec.T @ vec, torch.eye(k, dtype=D), rtol=0, atol=1e-10)
        torch.testing.assert_close(val, torch.diagonal(vec.T @ f @ vec), rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(rest, (f.trace() - val.sum()) / (d - k), rtol=1e-10, atol=0)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_weight_decay_is_preconditioned_with_the_gradient(curvature):
    torch.manual_seed(5)
    model = tiny_mlp(D)
    x, y = torch.randn(7, 6, dtype=D), torch.randint(0, 3, (7,))
    lr, wd, damping = 0.3, 0.05, 0.1
    last = model[4]
    u0 = torch.cat([last.weight.detach(), last.bias.detach()[:, None]], 1).clone()
    opt = OCNOpt(model, lr=lr, curvature=curvature, feedback=False, weight_decay=wd,
                 damping=damping, factor_update_freq=1, max_rank=None)
    opt.step(lambda: F.cross_entropy(model(x), y))
    st = opt.state[last.weight]
    grad = torch.cat([last.weight.grad, last.bias.grad[:, None]], 1)
    d = grad + wd * u0
    if curvature == "kfac":
        m = st["locations"] * torch.kron(st["A"], st["G"]) + damping * torch.eye(d.numel(),
                                                                                  dtype=D)
        step = torch.linalg.solve(m, d.T.reshape(-1)).reshape(d.shape[1], -1).T
    else:
        u, w = st["out_vectors"], st["in_vectors"]
        step = u @ ((u.T @ d @ w) / (st["m2"] + damping)) @ w.T
    new = torch.cat([last.weight.detach(), last.bias.detach()[:, None]], 1)
    torch.testing.assert_close(new, u0 - lr * step, rtol=1e-10, atol=1e-13)


def test_fallback_lr_drives_an_adam_on_parameters_outside_kronecker_layers():
    torch.manual_seed(6)

    def make():
        torch.manual_seed(6)
        return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))

    model, twin = make(), make()
    with pytest.warns(RuntimeWarning, match="1.weight"):
        opt = OCNOpt(model, lr=0.5, curvature="ekfac", feedback=False, fallback_lr=3e-3,
                     fallback_betas=(0.8, 0.99), fallback_eps=1e-6)
    adam = torch.optim.Adam(twin[1].parameters(), lr=3e-3, betas=(0.8, 0.99), eps=1e-6)
    sgd = torch.optim.SGD([p for i in (0, 3) for p in twin[i].parameters()], lr=0.0)
    for x, y in batches(model, n=4):
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
        adam.zero_grad()
        sgd.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        adam.step()
        with torch.no_grad():  # keep the twin's Kronecker layers on the same trajectory
            for i in (0, 3):
                for p, q in zip(twin[i].parameters(), model[i].parameters(), strict=True):
                    p.copy_(q)
        for p, q in zip(twin[1].parameters(), model[1].parameters(), strict=True):
            assert torch.equal(p, q)


def test_feedback_clip_bounds_the_sample_weights():
    """Identity curvature, last layer: the direction is sum_i clamp(s_i) q_i / B exactly."""
    torch.manual_seed(7)
    model, nominal = tiny_mlp(D), tiny_mlp(D)
    x, y = torch.randn(9, 6, dtype=D), torch.randint(0, 3, (9,))
    clip = 0.05
    opt = OCNOpt(model, lr=2.0, curvature="identity", feedback_clip=clip)
    opt.step(lambda: F.cross_entropy(model(x), y))
    with torch.no_grad():
        x_hat = model[3](model[2](model[1](model[0](x))))
        x_nom = nominal[3](nominal[2](nominal[1](nominal[0](x))))
    s, q = [], []
    for i in range(9):
        xi = x_nom[i : i + 1].clone().requires_grad_(True)
        nominal.zero_grad()
        F.cross_entropy(nominal[4](xi), y[i : i + 1]).backward()
        s.append((xi.grad[0] * (x_hat[i] - x_nom[i])).sum())
        q.append(nominal[4].weight.grad.clone())
    s = torch.stack(s)
    assert (s.abs() > clip).any()  # the clip is active on some samples
    d = sum((1 + s[i].clamp(-clip, clip)) * q[i] for i in range(9)) / 9
    torch.testing.assert_close(model[4].weight.grad, d, rtol=1e-10, atol=1e-13)


def test_nonfinite_feedback_terms_fall_back_to_open_loop_weights():
    """feedback_scale so large that every s_i overflows: each sample keeps weight 1, so the
    step equals the open-loop step, and the replaced terms are counted."""
    model, plain = tiny_mlp(), tiny_mlp()
    (x, y), *_ = batches(model, n=1)
    opt = OCNOpt(model, lr=0.5, curvature="identity", feedback_scale=1e38)
    with pytest.warns(RuntimeWarning, match=r"non-finite feedback"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    OCNOpt(plain, lr=0.5, curvature="identity", feedback=False).step(
        lambda: F.cross_entropy(plain(x), y))
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.diagnostics["nonfinite_feedback"] == 2 * len(x)  # two layers after the first
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_bitwise_resume_between_factor_updates(curvature):
    kw = dict(lr=0.02, curvature=curvature, momentum=0.9, factor_update_freq=3, update_freq=5,
              max_rank=3)
    data = batches(tiny_mlp(), n=9)
    model = tiny_mlp()
    opt = OCNOpt(model, **kw)
    for x, y in data[:4]:  # layer step 4: neither a factor update (3) nor a refresh (5)
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
    assert opt.state[model[0].weight]["kron_step"] == 4
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for x, y in data[4:]:
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed = tiny_mlp()
    resumed.load_state_dict(ckpt["model"])
    opt2 = OCNOpt(resumed, **kw)
    opt2.load_state_dict(ckpt["opt"])
    for x, y in data[4:]:
        opt2.step(lambda x=x, y=y: F.cross_entropy(resumed(x), y))
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_adam_grafting_gives_the_kronecker_direction_adams_magnitude():
    """graft='adam': step = -lr * m_hat, m the EMA (beta1) of the preconditioned direction
    rescaled to the norm of Adam's normalised direction d / (sqrt(v_hat) + eps) (float64)."""
    torch.manual_seed(8)
    model = tiny_mlp(D)
    last = model[4]
    lr, (b1, b2), eps, damping = 1e-2, (0.8, 0.95), 1e-8, 0.1
    opt = OCNOpt(model, lr=lr, curvature="kfac", feedback=False, graft="adam", betas=(b1, b2),
                 eps=eps, damping=damping, factor_update_freq=1, max_rank=None)
    m = v = None
    for k, (x, y) in enumerate(batches(model, n=3, dtype=D), start=1):
        u0 = torch.cat([last.weight.detach(), last.bias.detach()[:, None]], 1).clone()
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
        st = opt.state[last.weight]
        d = torch.cat([last.weight.grad, last.bias.grad[:, None]], 1)
        mk = st["locations"] * torch.kron(st["A"], st["G"]) + damping * torch.eye(d.numel(),
                                                                                    dtype=D)
        pm = torch.linalg.solve(mk, d.T.reshape(-1)).reshape(d.shape[1], -1).T
        v = (1 - b2) * d**2 if v is None else b2 * v + (1 - b2) * d**2
        normed = d / ((v / (1 - b2**k)).sqrt() + eps)  # weight and bias share one norm here
        g = pm * normed.norm() / pm.norm()
        m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g
        new = torch.cat([last.weight.detach(), last.bias.detach()[:, None]], 1)
        torch.testing.assert_close(new, u0 - lr * m / (1 - b1**k), rtol=1e-9, atol=1e-12)
    assert set(opt.param_groups[0]) >= {"betas", "eps"}
    assert "momentum" not in opt.param_groups[0]
    with pytest.raises(ValueError, match="graft"):
        OCNOpt(tiny_mlp(), curvature="adam", graft="adam")
    with pytest.raises(ValueError, match="'momentum' is not a setting"):
        OCNOpt(tiny_mlp(), curvature="ekfac", graft="adam", momentum=0.9)


def test_adam_grafting_with_feedback_scale_zero_and_resume():
    data = batches(tiny_mlp(), n=6)
    kw = dict(lr=3e-3, curvature="ekfac", graft="adam", factor_update_freq=2, update_freq=3,
              max_rank=3)
    runs = []
    for fb in ({"feedback": False}, {"feedback": True, "feedback_scale": 0.0}):
        model = tiny_mlp()
        opt = OCNOpt(model, **kw, **fb)
        for x, y in data:
            opt.step(lambda m=model, x=x, y=y: F.cross_entropy(m(x), y))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    model = tiny_mlp()
    opt = OCNOpt(model, **kw)
    for x, y in data[:3]:
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
    twin = tiny_mlp()
    twin.load_state_dict(model.state_dict())
    opt2 = OCNOpt(twin, **kw)
    opt2.load_state_dict(opt.state_dict())
    for x, y in data[3:]:
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
        opt2.step(lambda x=x, y=y: F.cross_entropy(twin(x), y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(),
                                                 strict=True))
