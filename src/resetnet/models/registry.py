"""A small timm-style model registry: ``create_model(name, **overrides)``, ``list_models()``, and
``load_model(checkpoint)`` for the models ``resetnet train`` saved."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_PATTERNS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], Callable[..., nn.Module]], str]] = []


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a model constructor under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def register_pattern(pattern: str, factory: Callable[[re.Match[str]], Callable[..., nn.Module]], example: str) -> None:
    """Register a family of names (e.g. ``resnet{6n+2}``) resolved by a regex."""
    _PATTERNS.append((re.compile(pattern), factory, example))


def list_models(filter: str = "") -> list[str]:
    """Names of the registered models containing ``filter``, sorted."""
    return sorted(name for name in _MODELS if filter in name)


def get_model_constructor(name: str) -> Callable[..., nn.Module]:
    if name in _MODELS:
        return _MODELS[name]
    for pattern, factory, _ in _PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            return factory(match)
    families = ", ".join(example for _, _, example in _PATTERNS)
    raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}" + (f"; families: {families}" if families else ""))


def create_model(name: str, pretrained: bool | None = None, checkpoint_path: str | os.PathLike[str] | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model; ``overrides`` replace its default constructor arguments.

    ``checkpoint_path`` (a run directory or a ``.safetensors`` checkpoint) loads its weights into the
    model (strict). No pretrained weights are published: ``pretrained=True`` is an error that says so.
    An override the constructor does not take is a ``ValueError`` that lists the valid ones.
    """
    if pretrained:
        raise ValueError(f"no pretrained weights are published for {name!r}; train one (resetnet train) and pass checkpoint_path=RUN_DIR")
    constructor = get_model_constructor(name)
    valid = getattr(constructor, "valid_overrides", None)
    if valid is not None:
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ValueError(f"unknown override(s) {unknown} for model {name!r}; valid overrides: {', '.join(sorted(valid))}")
    model = constructor(**overrides)
    model.model_name = name  # type: ignore[assignment]
    if checkpoint_path is not None:
        from ..checkpoint import load_weights

        load_weights(model, checkpoint_path, strict=True)
    return model


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu", ema: bool = False) -> tuple[nn.Module, dict]:
    """The model a checkpoint holds (a run directory or a ``.safetensors`` file written by ``resetnet train``),
    rebuilt from its recorded name and overrides, with its weights (strict; ``ema``: the EMA of them), in eval mode on ``device``.

    Returns ``(model, meta)``; ``meta["config"]`` is the run's config. Every failure (not a checkpoint, a torn
    file, a model or overrides this version cannot build, weights that do not fit) is a one-line ``CheckpointError``.
    """
    from ..checkpoint import load_weights, read_checkpoint

    ckpt = read_checkpoint(path)
    model_cfg = (ckpt.meta.get("config") or {}).get("model") or {}
    name, overrides = model_cfg.get("name"), model_cfg.get("overrides") or {}
    if not name:
        raise CheckpointError(f"checkpoint {ckpt.path} does not say which model it holds (no model name in its metadata)")
    what = f"model {name!r}" + (f" with overrides {overrides}" if overrides else "")
    try:
        model = create_model(str(name), **overrides)
    except (ValueError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint {ckpt.path} holds {what}, which this resetnet cannot build ({err}); use the resetnet version that wrote it, or retrain"
        ) from None
    report = load_weights(model, ckpt, strict=False, weights="aux/ema" if ema else "model")
    if any(report.values()):
        parts = [f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})" for label, keys in report.items() if keys]
        raise CheckpointError(
            f"checkpoint {ckpt.path}: its weights do not fit {what}: {'; '.join(parts)}; the file was modified "
            "or written by another resetnet version: use that version, or retrain"
        )
    return model.to(device).eval(), ckpt.meta
