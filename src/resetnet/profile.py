"""Compute accounting: multiply-accumulates actually needed under the current routing.

:func:`macs_per_image` counts convolutions, linear layers and LSTM cells
(BatchNorm, activations and additions are not counted, as in
``torch.utils.flop_counter``). A ReSet unit is counted for a sample only at
the iterations where that sample gave it a non-zero weight; the zero unit is
free; controllers are counted at every iteration.

:func:`count_invocations` records what the units really executed: calls and
samples per unit, so tests and benchmarks can prove skipped units did not run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .nn import ReSet, call_unit


def _leaf_macs(module: nn.Module, inputs: tuple, output) -> float:
    """MACs of one call of a leaf module, per sample (first dimension of the input)."""
    x = inputs[0]
    batch = max(int(x.shape[0]), 1)
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() / batch * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output.numel() / batch * module.in_features
    if isinstance(module, nn.LSTMCell):
        return 4 * module.hidden_size * (module.input_size + module.hidden_size)
    return 0.0


_COUNTED = (nn.Conv2d, nn.Linear, nn.LSTMCell)


def _unit_module_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, ReSet):
            for unit in m.units:
                ids.update(id(x) for x in unit.modules())
    return ids


@torch.no_grad()
def unit_macs(unit: nn.Module, input_shape: tuple[int, ...], iteration: int = 0) -> float:
    """MACs per sample of one unit on an input of shape (C, H, W) (or (B, C, H, W))."""
    shape = tuple(input_shape)[-3:]
    total = [0.0]
    hooks = [m.register_forward_hook(lambda mod, i, o: total.__setitem__(0, total[0] + _leaf_macs(mod, i, o)))
             for m in unit.modules() if isinstance(m, _COUNTED)]
    was_training = unit.training
    unit.eval()
    try:
        param = next(unit.parameters(), None)
        device = param.device if param is not None else "cpu"
        dtype = param.dtype if param is not None else torch.float32
        call_unit(unit, torch.zeros((1,) + shape, device=device, dtype=dtype), iteration)
    finally:
        unit.train(was_training)
        for h in hooks:
            h.remove()
    return total[0]


@dataclass
class _Pools:
    """One forward's accounting: MACs outside the units, and each ReSet module's pool."""

    fixed: float  # per image: stem, transitions, head, controllers (every iteration)
    modules: list[tuple[ReSet, torch.Tensor, torch.Tensor]]  # (module, per-unit MACs (n,), weights (B, k, n_out))


@torch.no_grad()
def _account(model: nn.Module, x: torch.Tensor) -> _Pools:
    """Run ``model(x)`` once in its current mode, recording the routing and the MACs outside the units."""
    skip = _unit_module_ids(model)
    fixed = [0.0]
    reset_inputs: dict[int, tuple[int, ...]] = {}
    reset_routing: dict[int, torch.Tensor] = {}
    wanted: dict[int, bool] = {}
    hooks = []
    for m in model.modules():
        if isinstance(m, _COUNTED) and id(m) not in skip:
            hooks.append(m.register_forward_hook(lambda mod, i, o: fixed.__setitem__(0, fixed[0] + _leaf_macs(mod, i, o))))
        if isinstance(m, ReSet):
            def pre(mod, args, kwargs):
                reset_inputs[id(mod)] = tuple(args[0].shape)
                wanted[id(mod)] = bool(kwargs.get("return_routing", args[1] if len(args) > 1 else False))
                if len(args) > 2:  # a positional ``execution`` must survive the rewrite
                    kwargs = {**kwargs, "execution": args[2]}
                return args[:1], {**kwargs, "return_routing": True}

            def post(mod, args, kwargs, out):
                reset_routing[id(mod)] = out[1].weights
                return out if wanted[id(mod)] else out[0]

            hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    modules = []
    for m in model.modules():
        if isinstance(m, ReSet) and id(m) in reset_routing:
            per_unit = torch.tensor([unit_macs(u, reset_inputs[id(m)]) for u in m.units], dtype=torch.float64)
            modules.append((m, per_unit, reset_routing[id(m)].detach().cpu()))
    return _Pools(fixed[0], modules)


@torch.no_grad()
def macs_per_image(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B,) float64 tensor: MACs each sample of ``x`` needs under the routing it gets now.

    The model runs once on ``x`` in its current mode (so a training-mode Gumbel
    scorer samples a route, and that route is what is counted).
    """
    pools = _account(model, x)
    total = torch.full((x.shape[0],), pools.fixed, dtype=torch.float64)
    for m, per_unit, weights in pools.modules:
        active = (weights[..., : len(m.units)] != 0).to(torch.float64)  # (B, k, n)
        total += (active * per_unit).sum(dim=(1, 2))
    return total


@torch.no_grad()
def macs_bounds(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> dict[str, float]:
    """MACs per image of ``model`` (eval mode) whatever its routing: ``dense`` (every unit at every
    iteration: Softmax), ``route`` (one unit per iteration: a hard route that never skips) and
    ``skip`` (the zero unit at every iteration). Equal for a model without ReSet modules.
    The weights' values do not matter (``model.to_empty()`` of a meta-built model will do)."""
    was = model.training
    model.eval()
    try:
        param = next(model.parameters())
        pools = _account(model, torch.zeros((1,) + tuple(input_shape), device=param.device, dtype=param.dtype))
    finally:
        model.train(was)
    dense = pools.fixed + sum(m.iterations * float(u.sum()) for m, u, _ in pools.modules)
    route = pools.fixed + sum(m.iterations * float(u.mean()) for m, u, _ in pools.modules)
    return {"dense": dense, "route": route, "skip": pools.fixed}


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
    counter = InvocationCounter()
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, ReSet):
            for r, unit in enumerate(m.units):
                key = (name, r)
                counter.calls[key] = 0
                counter.samples[key] = 0

                def hook(mod, args, kwargs, key=key):
                    counter.calls[key] += 1
                    counter.samples[key] += int(args[0].shape[0])

                hooks.append(unit.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield counter
    finally:
        for h in hooks:
            h.remove()
