"""Structure detection from the autograd graph (ocnopt.feedback.structure / record / game).

The central check is an identity of the chain rule that holds for any architecture: if only
modules that finished before a player ``t`` starts change (parameters moved along ``eps * D``),
the loss changes only through the cut of ``t``, so

    sum over cut tensors c of <dL/dc (partial), dc/deps>  ==  sum_theta <dL/dtheta, D_theta>.

The right side is plain autograd; ``dc/deps`` comes from central differences of the second-pass
observations.  A missing cut tensor, a wrong partial gradient or a wrong observation breaks it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ocnopt.feedback import GameFeedback, ModuleCall, Observer, Seen, analyse, edge_of
from ocnopt.feedback.record import _sequence_counter

D = torch.float64


# ------------------------------------------------------------------ models
class BasicBlock(nn.Module):
    """torchvision's BasicBlock: in-place ReLU, ``out += identity``, 1x1-conv+BN downsample."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True),
        BasicBlock(3, 3, 1), BasicBlock(3, 4, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).to(D)


class Inception(nn.Module):
    """Branches read the same tensor; functional ops between modules; concatenation."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.b1 = nn.Conv2d(3, 2, 1)
        self.b2a, self.b2b = nn.Conv2d(3, 2, 1), nn.Conv2d(2, 2, 3, padding=1)
        self.b3 = nn.Conv2d(3, 2, 1)
        self.head = nn.Linear(6 * 16, 3)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.stem(x))
        a = self.b1(h)
        b = self.b2b(torch.relu(self.b2a(h)))
        c = self.b3(F.avg_pool2d(h, 3, stride=1, padding=1))
        y = torch.tanh(torch.cat([a, b, c], dim=1))
        return self.head(y.flatten(1))


class Reuse(nn.Module):
    """A module applied twice (not a player), a skip over several layers, and a data-dependent
    number of residual blocks (Python control flow)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.inp, self.shared, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5)) for _ in range(3))
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        h0 = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h0))
        h = torch.tanh(self.shared(h))
        for blk in self.blocks[:2 if float(x.sum()) > 0 else 3]:
            h = h + blk(h)
        return self.head(torch.tanh(h) * h0)


class Attention(nn.Module):
    """q, k, v projections read the same LayerNorm output (a group of three players)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.norm = nn.LayerNorm(4)
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.o, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        x = x.view(x.shape[0], 3, 4)
        h = self.norm(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 2.0, dim=-1)
        x = x + self.o(att @ self.v(h))
        return self.head(x.mean(1))


MODELS = {
    "resnet": (resnet, (1, 6, 6)),
    "inception": (Inception, (1, 4, 4)),
    "reuse-control-flow": (Reuse, (4,)),
    "attention": (Attention, (12,)),
}


def layers_of(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def first_pass(model: nn.Module, x: Tensor, y: Tensor, information: str = "nash"):
    game = GameFeedback(model, layers_of(model), information)
    with game.record(), torch.enable_grad():
        loss = F.cross_entropy(model(x), y)
    plan = game.prepare(loss)
    params = [p for p in model.parameters() if p.requires_grad]
    with game.collect():
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return game, plan, {p: g for p, g in zip(params, grads, strict=True) if g is not None}


def data(shape: tuple[int, ...], n: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, *shape, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


# ------------------------------------------------------------------ the chain-rule identity
@pytest.mark.parametrize("name", MODELS)
def test_cut_terms_carry_the_whole_upstream_change(name: str) -> None:
    make, shape = MODELS[name]
    model = make()
    x, y = data(shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        game, plan, grads = first_pass(model, x, y)
    assert len(caught) == len(plan.warnings())  # attention: its weights are not observable
    calls = game.recorder.calls
    g = torch.Generator().manual_seed(8)
    direction = {p: torch.randn(p.shape, generator=g, dtype=D) for p in grads}
    eps = 1e-5
    wanted = [t.seen for p in plan.players for t in p.terms]
    checked = 0
    for player in plan.players:
        start = player.call.start_event
        done = {c.module for c in calls if c.end_event < start}
        later = {c.module for c in calls if c.end_event >= start}
        moved = [p for m in done - later for p in m.parameters(recurse=False) if p in grads]
        if not moved or not player.terms or player.dropped:
            continue
        seen_values: list[list[Tensor]] = []
        for sign in (1.0, -1.0, 0.0):
            with torch.no_grad():
                for p in moved:
                    p.add_(sign * eps * direction[p])
                obs = Observer(calls, wanted)

                def snapshot(module, args, obs=obs, terms=player.terms, out=seen_values):
                    out.append([obs.get(t.seen).clone() for t in terms])  # as the layer starts

                with obs:
                    handle = player.call.module.register_forward_pre_hook(snapshot)
                    model(x)
                    handle.remove()
                for p in moved:
                    p.sub_(sign * eps * direction[p])
        lhs = sum(float((game.partial(t) * (a - b)).sum()) / (2 * eps)
                  for t, a, b in zip(player.terms, seen_values[0], seen_values[1], strict=True))
        rhs = sum(float((grads[p] * direction[p]).sum()) for p in moved)
        assert abs(lhs - rhs) < 1e-7 * (1 + abs(rhs)), player.call.name
        for t, v in zip(player.terms, seen_values[2], strict=True):  # nominal values (in-place
            torch.testing.assert_close(t.seen.value(), v, rtol=0, atol=1e-13)  # saved ones too)
        checked += 1
    assert checked >= 3


# ------------------------------------------------------------------ expected cuts
def _cuts(game, plan) -> dict[str, list[str]]:
    calls = game.recorder.calls
    out = {}
    for p in plan.players:
        out[p.call.name] = [
            ("own " if t.own else "") + f"{calls[t.seen.call].name}:{t.seen.role}" for t in p.terms]
    return out


def test_resnet_cuts_include_skips_and_the_block_output_before_the_in_place_add() -> None:
    x, y = data((1, 6, 6))
    game, plan, _ = first_pass(resnet().train(), x, y)
    cuts = _cuts(game, plan)
    assert cuts == {
        "0": [],  # the stem reads the data: nothing before it moves
        "3.conv1": ["own 3.conv1:input"],
        "3.conv2": ["own 3.conv2:input", "3.conv1:input"],  # skip = the block input
        "4.conv1": ["own 4.conv1:input"],
        "4.conv2": ["own 4.conv2:input", "4.conv1:input"],
        # the downsample conv: its input and bn2's output waiting for `out += identity`
        "4.downsample.0": ["own 4.downsample.0:input", "4.bn2:output"],
        "7": ["own 7:input"],
    }
    bn2 = next(p for p in plan.players if p.call.name == "4.downsample.0").terms[1].seen
    assert bn2.saved is not None and bn2.tensor._version != bn2.version  # copied before `+=`
    assert not plan.warnings()


def test_branch_reuse_and_control_flow_cuts() -> None:
    x, y = data((1, 4, 4))
    game, plan, _ = first_pass(Inception(), x, y)
    assert _cuts(game, plan) == {
        "stem": [],
        "b1": ["own b1:input"],
        "b2a": ["own b2a:input", "b1:output"],  # the shared input and the finished branch
        "b2b": ["own b2b:input", "b2a:input", "b1:output"],  # h still waits for b3's pooling
        "b3": ["own b3:input", "b1:output", "b2b:output"],
        "head": ["own head:input"],
    }
    g = torch.Generator().manual_seed(5)
    for sign, blocks in ((1.0, 2), (-1.0, 3)):  # input sum > 0: two residual blocks, else three
        x = torch.rand(5, 4, generator=g, dtype=D) * sign
        game, plan, _ = first_pass(Reuse(), x, torch.zeros(5, dtype=torch.long))
        expected = {"inp": [], "head": ["own head:input"]}
        for b in range(blocks):  # h0 (first seen entering `shared`) is carried to the head
            expected[f"blocks.{b}.0"] = [f"own blocks.{b}.0:input", "shared:input"]
            expected[f"blocks.{b}.2"] = [f"own blocks.{b}.2:input", "shared:input",
                                         f"blocks.{b}.0:input"]
        assert _cuts(game, plan) == expected  # `shared` runs twice: not a player


def test_attention_weights_are_not_observable() -> None:
    x, y = data((12,))
    with pytest.warns(RuntimeWarning, match=r"v: output of SoftmaxBackward0"):
        game, plan, _ = first_pass(Attention(), x, y)
    cuts = _cuts(game, plan)
    assert cuts["k"] == ["own k:input", "q:output"] and cuts["v"] == ["own v:input"]


def test_cooperative_groups() -> None:
    x, y = data((1, 6, 6))
    _, plan, _ = first_pass(resnet(), x, y, "cooperative")
    names = [[plan.players[i].call.name for i in g] for g in plan.groups]
    assert names == [["4.conv1", "4.downsample.0"]]
    x, y = data((12,))
    with pytest.warns(RuntimeWarning, match="SoftmaxBackward0"):
        _, plan, _ = first_pass(Attention(), x, y, "cooperative")
    assert [[plan.players[i].call.name for i in g] for g in plan.groups] == [["q", "k", "v"]]
    x, y = data((1, 4, 4))
    _, plan, _ = first_pass(Inception(), x, y, "cooperative")
    assert [[plan.players[i].call.name for i in g] for g in plan.groups] == [["b1", "b2a"]]
    _, plan, _ = first_pass(Inception(), x, y, "nash")
    assert plan.groups == []


def test_markov_keeps_only_the_own_input() -> None:
    x, y = data((1, 6, 6))
    _, plan, _ = first_pass(resnet(), x, y, "markov")
    assert all(len(p.terms) <= 1 and all(t.own for t in p.terms) for p in plan.players)


# ------------------------------------------------------------------ fallbacks
class HiddenSkip(nn.Module):
    """The skip ``h`` is made by a functional op and never seen by a module before fc2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.fc0, self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc0(x))
        return self.fc2(torch.tanh(self.fc1(2 * h))) + h[:, :3]


def test_unobservable_cut_tensor_falls_back_with_a_warning_naming_the_layer() -> None:
    model = HiddenSkip()
    x, y = data((4,))
    game = GameFeedback(model, layers_of(model), "nash")
    with game.record():
        loss = F.cross_entropy(model(x), y)
    with pytest.warns(RuntimeWarning) as caught:
        plan = game.prepare(loss)
    assert [str(w.message).split("feedback: ")[2] for w in caught] == [
        f"{name}: output of TanhBackward0 (not seen by any module before the layer)"
        for name in ("fc1", "fc2")]  # h is read by fc1's input `2 * h` and after fc2
    fc2 = next(p for p in plan.players if p.call.name == "fc2")
    assert [t.own for t in fc2.terms] == [True]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        game.prepare(loss)  # once per layer


def test_analyse_on_hand_made_records_detects_a_lost_value() -> None:
    """Pure function: records built by hand (no hooks); a cut tensor modified in place after
    it was seen, without a saved copy, is dropped and reported."""
    torch.manual_seed(5)
    lin1, lin2 = nn.Linear(3, 3).double(), nn.Linear(3, 3).double()
    x = torch.randn(2, 3, dtype=D)
    calls: list[ModuleCall] = []

    def call(module, inp):
        c = ModuleCall(module, f"m{len(calls)}", 0, _sequence_counter(), 2 * len(calls))
        calls.append(c)
        if edge_of(inp) is not None:
            c.inputs = [Seen(len(calls) - 1, "input", 0, c.start_event, inp, inp._version,
                             edge_of(inp))]
        out = module(inp)
        c.end_event = c.start_event + 1
        c.outputs = [Seen(len(calls) - 1, "output", 0, c.end_event, out, out._version,
                          edge_of(out))]
        return out

    a = call(lin1, x)  # a: seen as lin1's output
    b = call(lin2, torch.tanh(a))  # lin2's cut: its input and `a` (read again below)
    a_skip = a * 1.0
    loss = (b + a_skip).pow(2).sum()
    plan = analyse(loss, calls, {lin1, lin2}, "nash")
    assert [t.own for t in plan.players[1].terms] == [True, False]
    with torch.no_grad():
        a.mul_(2.0)  # modified in place after it was seen, not saved
    plan = analyse(loss, calls, {lin1, lin2}, "nash")
    assert [t.own for t in plan.players[1].terms] == [True]
    assert "modified in place" in plan.warnings()[0]
    with pytest.raises(ValueError, match="markov, nash, cooperative"):
        analyse(loss, calls, {lin1, lin2}, "open-loop")


class GradOnlyModule(nn.Module):
    """The skip ``h`` is seen as ``act``'s output, but ``act`` runs only when grad is enabled:
    the second (no-grad) pass cannot observe it again."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.fc0, self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 5)
        self.act, self.head = nn.Tanh(), nn.Linear(5, 3)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        a = self.fc0(x)
        h = self.act(a) if torch.is_grad_enabled() else torch.tanh(a)
        return self.head(self.fc2(torch.tanh(self.fc1(2 * h))) + h)


def test_a_cut_tensor_missing_in_the_second_pass_is_skipped_with_a_warning() -> None:
    model = GradOnlyModule()
    x, y = data((4,))
    game, plan, _ = first_pass(model, x, y)
    fc2 = next(p for p in plan.players if p.call.name == "fc2")
    assert [t.own for t in fc2.terms] == [True, False]  # its input and h (act's output)
    values = []
    with torch.no_grad(), game.observe(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = model.fc2.register_forward_pre_hook(
            lambda m, args: values.append(game.feedback(m, args[0])))
        model(x)
        handle.remove()
    assert len(caught) == 1 and "'fc2' could not observe" in str(caught[0].message)
    torch.testing.assert_close(values[0], torch.zeros(5, dtype=D))  # parameters unchanged
