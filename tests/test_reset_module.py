"""The ReSet module: Algorithm 1, executions, controllers, per-iteration BN, errors."""

import copy

import pytest
import torch
from torch import nn

import resetnet
from resetnet.nn import BasicBlock, CNNController, ReSet, ResidualSequence, RNNController, Routing

C, H = 4, 8
BIG = 1000.0  # logit margin that no Gumbel noise can overcome: Gumbel-ST then gives an exact one-hot


class RouteController(nn.Module):
    """Protocol controller that routes by a fixed table: ``route[b, j]`` (or ``route[j]`` for all samples)."""

    def __init__(self, route, num_outputs):
        super().__init__()
        self.route = torch.as_tensor(route)
        self.num_outputs = num_outputs
        self.seen = []

    def forward(self, x, iteration, state):
        self.seen.append((iteration, state))
        idx = self.route[..., iteration]
        idx = idx.expand(x.shape[0]) if idx.dim() == 0 else idx
        logits = torch.nn.functional.one_hot(idx, self.num_outputs).to(x.dtype) * BIG
        return logits, iteration


class ScaledConv(nn.Module):
    """An iteration-aware unit without BatchNorm (per-sample, so sub-batch evaluation is exact)."""

    takes_iteration = True

    def __init__(self, channels, iterations):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, iterations))

    def forward(self, x, iteration):
        return torch.tanh(self.conv(x)) * self.scale[iteration]


def _randomize_bn(module):
    """Give every BatchNorm distinct affine parameters and running statistics."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return module


def _x(b=4):
    return torch.randn(b, C, H, H)


def reference_reset(module, x):
    """Algorithm 1 written out: an independent loop over the module's controller, scorer and units."""
    controller, scorer, units = module.controller, module.scorer, list(module.units)
    state = controller.initial_state(x) if hasattr(controller, "initial_state") else None  # C.reset_state()
    all_logits, all_weights = [], []
    for j in range(module.iterations):
        logits, state = controller(x, j, state)
        y = scorer(logits)
        update = torch.zeros_like(x)
        for r, unit in enumerate(units):
            out = unit(x, iteration=j) if getattr(unit, "takes_iteration", False) else unit(x)
            update = update + y[:, r].reshape(-1, 1, 1, 1) * out
        x = x + update  # the zero unit (last column of y, if any) adds nothing
        all_logits.append(logits)
        all_weights.append(y)
    return x, torch.stack(all_logits, 1), torch.stack(all_weights, 1)


def _seeded(fn, seed=123):
    torch.manual_seed(seed)
    return fn()


# ------------------------------------------------------ Algorithm 1 reference
SCORER_EXECUTIONS = [
    ("softmax", "naive"),
    ("softmax", "auto"),
    ("gumbel_softmax", "naive"),
    ("gumbel_softmax", "auto"),
    ("gumbel_st", "sparse"),
    ("gumbel_st", "naive"),
    ("topk", "sparse"),
    ("topk", "naive"),
]


@pytest.mark.parametrize("scorer,execution", SCORER_EXECUTIONS)
@pytest.mark.parametrize("zero_unit", [True, False])
@pytest.mark.parametrize("controller", ["rnn", "cnn"])
def test_reference_loop_train_mode(controller, zero_unit, scorer, execution):
    """Train mode, stochastic scorers reseeded; per-sample units so sparse sub-batches are exact."""
    k = 3
    units = [ScaledConv(C, k), nn.Sequential(nn.Conv2d(C, C, 1), nn.Tanh()), ScaledConv(C, k)]
    module = ReSet(
        units, k, controller=controller, scorer=scorer, zero_unit=zero_unit, channels=C, execution=execution, k=2 if scorer == "topk" else None
    ).train()
    x = _x()
    out, routing = _seeded(lambda: module(x, return_routing=True))
    ref, ref_logits, ref_weights = _seeded(lambda: reference_reset(module, x))
    assert isinstance(routing, Routing) and routing.zero_unit == zero_unit
    torch.testing.assert_close(routing.logits, ref_logits)
    torch.testing.assert_close(routing.weights, ref_weights)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, x)  # the module did something


@pytest.mark.parametrize("scorer,execution", SCORER_EXECUTIONS)
@pytest.mark.parametrize("zero_unit", [True, False])
@pytest.mark.parametrize("controller", ["rnn", "cnn"])
def test_reference_loop_basicblock_units_eval(controller, zero_unit, scorer, execution):
    """Eval mode with per-iteration BN units whose BN copies all differ (wrong copy -> mismatch)."""
    k = 3
    units = [BasicBlock(C, bn_iterations=k) for _ in range(3)]
    module = ReSet(
        units,
        k,
        controller=controller,
        scorer=scorer,
        zero_unit=zero_unit,
        channels=C,
        execution=execution,
        temperature=0.5 if scorer.startswith("gumbel") else None,
    )
    _randomize_bn(module).eval()
    x = _x()
    out, routing = module(x, return_routing=True)
    ref, ref_logits, ref_weights = reference_reset(module, x)
    torch.testing.assert_close(routing.weights, ref_weights)
    torch.testing.assert_close(routing.logits, ref_logits)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert routing.weights.shape == (4, k, 3 + zero_unit)


@pytest.mark.parametrize("execution", ["naive", "auto"])
@pytest.mark.parametrize("controller", ["rnn", "cnn"])
def test_reference_loop_basicblock_units_train_dense(controller, execution):
    k = 2
    module = ReSet([BasicBlock(C, bn_iterations=k) for _ in range(3)], k, controller=controller, channels=C, execution=execution)
    _randomize_bn(module).train()
    x = _x()
    out = module(x)
    ref, _, _ = reference_reset(module, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sparse_equals_naive_in_eval():
    k = 3
    module = ReSet([BasicBlock(C, bn_iterations=k) for _ in range(4)], k, scorer="topk", k=2, channels=C)
    _randomize_bn(module).eval()
    x = _x(6)
    torch.testing.assert_close(module(x, execution="sparse"), module(x, execution="naive"), rtol=1e-5, atol=1e-6)
    assert module.resolve_execution() == "sparse"


# ------------------------------------------------------------------ gradients
def _grad_norm(module):
    return [None if p.grad is None else float(p.grad.abs().sum()) for p in module.parameters()]


@pytest.mark.parametrize("scorer", ["softmax", "gumbel_softmax", "gumbel_st", "topk"])
@pytest.mark.parametrize("controller", ["rnn", "cnn"])
def test_gradients_reach_controller_and_units(controller, scorer):
    # topk with k=2 of 3 units + zero unit: a real unit is always among the kept ones. (With a hard
    # scorer, sparse execution and every sample choosing the zero unit, the output would not depend
    # on the controller at all.)
    k, n = 3, 3
    module = ReSet(
        [BasicBlock(C, bn_iterations=k) for _ in range(n)], k, controller=controller, scorer=scorer, channels=C, k=2 if scorer == "topk" else None
    ).train()
    x = torch.randn(8, C, H, H)
    out, routing = module(x, return_routing=True)
    (out * torch.randn_like(out)).sum().backward()
    # every controller parameter gets a non-zero gradient
    for name, p in module.controller.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    used = (routing.weights[..., :n] != 0).any(dim=0)  # (k, n): unit r used by some sample at iteration j
    chosen = used.any(dim=0)
    assert chosen.any()
    for r, unit in enumerate(module.units):
        for conv in (unit.conv1, unit.conv2):
            if chosen[r]:
                assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0, r
            else:  # train mode runs every unit (straight-through estimator): weight 0, gradient exactly 0
                assert module.resolve_execution() in ("fused", "naive")
                assert conv.weight.grad is not None and conv.weight.grad.abs().sum() == 0, r
        for j in range(k):  # BN copy j is trained only by the samples that used the unit at iteration j
            for p in list(unit.bn1.norms[j].parameters()) + list(unit.bn2.norms[j].parameters()):
                if used[j, r]:
                    assert p.grad is not None and p.grad.abs().sum() > 0, (r, j)
                else:
                    assert p.grad is None or p.grad.abs().sum() == 0, (r, j)
    if not module.scorer.sparse:
        assert bool(used.all())


@pytest.mark.parametrize("scorer", ["softmax", "gumbel_softmax", "gumbel_st", "topk"])
def test_naive_execution_gives_every_unit_a_gradient(scorer):
    k, n = 2, 4
    module = ReSet([BasicBlock(C, bn_iterations=k) for _ in range(n)], k, scorer=scorer, channels=C, execution="naive").train()
    x = torch.randn(3, C, H, H)
    out, routing = module(x, return_routing=True)
    (out * torch.randn_like(out)).sum().backward()
    used = (routing.weights[..., :n] != 0).any(dim=0)  # (k, n)
    assert all(p.grad is not None for p in module.units.parameters())  # every unit ran
    # exact zero weight -> exactly zero gradient; non-zero weight -> non-zero gradient
    for r, unit in enumerate(module.units):
        for conv in (unit.conv1, unit.conv2):
            assert bool(conv.weight.grad.abs().sum() > 0) == bool(used[:, r].any())
        for j in range(k):
            for p in list(unit.bn1.norms[j].parameters()) + list(unit.bn2.norms[j].parameters()):
                assert bool(p.grad.abs().sum() > 0) == bool(used[j, r])
    if not module.scorer.sparse:
        assert all(p.grad.abs().sum() > 0 for p in module.units.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.controller.parameters())


def test_sparse_and_naive_give_the_same_unit_gradients():
    # One iteration: with more, the straight-through gradient of the weights of the *unselected*
    # units (which naive execution computes and sparse execution cannot) flows back through the
    # controller into the earlier iterations, so the two executions legitimately differ there.
    k, n = 1, 3
    module = ReSet([ScaledConv(C, k) for _ in range(n)], k, scorer="gumbel_st", channels=C).train()
    x = _x(8)
    grads = {}
    for execution in ("sparse", "naive"):
        module.zero_grad(set_to_none=False)
        out = _seeded(lambda: module(x, execution=execution))
        out.pow(2).sum().backward()
        grads[execution] = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.units.parameters()]
    for a, b in zip(grads["sparse"], grads["naive"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert sum(g.abs().sum() > 0 for g in grads["sparse"]) >= 2


# ------------------------------------------------------ sequential policy
@pytest.mark.parametrize("zero_unit", [True, False])
@pytest.mark.parametrize("execution", ["sparse", "naive"])
def test_forced_sequential_policy_equals_plain_stage(zero_unit, execution):
    n = 4
    blocks = [BasicBlock(C, bn_iterations=1) for _ in range(n)]
    stage = ResidualSequence(copy.deepcopy(blocks))
    module = ReSet(
        blocks,
        n,
        controller=RouteController(torch.arange(n), n + zero_unit),
        scorer="gumbel_st",
        zero_unit=zero_unit,
        execution=execution,
        train_execution=execution,
    )
    _randomize_bn(module)
    stage.load_state_dict({k.replace("units.", "blocks."): v for k, v in module.state_dict().items() if k.startswith("units.")})
    x = _x()
    module.eval(), stage.eval()
    out, routing = module(x, return_routing=True)
    assert torch.equal(out, stage(x))
    assert torch.equal(routing.hard_route(), torch.arange(n).expand(4, n))
    # train mode (noise cannot beat the margin): same outputs and the same BN running statistics
    module.train(), stage.train()
    assert torch.equal(module(x), stage(x))
    if execution == "sparse":  # (naive execution also runs the unselected units, updating their BN)
        for a, b in zip(module.units.buffers(), stage.blocks.buffers()):
            assert torch.equal(a, b)


def test_forced_sequential_policy_whole_model_equals_resnet():
    """resnet_t3's first stage (2 blocks) moved into the pool of reset_t3_2cu3it run for 2 iterations."""
    resnet = resetnet.create_model("resnet_t3")
    _randomize_bn(resnet)
    twin = resetnet.create_model("reset_t3_2cu3it", iterations=2, unit_bn="shared", scorer="gumbel_st")
    twin.stages[0].controller = RouteController(torch.arange(2), 3)
    state = {k.replace("stages.0.blocks.", "stages.0.units."): v for k, v in resnet.state_dict().items()}
    twin.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 16, 16)
    resnet.eval(), twin.eval()
    assert torch.equal(twin(x), resnet(x))
    # with a different policy the logits differ (the check above is not vacuous)
    twin.stages[0].controller = RouteController(torch.tensor([1, 0]), 3)
    assert not torch.allclose(twin(x), resnet(x))


# --------------------------------------------------------- per-iteration BN
def test_basic_block_per_iteration_bn_copies():
    block = BasicBlock(C, bn_iterations=3)
    assert len(block.bn1.norms) == 3 and len(block.bn2.norms) == 3
    assert block.bn1.iterations == 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in block.modules()) == 6
    shared = BasicBlock(C)
    n_shared = sum(p.numel() for p in shared.parameters())
    assert sum(p.numel() for p in block.parameters()) == n_shared + 2 * 2 * 2 * C  # 2 more copies of 2 BNs

    block.train()
    x = _x()
    before = copy.deepcopy(block.state_dict())
    block(x, iteration=1)
    after = block.state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        if "running" in key or "num_batches" in key:
            assert changed == (".norms.1." in key), key
        else:
            assert not changed, key
    # eval output depends on the iteration's copy
    _randomize_bn(block).eval()
    assert not torch.allclose(block(x, iteration=0), block(x, iteration=2))
    with pytest.raises(IndexError, match="bn_iterations"):
        block(x, iteration=3)


def test_per_iteration_bn_inside_reset_only_updates_used_copy():
    # iteration 0 -> unit 0, iteration 1 -> zero unit, iteration 2 -> unit 1
    k = 3
    units = [BasicBlock(C, bn_iterations=k) for _ in range(2)]
    module = ReSet(units, k, controller=RouteController(torch.tensor([0, 2, 1]), 3), scorer="gumbel_st", train_execution="sparse").train()
    module(_x())
    tracked = [[int(u.bn1.norms[j].num_batches_tracked) for j in range(k)] for u in units]
    assert tracked == [[1, 0, 0], [0, 0, 1]]
    tracked2 = [[int(u.bn2.norms[j].num_batches_tracked) for j in range(k)] for u in units]
    assert tracked2 == tracked
    for u, j_unused in ((units[0], 1), (units[1], 0)):
        assert torch.equal(u.bn1.norms[j_unused].running_mean, torch.zeros(C))
    assert not torch.equal(units[0].bn1.norms[0].running_mean, torch.zeros(C))


def test_dense_training_of_a_hard_scorer_updates_every_bn_copy():
    # The default train execution runs every unit at every iteration (straight-through estimator),
    # so every unit's BN copy of every iteration sees the whole batch, as in the naive reference.
    k = 3
    units = [BasicBlock(C, bn_iterations=k) for _ in range(2)]
    module = ReSet(units, k, controller=RouteController(torch.tensor([0, 2, 1]), 3), scorer="gumbel_st").train()
    module(_x())
    assert [[int(u.bn1.norms[j].num_batches_tracked) for j in range(k)] for u in units] == [[1, 1, 1], [1, 1, 1]]


# --------------------------------------------------------- user controllers
class StatefulController(nn.Module):
    def __init__(self, channels, num_outputs):
        super().__init__()
        self.fc = nn.Linear(channels, num_outputs)
        self.init_calls = 0
        self.calls = []

    def initial_state(self, x):
        self.init_calls += 1
        return torch.zeros(x.shape[0], self.fc.out_features)

    def forward(self, x, iteration, state):
        self.calls.append(iteration)
        logits = self.fc(x.mean(dim=(2, 3))) + state
        return logits, state + logits.detach()


class StatelessController(nn.Module):
    def __init__(self, channels, num_outputs):
        super().__init__()
        self.fc = nn.Linear(channels, num_outputs)
        self.states = []

    def forward(self, x, iteration, state):
        self.states.append(state)
        return self.fc(x.mean(dim=(2, 3))), f"after-{iteration}"


@pytest.mark.parametrize("cls", [StatefulController, StatelessController])
def test_user_controller(cls):
    k = 3
    ctrl = cls(C, 3)
    module = ReSet([ScaledConv(C, k), ScaledConv(C, k)], k, controller=ctrl)
    assert module.controller is ctrl
    x = _x()
    out, routing = module(x, return_routing=True)
    assert routing.weights.shape == (4, k, 3)
    if cls is StatefulController:
        assert ctrl.init_calls == 1 and ctrl.calls == [0, 1, 2]
    else:
        assert ctrl.states == [None, "after-0", "after-1"]
        ctrl.states.clear()
    ref, _, ref_w = reference_reset(module, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(routing.weights, ref_w)
    out.sum().backward()
    assert ctrl.fc.weight.grad is not None and ctrl.fc.weight.grad.abs().sum() > 0


def test_controller_options_and_wrong_logits():
    module = ReSet([ScaledConv(C, 2)], 2, controller="rnn", channels=C, controller_options={"hidden_dim": 7})
    assert isinstance(module.controller, RNNController) and module.controller.hidden_dim == 7
    assert isinstance(ReSet([ScaledConv(C, 2)], 2, controller="cnn", channels=C).controller, CNNController)
    with pytest.raises(ValueError, match="configure the module instead"):
        ReSet([ScaledConv(C, 2)], 2, controller=StatelessController(C, 2), controller_options={"hidden_dim": 7})
    bad = ReSet([ScaledConv(C, 2)], 2, controller=StatelessController(C, 3))  # 3 logits for 1 unit + zero
    with pytest.raises(ValueError, match=r"controller returned logits of shape \(4, 3\); expected \(4, 2\)"):
        bad(_x())


# ------------------------------------------------------------------ errors
def test_error_iterations():
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"iterations >= 1, got " + str(bad)):
            ReSet([BasicBlock(C)], bad, channels=C)


def test_error_empty_pool():
    with pytest.raises(ValueError, match="non-empty pool"):
        ReSet([], 2, channels=C)


def test_error_unknown_scorer():
    with pytest.raises(ValueError, match=r"unknown scorer 'gumbel'.*softmax, gumbel_softmax, gumbel_st, topk"):
        ReSet([BasicBlock(C)], 2, scorer="gumbel", channels=C)


def test_error_unknown_controller():
    with pytest.raises(ValueError, match=r"unknown controller 'lstm'.*rnn, cnn"):
        ReSet([BasicBlock(C)], 2, controller="lstm", channels=C)


def test_error_named_controller_needs_channels():
    with pytest.raises(ValueError, match="channels"):
        ReSet([BasicBlock(C)], 2, controller="rnn")


def test_error_topk_larger_than_pool():
    with pytest.raises(ValueError, match=r"k=3 .*the pool has 2"):
        ReSet([BasicBlock(C), BasicBlock(C)], 2, scorer="topk", k=3, channels=C)
    with pytest.raises(ValueError, match=r"k=3 .*the pool has 2"):
        ReSet([BasicBlock(C), BasicBlock(C)], 2, scorer=resetnet.nn.TopKScorer(3), channels=C)
    ReSet([BasicBlock(C), BasicBlock(C)], 2, scorer="topk", k=2, channels=C)  # k == n is fine


def test_error_misplaced_scorer_options():
    with pytest.raises(ValueError, match="only valid with scorer='topk'"):
        ReSet([BasicBlock(C)], 2, scorer="softmax", k=1, channels=C)
    with pytest.raises(ValueError, match="temperature"):
        ReSet([BasicBlock(C)], 2, scorer="softmax", temperature=0.5, channels=C)


def test_error_execution_modes():
    with pytest.raises(ValueError, match=r"unknown execution mode 'fast'.*naive"):
        ReSet([BasicBlock(C)], 2, channels=C, execution="fast")
    module = ReSet([ScaledConv(C, 2)], 2, channels=C)
    with pytest.raises(ValueError, match="execution='fused'"):
        module(_x(), execution="fused")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        module(torch.randn(4, C))


@pytest.mark.parametrize("execution", ["naive", "sparse"])
@pytest.mark.parametrize("bad", [nn.Conv2d(C, 2 * C, 1), nn.Conv2d(C, C, 3, stride=2, padding=1)])
def test_error_unit_changes_shape(bad, execution):
    units = [BasicBlock(C), BasicBlock(C), bad]
    module = ReSet(
        units, 2, controller=RouteController(torch.tensor([0, 2]), 4), scorer="gumbel_st", execution=execution
    )  # construction does not run the units
    with pytest.raises(ValueError, match=r"unit 2 \(Conv2d\) changed the shape from \(4, 4, 8, 8\)"):
        module(_x())


def test_error_unit_not_a_module():
    with pytest.raises(ValueError, match=r"unit 1 is a builtin_function_or_method, not an nn.Module"):
        ReSet([BasicBlock(C), torch.tanh], 2, channels=C)


# -------------------------------------------------------------------- misc
def test_routing_record():
    k, n = 3, 2
    module = ReSet(
        [ScaledConv(C, k) for _ in range(n)], k, controller=RouteController(torch.tensor([[0, 2, 1], [2, 2, 2]]), n + 1), scorer="gumbel_st"
    )
    x = torch.randn(2, C, H, H)
    out, routing = module(x, return_routing=True)
    assert routing.num_units == n and routing.iterations == k
    assert torch.equal(routing.hard_route(), torch.tensor([[0, 2, 1], [2, 2, 2]]))
    assert torch.equal(routing.skip_mask(), torch.tensor([[False, True, False], [True, True, True]]))
    assert torch.equal(out[1], x[1])  # always skipped: identity
    # soft weights never skip (no exact zeros), even where the zero unit has the largest weight
    soft = Routing(routing.logits, torch.softmax(routing.logits / BIG, -1))
    assert torch.equal(soft.hard_route(), routing.hard_route())
    assert not soft.skip_mask().any()
    assert not Routing(routing.logits, routing.weights, zero_unit=False).skip_mask().any()
    assert torch.equal(module(x), out)  # return_routing=False returns the tensor only
