"""Parameter groups of a :class:`~resetnet.models.CifarNet`: selection, freezing, frozen BatchNorm.

Groups (see ``docs/architecture.md``): ``controller`` (every ``ReSet.controller``), ``units`` (every ``ReSet.units``, the
computational units), ``stem`` (``model.stem``), ``stage{i}`` (``model.transitions[i]`` and ``model.stages[i]``, controller and
units included), ``head`` (``model.head_norm`` and ``model.fc``) and ``all``. Groups may overlap; selections are unions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from ..nn import ReSet

STATIC_GROUPS = ("controller", "units", "stem", "head", "all")
_STAGE = re.compile(r"stage(\d+)")


def _stage_count(model: nn.Module) -> int:
    return len(getattr(model, "stages", None) or ())


def available_groups(model: nn.Module) -> list[str]:
    """The group names valid for ``model``."""
    return ["controller", "units", "stem"] + [f"stage{i}" for i in range(_stage_count(model))] + ["head", "all"]


def check_group_names(groups: Iterable[str]) -> list[str]:
    """Validate names without a model (``stage{i}`` accepted for any i); ValueError lists the names."""
    groups = list(groups)
    for g in groups:
        if not isinstance(g, str) or not (g in STATIC_GROUPS or _STAGE.fullmatch(g)):
            raise ValueError(f"unknown parameter group {g!r}; valid groups: controller, units, stem, stage0, stage1, stage2, head, all")
    return groups


def group_modules(model: nn.Module, group: str) -> list[nn.Module]:
    """The modules making up ``group`` in ``model`` (ValueError listing the valid names otherwise)."""
    resets = [m for m in model.modules() if isinstance(m, ReSet)]
    groups = {"all": [model], "controller": [m.controller for m in resets], "units": [m.units for m in resets]}
    if hasattr(model, "stem"):
        groups["stem"] = [model.stem]
    if hasattr(model, "fc"):
        groups["head"] = [m for m in (getattr(model, "head_norm", None), model.fc) if m is not None]
    match = _STAGE.fullmatch(group)
    if match and int(match.group(1)) < _stage_count(model):
        i = int(match.group(1))
        return [model.transitions[i], model.stages[i]]
    if group in groups:
        return groups[group]
    raise ValueError(f"unknown parameter group {group!r} for {type(model).__name__}; valid groups: {', '.join(available_groups(model))}")


def select_named_parameters(model: nn.Module, groups: Iterable[str]) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs of the union of ``groups``, in the model's order, without duplicates."""
    wanted: set[int] = set()
    for g in groups:
        for m in group_modules(model, g):
            wanted.update(id(p) for p in m.parameters())
    return [(n, p) for n, p in model.named_parameters() if id(p) in wanted]


def select_parameters(model: nn.Module, groups: Iterable[str]) -> list[nn.Parameter]:
    """The parameters of the union of ``groups`` (model order, no duplicates)."""
    return [p for _, p in select_named_parameters(model, groups)]


def freeze(model: nn.Module, groups: Iterable[str]) -> list[nn.Parameter]:
    """Set ``requires_grad = False`` on the parameters of ``groups``; returns them."""
    params = select_parameters(model, groups)
    for p in params:
        p.requires_grad_(False)
    return params


def set_trainable(model: nn.Module, groups: Iterable[str]) -> list[nn.Parameter]:
    """Train exactly ``groups``: freeze every other parameter. Returns the trainable parameters."""
    keep = select_parameters(model, groups)
    ids = {id(p) for p in keep}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return keep


def frozen_batchnorms(model: nn.Module) -> list[nn.Module]:
    """BatchNorm modules whose parameters are all frozen (``requires_grad`` false); one without parameters when the whole model is."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return [m for m in bns if not any(p.requires_grad for p in list(m.parameters(recurse=False)) or model.parameters())]


def set_frozen_bn_eval(modules: Iterable[nn.Module]) -> None:
    """Put BatchNorm modules in eval mode (running statistics used, not updated); call after every ``model.train()``."""
    for m in modules:
        m.eval()
