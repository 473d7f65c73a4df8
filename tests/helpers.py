"""Shared test data: small random uint8 image sets in the layout ``train(..., arrays=...)`` takes."""

from __future__ import annotations

import numpy as np


def random_arrays(n_train: int = 64, n_test: int = 32, size: int = 8, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (x, y), "test": (x, y)}``: NHWC uint8 images of ``size`` x ``size`` and labels in 0..9, drawn in
    the order train x, train y, test x, test y from ``np.random.default_rng(seed)`` (the fault tests' child process
    draws the same)."""
    rng = np.random.default_rng(seed)
    return {
        "train": (rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8), rng.integers(0, 10, n_train)),
        "test": (rng.integers(0, 256, (n_test, size, size, 3), dtype=np.uint8), rng.integers(0, 10, n_test)),
    }
