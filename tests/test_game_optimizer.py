"""OCNOpt(information=...) through the public optimizer, against the float64 game oracle
(``ocnopt.reference.game``), explicit per-sample computations and the optimizer's own
Markovian fallback."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocnopt import OCNOpt
from ocnopt.curvature.kronecker import refresh_eigenbasis
from ocnopt.curvature.layer_state import KFAC
from ocnopt.feedback import per_sample_grads, step_model
from ocnopt.layers import helper_for
from ocnopt.reference import Op, Program, ResidualMLP, TinyResCNN, TwoBranchNet, game_step
from tests.conftest import tiny_cnn, tiny_mlp

D = torch.float64
INFO = ("markov", "nash", "cooperative")
NETS = {"residual-mlp": (ResidualMLP, (4,)), "residual-cnn": (TinyResCNN, (1, 6, 6)),
        "two-branch": (TwoBranchNet, (4,))}


def batch(shape: tuple[int, ...], n: int = 4, seed: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


def layers_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def closure_for(model: nn.Module, opt: OCNOpt, x: Tensor, y: Tensor, torch_style: bool):
    def closure() -> Tensor:
        loss = F.cross_entropy(model(x), y)
        if torch_style and torch.is_grad_enabled():
            opt.zero_grad()
            loss.backward()
        return loss
    return closure


def assert_params_close(a: nn.Module, b: nn.Module, tol: float = 1e-10) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=tol, atol=tol * 1e-2)


# ------------------------------------------------------------------ against the oracle
@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("information", INFO)
@pytest.mark.parametrize("torch_style", [False, True], ids=["ocnopt-backward", "closure-backward"])
def test_identity_steps_equal_the_oracle(name: str, information: str, torch_style: bool) -> None:
    cls, shape = NETS[name]
    x, y = batch(shape)
    ref, got = cls(), cls()
    game_step(ref.program(), x, y, "cross_entropy", lr=0.7, information=information,
              feedback_scale=1.5, weight_decay=0.02)
    opt = OCNOpt(got, lr=0.7, curvature="identity", feedback_scale=1.5, weight_decay=0.02,
                 information=information)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback on these nets
        opt.step(closure_for(got, opt, x, y, torch_style))
    assert_params_close(ref, got)


def _spd(n: int, g: torch.Generator) -> Tensor:
    a = torch.randn(n, n, generator=g, dtype=D)
    return a @ a.T / n + 0.5 * torch.eye(n, dtype=D)


def fixed_curvature(curvature: str, ref: nn.Module, got: nn.Module, opt: OCNOpt) -> dict:
    """Load a fixed ``M`` into the optimizer's state and return it in the oracle's layout.

    rmsprop with ``alpha=1``: ``M = diag(sqrt(square_avg) + eps)`` never changes.  kfac with
    exact bases and no factor update or refresh due: ``M = L A (x) G + damping`` (dense, from
    the factors, permuted from the ``[W | b]`` row-major layout to ``concat(W.flatten(), b)``).
    """
    g = torch.Generator().manual_seed(1)
    M = {}
    for lr_, lg in zip(layers_of(ref), layers_of(got), strict=True):
        if curvature == "rmsprop":
            diag = []
            for p in (q for q in (lg.weight, lg.bias) if q is not None):
                S = torch.rand(p.shape, generator=g, dtype=D) + 0.1
                opt.state[p] = {"step": torch.tensor(3.0), "square_avg": S}
                diag.append(S.sqrt().reshape(-1) + 1e-3)
            M[lr_] = torch.cat(diag)
            continue
        d_out, d_in, hb = lg.weight.shape[0], lg.weight[0].numel(), int(lg.bias is not None)
        A, G = _spd(d_in + hb, g), _spd(d_out, g)
        L = 2.0 if isinstance(lg, nn.Conv2d) else 1.0
        ib, ob = refresh_eigenbasis(A, None), refresh_eigenbasis(G, None)
        opt.state[lg.weight] = {
            "A": A, "G": G, "in_vectors": ib.vectors, "in_values": ib.values, "in_rest": ib.rest,
            "out_vectors": ob.vectors, "out_values": ob.values, "out_rest": ob.rest,
            "kron_step": 1, "locations": L, "batch_size": 4}
        dense = L * torch.kron(G, A) + 0.1 * torch.eye(d_out * (d_in + hb), dtype=D)
        idx = torch.tensor([o * (d_in + hb) + i for o in range(d_out) for i in range(d_in)]
                           + [o * (d_in + hb) + d_in for o in range(d_out)] * hb)
        M[lr_] = dense[idx][:, idx]
    return M


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("information", INFO)
@pytest.mark.parametrize("curvature", ["rmsprop", "kfac"])
def test_fixed_curvature_steps_equal_the_oracle(name: str, information: str,
                                                curvature: str) -> None:
    """With a curvature the oracle can be given exactly, the cooperative solve (and the nash /
    markov feedback) through the optimizer equals the oracle's stage minimiser."""
    cls, shape = NETS[name]
    x, y = batch(shape)
    ref, got = cls(), cls()
    kw = (dict(alpha=1.0, eps=1e-3) if curvature == "rmsprop" else
          dict(max_rank=None, damping=0.1, factor_update_freq=1000, update_freq=1000,
               early_refresh=False))
    opt = OCNOpt(got, lr=0.3, curvature=curvature, feedback_scale=1.5, weight_decay=0.02,
                 information=information, **kw)
    M = fixed_curvature(curvature, ref, got, opt)
    game_step(ref.program(), x, y, "cross_entropy", lr=0.3, information=information,
              feedback_scale=1.5, weight_decay=0.02, curvature=M)
    opt.step(lambda: F.cross_entropy(got(x), y))
    assert_params_close(ref, got)


def test_the_structures_differ_on_non_markovian_nets() -> None:
    """Guards the oracle tests against vacuous agreement: nash moves other parameters than
    markov on every net, cooperative other than nash where two layers read one tensor."""
    for name, (cls, shape) in NETS.items():
        x, y = batch(shape)
        runs = {}
        for information in INFO:
            model = cls()
            OCNOpt(model, lr=0.7, curvature="identity", feedback_scale=1.5,
                   information=information).step(
                lambda m=model, x=x, y=y: F.cross_entropy(m(x), y))
            runs[information] = params(model)
        assert _gap(runs["nash"], runs["markov"]) > 1e-4, name
        assert (_gap(runs["cooperative"], runs["nash"]) > 1e-4) == (name != "residual-mlp"), name


def _gap(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a, b, strict=True))


def test_nash_minus_markov_is_exactly_the_skip_term() -> None:
    """Residual MLP: fc0 and fc1 see only their inputs, so both runs reach fc2 with the same
    deviation; fc2's cut adds the skip h0.  The difference of fc2's updates must be
    ``-lr/B sum_i beta <dl_i/dh0 (partial), dh0_i> q_i`` computed with explicit per-sample
    gradients (partial: through the two additions that read h0 after fc2 starts)."""
    x, y = batch((4,))
    lr, beta, B = 0.7, 1.5, x.shape[0]
    runs = {}
    for information in ("markov", "nash"):
        model = ResidualMLP()
        OCNOpt(model, lr=lr, curvature="identity", feedback_scale=beta,
               information=information).step(lambda m=model: F.cross_entropy(m(x), y))
        runs[information] = model
    nom = ResidualMLP()
    for layer in ("fc0", "fc1"):
        for p, q in zip(getattr(runs["markov"], layer).parameters(),
                        getattr(runs["nash"], layer).parameters(), strict=True):
            assert torch.equal(p, q)
    expected_w = torch.zeros_like(nom.fc2.weight)
    expected_b = torch.zeros_like(nom.fc2.bias)
    with torch.no_grad():
        h0 = torch.tanh(nom.fc0(x))
        dh0 = torch.tanh(runs["nash"].fc0(x)) - h0
        b1 = nom.fc2(torch.tanh(nom.fc1(h0)))
    for i in range(B):
        z = h0[i:i + 1].clone().requires_grad_(True)  # h0 where the additions read it
        h1 = z + b1[i:i + 1]
        h2 = h1 + nom.fc4(torch.tanh(nom.fc3(h1)))
        partial = torch.autograd.grad(
            F.cross_entropy(nom.head(torch.tanh(h2 + z)), y[i:i + 1]), z)[0]
        loss_i = F.cross_entropy(nom(x[i:i + 1]), y[i:i + 1])
        qw, qb = torch.autograd.grad(loss_i, [nom.fc2.weight, nom.fc2.bias])
        s = beta * float((partial * dh0[i]).sum())
        expected_w += -lr / B * s * qw
        expected_b += -lr / B * s * qb
    torch.testing.assert_close(runs["nash"].fc2.weight - runs["markov"].fc2.weight, expected_w,
                               rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(runs["nash"].fc2.bias - runs["markov"].fc2.bias, expected_b,
                               rtol=1e-9, atol=1e-13)
    assert float(expected_w.abs().max()) > 1e-4


# ------------------------------------------------------------------ chains and fallbacks
def unhookable_closure(model: nn.Module, opt: OCNOpt, x: Tensor, y: Tensor):
    """A torch-style closure whose backward() cannot be intercepted (torch functions
    disabled): OCNOpt falls back to the Markovian step with total input gradients."""
    def closure() -> Tensor:
        loss = F.cross_entropy(model(x), y)
        if torch.is_grad_enabled():
            opt.zero_grad()
            with torch._C.DisableTorchFunction():
                loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("make,shape", [(tiny_mlp, (6,)), (tiny_cnn, (1, 6, 6))],
                         ids=["mlp", "cnn"])
@pytest.mark.parametrize("curvature", ["identity", "adam", "ekfac"])
def test_on_chains_every_structure_is_the_markovian_step_bitwise(make, shape, curvature) -> None:
    """The three structures and the pre-game step (the fallback: own input, total gradient)
    give bitwise the same parameters over several steps on feed-forward chains."""
    data = [batch(shape, n=5, seed=s) for s in range(3)]
    runs = []
    for information in (*INFO, "fallback"):
        model = make(D)
        opt = OCNOpt(model, lr=0.3, curvature=curvature, feedback_scale=1.5,
                     information="nash" if information == "fallback" else information,
                     **({"momentum": 0.5} if curvature != "adam" else {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for x, y in data:
                opt.step(unhookable_closure(model, opt, x, y) if information == "fallback"
                         else closure_for(model, opt, x, y, False))
        runs.append(params(model))
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


def test_an_unhookable_backward_falls_back_with_one_warning() -> None:
    """The fallback is the step before the game feedback (own input, total gradient): on the
    residual MLP (no layer reads a tensor an earlier layer read) that is the markov step."""
    x, y = batch((4,))
    model, ref = ResidualMLP(), ResidualMLP()
    opt = OCNOpt(model, lr=0.7, curvature="identity", feedback_scale=1.5)
    with pytest.warns(RuntimeWarning, match="game feedback unavailable for this step .*could "
                      "not hook it.*Markovian step"):
        opt.step(unhookable_closure(model, opt, x, y))
    game_step(ref.program(), x, y, "cross_entropy", lr=0.7, information="markov",
              feedback_scale=1.5)
    assert_params_close(ref, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(unhookable_closure(model, opt, x, y))  # warned once


def test_a_second_backward_in_the_closure_falls_back() -> None:
    x, y = batch((4,))
    model = ResidualMLP()
    opt = OCNOpt(model, lr=0.7, curvature="identity")

    def closure() -> Tensor:
        loss = F.cross_entropy(model(x), y)
        if torch.is_grad_enabled():
            opt.zero_grad()
            (0.5 * loss).backward(retain_graph=True)
            (0.5 * loss).backward()
        return loss

    with pytest.warns(RuntimeWarning, match="backward\\(\\) more than once"):
        opt.step(closure)
    assert opt.num_steps == 1


def test_unobservable_cut_tensors_are_named_in_a_warning() -> None:
    class HiddenSkip(nn.Module):  # h is read by fc1's input `2 * h` and after fc2
        def __init__(self) -> None:
            super().__init__()
            self.fc0, self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.fc0(x))
            return self.fc2(torch.tanh(self.fc1(2 * h))) + h[:, :3]

    model = HiddenSkip()
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    opt = OCNOpt(model, lr=0.1, curvature="identity")
    with pytest.warns(RuntimeWarning, match="fc2: output of TanhBackward0"):
        opt.step(lambda: F.cross_entropy(model(x), y))


# ------------------------------------------------------------------ degenerate cases
class ResNetDropout(nn.Module):
    """Train-mode BatchNorm, in-place ReLU and ``out += identity``, a 1x1-conv+BN downsample,
    and dropout before the head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3),
                                  nn.ReLU(inplace=True))
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4)
        self.down = nn.Sequential(nn.Conv2d(3, 4, 1, 2, bias=False), nn.BatchNorm2d(4))
        self.drop, self.head = nn.Dropout(0.3), nn.Linear(4 * 3 * 3, 3)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += self.down(x)
        return self.head(self.drop(F.relu(out).flatten(1)))


DEGENERATE = {**NETS, "resnet-dropout": (ResNetDropout, (1, 6, 6))}


@pytest.mark.parametrize("name", DEGENERATE)
@pytest.mark.parametrize("information", INFO)
@pytest.mark.parametrize("curvature", ["identity", "adam", "ekfac"])
@pytest.mark.parametrize("how", ["scale-0", "clip-0"])
def test_feedback_scale_or_clip_zero_is_feedback_off_bitwise(name: str, information: str,
                                                             curvature: str, how: str) -> None:
    """``feedback_scale=0``, and ``feedback_clip=0`` (every sample weight, joint ones
    included, clamped to 1), give the parameters of ``feedback=False`` bitwise."""
    cls, shape = DEGENERATE[name]
    data = [batch(shape, n=6, seed=s) for s in range(2)]
    runs = []
    for feedback in (False, True):
        model = cls()
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BatchNorm parameters: open-loop fallback
            opt = OCNOpt(model, lr=0.05, curvature=curvature, feedback=feedback,
                         feedback_scale=0.0 if how == "scale-0" else 1.5,
                         feedback_clip=0.0 if how == "clip-0" else None,
                         weight_decay=1e-3, information=information,
                         factor_update_freq=1, update_freq=2)
            for x, y in data:
                opt.step(lambda m=model, x=x, y=y: F.cross_entropy(m(x), y))
        runs.append(params(model) + [b.clone() for b in model.buffers()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("information", INFO)
def test_dropout_and_batchnorm_are_replayed_for_the_cut_tensors(information: str) -> None:
    """With every layer but the head frozen (lr 0) the second pass must reproduce the first
    exactly (same dropout masks, same train-mode BatchNorm statistics, in-place residual sum),
    so every deviation is 0 and the step is the open-loop step bitwise."""
    x, y = batch((1, 6, 6), n=6)
    runs = []
    for feedback in (False, True):
        model = ResNetDropout()
        head = list(model.head.parameters())
        rest = [p for p in model.parameters() if all(p is not h for h in head)]
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = OCNOpt(model, curvature="identity", feedback=feedback, feedback_scale=2.0,
                         information=information,
                         params=[{"params": rest, "lr": 0.0}, {"params": head, "lr": 0.5}])
            opt.step(lambda m=model: F.cross_entropy(m(x), y))
        runs.append(params(model))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("information", ["nash", "cooperative"])
@pytest.mark.parametrize("curvature", ["identity", "adam"])
def test_maximize_equals_minimizing_the_negated_loss(information: str, curvature: str) -> None:
    x, y = batch((1, 6, 6))
    runs = []
    for maximize in (False, True):
        model = TinyResCNN()
        opt = OCNOpt(model, lr=0.3 if curvature == "identity" else 0.01, curvature=curvature,
                     feedback_scale=1.5, weight_decay=0.01, maximize=maximize,
                     information=information)
        sign = -1.0 if maximize else 1.0
        for _ in range(2):
            opt.step(lambda m=model, sign=sign: sign * F.cross_entropy(m(x), y))
        runs.append(params(model))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_momentum_scales_the_first_step_feedback_by_the_gain_correction() -> None:
    """First step (empty momentum buffer): the momentum run's update is the momentum-free
    run's with ``feedback_scale`` times ``(1 - momentum) / (1 - dampening)``, skip terms too."""
    x, y = batch((4,))
    runs = []
    for momentum, beta in ((0.6, 1.5), (0.0, 1.5 * 0.4 / 0.9)):
        model = ResidualMLP()
        OCNOpt(model, lr=0.7, curvature="identity", feedback_scale=beta, momentum=momentum,
               dampening=0.1 if momentum else 0.0).step(lambda m=model: F.cross_entropy(m(x), y))
        runs.append(params(model))
    for a, b in zip(*runs, strict=True):  # torch's first momentum buffer is d itself
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_momentum_scales_a_cooperative_groups_whole_feedback_by_the_gain_correction() -> None:
    """Two-branch net: fc0 reads the data (open loop), so the group (fa1, fb1) sees the same
    deviation in every run.  First step with momentum: the group's feedback (deviation and
    cross terms of the momentum-free joint solve) enters scaled by the gain correction, so
    ``step - open loop = gain * (momentum-free cooperative step - open loop)``."""
    x, y = batch((4,))
    runs = {}
    for key, momentum, beta in (("momentum", 0.6, 1.5), ("free", 0.0, 1.5), ("open", 0.0, 0.0)):
        model = TwoBranchNet()
        OCNOpt(model, lr=0.7, curvature="identity", feedback_scale=beta, momentum=momentum,
               dampening=0.1 if momentum else 0.0, information="cooperative").step(
            lambda m=model: F.cross_entropy(m(x), y))
        runs[key] = model
    gain = 0.4 / 0.9
    for name in ("fa1", "fb1"):
        mom, free, open_ = (getattr(runs[k], name).weight for k in ("momentum", "free", "open"))
        torch.testing.assert_close(mom - open_, gain * (free - open_), rtol=1e-10, atol=1e-14)
        assert float((free - open_).abs().max()) > 1e-4


@pytest.mark.parametrize("style", ["ocnopt-backward", "closure-backward"])
@pytest.mark.parametrize("information", ["nash", "cooperative"])
def test_grad_scaler_steps_equal_unscaled_steps(style: str, information: str) -> None:
    x, y = batch((1, 6, 6))
    x = x.float()
    runs = []
    for use_scaler in (False, True):
        model = TinyResCNN().float()
        opt = OCNOpt(model, lr=0.3, curvature="identity", feedback_scale=1.5,
                     information=information)
        closure = closure_for(model, opt, x, y, style == "closure-backward")
        if use_scaler:
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
            scaler.scale(torch.ones(()))

            def scaled(model=model, opt=opt, scaler=scaler) -> Tensor:
                loss = F.cross_entropy(model(x), y)
                if style == "closure-backward" and torch.is_grad_enabled():
                    opt.zero_grad()
                    scaler.scale(loss).backward()
                return loss

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                scaler.step(opt, scaled)
        else:
            opt.step(closure)
        runs.append(params(model))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ atomic steps, state
def _everything(model: nn.Module, opt: OCNOpt) -> tuple:
    sd = copy.deepcopy(opt.state_dict())
    sd.pop("ocnopt")
    return copy.deepcopy(model.state_dict()), sd


def _same(a, b) -> bool:
    if isinstance(a, Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("curvature", ["identity", "ekfac"])
def test_an_exception_after_the_group_decided_rolls_everything_back(curvature: str) -> None:
    """The downsample conv and conv1 decide (and are updated) at conv1; the head raises in
    the second pass after that: parameters, BatchNorm statistics and state come back."""
    model = ResNetDropout()
    data = [batch((1, 6, 6), n=6, seed=s) for s in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OCNOpt(model, lr=0.1, curvature=curvature, information="cooperative",
                     feedback_scale=1.0, factor_update_freq=1, update_freq=2)
        for x, y in data[:2]:
            opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
    before = _everything(model, opt)
    moved = {}

    def boom(module: nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled():
            moved["down"] = not torch.equal(model.down[0].weight, before[0]["down.0.weight"])
            raise RuntimeError("boom")

    handle = model.head.register_forward_pre_hook(boom)
    x, y = data[2]
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(lambda: F.cross_entropy(model(x), y))
    handle.remove()
    assert moved == {"down": True}  # the group had been updated when the error came
    assert _same(before, _everything(model, opt))
    assert opt.skip_reasons == {"exception": 1}


def test_state_round_trip_with_cooperative_feedback() -> None:
    data = [batch((1, 6, 6), n=6, seed=s) for s in range(4)]

    def train(model, opt, part):
        for x, y in part:
            opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))

    kw = dict(lr=0.1, curvature="ekfac", information="cooperative", momentum=0.5,
              factor_update_freq=1, update_freq=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ResNetDropout()
        opt = OCNOpt(model, **kw)
        train(model, opt, data[:2])
        saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(
            opt.state_dict())
        torch.manual_seed(7)
        train(model, opt, data[2:])
        resumed = ResNetDropout()
        resumed.load_state_dict(saved_model)
        opt2 = OCNOpt(resumed, **kw)
        opt2.load_state_dict(saved_opt)
        torch.manual_seed(7)
        train(resumed, opt2, data[2:])
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ groups and early stop
class ForkHead(nn.Module):
    """``fa`` and ``fb`` read ``h`` and are the last players: the group decides at ``fa``,
    which is also where the second pass stops."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.fc0, self.fa, self.fb = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(5, 3)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc0(x))
        return self.fa(h) + torch.tanh(self.fb(h))

    def program(self) -> Program:
        return Program("x", (
            Op("a0", ("x",), layer=self.fc0), Op("h", ("a0",), fn=torch.tanh),
            Op("a", ("h",), layer=self.fa), Op("b", ("h",), layer=self.fb),
            Op("t", ("b",), fn=torch.tanh), Op("out", ("a", "t"), fn=torch.add)), "out")


def test_the_second_pass_stops_at_the_group_that_updates_the_last_layer() -> None:
    x, y = batch((4,))
    ref, model = ForkHead(), ForkHead()
    game_step(ref.program(), x, y, "cross_entropy", lr=0.7, information="cooperative",
              feedback_scale=1.5)
    calls = []
    model.fb.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    OCNOpt(model, lr=0.7, curvature="identity", feedback_scale=1.5,
           information="cooperative").step(lambda: F.cross_entropy(model(x), y))
    assert calls == [True]  # fb never ran in the second pass
    assert_params_close(ref, model)


def test_kronecker_step_model_is_the_preconditioner_on_each_sample() -> None:
    """The batched (vmap) ``lr M^-1`` of the joint solve equals the optimizer's own KFAC
    preconditioner per sample, truncated bases included."""
    torch.manual_seed(6)
    layer = nn.Conv2d(5, 6, 3, padding=1).double()
    helper = helper_for(layer)[0]
    x = torch.randn(4, 5, 4, 4, dtype=D)
    g = torch.randn(4, 6, 4, 4, dtype=D)
    gen = torch.Generator().manual_seed(2)
    A, G = _spd(46, gen), _spd(6, gen)
    ib, ob = refresh_eigenbasis(A, 7), refresh_eigenbasis(G, 3)
    st = {"A": A, "G": G, "in_vectors": ib.vectors, "in_values": ib.values, "in_rest": ib.rest,
          "out_vectors": ob.vectors, "out_values": ob.values, "out_rest": ob.rest,
          "locations": 16.0}
    group = {"lr": 0.3, "weight_decay": 0.0, "damping": 0.05}
    model = step_model("kfac", helper, (st, {}), (group, group), KFAC)
    q = per_sample_grads(helper, x, g)
    for i, qi in enumerate(q):
        torch.testing.assert_close(model(q)[i], 0.3 * KFAC.precondition(st, qi, group)[0],
                                   rtol=1e-12, atol=1e-14)


def test_invalid_information_is_refused() -> None:
    with pytest.raises(ValueError, match="valid: markov, nash, cooperative"):
        OCNOpt(nn.Linear(2, 2), information="open-loop")


@pytest.mark.parametrize("information", INFO)
def test_no_tensor_of_a_step_outlives_it(information: str) -> None:
    """The gradient hooks on the layers' inputs and outputs hold their records only weakly
    (the records hold the graph's tensors): the live tensors do not grow from step to step."""
    import gc

    model = ResNetDropout()
    x, y = batch((1, 6, 6), n=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OCNOpt(model, lr=0.01, curvature="ekfac", information=information,
                     factor_update_freq=1, update_freq=1)

    def live() -> int:
        gc.collect()
        return sum(1 for t in gc.get_objects() if isinstance(t, Tensor))

    for _ in range(2):
        opt.step(lambda: F.cross_entropy(model(x), y))
    before = live()
    for _ in range(3):
        opt.step(lambda: F.cross_entropy(model(x), y))
    assert live() == before
