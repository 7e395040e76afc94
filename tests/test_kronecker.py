"""Kronecker algebra against brute-force float64 computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocnopt import OCNOpt
from ocnopt.curvature import Eigenbasis, Projection, refresh_eigenbasis, symmetric_eigh
from ocnopt.layers import helper_for

D = torch.float64


def _psd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, 3 * d, generator=g, dtype=D)
    return x @ x.T / (3 * d)


def _complete(b: Eigenbasis) -> tuple[torch.Tensor, list[list[int]]]:
    """Full orthonormal basis [kept | complement] and the index groups sharing one scale."""
    if not b.truncated:
        return b.vectors, [[j] for j in range(b.rank)]
    g = torch.Generator().manual_seed(9)
    extra = torch.randn(b.dim, b.dim - b.rank, generator=g, dtype=D)
    q = torch.linalg.qr(torch.cat([b.vectors, extra], 1)).Q
    return q, [[j] for j in range(b.rank)] + [list(range(b.rank, b.dim))]


@pytest.mark.parametrize("k_out,k_in", [(None, None), (3, None), (None, 4), (3, 4), (7, 9)])
def test_projection_matches_explicit_block_scaling(k_out, k_in):
    d_out, d_in = 7, 9
    out = refresh_eigenbasis(_psd(d_out, 0), k_out)
    inp = refresh_eigenbasis(_psd(d_in, 1), k_in)
    v = torch.randn(d_out, d_in, dtype=D)
    scale = torch.rand(out.rank + out.truncated, inp.rank + inp.truncated, dtype=D) + 0.1
    proj = Projection(v, out, inp)
    uf, go = _complete(out)
    wf, gi = _complete(inp)
    c = uf.T @ v @ wf
    s_full = torch.zeros_like(c)
    m_ref = torch.zeros_like(scale)
    for a, ia in enumerate(go):
        for b, ib in enumerate(gi):
            block = (torch.tensor(ia)[:, None], torch.tensor(ib)[None, :])
            s_full[block] = scale[a, b]
            m_ref[a, b] = c[block].square().mean()
    torch.testing.assert_close(proj.apply(scale), uf @ (c * s_full) @ wf.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(proj.second_moments(), m_ref, rtol=0, atol=1e-12)


def test_exact_basis_is_eigendecomposition_and_truncation_keeps_top():
    f = _psd(12, 2)
    full = refresh_eigenbasis(f, None)
    torch.testing.assert_close(full.vectors @ torch.diag(full.values) @ full.vectors.T, f)
    top = refresh_eigenbasis(f, 5)
    ev = torch.linalg.eigvalsh(f).flip(0)
    torch.testing.assert_close(top.values, ev[:5])
    torch.testing.assert_close(top.rest, ev[5:].mean())


def test_warm_started_refresh_tracks_a_drifting_factor():
    f = _psd(30, 3)
    basis = refresh_eigenbasis(f, 6)
    for i in range(5):  # slowly drifting factor, refreshed by subspace iteration
        f = 0.9 * f + 0.1 * _psd(30, 10 + i)
        basis = refresh_eigenbasis(f, 6, basis, power_iters=2)
    exact = torch.linalg.eigvalsh(f).flip(0)[:6]
    assert torch.allclose(basis.values, exact, rtol=2e-2)
    # Rayleigh quotients of the kept vectors are the reported eigenvalues
    rq = torch.einsum("ik,ij,jk->k", basis.vectors, f, basis.vectors)
    torch.testing.assert_close(rq, basis.values)


def test_symmetric_eigh_rejects_nonfinite_and_retries_in_float64(monkeypatch):
    bad = _psd(4, 4).float()
    bad[0, 0] = float("nan")
    assert symmetric_eigh(bad) is None
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky(m):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated failure")
        return real_eigh(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    vals, vecs = symmetric_eigh(_psd(4, 5).float())
    assert calls == [torch.float32, torch.float64]
    assert vals.dtype == torch.float32 and bool(torch.isfinite(vecs).all())


def _per_sample_grad_matrices(model, layer, x, y, loss="ce"):
    """Brute force: per-sample gradient of sample i's own loss, as (d_out, d_in+1) matrices."""
    helper, _ = helper_for(layer)
    out = []
    for i in range(x.shape[0]):
        model.zero_grad()
        logits = model(x[i : i + 1])
        li = F.cross_entropy(logits, y[i : i + 1]) if loss == "ce" else (
            0.5 * (logits - y[i : i + 1]).square().sum())
        li.backward()
        out.append(helper.to_matrix(layer.weight.grad, layer.bias.grad))
    return out


def _kfac_matrix(opt, layer):
    st = opt.state[layer.weight]
    return st["locations"] * torch.kron(st["A"], st["G"])  # column-major vec ordering


def _vec(m):
    return m.T.reshape(-1)  # column-major


def _one_capture_step(model, x, y, curvature="kfac"):
    opt = OCNOpt(model, lr=0.0, curvature=curvature, feedback=False, factor_update_freq=1)
    opt.step(lambda: F.cross_entropy(model(x), y))
    return opt


def test_kfac_factors_exact_for_single_datum_linear_and_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 4),
                          nn.Tanh(), nn.Linear(4, 3)).to(D)
    x = torch.randn(1, 2, 3, 3, dtype=D)  # conv output is 1x1: KFC is exact with one location
    y = torch.tensor([1])
    opt = _one_capture_step(model, x, y)
    for layer in (model[0], model[3], model[5]):
        (q,) = _per_sample_grad_matrices(model, layer, x, y)
        exact = torch.outer(_vec(q), _vec(q))  # GGN block with the outer-product terminal Hessian
        torch.testing.assert_close(_kfac_matrix(opt, layer), exact, rtol=1e-9, atol=1e-12)


def test_kfac_factors_exact_for_shared_input_batch():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    x = torch.randn(1, 5, dtype=D).expand(6, 5).contiguous()  # same input, different labels
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    opt = _one_capture_step(model, x, y)
    layer = model[0]
    qs = _per_sample_grad_matrices(model, layer, x, y)
    exact = sum(torch.outer(_vec(q), _vec(q)) for q in qs) / len(qs)
    torch.testing.assert_close(_kfac_matrix(opt, layer), exact, rtol=1e-9, atol=1e-12)


def test_conv_factor_is_location_average_of_patches():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).to(D)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2)).to(D)
    x = torch.randn(4, 2, 5, 5, dtype=D)
    y = torch.tensor([0, 1, 1, 0])
    opt = _one_capture_step(model, x, y)
    st = opt.state[conv.weight]
    # brute force: explicit patch extraction with loops
    xp = F.pad(x, (1, 1, 1, 1))
    rows = []
    for i in range(4):
        for r in range(0, 5, 2):
            for c in range(0, 5, 2):
                patch = xp[i, :, r : r + 3, c : c + 3].reshape(-1)
                rows.append(torch.cat([patch, torch.ones(1, dtype=D)]))
    a = torch.stack(rows)
    torch.testing.assert_close(st["A"], a.T @ a / a.shape[0])
    assert st["locations"] == 9


def test_ekfac_equals_kfac_for_single_datum_without_eigenvalue_memory():
    torch.manual_seed(3)
    x = torch.randn(1, 5, dtype=D)
    y = torch.tensor([2])
    results = []
    for curv in ("kfac", "ekfac"):
        torch.manual_seed(4)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
        extra = dict(eigenvalue_decay=0.0) if curv == "ekfac" else {}
        opt = OCNOpt(model, lr=0.5, curvature=curv, feedback=False, damping=1e-3,
                     factor_update_freq=1, **extra)
        opt.step(lambda model=model: F.cross_entropy(model(x), y))
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-8, atol=1e-10)


def test_kfac_step_is_damped_natural_gradient():
    """Full-rank KFAC direction == (L A (x) G + damping I)^-1 vec(grad), brute force."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(D)
    x, y = torch.randn(8, 4, dtype=D), torch.randint(0, 2, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    opt = OCNOpt(model, lr=1.0, curvature="kfac", feedback=False, damping=0.1,
                 factor_update_freq=1, max_rank=None)
    opt.step(lambda: F.cross_entropy(model(x), y))
    for layer, (w0, b0) in ((model[0], before[0:2]), (model[2], before[2:4])):
        helper, _ = helper_for(layer)
        grad = helper.to_matrix(layer.weight.grad, layer.bias.grad)
        m = _kfac_matrix(opt, layer) + 0.1 * torch.eye(grad.numel(), dtype=D)
        step = torch.linalg.solve(m, _vec(grad))
        new = _vec(helper.to_matrix(layer.weight.detach(), layer.bias.detach()))
        torch.testing.assert_close(new, _vec(helper.to_matrix(w0, b0)) - step)


@pytest.mark.parametrize("feedback", [False, True])
@pytest.mark.parametrize("early", [False, True])
def test_factors_and_bases_follow_their_schedules(feedback, early):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = OCNOpt(model, lr=0.05, curvature="ekfac", feedback=feedback, factor_update_freq=3,
                 update_freq=6, early_refresh=early)
    st = opt.state[model[0].weight]
    seen_a, seen_basis = [], []
    for _ in range(8):
        x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
        seen_a.append(st["A"].clone())
        seen_basis.append(st["in_vectors"].clone())
    a_changed = [not torch.equal(seen_a[i], seen_a[i - 1]) for i in range(1, 8)]
    basis_changed = [not torch.equal(seen_basis[i], seen_basis[i - 1]) for i in range(1, 8)]
    if early:  # refreshes (with fresh factors) at steps 1, 2, 4 and 6; factors also at 3
        assert a_changed == [True, True, True, True, False, True, False]
        assert basis_changed == [True, True, False, True, False, True, False]
    else:
        assert a_changed == [False, False, True, False, False, True, False]  # steps 3 and 6
        assert basis_changed == [False, False, False, False, False, True, False]  # step 6
