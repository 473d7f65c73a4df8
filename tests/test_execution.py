"""Execution modes of ReSet: naive (reference), sparse dispatch and fused dense evaluation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from resetnet.nn import BasicBlock, ReSet, Scorer, TopKScorer
from resetnet.nn.fused import can_fuse, fused_forward
from resetnet.profile import count_invocations, macs_per_image, unit_macs

C, HW, N_UNITS, ITERS = 8, 6, 3, 3
SCORERS = [("softmax", {}), ("gumbel_softmax", {"temperature": 0.7}), ("gumbel_st", {}), ("topk", {"k": 1}), ("topk", {"k": 2})]


class FixedLogits(nn.Module):
    """Controller protocol: returns precomputed logits (iterations, B, n_outputs) to force a routing."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def initial_state(self, x: torch.Tensor) -> int:
        return 0

    def forward(self, x: torch.Tensor, iteration: int, state: int):
        return self.logits[iteration, : x.shape[0]], state + 1


def routed_logits(batch: int, zero_share: float, seed: int, n_units: int = N_UNITS, iterations: int = ITERS) -> torch.Tensor:
    """Random logits; a share of the samples (per iteration) gets the zero unit (last) far ahead."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(iterations, batch, n_units + 1, generator=g)
    skipped = round(zero_share * batch)
    for j in range(iterations):
        rows = torch.randperm(batch, generator=g)[:skipped]
        logits[j, rows, -1] = 20.0
    return logits


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics, so eval mode is a real test."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return module


def make_reset(
    scorer: str = "softmax",
    logits: torch.Tensor | None = None,
    *,
    controller="cnn",
    bn_iterations: int = ITERS,
    n_units: int = N_UNITS,
    iterations: int = ITERS,
    seed: int = 0,
    **options,
) -> ReSet:
    torch.manual_seed(seed)
    units = [BasicBlock(C, bn_iterations) for _ in range(n_units)]
    ctrl = FixedLogits(logits) if logits is not None else controller
    return randomize(ReSet(units, iterations, controller=ctrl, scorer=scorer, channels=C, **options), seed)


def run(module: ReSet, x: torch.Tensor, execution: str):
    return module(x, return_routing=True, execution=execution)


def assert_buffers_equal(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
        assert x.dtype == y.dtype, name
        if x.dtype.is_floating_point:
            torch.testing.assert_close(x, y, atol=atol, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(x, y), f"{name}: {x} != {y}"


# ------------------------------------------------------------- eval parity
@pytest.mark.parametrize("scorer,options", SCORERS, ids=lambda v: str(v))
@pytest.mark.parametrize("zero_share", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 7])
def test_eval_parity_sparse_naive_fused(scorer, options, zero_share, batch):
    logits = routed_logits(batch, zero_share, seed=batch)
    m = make_reset(scorer, logits, **options).eval()
    x = torch.randn(batch, C, HW, HW)
    with torch.no_grad():
        ref, routing = run(m, x, "naive")
        sparse, r_sparse = run(m, x, "sparse")
        fused, _ = run(m, x, "fused")  # dense evaluation of any weights (zeros multiply finite outputs)
    torch.testing.assert_close(sparse, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(routing.weights, r_sparse.weights)
    if scorer in ("gumbel_st", "topk") and options.get("k", 1) == 1 and zero_share == 1.0:
        assert routing.skip_mask().all()
        torch.testing.assert_close(sparse, x, atol=0, rtol=0)


class FixedWeights(Scorer):
    """A scorer that ignores the logits and returns given weights (iterations, B, n_outputs), one iteration per call."""

    sparse = True

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights, self.calls = weights, 0

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        w = self.weights[self.calls % len(self.weights)]
        self.calls += 1
        return w + (logits - logits.detach()) * w  # value: exactly w; gradient to the logits: w


@pytest.mark.parametrize("grad", [False, True])
def test_sparse_units_on_the_whole_batch_next_to_sub_batches(grad):
    """A unit every sample chose runs on the batch as is, the others on gathered rows, mixed in one iteration;
    weights of 1 (not multiplied in) and other non-zero weights in one routing."""
    batch = 5
    w = torch.zeros(ITERS, batch, N_UNITS + 1)
    w[0, :, 0] = 1.0  # unit 0: every sample, weight 1
    w[0, [1, 3], 1] = 1.0  # unit 1: two samples
    w[0, [0, 2, 4], 3] = 1.0  # the others: zero unit too (weights need not sum to 1 here)
    w[1, :, 2] = 0.5  # unit 2: every sample, weight 0.5
    w[1, [0, 4], 0] = 0.25  # unit 0: a sub-batch with weight 0.25
    w[1, [1, 2, 3], 3] = 0.5
    w[2, [2], 1] = 1.0  # unit 1 alone on one sample; everyone else skips
    w[2, [0, 1, 3, 4], 3] = 1.0
    m = make_reset(FixedWeights(w)).eval()
    x = torch.randn(batch, C, HW, HW, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        ref = m(x, execution="naive")
        with count_invocations(m) as counter:
            out = m(x, execution="sparse")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert [counter.calls[("", r)] for r in range(N_UNITS)] == [2, 2, 1]
    assert [counter.samples[("", r)] for r in range(N_UNITS)] == [batch + 2, 2 + 1, batch]
    if grad:  # the input and the controller (through weights of exactly 1) get the naive loop's gradients
        params = [x, *m.controller.parameters()]
        g_ref = torch.autograd.grad(ref.square().sum(), params)
        g = torch.autograd.grad(out.square().sum(), params)
        assert g_ref[1].abs().sum() > 0
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "scorer,options,zero_share", [("gumbel_st", {}, 0.0), ("gumbel_st", {}, 0.5), ("topk", {"k": 2}, 0.25), ("softmax", {}, 0.0)]
)
def test_channels_last_parity_and_layout(scorer, options, zero_share):
    logits = routed_logits(6, zero_share, seed=4)
    m = make_reset(scorer, logits, **options).eval().to(memory_format=torch.channels_last)
    x = torch.randn(6, C, HW, HW).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = m(x, execution="naive")
        for mode in ("sparse", "fused"):
            y = m(x, execution=mode)
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
            assert y.is_contiguous(memory_format=torch.channels_last), mode


def test_auto_resolution():
    for training in (True, False):
        assert make_reset("softmax").train(training).resolve_execution() == "fused"
        assert make_reset("gumbel_softmax").train(training).resolve_execution() == "fused"
    # hard scorers: every unit in training (the straight-through estimator), sparse dispatch in eval
    assert make_reset("gumbel_st").train().resolve_execution() == "fused"
    assert make_reset("topk", k=2).train().resolve_execution() == "fused"
    assert make_reset("gumbel_st").eval().resolve_execution() == "sparse"
    assert make_reset("topk", k=2).eval().resolve_execution() == "sparse"
    assert make_reset("gumbel_st").train().resolve_execution(training=False) == "sparse"
    assert make_reset("gumbel_st", train_execution="sparse").train().resolve_execution() == "sparse"
    m = ReSet([BasicBlock(C), nn.Identity()], 2, controller="cnn", channels=C)
    assert m.resolve_execution() == "naive"
    assert m.resolve_execution("sparse") == "sparse"
    with pytest.raises(ValueError, match="fused"):
        m.resolve_execution("fused")


def test_can_fuse_rules():
    assert can_fuse([BasicBlock(C, 2) for _ in range(3)])
    assert not can_fuse([])
    assert not can_fuse([BasicBlock(C), BasicBlock(C + 1)])  # widths differ
    assert not can_fuse([BasicBlock(C, 1), BasicBlock(C, 2)])  # bn_iterations differ
    shared = BasicBlock(C)
    assert not can_fuse([shared, shared])  # a unit twice: its BN would be updated twice
    odd = BasicBlock(C)
    odd.bn1.norms[0].eps = 1e-3
    assert not can_fuse([BasicBlock(C), odd])  # one kernel, one eps

    class Custom(BasicBlock):
        def forward(self, x, iteration=0):
            return super().forward(x, iteration) * 2

    assert not can_fuse([BasicBlock(C), Custom(C)])


# ------------------------------------------------------ train / gradient parity
def _grads(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> dict[str, torch.Tensor]:
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + out.square().mean()
    names = ["x"] + [n for n, p in module.named_parameters()]
    tensors = [x] + [p for n, p in module.named_parameters()]
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return {n: g for n, g in zip(names, grads) if g is not None}


@pytest.mark.parametrize("controller", ["rnn", "cnn"])
@pytest.mark.parametrize("bn_iterations", [1, ITERS])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_gradient_and_running_stats_parity(controller, bn_iterations, mode):
    base = make_reset("softmax", controller=controller, bn_iterations=bn_iterations)
    base.train(mode == "train")
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    x = torch.randn(5, C, HW, HW)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = a(xa, execution="fused")
    yb = b(xb, execution="naive")
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    ga, gb = _grads(a, xa, ya), _grads(b, xb, yb)
    assert ga.keys() == gb.keys()
    assert any(k.startswith("units.") and k.endswith("weight") and "bn" in k for k in ga)  # BN affine params covered
    assert "controller.features.conv.weight" in ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    assert_buffers_equal(a, b)  # running_mean/var, num_batches_tracked of every BN copy


def _bn_variant(momenta):
    """A softmax pool whose BNs use the given momenta (None = cumulative average), cycled."""
    m = make_reset("softmax")
    norms = [bn for u in m.units for bn in u.modules() if isinstance(bn, nn.BatchNorm2d)]
    for i, bn in enumerate(norms):
        bn.momentum = momenta[i % len(momenta)]
        bn.num_batches_tracked.fill_(i % 4)
    return m.train()


@pytest.mark.parametrize("momenta", [[None], [0.1, 0.3, None], [0.05]], ids=["cumulative", "mixed", "single"])
def test_fused_running_stats_momentum_variants(momenta):
    a = _bn_variant(momenta)
    b = copy.deepcopy(a)
    for step in range(2):
        x = torch.randn(4, C, HW, HW) + step
        torch.testing.assert_close(a(x, execution="fused"), b(x, execution="naive"), atol=1e-5, rtol=1e-5)
    assert_buffers_equal(a, b)


def test_fused_without_running_stats_and_affine():
    torch.manual_seed(0)
    for kwargs in ({"track_running_stats": False}, {"affine": False}):
        units = [BasicBlock(C, 2) for _ in range(3)]
        for u in units:
            for bn_holder in (u.bn1, u.bn2):
                bn_holder.norms = nn.ModuleList(nn.BatchNorm2d(C, **kwargs) for _ in range(2))
        assert can_fuse(units)
        x, w = torch.randn(3, C, HW, HW), torch.rand(3, 3)
        for train in (True, False):
            for u in units:
                u.train(train)
            ref = sum(w[:, r, None, None, None] * u(x, iteration=1) for r, u in enumerate(units))
            torch.testing.assert_close(fused_forward(units, x, w, 1), ref, atol=1e-5, rtol=1e-5)


def test_fused_falls_back_when_bn_modes_differ():
    a = make_reset("softmax").train()
    a.units[1].bn2.eval()  # a partly frozen pool
    b = copy.deepcopy(a)
    x = torch.randn(4, C, HW, HW)
    torch.testing.assert_close(a(x, execution="fused"), b(x, execution="naive"), atol=1e-5, rtol=1e-5)
    assert_buffers_equal(a, b)


def test_fused_input_checks():
    units = [BasicBlock(C) for _ in range(2)]
    with pytest.raises(ValueError, match="channels"):
        fused_forward(units, torch.randn(2, C + 1, 4, 4), torch.rand(2, 2), 0)
    with pytest.raises(ValueError, match="weights"):
        fused_forward(units, torch.randn(2, C, 4, 4), torch.rand(2, 3), 0)


# ------------------------------------------------------------ sparse dispatch
class RecordingTopK(Scorer):
    """A top-k scorer that keeps its output (the weights used in the forward pass) with its gradient."""

    sparse = True

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        self.inner = TopKScorer(k)
        self.outputs: list[torch.Tensor] = []

    def forward(self, logits):
        y = self.inner(logits)
        y.retain_grad()
        self.outputs.append(y)
        return y


def test_sparse_train_sub_batch_of_one_and_local_bn():
    """A unit chosen by one sample runs on a 1-sample sub-batch; its BN sees only that sample."""
    batch = 5
    logits = torch.zeros(1, batch, N_UNITS + 1)
    logits[0, :, 1] = 5.0
    logits[0, 2, 0] = 10.0  # sample 2 alone goes to unit 0
    m = make_reset("topk", logits, iterations=1, bn_iterations=1).train()
    ref_unit = copy.deepcopy(m.units[0])
    x = torch.randn(batch, C, HW, HW, requires_grad=True)
    with count_invocations(m) as counter:
        y = m(x, execution="sparse")
    assert counter.samples == {("", 0): 1, ("", 1): batch - 1, ("", 2): 0}
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    ref_unit(x[2:3].detach())  # the update the unit's BN gets from its sub-batch alone
    assert_buffers_equal(m.units[0], ref_unit)


@pytest.mark.parametrize("execution,unselected_grad", [("sparse", False), ("naive", True)])
def test_straight_through_gradient_reaches_unselected_units_only_in_naive(execution, unselected_grad):
    logits = routed_logits(6, 0.0, seed=3)
    m = make_reset(RecordingTopK(1), logits).train()
    x = torch.randn(6, C, HW, HW)
    m(x, execution=execution).square().sum().backward()
    for y in m.scorer.outputs:
        unselected = y[:, :N_UNITS] == 0
        grads = y.grad[:, :N_UNITS][unselected]
        assert unselected.any()
        assert bool((grads != 0).any()) == unselected_grad
        assert (y.grad[:, :N_UNITS][~unselected] != 0).all()  # selected units get a gradient either way
    assert m.controller.logits.grad is not None


@pytest.mark.parametrize("scorer,options", [("gumbel_st", {}), ("topk", {"k": 1}), ("topk", {"k": 2})])
@pytest.mark.parametrize("zero_share", [0.0, 0.5, 1.0])
def test_counter_matches_routing_and_macs(scorer, options, zero_share):
    batch = 8
    logits = routed_logits(batch, zero_share, seed=11)
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), make_reset(scorer, logits, **options)).eval()
    reset = model[1]
    x = torch.randn(batch, 3, HW, HW)
    with torch.no_grad(), count_invocations(model) as counter:
        _, routing = reset(model[0](x), return_routing=True, execution="sparse")
    active = routing.weights[..., :N_UNITS] != 0  # (B, k, n)
    for r in range(N_UNITS):
        assert counter.samples[("1", r)] == int(active[..., r].sum())
        assert counter.calls[("1", r)] == int(active[..., r].any(dim=0).sum())  # skipped units are not called
    if zero_share == 1.0 and options.get("k", 1) == 1:
        assert counter.total_calls == 0 and counter.total_samples == 0

    per_image = macs_per_image(model, x)
    stem = C * HW * HW * 3 * 9
    per_unit = unit_macs(reset.units[0], (C, HW, HW))
    assert per_unit == 2 * C * C * 9 * HW * HW
    assert per_image.sum().item() == pytest.approx(batch * stem + counter.total_samples * per_unit)


class MultiHot(Scorer):
    """Weights exactly 1 where the logit is positive, else 0 (no gradient): several full-batch units of weight 1."""

    sparse = True

    def forward(self, logits):
        return (logits > 0).to(logits.dtype)


@pytest.mark.parametrize("grad", [False, True])
def test_sparse_never_writes_into_a_unit_output(grad):
    """Weights of exactly 1 are not multiplied in; the unit's output (here: the input itself) must stay untouched."""
    batch = 4
    logits = -torch.ones(3, batch, 4)
    logits[0, :, 0] = logits[0, :, 1] = 1  # iteration 0: identity units 0 and 1 on every sample
    logits[1, :, 0] = 1
    logits[1, :2, 2] = 1  # iteration 1: unit 0 on all samples, the BasicBlock on two
    logits[2, 1:, 2] = 1  # iteration 2: the BasicBlock first (partial), then nothing
    units = [nn.Identity(), nn.Identity(), BasicBlock(C)]
    m = randomize(ReSet(units, 3, controller=FixedLogits(logits), scorer=MultiHot())).eval()
    x = torch.randn(batch, C, HW, HW, requires_grad=grad)
    x_before = x.detach().clone()
    with torch.set_grad_enabled(grad):
        y = m(x, execution="sparse")
        ref = m(x, execution="naive")
    assert torch.equal(x.detach(), x_before)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    if grad:
        (gx,) = torch.autograd.grad(y.sum(), x)
        (gr,) = torch.autograd.grad(ref.sum(), x)
        torch.testing.assert_close(gx, gr, atol=1e-5, rtol=1e-5)


class StatefulLogits(FixedLogits):
    """FixedLogits that keeps the representation it saw in its state (and checks it is unchanged)."""

    def initial_state(self, x: torch.Tensor):
        return None

    def forward(self, x: torch.Tensor, iteration: int, state):
        if state is not None:
            seen, copy_ = state
            assert torch.equal(seen, copy_), "the module wrote into a tensor the controller keeps"
        return self.logits[iteration, : x.shape[0]], (x, x.clone())


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_sparse_in_place_updates_are_safe(context):
    """Without autograd sparse updates its own working tensor in place; it must never write into the
    caller's input, into a unit output that aliases x (identity units), or into a tensor the controller keeps."""
    ctx = torch.no_grad if context == "no_grad" else torch.inference_mode
    batch, iterations = 5, 4
    logits = -torch.ones(iterations, batch, 4)
    logits[:, :, 0] = logits[:, :, 1] = 1  # every iteration: two identity units on every sample ...
    logits[1:, :2, 2] = 1  # ... plus the BasicBlock on two samples from iteration 1 on
    units = [nn.Identity(), nn.Identity(), BasicBlock(C)]
    x = torch.randn(batch, C, HW, HW)
    x_before = x.clone()
    for controller in (FixedLogits(logits), StatefulLogits(logits)):
        m = randomize(ReSet(units, iterations, controller=controller, scorer=MultiHot())).eval()
        with ctx():
            y = m(x, execution="sparse")
            ref = m(x, execution="naive")
        assert torch.equal(x, x_before)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # hard routing with partial sub-batches only (the index_add path), several iterations
    logits = routed_logits(7, 0.25, seed=13, iterations=ITERS)
    x = torch.randn(7, C, HW, HW)
    x_before = x.clone()
    for controller in (FixedLogits(logits), StatefulLogits(logits)):
        m = make_reset("gumbel_st", logits).eval()
        m.controller = controller
        with ctx():
            y = m(x, execution="sparse")
            ref = m(x, execution="naive")
        assert torch.equal(x, x_before)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scorer,options", [("gumbel_st", {}), ("topk", {"k": 2})])
def test_sparse_under_bf16_autocast(scorer, options):
    """The CUDA benchmarks run under bf16 autocast; the CPU autocast exercises the same dtype handling."""
    logits = routed_logits(7, 0.25, seed=17)
    m = make_reset(scorer, logits, **options).eval()
    x = torch.randn(7, C, HW, HW)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        stem = nn.functional.conv2d(x, torch.ones(C, C, 1, 1) / C)  # a bf16 activation, as after a conv
        assert stem.dtype == torch.bfloat16
        sparse = m(stem, execution="sparse")
        naive = m(stem, execution="naive")
    assert sparse.dtype == naive.dtype
    torch.testing.assert_close(sparse.float(), naive.float(), atol=0.05, rtol=0.02)
    m.train()
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(nn.functional.conv2d(xg, torch.ones(C, C, 1, 1) / C), execution="sparse")
    y.float().square().mean().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("scorer,options", [("gumbel_st", {}), ("topk", {"k": 2})])
def test_sparse_channels_last_gradients_match_naive(scorer, options):
    """The row kernels run on channels_last tensors through an NHWC view; gradients must not change."""
    logits = routed_logits(6, 0.25, seed=21)
    base = make_reset(scorer, logits, **options).eval().to(memory_format=torch.channels_last)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    x = torch.randn(6, C, HW, HW).contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = a(xa, execution="sparse")
    assert ya.is_contiguous(memory_format=torch.channels_last)
    ga, gb = _grads(a, xa, ya), _grads(b, xb, b(xb, execution="naive"))
    for k in ["x"] + [k for k in gb if k.startswith("units.")]:
        ref = gb[k]
        got = ga.get(k, torch.zeros_like(ref))
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("scorer,options", [("gumbel_st", {}), ("topk", {"k": 2})])
def test_sparse_eval_gradients_match_naive_for_input_and_units(scorer, options):
    """In eval mode (no batch statistics) sparse and naive agree on d/dx and d/d(unit parameters)."""
    logits = routed_logits(6, 0.25, seed=9)
    base = make_reset(scorer, logits, **options).eval()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    x = torch.randn(6, C, HW, HW)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ga, gb = _grads(a, xa, a(xa, execution="sparse")), _grads(b, xb, b(xb, execution="naive"))
    for k in ["x"] + [k for k in gb if k.startswith("units.")]:
        ref = gb[k]
        got = ga.get(k, torch.zeros_like(ref))  # a unit sparse never called has no gradient; naive gives it zeros
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_every_sample_to_zero_unit_runs_no_unit():
    logits = routed_logits(4, 1.0, seed=5)
    m = make_reset("gumbel_st", logits).eval()
    x = torch.randn(4, C, HW, HW)
    with torch.no_grad(), count_invocations(m) as counter:
        y = m(x)  # auto -> sparse
    assert counter.total_calls == 0
    assert torch.equal(y, x)


# ------------------------------------------------------------- torch.compile
def _compile_check(backend: str) -> None:
    eager = make_reset("softmax", controller="rnn").train()
    compiled_module = copy.deepcopy(eager)
    x = torch.randn(4, C, HW, HW)
    explanation = torch._dynamo.explain(copy.deepcopy(eager))(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(compiled_module, fullgraph=True, backend=backend)
    for _ in range(2):  # the second call reuses the graph; running stats keep matching
        y = compiled(x)
        y.square().sum().backward()
        ref = eager(x, execution="fused")
        ref.square().sum().backward()
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for (name, p), (_, q) in zip(compiled_module.named_parameters(), eager.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4)
    assert_buffers_equal(compiled_module, eager, atol=1e-5)


def test_fused_compiles_without_graph_breaks():
    _compile_check("aot_eager")


@pytest.mark.slow
def test_fused_compiles_with_inductor():
    _compile_check("inductor")


def _sparse_compile_check(backend: str) -> None:
    """Sparse dispatch under torch.compile runs eagerly (data-dependent shapes) and gives the eager result."""
    torch._dynamo.reset()
    results = {}
    for compiled in (False, True):
        m = make_reset("topk", routed_logits(6, 0.25, seed=23), k=1).eval()  # deterministic in train mode too
        fn = torch.compile(m, backend=backend) if compiled else m
        x = torch.randn(6, C, HW, HW, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            results[compiled] = [fn(x) for _ in range(2)]
        m.train()
        xg = x.clone().requires_grad_()
        fn(xg).square().sum().backward()
        results[compiled].append(xg.grad)
    for got, ref in zip(results[True], results[False]):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_sparse_runs_under_torch_compile():
    _sparse_compile_check("aot_eager")


@pytest.mark.slow
def test_sparse_runs_under_torch_compile_with_inductor():
    _sparse_compile_check("inductor")


_RESET38_COMPILE_SCRIPT = """
import copy, sys, torch
sys.path.insert(0, {bench!r})
import routing as R, resetnet
torch.manual_seed(0)
model = R.force_routing(resetnet.create_model("reset38", scorer="gumbel_st"), 4, 0.0, seed=1).eval()
x = torch.randn(4, 3, 32, 32)
with torch.no_grad():
    ref = model(x)
    compiled = torch.compile(model)
    for _ in range(3):
        torch.testing.assert_close(compiled(x), ref, atol=1e-3, rtol=1e-3)
print("ok")
"""


@pytest.mark.slow
def test_hard_reset38_under_inductor_in_a_subprocess():
    """Regression: compiling sparse dispatch with inductor corrupted the heap (torch 2.13, CPU) before
    sparse dispatch was excluded from compilation. A crash must not take pytest down, hence the subprocess."""
    import subprocess
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    proc = subprocess.run([sys.executable, "-c", _RESET38_COMPILE_SCRIPT.format(bench=bench)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_fused_compiles_without_graph_breaks_in_inference():
    """Eval mode without autograd (where sparse would update in place) stays one graph for dense execution."""
    m = make_reset("softmax", controller="rnn").eval()
    x = torch.randn(4, C, HW, HW)
    with torch.no_grad():
        explanation = torch._dynamo.explain(m)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), m(x, execution="fused"), atol=1e-5, rtol=1e-5)


# ------------------------------------------------- the paper's estimators in training (Sec. 3.3, 5.4.3)
class MaskedSoftmax(Scorer):
    """softmax(logits) * top-k mask, differentiated as written (no straight-through part)."""

    sparse = True

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        soft = torch.softmax(logits, dim=-1)
        mask = torch.zeros_like(soft).scatter_(-1, soft.topk(self.k, dim=-1).indices, 1.0)
        return soft * mask


def _train_grads(module: ReSet, x: torch.Tensor, execution: str | None, seed: int = 5) -> dict[str, torch.Tensor]:
    """Input, controller and unit gradients of one train-mode step (Gumbel noise seeded)."""
    m = copy.deepcopy(module).train()
    xx = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = m(xx, execution=execution)
    return _grads(m, xx, out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


class PerSampleUnit(nn.Module):
    """A unit without BatchNorm: its output for a sample does not depend on the rest of the batch,
    so sparse and naive execution compute the same forward in train mode too. (A BatchNorm unit
    under sparse training normalises over its own sub-batch: a second difference, see docs/execution.md.)"""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


def make_per_sample_reset(scorer: str, controller="cnn", iterations: int = ITERS, seed: int = 0, **options) -> ReSet:
    torch.manual_seed(seed)
    units = [PerSampleUnit(C) for _ in range(N_UNITS)]
    return ReSet(units, iterations, controller=controller, scorer=scorer, channels=C, **options)


HARD = [("gumbel_st", {}), ("topk", {"k": 2})]


@pytest.mark.parametrize("scorer,options", HARD)
def test_default_training_of_hard_scorers_is_the_papers_estimator(scorer, options):
    """train_execution 'auto' (the default) gives the naive reference's gradients: every unit's output
    receives the relaxed weights' gradient. k=3 iterations and a controller whose logits depend on x:
    the case where the truncated (sparse) estimator differs."""
    module = make_reset(scorer, controller="cnn", **options)
    x = torch.randn(6, C, HW, HW)
    assert module.train().resolve_execution() == "fused"
    default = _train_grads(module, x, None)
    naive = _train_grads(module, x, "naive")
    assert default.keys() == naive.keys()
    for k in naive:
        torch.testing.assert_close(default[k], naive[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("scorer,options", HARD)
def test_sparse_training_is_a_truncated_estimator(scorer, options):
    """train_execution 'sparse': the same forward, but unselected units send no gradient to their
    weights, so the controller's gradient, and (through the controller of later iterations) the
    input's gradient, differ from the paper's estimator. Sizes measured in docs/execution.md."""
    module = make_per_sample_reset(scorer, **options)
    x = torch.randn(6, C, HW, HW)
    sparse, naive = _train_grads(module, x, "sparse"), _train_grads(module, x, "naive")
    ctrl = [k for k in naive if k.startswith("controller.") and k.endswith("weight")]
    assert ctrl
    assert max(_rel(sparse[k], naive[k]) for k in ctrl) > 0.05
    assert _rel(sparse["x"], naive["x"]) > 0.01


def test_sparse_training_equals_naive_where_no_gradient_crosses_an_unselected_unit():
    """One iteration and a controller that ignores x: the input's and the units' gradients agree
    (an unselected unit has weight 0 in both); only the controller's differs."""
    module = make_per_sample_reset("topk", controller=FixedLogits(routed_logits(6, 0.0, seed=2, iterations=1)), iterations=1, k=2)
    x = torch.randn(6, C, HW, HW)
    sparse, naive = _train_grads(module, x, "sparse"), _train_grads(module, x, "naive")
    for k in naive:
        if k.startswith("units.") or k == "x":
            torch.testing.assert_close(sparse[k], naive[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    assert _rel(sparse["controller.logits"], naive["controller.logits"]) > 0.05


def test_sparse_top_k_training_is_a_plain_masked_softmax():
    """Under sparse training the straight-through part of top-k does nothing: its controller gradient
    equals that of softmax * mask differentiated as written (the paper's top-k passes the full
    softmax gradient)."""
    module = make_per_sample_reset("topk", k=2)
    masked = copy.deepcopy(module)
    masked.scorer = MaskedSoftmax(2)
    x = torch.randn(6, C, HW, HW)
    sparse, plain = _train_grads(module, x, "sparse"), _train_grads(masked, x, "naive")
    assert "controller.fc.weight" in sparse
    for k in plain:  # a unit nobody chose did not run under sparse dispatch: no gradient = zero gradient
        torch.testing.assert_close(sparse.get(k, torch.zeros_like(plain[k])), plain[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    naive = _train_grads(module, x, "naive")
    ctrl = [k for k in naive if k.startswith("controller.") and k.endswith("weight")]
    assert max(_rel(sparse[k], naive[k]) for k in ctrl) > 0.05
