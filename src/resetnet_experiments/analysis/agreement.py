"""Sequential-policy agreement (paper Sec. 5.1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from resetnet.nn.routing import Routing


def sequential_hits(routing: Sequence[Routing]) -> list[tuple[int, int]]:
    """Per module: (pairs whose arg-max unit is the iteration's index, all (image, iteration) pairs)."""
    out = []
    for r in routing:
        route = r.hard_route()  # (B, k)
        target = torch.arange(route.shape[1], device=route.device).expand_as(route)
        out.append((int((route == target).sum()), route.numel()))
    return out


def sequential_agreement(routing: Sequence[Routing]) -> float:
    """Fraction of (image, iteration) pairs whose arg-max unit is the iteration's own index.

    For a ReSet twin of a trained ResNet (``reset_seq{6n+2}``), unit j is the ResNet's
    j-th block of the stage, so the sequential policy chooses unit j at iteration j.
    Pairs are pooled over all modules.
    """
    per_module = sequential_hits(routing)
    hits, total = sum(h for h, _ in per_module), sum(c for _, c in per_module)
    if total == 0:
        raise ValueError("sequential_agreement needs at least one ReSet module's routing")
    return hits / total
