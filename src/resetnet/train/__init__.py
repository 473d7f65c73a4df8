"""Training: configs, parameter groups, schedules, checkpoints, the trainer and evaluation.

Python API (see ``docs/training.md``)::

    from resetnet.train import train, load_config, load_model
    summary = train(load_config("smoke", ["train.iterations=20"]), "runs/smoke", data_dir="data")
    model, meta = load_model("runs/smoke")
"""
from .checkpoint import CheckpointError, load_model, load_weights, read_checkpoint, save_checkpoint
from .config import ConfigError, defaults, list_configs, load_config, parse_set, validate
from .evaluate import compare_timing, evaluate, mean_macs
from .params import freeze, select_parameters, set_trainable
from .trainer import (
    DataBundle, NonFiniteLoss, Runtime, Trainer, TrainingInterrupted, TrainingStopped, build_data, build_model,
    build_optimizer, resolve_runtime, train,
)

__all__ = [
    "CheckpointError", "ConfigError", "DataBundle", "NonFiniteLoss", "Runtime", "Trainer", "TrainingInterrupted",
    "TrainingStopped", "build_data", "build_model", "build_optimizer", "compare_timing", "defaults", "evaluate",
    "freeze", "list_configs", "load_config", "load_model", "load_weights", "mean_macs", "parse_set",
    "read_checkpoint", "resolve_runtime", "save_checkpoint", "select_parameters", "set_trainable", "train", "validate",
]
