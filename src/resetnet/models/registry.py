"""A small timm-style model registry: ``create_model(name, **overrides)`` and ``list_models()``."""
from __future__ import annotations

import re
from typing import Any, Callable

from torch import nn

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


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model; ``overrides`` replace its default constructor arguments.

    An override the constructor does not take is a ``ValueError`` that lists the valid ones.
    """
    constructor = get_model_constructor(name)
    valid = getattr(constructor, "valid_overrides", None)
    if valid is not None:
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ValueError(f"unknown override(s) {unknown} for model {name!r}; valid overrides: {', '.join(sorted(valid))}")
    model = constructor(**overrides)
    model.model_name = name  # type: ignore[assignment]
    return model
