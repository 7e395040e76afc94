"""A safe drop-in for real models: every optimised parameter is updated correctly or named in a
warning, frozen ones never move; param groups, schedulers, scalar types, autocast, compile and
sequence-first layouts behave as on the torch twin (checked against torch.optim or brute force)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocnopt import CURVATURES, OCNOpt
from tests.conftest import batches, tiny_mlp

D = torch.float64


@contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _enc(seed=0):
    torch.manual_seed(seed)
    enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return nn.Sequential(enc, nn.Flatten(), nn.Linear(8 * 5, 3)).to(D)


def test_attention_out_projection_is_updated_from_its_true_gradient():
    model, twin = _enc(), _enc()
    x, y = torch.randn(4, 5, 8, dtype=D), torch.randint(0, 3, (4,))
    with pytest.warns(RuntimeWarning, match=r"0\.self_attn\.out_proj"):
        opt = OCNOpt(model, lr=1e-2, curvature="adam", feedback=True)
    assert "0.self_attn.out_proj" not in opt.layer_names
    opt.step(lambda: F.cross_entropy(model(x), y))
    adam = torch.optim.Adam(twin.parameters(), lr=1e-2)
    F.cross_entropy(twin(x), y).backward()
    adam.step()
    out, ref = model[0].self_attn.out_proj, twin[0].self_attn.out_proj
    assert torch.equal(out.weight, ref.weight) and torch.equal(out.bias, ref.bias)
    assert torch.equal(model[0].self_attn.in_proj_weight, twin[0].self_attn.in_proj_weight)


class _TiedLM(nn.Module):
    def __init__(self, vocab=12, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hid = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, t):
        return self.out(torch.tanh(self.hid(self.emb(t))).mean(1))


def test_tied_weights_get_their_total_gradient_and_a_warning():
    torch.manual_seed(1)
    model, twin = _TiedLM(), _TiedLM()
    twin.load_state_dict(model.state_dict())
    t, y = torch.randint(0, 12, (6, 4)), torch.randint(0, 12, (6,))
    with pytest.warns(RuntimeWarning, match="out .its parameters are shared"):
        opt = OCNOpt(model, lr=1e-2, curvature="adam", feedback=True)
    opt.step(lambda: F.cross_entropy(model(t), y))
    adam = torch.optim.Adam(twin.parameters(), lr=1e-2)
    F.cross_entropy(twin(t), y).backward()
    adam.step()
    assert torch.equal(model.emb.weight, twin.emb.weight)


def test_tied_language_model_trains_like_adam():
    """A tiny next-token task: adam + feedback must not diverge where torch Adam converges."""
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(0, 12, (64, 5), generator=g)
    target = (seq.sum(1) % 12)
    losses = {}
    for name in ("torch", "ocnopt"):
        torch.manual_seed(3)
        model = _TiedLM()
        if name == "torch":
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        else:
            with _quiet():
                opt = OCNOpt(model, lr=1e-2, curvature="adam", feedback=True)
        for k in range(150):
            t, y = seq[(k * 16) % 64 :][:16], target[(k * 16) % 64 :][:16]
            if name == "torch":
                opt.zero_grad()
                F.cross_entropy(model(t), y).backward()
                opt.step()
            else:
                opt.step(lambda m=model, t=t, y=y: F.cross_entropy(m(t), y))
        with torch.no_grad():
            losses[name] = float(F.cross_entropy(model(seq), target))
    assert losses["ocnopt"] < 1.5 * losses["torch"] + 0.1, losses


@pytest.mark.parametrize("how", ["requires_grad", "not_in_params"])
@pytest.mark.parametrize("curvature,feedback", [("identity", True), ("kfac", False),
                                                ("ekfac", True)])
def test_frozen_bias_never_moves_and_weight_step_is_exact(how, curvature, feedback):
    torch.manual_seed(4)
    model = tiny_mlp(D)
    x, y = torch.randn(7, 6, dtype=D), torch.randint(0, 3, (7,))
    last = model[4]
    params = None
    if how == "requires_grad":
        last.bias.requires_grad_(False)
    else:
        params = [p for p in model.parameters() if p is not last.bias]
    bias0, w0 = last.bias.detach().clone(), last.weight.detach().clone()
    kw = dict(damping=0.1, factor_update_freq=1, max_rank=None) if curvature != "identity" \
        else {}
    opt = OCNOpt(model, lr=0.3, curvature=curvature, feedback=feedback, params=params, **kw)
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert torch.equal(last.bias, bias0)
    d = last.weight.grad  # the direction used (feedback: the re-weighted gradient)
    if curvature == "identity":
        expected = w0 - 0.3 * d
    else:
        st = opt.state[last.weight]
        assert st["A"].shape == (4, 4)  # no ones column for the frozen bias
        if curvature == "kfac":
            m = torch.kron(st["A"], st["G"]) + 0.1 * torch.eye(d.numel(), dtype=D)
            step = torch.linalg.solve(m, d.T.reshape(-1)).reshape(d.shape[1], -1).T
        else:
            u, w = st["out_vectors"], st["in_vectors"]
            step = u @ ((u.T @ d @ w) / (st["m2"] + 0.1)) @ w.T
        expected = w0 - 0.3 * step
    torch.testing.assert_close(last.weight.detach(), expected, rtol=1e-10, atol=1e-13)


def test_weight_and_bias_in_different_groups_match_torch_sgd():
    model, twin = tiny_mlp(), tiny_mlp()

    def groups(m):
        weights = [p for n, p in m.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in m.named_parameters() if n.endswith("bias")]
        return [{"params": weights, "weight_decay": 0.1}, {"params": biases, "lr": 0.05}]

    opt = OCNOpt(model, lr=0.2, curvature="identity", feedback=False, momentum=0.9,
                 params=groups(model))
    sgd = torch.optim.SGD(groups(twin), lr=0.2, momentum=0.9)
    for x, y in batches(model, n=4):
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
        sgd.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        sgd.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_kronecker_layer_with_split_groups_decays_only_the_weight():
    torch.manual_seed(5)
    model = tiny_mlp(D)
    x, y = torch.randn(7, 6, dtype=D), torch.randint(0, 3, (7,))
    last = model[4]
    u0 = torch.cat([last.weight.detach(), last.bias.detach()[:, None]], 1).clone()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = OCNOpt(model, lr=0.3, curvature="kfac", feedback=False, damping=0.1,
                 factor_update_freq=1, max_rank=None,
                 params=[{"params": weights, "weight_decay": 0.05},
                         {"params": biases, "lr": 0.1}])
    opt.step(lambda: F.cross_entropy(model(x), y))
    st = opt.state[last.weight]
    grad = torch.cat([last.weight.grad, last.bias.grad[:, None]], 1)
    d = grad + 0.05 * torch.cat([u0[:, :-1], torch.zeros(3, 1, dtype=D)], 1)
    m = torch.kron(st["A"], st["G"]) + 0.1 * torch.eye(d.numel(), dtype=D)
    step = torch.linalg.solve(m, d.T.reshape(-1)).reshape(d.shape[1], -1).T
    torch.testing.assert_close(last.weight.detach(), u0[:, :-1] - 0.3 * step[:, :-1],
                               rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(last.bias.detach(), u0[:, -1] - 0.1 * step[:, -1],
                               rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("curvature,twin,kw", [
    ("identity", torch.optim.SGD, dict(momentum=0.9)),
    ("kfac", torch.optim.SGD, dict(momentum=0.9)),
    ("rmsprop", torch.optim.RMSprop, dict(momentum=0.5)),
    ("adam", torch.optim.Adam, {}),
])
@pytest.mark.parametrize("scheduler", ["onecycle", "cyclic"])
def test_schedulers_cycle_the_same_keys_as_on_the_torch_twin(curvature, twin, kw, scheduler):
    def make(opt):
        if scheduler == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
        return torch.optim.lr_scheduler.CyclicLR(opt, 0.01, 0.1, step_size_up=3)

    m1, m2 = nn.Linear(3, 2), nn.Linear(3, 2)
    ours = OCNOpt(m1, lr=0.01, curvature=curvature, feedback=False, **kw)
    theirs = twin(m2.parameters(), lr=0.01, **kw)
    s1, s2 = make(ours), make(theirs)
    for _ in range(8):
        for key in ("lr", "momentum", "betas"):
            assert ours.param_groups[0].get(key) == theirs.param_groups[0].get(key), key
        ours.step()  # no gradients: a no-op, as in torch
        theirs.step()
        s1.step()
        s2.step()


@pytest.mark.parametrize("lr", [np.float32(0.25), np.float64(0.25), torch.tensor(0.25)],
                         ids=["np32", "np64", "tensor"])
def test_learning_rate_as_any_real_scalar(lr):
    model, plain = tiny_mlp(), tiny_mlp()
    (x, y), *_ = batches(model, n=1)
    OCNOpt(model, lr=lr, curvature="identity").step(lambda: F.cross_entropy(model(x), y))
    OCNOpt(plain, lr=0.25, curvature="identity").step(lambda: F.cross_entropy(plain(x), y))
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="lr"):
        OCNOpt(tiny_mlp(), lr=torch.tensor([0.1, 0.2]), curvature="identity")


@pytest.mark.parametrize("curvature", CURVATURES)
def test_autocast_bfloat16_with_feedback_matches_the_float32_step(curvature):
    """Under CPU autocast the step is the float32 step up to bfloat16 rounding of the forward."""
    kw = dict(momentum=0.9) if curvature in ("identity", "kfac", "ekfac") else {}
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    updates = {}
    for mode in ("fp32", "bf16"):
        model = tiny_mlp()
        start = [p.detach().clone() for p in model.parameters()]
        opt = OCNOpt(model, lr=0.05, curvature=curvature, feedback=True, **kw)

        def closure(model=model, mode=mode):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                return F.cross_entropy(model(x), y)

        opt.step(closure)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        updates[mode] = torch.cat([(p.detach() - s).reshape(-1)
                                   for p, s in zip(model.parameters(), start, strict=True)])
    cos = F.cosine_similarity(updates["fp32"], updates["bf16"], dim=0)
    assert cos > 0.99 and opt.skipped_steps == 0


def test_compiled_model_needs_feedback_off_and_then_trains_like_the_eager_one():
    model = tiny_mlp()
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(ValueError, match=r"torch.compile\(model\) with feedback=True"):
        OCNOpt(compiled, lr=0.1, curvature="identity")
    eager = tiny_mlp()
    opts = [OCNOpt(m, lr=0.05, curvature="kfac", feedback=False, momentum=0.9,
                   factor_update_freq=1) for m in (compiled, eager)]
    with _quiet():
        for x, y in batches(model, n=3):
            for m, o in zip((compiled, eager), opts, strict=True):
                o.step(lambda m=m, x=x, y=y: F.cross_entropy(m(x), y))
    assert "A" in opts[0].state[model[0].weight]
    for a, b in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _SeqNet(nn.Module):
    """Linear layers over (sequence, batch, features) or (batch, sequence, features)."""

    def __init__(self, batch_first: bool):
        super().__init__()
        torch.manual_seed(6)
        self.batch_first = batch_first
        self.a, self.b, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.head(h.mean(1 if self.batch_first else 0))


def test_sequence_first_inputs_with_batch_dim_1_equal_the_batch_first_step():
    x, y = torch.randn(6, 7, 4, dtype=D), torch.randint(0, 3, (6,))  # (batch, seq, feat)
    bf, sf = _SeqNet(True).to(D), _SeqNet(False).to(D)
    sf.load_state_dict(bf.state_dict())
    o1 = OCNOpt(bf, lr=0.5, curvature="ekfac", momentum=0.9, factor_update_freq=1)
    o2 = OCNOpt(sf, lr=0.5, curvature="ekfac", momentum=0.9, factor_update_freq=1,
                batch_dim={"a": 1, "b": 1})  # the head sees (batch, features)
    for _ in range(2):
        o1.step(lambda: F.cross_entropy(bf(x), y))
        o2.step(lambda: F.cross_entropy(sf(x.transpose(0, 1)), y))
    for a, b in zip(bf.parameters(), sf.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.warns(RuntimeWarning, match="batch_dim must be 0"):
        OCNOpt(nn.Conv2d(1, 2, 3), batch_dim=1)
    with pytest.raises(ValueError, match="batch_dim"):
        OCNOpt(tiny_mlp(), batch_dim={"a": 1.5})


def test_batch_first_false_modules_are_flagged():
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16), nn.Linear(8, 3))
    with pytest.warns(RuntimeWarning, match="batch_first=False.*pass batch_dim"):
        OCNOpt(model, lr=0.01, curvature="adam")


def test_clear_errors_for_misused_closures():
    model = tiny_mlp()
    opt = OCNOpt(model, lr=0.1, curvature="identity")
    (x, y), *_ = batches(model, n=1)
    with pytest.raises(ValueError, match="does not require grad"):
        opt.step(lambda: F.cross_entropy(model(x), y).detach())
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    with pytest.raises(TypeError, match="returned float without calling backward"):
        opt.step(lambda: float(F.cross_entropy(model(x), y)))
    assert opt.num_steps == 0 and opt.skip_reasons == {"exception": 3}
