"""Errors a user can cause. The command line prints any :class:`UserError` as one line
(``resetnet COMMAND: error: WHAT; FIX``) and exits with code 2; nothing else is needed to
report one, so every message names the problem and the fix."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["UserError", "ConfigError", "DataError", "DataNotAvailable", "CheckpointError", "RunDirError", "RunDirLocked", "UsageError"]
__all__ += ["MissingDependency", "require"]


class UserError(Exception):
    """Bad input: a config, a data set, a checkpoint, an output path, a command-line value."""


class ConfigError(UserError, ValueError):
    """A config file or override is invalid."""


class DataError(UserError, RuntimeError):
    """A data set is missing, corrupt or malformed."""


class DataNotAvailable(DataError):
    """An optional data set (e.g. CIFAR-10.1) is absent and could not be fetched."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, torn, not a checkpoint, or does not fit the model."""


class RunDirError(UserError, RuntimeError):
    """A run directory cannot be created or written."""


class RunDirLocked(RunDirError):
    """Another live process holds the run directory; ``holder`` is its lock record, ``where`` the message without advice."""

    def __init__(self, message: str, holder: dict | None = None, where: str = "") -> None:
        super().__init__(message)
        self.holder, self.where = dict(holder or {}), where or message


class UsageError(UserError, ValueError):
    """A command-line value is unusable (a device that is not there, an unwritable output path)."""


class MissingDependency(UserError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` for ``purpose``, or raise :class:`MissingDependency` naming ``pip install 'resetnet[EXTRA]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        raise MissingDependency(f"{purpose} needs {package}, which is not installed ({err}); pip install 'resetnet[{extra}]'") from None
