"""Move a trained CIFAR ResNet into its ReSet twin (paper Sec. 5.1).

``resnet{6n+2}`` and ``reset_seq{6n+2}`` share the stem, the downsampling blocks
and the head; each ResNet stage's identity blocks become, in order, the pool of
the corresponding ReSet module (iterations = number of blocks). With the
sequential policy (unit j at iteration j) the twin computes exactly the ResNet.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .registry import create_model

_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")


def resnet_to_reset_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a resnet state dict's ``stages.i.blocks.b.*`` keys to ``stages.i.units.b.*``."""
    return {_BLOCK_KEY.sub(r"stages.\1.units.\2.", key): value for key, value in state.items()}


def reset_from_resnet(resnet: nn.Module, **overrides: Any) -> nn.Module:
    """A ``reset_seq{depth}`` model holding ``resnet``'s trained weights; controllers are fresh.

    ``resnet`` must be a ``resnet{6n+2}`` from the zoo. Overrides go to the ReSet twin
    (e.g. ``controller="cnn"``); the unit BN mode must stay shared so the weights fit.
    """
    name = getattr(resnet, "model_name", "")
    match = re.fullmatch(r"resnet(\d+)", name)
    if not match:
        raise ValueError(f"reset_from_resnet needs a zoo resnet{{6n+2}} model, got {name or type(resnet).__name__!r}")
    if overrides.get("unit_bn", "shared") != "shared":
        raise ValueError("a transferred ResNet has one BatchNorm per block: use unit_bn='shared'")
    twin = create_model(f"reset_seq{match.group(1)}", **overrides)
    state = resnet_to_reset_state(resnet.state_dict())
    missing, unexpected = twin.load_state_dict(state, strict=False)
    not_controller = [k for k in missing if ".controller." not in k]
    if not_controller or unexpected:
        raise ValueError(f"resnet -> reset_seq weight transfer failed: missing {not_controller}, unexpected {list(unexpected)}")
    return twin
