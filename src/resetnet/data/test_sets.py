"""Extra test sets (``--test-set NAME=PATH`` of ``resetnet eval`` and ``resetnet reproduce``) for distribution-shift columns.

An ``.npz`` with ``x``: uint8 images ``(N, 32, 32, 3)`` (HWC, RGB, like CIFAR-10.1's ``.npy``) and ``y``: integer labels in
``[0, 10)`` in CIFAR-10's class order: CIFAR-10-C corruptions, a CIFAR-10.2 copy, or a set of your own.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np

from .paths import DataError

__all__ = ["load_test_set", "parse_test_set"]

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_RESERVED = {"c10", "cifar10", "c10_1", "cifar10_1"}


def parse_test_set(text: str) -> tuple[str, Path]:
    """``"NAME=PATH"`` -> ``(NAME, PATH)``; a DataError names what is wrong."""
    if "=" not in text:
        raise DataError(f"--test-set {text!r}: expected NAME=PATH, e.g. --test-set cifar10c_fog=fog.npz")
    name, path = text.split("=", 1)
    name = name.strip()
    if not _NAME.fullmatch(name) or name.lower() in _RESERVED:
        raise DataError(
            f"--test-set {text!r}: the name must be letters, digits, '_', '.' or '-' (starting with a letter), "
            f"and not one of {', '.join(sorted(_RESERVED))}"
        )
    return name, Path(path).expanduser()


def load_test_set(path: str | os.PathLike[str], num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``(x uint8 (N, 32, 32, 3), y int64 (N,))`` from an ``.npz`` file, validated."""
    path = Path(path).expanduser()
    fix = "expected an .npz with x: uint8 (N, 32, 32, 3) and y: integer labels in [0, 10), e.g. np.savez(PATH, x=x, y=y)"
    if not path.is_file():
        raise DataError(f"test set {path}: no such file; {fix}")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if not {"x", "y"} <= keys:
                raise DataError(f"test set {path}: has arrays {sorted(keys)}, not x and y; {fix}")
            x, y = f["x"], f["y"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"test set {path}: not a readable .npz file ({type(err).__name__}: {err}); {fix}") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise DataError(f"test set {path}: x is {x.dtype} {tuple(x.shape)}; {fix}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"test set {path}: y is {y.dtype} {tuple(y.shape)}, not a 1-D integer array; {fix}")
    if len(y) != len(x) or len(x) == 0:
        raise DataError(f"test set {path}: {len(x)} images and {len(y)} labels; {fix}")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"test set {path}: labels range over [{y.min()}, {y.max()}], outside [0, {num_classes}); {fix}")
    return x, y.astype(np.int64)
