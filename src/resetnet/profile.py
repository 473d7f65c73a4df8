"""Compute accounting: :func:`macs_per_image` counts the multiply-accumulates of convolutions, linear layers and LSTM cells
(as ``torch.utils.flop_counter``) under the current routing: a ReSet unit only at the iterations where a sample gives it a
non-zero weight, controllers at every iteration, the zero unit never. :func:`count_invocations` records what units ran."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .nn import ReSet, call_unit


def _add_macs(total: list[float], module: nn.Module, inputs: tuple, output) -> None:
    """Forward hook: add the MACs of one call of a leaf module, per sample (first dimension of the input), to ``total[0]``."""
    batch = max(int(inputs[0].shape[0]), 1)
    if isinstance(module, nn.Conv2d):
        total[0] += output.numel() / batch * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    elif isinstance(module, nn.Linear):
        total[0] += output.numel() / batch * module.in_features
    elif isinstance(module, nn.LSTMCell):
        total[0] += 4 * module.hidden_size * (module.input_size + module.hidden_size)


def _count_macs(modules: Iterable[nn.Module], total: list[float]) -> list:
    """Forward hooks adding the MACs of every call of the counted ``modules`` to ``total[0]``."""
    return [m.register_forward_hook(functools.partial(_add_macs, total)) for m in modules if isinstance(m, (nn.Conv2d, nn.Linear, nn.LSTMCell))]


@torch.no_grad()
def unit_macs(unit: nn.Module, input_shape: tuple[int, ...], iteration: int = 0) -> float:
    """MACs per sample of one unit on an input of shape (C, H, W) (or (B, C, H, W))."""
    x = next(unit.parameters(), torch.zeros(())).new_zeros((1, *input_shape[-3:]))  # the unit's device and dtype (else float32 CPU)
    total = [0.0]
    hooks = _count_macs(unit.modules(), total)
    was_training = unit.training
    unit.eval()
    try:
        call_unit(unit, x, iteration)
    finally:
        unit.train(was_training)
        for h in hooks:
            h.remove()
    return total[0]


@torch.no_grad()
def _account(model: nn.Module, x: torch.Tensor) -> tuple[float, list[tuple[ReSet, torch.Tensor, torch.Tensor]]]:
    """Run ``model(x)`` once in its current mode: ``(MACs per image outside the units (stem, transitions, head,
    controllers), [(ReSet module, per-unit MACs (n,), routing weights (B, k, n_out))])``."""
    resets = [m for m in model.modules() if isinstance(m, ReSet)]
    in_units = {id(sub) for m in resets for sub in m.units.modules()}
    fixed = [0.0]
    calls: dict[int, tuple[tuple[int, ...], bool]] = {}  # id(ReSet) -> (input shape, whether the caller wants the routing)
    reset_routing: dict[int, torch.Tensor] = {}

    def pre(mod, args, kwargs):
        kwargs = {**dict(zip(("return_routing", "execution"), args[1:])), **kwargs}  # ReSet.forward(x, return_routing, execution)
        calls[id(mod)] = (tuple(args[0].shape), bool(kwargs.get("return_routing", False)))
        return args[:1], {**kwargs, "return_routing": True}

    def post(mod, args, kwargs, out):
        reset_routing[id(mod)] = out[1].weights
        return out if calls[id(mod)][1] else out[0]

    hooks = _count_macs((m for m in model.modules() if id(m) not in in_units), fixed)
    for m in resets:
        hooks += [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post, with_kwargs=True)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    ran = [m for m in resets if id(m) in reset_routing]  # the ReSet modules the forward called
    per_unit = [torch.tensor([unit_macs(u, calls[id(m)][0]) for u in m.units], dtype=torch.float64) for m in ran]
    return fixed[0], [(m, macs, reset_routing[id(m)].detach().cpu()) for m, macs in zip(ran, per_unit)]


@torch.no_grad()
def macs_per_image(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B,) float64 MACs each sample of ``x`` needs under the routing ``model`` gives it now (one forward in its current mode)."""
    fixed, modules = _account(model, x)
    total = torch.full((x.shape[0],), fixed, dtype=torch.float64)
    for m, per_unit, weights in modules:
        active = (weights[..., : len(m.units)] != 0).to(torch.float64)  # (B, k, n)
        total += (active * per_unit).sum(dim=(1, 2))
    return total


@torch.no_grad()
def macs_bounds(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> dict[str, float]:
    """MACs per image of ``model`` (eval mode) whatever its routing: ``dense`` (every unit at every iteration: Softmax), ``route``
    (one unit per iteration, never skipping), ``skip`` (the zero unit throughout). Any weight values will do (``to_empty()``)."""
    was = model.training
    model.eval()
    try:
        fixed, modules = _account(model, next(model.parameters()).new_zeros((1,) + tuple(input_shape)))
    finally:
        model.train(was)
    dense = fixed + sum(m.iterations * float(u.sum()) for m, u, _ in modules)
    route = fixed + sum(m.iterations * float(u.mean()) for m, u, _ in modules)
    return {"dense": dense, "route": route, "skip": fixed}


@dataclass
class InvocationCounter:
    """Calls and samples processed per unit, keyed by ``(reset_module_name, unit_index)``."""

    calls: dict[tuple[str, int], int] = field(default_factory=dict)
    samples: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_samples(self) -> int:
        return sum(self.samples.values())

    def reset(self) -> None:
        self.calls.clear()
        self.samples.clear()


@contextlib.contextmanager
def count_invocations(model: nn.Module) -> Iterator[InvocationCounter]:
    """Count what the ReSet units of ``model`` really execute inside the ``with`` block."""
    units = {(name, r): unit for name, m in model.named_modules() if isinstance(m, ReSet) for r, unit in enumerate(m.units)}
    counter = InvocationCounter(dict.fromkeys(units, 0), dict.fromkeys(units, 0))

    def hook(key: tuple[str, int], unit: nn.Module, args: tuple) -> None:
        counter.calls[key] += 1
        counter.samples[key] += int(args[0].shape[0])

    hooks = [unit.register_forward_pre_hook(functools.partial(hook, key)) for key, unit in units.items()]
    try:
        yield counter
    finally:
        for h in hooks:
            h.remove()
