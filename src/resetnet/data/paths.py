"""Data directory resolution and the data-layer exception types."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError, DataNotAvailable

__all__ = ["DataError", "DataNotAvailable", "ENV_VAR", "resolve_data_dir"]

#: Environment variable consulted when no explicit data directory is given.
ENV_VAR = "RESETNET_DATA"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``data_dir``, else ``$RESETNET_DATA``, else ``$XDG_CACHE_HOME/resetnet`` or ``~/.cache/resetnet``.

    The directory is not created here; downloaders create it when they write to it.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "resetnet"
