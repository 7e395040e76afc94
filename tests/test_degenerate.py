"""Degenerate cases (Prop. 2): OCNOpt with feedback off IS the base optimizer, bitwise on CPU.

Also: ``feedback_scale=0`` gives exactly the parameters of ``feedback=False`` for every curvature.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ocnopt import CURVATURES, OCNOpt
from tests.conftest import batches, tiny_cnn, tiny_mlp

STEPS = 6


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _train_torch(make_model, torch_opt, kw, data):
    model = make_model()
    opt = torch_opt(model.parameters(), **kw)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return _params(model)


def _train_ocnopt(make_model, kw, data, classic: bool):
    model = make_model()
    opt = OCNOpt(model, **kw)
    for x, y in data:
        if classic:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        else:
            opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y))
    return _params(model)


CASES = [
    (torch.optim.SGD, dict(lr=0.1), dict(curvature="identity")),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
     dict(curvature="identity", momentum=0.9, weight_decay=1e-2)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True),
     dict(curvature="identity", momentum=0.8, nesterov=True)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.5, dampening=0.3),
     dict(curvature="identity", momentum=0.5, dampening=0.3)),
    (torch.optim.RMSprop, dict(lr=1e-2), dict(curvature="rmsprop")),
    (torch.optim.RMSprop, dict(lr=1e-2, alpha=0.9, eps=1e-6, weight_decay=1e-3, momentum=0.5,
                               centered=True),
     dict(curvature="rmsprop", alpha=0.9, eps=1e-6, weight_decay=1e-3, momentum=0.5,
          centered=True)),
    (torch.optim.Adam, dict(lr=1e-2), dict(curvature="adam")),
    (torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2,
                            amsgrad=True),
     dict(curvature="adam", betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2, amsgrad=True)),
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1),
     dict(curvature="adam", weight_decay=0.1, decoupled_weight_decay=True)),
]


@pytest.mark.parametrize("make_model", [tiny_mlp, tiny_cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("torch_opt,torch_kw,ocn_kw", CASES)
@pytest.mark.parametrize("classic", [False, True], ids=["closure", "classic"])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
def test_feedback_off_is_torch_optimizer(make_model, torch_opt, torch_kw, ocn_kw, classic,
                                         foreach):
    """Both OCNOpt sweeps (per tensor, and one foreach call per param group) are bitwise the
    torch optimizer's default single-tensor path on CPU."""
    data = batches(make_model(), n=STEPS)
    ref = _train_torch(make_model, torch_opt, torch_kw, data)
    kw = dict(ocn_kw, lr=torch_kw["lr"], feedback=False, foreach=foreach)
    got = _train_ocnopt(make_model, kw, data, classic=classic)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("make_model", [tiny_mlp, tiny_cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("curvature", CURVATURES)
def test_feedback_scale_zero_equals_feedback_off(make_model, curvature):
    data = batches(make_model(), n=STEPS)
    common = dict(lr=0.05 if curvature not in ("adam", "rmsprop") else 1e-2,
                  curvature=curvature, weight_decay=1e-3, factor_update_freq=1, update_freq=3)
    if curvature in ("identity", "kfac", "ekfac"):
        common["momentum"] = 0.9
    off = _train_ocnopt(make_model, dict(common, feedback=False), data, classic=False)
    zero = _train_ocnopt(make_model, dict(common, feedback=True, feedback_scale=0.0), data,
                         classic=False)
    on = _train_ocnopt(make_model, dict(common, feedback=True, feedback_scale=1.0), data,
                       classic=False)
    for a, b in zip(off, zero, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()
    # ...and the feedback really does something (this test could not pass vacuously)
    assert any(not torch.allclose(a, b) for a, b in zip(off, on, strict=True))
