"""The model registry and zoo."""

from . import zoo  # noqa: F401  (registers the models)
from .cifar import CifarNet, ReSetOptions, StageSpec
from .registry import create_model, get_model_constructor, list_models, load_model, register_model

__all__ = ["CifarNet", "ReSetOptions", "StageSpec", "create_model", "get_model_constructor", "list_models", "load_model", "register_model"]
