"""The model zoo: every constructor is small and registered.

Widths are He et al.'s 16/32/64. ``resnet{6n+2}`` has n blocks per stage and He et
al.'s CIFAR stem (no max-pool). ``reset38`` replaces each stage by a ReSet module with
5 BasicBlock units and the zero unit, run for 5 iterations, after the paper's stem with
its max-pool (paper Sec. 4, Fig. 3). The shortened models of Tables 1 and 3, ReSet rows
and their sequential baselines alike, have the paper's stem, so each table compares like
with like. ``reset_seq{6n+2}`` (Sec. 5.1) has He et al.'s stem, as the ResNet whose
blocks it takes. ``stem_maxpool`` overrides the stem of any model.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from .cifar import CifarNet, ReSetOptions, StageSpec
from .registry import register_model, register_pattern

WIDTHS = (16, 32, 64)
PLAIN_OVERRIDES = ("num_classes", "in_channels", "stem_width", "stem_maxpool")
RESET_OVERRIDES = PLAIN_OVERRIDES + tuple(f.name for f in fields(ReSetOptions)) + ("units", "iterations")


def _plain(blocks: tuple[int, int, int], stem_maxpool: bool = False, **kw: Any) -> CifarNet:
    return CifarNet([StageSpec(w, blocks=b) for w, b in zip(WIDTHS, blocks)], stem_maxpool=stem_maxpool, **kw)


def _positive(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"override {name!r} must be an integer >= 1, got {value!r}")
    return value


def _reset(
    layout: tuple[tuple[int, int] | int, ...],
    units: int | None = None,
    iterations: int | None = None,
    transition: str = "conv",
    stem_maxpool: bool = True,
    **kw: Any,
) -> CifarNet:
    """``layout`` holds per stage either a block count (plain) or a (units, iterations) pair (ReSet).

    ``units``/``iterations`` overrides apply to every ReSet stage.
    """
    units, iterations = _positive("units", units), _positive("iterations", iterations)
    plain = {k: kw.pop(k) for k in PLAIN_OVERRIDES if k in kw}
    options = ReSetOptions(**kw)
    stages = []
    for width, item in zip(WIDTHS, layout):
        if isinstance(item, tuple):
            n, k = item
            stages.append(StageSpec(width, units=units or n, iterations=iterations or k, transition=transition))
        else:
            stages.append(StageSpec(width, blocks=item))
    return CifarNet(stages, reset_options=options, stem_maxpool=stem_maxpool, **plain)


def _with_overrides(fn, valid):
    """Set ``fn.valid_overrides``: the override names ``create_model`` accepts."""
    fn.valid_overrides = valid
    return fn


def _registered(valid: tuple[str, ...]):
    """Decorator: register a constructor with its valid overrides."""
    return lambda fn: register_model(_with_overrides(fn, valid))


def _resnet_depth(depth: int):
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"resnet depth must be 6n+2 with n >= 1 (20, 32, 38, 44, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6

    def constructor(**kw: Any) -> CifarNet:
        return _plain((n, n, n), **kw)

    constructor.__name__ = f"resnet{depth}"
    constructor.__doc__ = f"He et al.'s CIFAR ResNet-{depth}: {n} BasicBlocks per stage at widths 16/32/64."
    return _with_overrides(constructor, PLAIN_OVERRIDES)


for _depth in (20, 32, 38, 44, 56, 110):
    register_model(_resnet_depth(_depth))
register_pattern(r"resnet(\d+)", lambda m: _resnet_depth(int(m.group(1))), "resnet{6n+2}")


def _reset_seq_depth(depth: int):
    if depth < 14 or (depth - 2) % 6:
        raise ValueError(f"reset_seq depth must be 6n+2 with n >= 2 (20, 32, 38, ...), got {depth}")
    n = (depth - 2) // 6

    def constructor(**kw: Any) -> CifarNet:
        kw.setdefault("unit_bn", "shared")
        kw.setdefault("stem_maxpool", False)  # He et al.'s stem, as the ResNet it is built from
        return _reset(((n, n), (n - 1, n - 1), (n - 1, n - 1)), transition="block", **kw)

    constructor.__name__ = f"reset_seq{depth}"
    constructor.__doc__ = (
        f"The ReSet twin of resnet{depth} (Sec. 5.1): the same stem and downsampling blocks, and each "
        f"stage's other blocks as a ReSet pool (units = iterations = {n}, {n - 1}, {n - 1}), shared BN. "
        f"Load a trained resnet{depth} into it with resetnet.models.transfer.reset_from_resnet."
    )
    return _with_overrides(constructor, RESET_OVERRIDES)


for _depth in (20, 38):
    register_model(_reset_seq_depth(_depth))
register_pattern(r"reset_seq(\d+)", lambda m: _reset_seq_depth(int(m.group(1))), "reset_seq{6n+2}")


@_registered(RESET_OVERRIDES)
def reset38(**kw: Any) -> CifarNet:
    """ReSet-38 (paper Sec. 4, Fig. 3): the paper's max-pool stem, three ReSet modules (5 BasicBlock units + zero unit, 5 iterations) at widths 16/32/64."""
    return _reset(((5, 5), (5, 5), (5, 5)), **kw)


# Table 1: shortened models, n1-n2-n3 blocks per stage.
def _table1(blocks: tuple[int, int, int]) -> None:
    tag = "_".join(map(str, blocks))

    def plain(**kw: Any) -> CifarNet:
        kw.setdefault("stem_maxpool", True)  # the stem of its ReSet row
        return _plain(blocks, **kw)

    def routed(**kw: Any) -> CifarNet:
        return _reset(tuple((5, 5) if b == 5 else b for b in blocks), **kw)

    plain.__name__, routed.__name__ = f"resnet_{tag}", f"reset_{tag}"
    plain.__doc__ = f"Table 1 sequential baseline, {tag.replace('_', '-')} blocks per stage, with the paper's max-pool stem (as its ReSet row)."
    routed.__doc__ = f"Table 1 ReSet: a ReSet module (5 units, 5 iterations) in the 5-block stage of {tag.replace('_', '-')}."
    _registered(PLAIN_OVERRIDES)(plain)
    _registered(RESET_OVERRIDES)(routed)


for _blocks in ((1, 1, 5), (1, 5, 1), (5, 1, 1)):
    _table1(_blocks)


@_registered(PLAIN_OVERRIDES)
def resnet_t3(**kw: Any) -> CifarNet:
    """Table 3 sequential baseline ("2 CU & 2 iters"): 2 blocks in stage 1, one block in stages 2 and 3, the paper's max-pool stem (as the ReSet rows)."""
    kw.setdefault("stem_maxpool", True)
    return _plain((2, 1, 1), **kw)


def _table3(units: int, iterations: int) -> None:
    def routed(**kw: Any) -> CifarNet:
        return _reset(((units, iterations), 1, 1), **kw)

    routed.__name__ = f"reset_t3_{units}cu{iterations}it"
    routed.__doc__ = f"Table 3 shortened ReSet: stage 1 is a ReSet module with {units} units and {iterations} iterations."
    _registered(RESET_OVERRIDES)(routed)


for _u, _k in ((6, 2), (3, 2), (2, 3), (2, 6), (3, 3)):
    _table3(_u, _k)
