"""Compute accounting: macs_per_image against torch's FlopCounterMode, and count_invocations."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import resetnet
from resetnet.profile import count_invocations, macs_per_image, unit_macs

BIG = 1000.0


class RouteController(nn.Module):
    """Protocol controller routing by a fixed (B, k) table of output indices (the zero unit is the last)."""

    def __init__(self, route, num_outputs):
        super().__init__()
        self.route = torch.as_tensor(route)
        self.num_outputs = num_outputs

    def forward(self, x, iteration, state):
        logits = nn.functional.one_hot(self.route[:, iteration], self.num_outputs).to(x.dtype) * BIG
        return logits, None


def flop_macs(fn, batch):
    """MACs per image according to torch.utils.flop_counter (FLOPs / 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2 / batch


def _unit_flop_macs(unit, shape):
    return flop_macs(lambda: unit(torch.zeros((1,) + tuple(shape))), 1)


def _hard_model(units=4, iterations=3):
    """reset_t3 with a Gumbel-ST scorer and He et al.'s stem: stage 0 is a ReSet module on (16, H, W)."""
    return resetnet.create_model("reset_t3_3cu2it", scorer="gumbel_st", units=units, iterations=iterations, stem_maxpool=False).eval()


@torch.no_grad()
def _dense_macs(model, x):
    """FlopCounterMode MACs with every unit run on every sample at every iteration (naive execution)."""
    reset = model.reset_modules()[0]
    reset.execution, saved = "naive", reset.execution
    try:
        return flop_macs(lambda: model(x), x.shape[0])
    finally:
        reset.execution = saved


@torch.no_grad()
def test_resnet38_matches_flop_counter():
    model = resetnet.create_model("resnet38").eval()
    x = torch.randn(2, 3, 32, 32)
    macs = macs_per_image(model, x)
    assert macs.shape == (2,) and macs.dtype == torch.float64
    assert macs[0] == macs[1]
    reference = flop_macs(lambda: model(x), 2)
    assert abs(float(macs[0]) - reference) <= 0.01 * reference
    assert 75e6 < reference < 90e6  # ResNet-38 on CIFAR: about 83M MACs


@torch.no_grad()
def test_dense_reset_model_matches_flop_counter():
    model = resetnet.create_model("reset_t3_3cu2it").eval()  # softmax: every unit at every iteration
    x = torch.randn(2, 3, 16, 16)
    macs = macs_per_image(model, x)
    torch.testing.assert_close(macs, torch.full((2,), _dense_macs(model, x), dtype=torch.float64))


@torch.no_grad()
def test_unit_macs():
    block = resetnet.nn.BasicBlock(16, bn_iterations=3)
    assert unit_macs(block, (16, 8, 8)) == 2 * 16 * 16 * 9 * 64 == _unit_flop_macs(block, (16, 8, 8))
    assert unit_macs(block, (5, 16, 8, 8), iteration=2) == 2 * 16 * 16 * 9 * 64


@torch.no_grad()
@pytest.mark.parametrize("train", [False, True])
def test_hard_routing_counts_fixed_part_plus_selected_units(train):
    model = _hard_model()
    reset = model.reset_modules()[0]
    for p in reset.controller.parameters():  # make the routes differ from sample to sample
        nn.init.normal_(p, std=2.0)
    x = torch.randn(6, 3, 8, 8) * torch.linspace(0.2, 3.0, 6).view(-1, 1, 1, 1)
    k, n = reset.iterations, len(reset.units)
    shape = (16, 8, 8)
    per_unit = [_unit_flop_macs(u, shape) for u in reset.units]
    fixed = _dense_macs(model, x) - k * sum(per_unit)  # stem, transitions, head, controller (every iteration)

    model.train(train)
    torch.manual_seed(1)
    macs = macs_per_image(model, x)  # counts the route sampled in this very call (train mode)
    torch.manual_seed(1)
    _, routing = model(x, return_routing=True)
    route = routing[0].hard_route()  # (B, k)
    assert ((routing[0].weights != 0).sum(-1) == 1).all()
    expected = torch.tensor([fixed + sum(per_unit[r] for r in row if r < n) for row in route.tolist()], dtype=torch.float64)
    torch.testing.assert_close(macs, expected, rtol=1e-12, atol=1e-3)
    assert len(set(route.flatten().tolist())) > 2 and len(set(macs.tolist())) > 1  # not a trivial route


@torch.no_grad()
def test_all_zero_unit_routing_counts_no_unit():
    model = _hard_model()
    reset = model.reset_modules()[0]
    k, n, b = reset.iterations, len(reset.units), 4
    reset.controller = RouteController(torch.full((b, k), n), n + 1)
    x = torch.randn(b, 3, 8, 8)
    dense = _dense_macs(model, x)  # same model with every unit evaluated
    per_unit = [_unit_flop_macs(u, (16, 8, 8)) for u in reset.units]
    macs = macs_per_image(model, x)
    torch.testing.assert_close(macs, torch.full((b,), dense - k * sum(per_unit), dtype=torch.float64))
    with count_invocations(model) as counter:
        _, routing = model(x, return_routing=True)
    assert routing[0].skip_mask().all()
    assert counter.calls == {("stages.0", r): 0 for r in range(n)}
    assert counter.total_samples == 0
    # the FlopCounter agrees: a sparse run with all skips costs the fixed part only
    assert flop_macs(lambda: model(x), b) == pytest.approx(dense - k * sum(per_unit))


@torch.no_grad()
def test_count_invocations_with_a_route_table():
    model = _hard_model(units=4, iterations=3)
    reset = model.reset_modules()[0]
    route = torch.tensor([[0, 0, 4], [0, 4, 4], [2, 1, 4], [0, 1, 4]])  # unit 3 is never chosen; 4 is the zero unit
    reset.controller = RouteController(route, 5)
    x = torch.randn(4, 3, 8, 8)
    with count_invocations(model) as counter:
        model(x)
    key = lambda r: ("stages.0", r)  # noqa: E731
    # unit 0: iteration 0 (samples 0, 1, 3), iteration 1 (sample 0); unit 1: iteration 1 (samples 2, 3)
    assert counter.calls == {key(0): 2, key(1): 1, key(2): 1, key(3): 0}
    assert counter.samples == {key(0): 4, key(1): 2, key(2): 1, key(3): 0}
    assert counter.total_calls == 4 and counter.total_samples == 7
    counter.reset()
    assert counter.calls == {}

    # MACs: fixed part plus the chosen units
    per_unit = _unit_flop_macs(reset.units[0], (16, 8, 8))
    fixed = _dense_macs(model, x) - 3 * 4 * per_unit
    expected = torch.tensor([fixed + per_unit * c for c in (2, 1, 2, 2)], dtype=torch.float64)
    torch.testing.assert_close(macs_per_image(model, x), expected)

    # naive execution runs every unit on the whole batch at every iteration
    reset.execution = "naive"
    with count_invocations(model) as counter:
        model(x)
    assert counter.calls == {key(r): 3 for r in range(4)}
    assert counter.samples == {key(r): 12 for r in range(4)}


@torch.no_grad()
def test_profiling_leaves_the_model_unchanged():
    model = _hard_model()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    macs_per_image(model, x)
    with count_invocations(model):
        pass
    after = model(x)
    assert isinstance(after, torch.Tensor) and torch.equal(before, after)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # a bare ReSet module can be profiled too, and a caller's return_routing is honoured
    reset = model.reset_modules()[0]
    z = torch.randn(2, 16, 8, 8)
    macs = macs_per_image(reset, z)
    assert macs.shape == (2,) and (macs > 0).all()
    out, routing = reset(z, return_routing=True)
    assert routing.weights.shape == (2, reset.iterations, len(reset.units) + 1)


class _Positional(nn.Module):
    """Calls its ReSet module with positional ``return_routing`` and ``execution``."""

    def __init__(self, reset, return_routing, execution):
        super().__init__()
        self.reset, self.return_routing, self.execution = reset, return_routing, execution

    def forward(self, x):
        out = self.reset(x, self.return_routing, self.execution)
        if self.return_routing:
            assert isinstance(out, tuple) and out[1].weights.shape[0] == x.shape[0]
            out = out[0]
        return out


@torch.no_grad()
def test_macs_per_image_keeps_positional_arguments():
    reset = resetnet.nn.ReSet([nn.Conv2d(4, 4, 3, padding=1)], 2, channels=4).eval()
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="execution='fused'"):  # not fusable: the call itself fails...
        reset(x, False, "fused")
    with pytest.raises(ValueError, match="execution='fused'"):  # ...and so it must while profiling
        macs_per_image(_Positional(reset, False, "fused"), x)
    expected = macs_per_image(reset, x)
    for return_routing in (False, True):
        torch.testing.assert_close(macs_per_image(_Positional(reset, return_routing, "naive"), x), expected)
