"""Multi-process OCNOpt on torch.distributed (gloo, 2 processes on 127.0.0.1, CPU)."""

from __future__ import annotations

import pytest
import torch

from ocnopt.distributed import Communicator, assign_work
from tests.distributed_utils import run_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed not available")


def test_assign_work_balances_costs_deterministically():
    costs = [("a", 8.0), ("b", 1.0), ("c", 4.0), ("d", 4.0), ("e", 1.0)]
    got = assign_work(costs, 2)
    loads = [sum(c for k, c in costs if got[k] == r) for r in range(2)]
    assert got == assign_work(costs, 2) and max(loads) == 9.0
    assert assign_work(costs, 1) == {k: 0 for k, _ in costs}


def _comm_rank(rank, world):
    comm = Communicator(torch.distributed.group.WORLD)
    a = torch.full((2, 3), float(rank + 1))
    b = torch.arange(4.0) * (rank + 1)
    comm.mean_([a, b], "gradients")
    flags = (comm.all_true(True), comm.all_true(rank == 0))
    c = torch.full((3,), float(rank))
    comm.broadcast_([c], src=1, kind="bases")
    return a, b, flags, c, comm.bytes["gradients"]


def test_communicator_means_consensus_and_broadcast():
    results = run_ranks(_comm_rank, 2)
    for a, b, flags, c, nbytes in results:
        assert torch.equal(a, torch.full((2, 3), 1.5))
        assert torch.equal(b, torch.arange(4.0) * 1.5)
        assert flags == (True, False)
        assert torch.equal(c, torch.ones(3))
        assert nbytes == 10 * 4


# ---------------------------------------------------------------- the optimizer on 2 ranks
import warnings  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from ocnopt import CURVATURES, OCNOpt  # noqa: E402

D = torch.float64
STEPS = 4
CASES = [(c, fb) for c in CURVATURES for fb in (False, True)]


def _model():
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 4),
                         nn.Tanh(), nn.Linear(4, 3)).to(D)


def _data(n=STEPS, batch=8):
    g = torch.Generator().manual_seed(12)
    return [(torch.randn(batch, 6, generator=g, dtype=D), torch.randint(0, 3, (batch,),
                                                                         generator=g))
            for _ in range(n)]


def _kw(curvature, feedback):
    kw = dict(curvature=curvature, feedback=feedback, factor_update_freq=1, update_freq=2,
              max_rank=3 if curvature in ("kfac", "ekfac") else None)
    kw = {k: v for k, v in kw.items() if v is not None}
    kw["lr"] = 0.05 if curvature in ("identity", "kfac", "ekfac") else 1e-2
    if curvature in ("identity", "kfac", "ekfac"):
        kw["momentum"] = 0.9
    return kw


def _train(model, opt, data, sl=slice(None), nan_at=None, classic=False):
    for k, (x, y) in enumerate(data):
        x, y = x[sl].clone(), y[sl]
        if k == nan_at:
            x[0, 0] = float("nan")
        if classic:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        else:
            opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))


def _rank_runs(rank, world):
    data = _data()
    sl = slice(rank * 4, (rank + 1) * 4)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for curvature, feedback in CASES:
            model = _model()
            opt = OCNOpt(model, **_kw(curvature, feedback))
            _train(model, opt, data, sl)
            out[(curvature, feedback)] = [p.detach().clone() for p in model.parameters()]
        # DDP-wrapped, closure loop and classic loop
        ddp = nn.parallel.DistributedDataParallel(_model())
        opt = OCNOpt(ddp, **_kw("ekfac", True))
        _train(ddp, opt, data, sl)
        out["ddp"] = [p.detach().clone() for p in ddp.module.parameters()]
        ddp = nn.parallel.DistributedDataParallel(_model())
        opt = OCNOpt(ddp, **_kw("kfac", False))
        _train(ddp, opt, data, sl, classic=True)
        out["ddp-classic"] = [p.detach().clone() for p in ddp.module.parameters()]
        # game feedback (nash) on a residual net, and a model with an ODE block
        for key, make in (("nash", _residual), ("ode", _ode_model)):
            model = make()
            opt = OCNOpt(model, **_kw("ekfac", True))
            _train(model, opt, _extra_data(key), sl)
            out[key] = [p.detach().clone() for p in model.parameters()]
        # a NaN on rank 1 only, at step 2: every rank skips that step
        model = _model()
        opt = OCNOpt(model, **_kw("ekfac", True))
        _train(model, opt, data, sl, nan_at=2 if rank == 1 else None)
        out["nan"] = ([p.detach().clone() for p in model.parameters()], opt.skip_reasons)
        # checkpoint after two steps (rank 0 saves)
        model = _model()
        opt = OCNOpt(model, **_kw("ekfac", True))
        _train(model, opt, data[:2], sl)
        out["ckpt"] = (model.state_dict(), opt.state_dict())
    return out


def _residual():
    from ocnopt.reference.game_nets import ResidualMLP

    return ResidualMLP(seed=13)


def _ode_model():
    from ocnopt.ode import ODEBlock

    torch.manual_seed(14)
    field = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5))

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = field

        def forward(self, t, h):
            return self.net(h)

    return nn.Sequential(nn.Linear(6, 5), ODEBlock(Field(), method="euler",
                                                    options={"step_size": 0.25}),
                         nn.Tanh(), nn.Linear(5, 3)).to(D)


def _extra_data(key):
    return [(x[:, :4], y) for x, y in _data()] if key == "nash" else _data()


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_rank_runs, 2)


def _single(curvature, feedback, data, skip=None, classic=False):
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OCNOpt(model, **_kw(curvature, feedback))
        _train(model, opt, [d for k, d in enumerate(data) if k != skip], classic=classic)
    return [p.detach() for p in model.parameters()]


def _close(a, b):
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature,feedback", CASES)
def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_ranks, curvature, feedback):
    ref = _single(curvature, feedback, _data())
    r0, r1 = (r[(curvature, feedback)] for r in two_ranks)
    assert all(torch.equal(a, b) for a, b in zip(r0, r1, strict=True))  # replicas identical
    _close(r0, ref)


def test_ddp_wrapped_model_in_both_loops(two_ranks):
    for key, curvature, feedback, classic in (("ddp", "ekfac", True, False),
                                              ("ddp-classic", "kfac", False, True)):
        ref = _single(curvature, feedback, _data(), classic=classic)
        r0, r1 = (r[key] for r in two_ranks)
        assert all(torch.equal(a, b) for a, b in zip(r0, r1, strict=True))
        _close(r0, ref)


@pytest.mark.parametrize("key,make", [("nash", _residual), ("ode", _ode_model)])
def test_game_and_ode_models_on_two_ranks(two_ranks, key, make):
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OCNOpt(model, **_kw("ekfac", True))
        _train(model, opt, _extra_data(key))
    r0, r1 = (r[key] for r in two_ranks)
    assert all(torch.equal(a, b) for a, b in zip(r0, r1, strict=True))
    _close(r0, [p.detach() for p in model.parameters()])


def test_nan_on_one_rank_is_skipped_by_all(two_ranks):
    (p0, reasons0), (p1, reasons1) = (r["nan"] for r in two_ranks)
    assert reasons0 == {"nonfinite_on_another_rank": 1}
    assert reasons1 == {"nonfinite_gradient": 1} or reasons1 == {"nonfinite_loss": 1}
    assert all(torch.equal(a, b) for a, b in zip(p0, p1, strict=True))
    _close(p0, _single("ekfac", True, _data(), skip=2))


def test_checkpoint_from_two_ranks_resumes_on_one(two_ranks):
    model_sd, opt_sd = two_ranks[0]["ckpt"]
    data = _data()
    model = _model()
    model.load_state_dict(model_sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OCNOpt(model, **_kw("ekfac", True))
        opt.load_state_dict(opt_sd)
        _train(model, opt, data[2:])
    _close([p.detach() for p in model.parameters()], _single("ekfac", True, data))


def _dist_speed_rank(rank, world):
    from ocnopt.bench.dist_speed import measure

    return measure("mlp", "cpu", global_batch=8, steps=2, warmup=2, rounds=1)


def test_distributed_speed_rows_count_exactly_what_is_sent():
    from ocnopt.bench.models import build_model

    rows = run_ranks(_dist_speed_rank, 2)[0]
    n = sum(p.numel() for p in build_model("mlp", input_shape=(1, 28, 28),
                                           num_classes=10).parameters())
    by = {r["optimizer"]: r for r in rows}
    assert by["adam"]["bytes_per_step"] is None and by["adam"]["world_size"] == 2
    # open loop: one all-reduce of every gradient; feedback: one per layer of its direction
    assert by["ocnopt-ekfac"]["bytes_per_step"]["gradients"] == 4 * n
    assert by["ocnopt-ekfac"]["bytes_per_step"]["directions"] == 0
    assert by["ocnopt-ekfac+fb"]["bytes_per_step"]["directions"] == 4 * n
    assert by["ocnopt-ekfac+fb"]["bytes_per_step"]["gradients"] == 0
    assert all(r["ms_per_step"] > 0 and r["local_batch"] == 4 for r in rows)
