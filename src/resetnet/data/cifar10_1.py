"""CIFAR-10.1 (Recht et al., 2018): a fresh CIFAR-10-style test set, stored as ``.npy`` files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .download import download_url
from .paths import DataError, DataNotAvailable, resolve_data_dir

__all__ = ["CIFAR10_1_DIRNAME", "CIFAR10_1_SIZES", "CIFAR10_1_URL", "cifar10_1_available", "cifar10_1_files", "load_cifar10_1"]

CIFAR10_1_DIRNAME = "cifar-10.1"
#: Official image counts per version (informational; not enforced so tests can use small files).
CIFAR10_1_SIZES: dict[str, int] = {"v4": 2021, "v6": 2000}
#: URL template; ``{version}`` and ``{kind}`` (``data`` or ``labels``) are filled in.
CIFAR10_1_URL = "https://raw.githubusercontent.com/modestyachts/CIFAR-10.1/master/datasets/cifar10.1_{version}_{kind}.npy"


def _check_version(version: str) -> None:
    if version not in CIFAR10_1_SIZES:
        raise ValueError(f"unknown CIFAR-10.1 version {version!r}; valid versions: {', '.join(CIFAR10_1_SIZES)}")


def _names(version: str) -> tuple[str, str]:
    return f"cifar10.1_{version}_data.npy", f"cifar10.1_{version}_labels.npy"


def cifar10_1_files(root: str | os.PathLike[str] | None, version: str = "v6") -> tuple[Path, Path] | None:
    """``(data_path, labels_path)`` if both files exist in ``root`` or ``root/cifar-10.1``, else ``None``."""
    _check_version(version)
    root = resolve_data_dir(root) if root is None else Path(root).expanduser()
    data_name, labels_name = _names(version)
    for d in (root, root / CIFAR10_1_DIRNAME):
        data, labels = d / data_name, d / labels_name
        if data.is_file() and labels.is_file():
            return data, labels
    return None


def cifar10_1_available(root: str | os.PathLike[str] | None, version: str = "v6") -> bool:
    """True if both the image and the label file of ``version`` are present (no download)."""
    return cifar10_1_files(root, version) is not None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path} is not a valid .npy array ({e}); delete it and re-download.") from e


def load_cifar10_1(root: str | os.PathLike[str] | None, version: str = "v6", *, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Load CIFAR-10.1 ``version`` (``"v4"``: 2021 images, ``"v6"``: 2000) as ``(uint8 (N, 32, 32, 3), int64 (N,))``.

    Looks in ``root`` and ``root/cifar-10.1/``; with ``download``, missing files are fetched into the latter.
    Raises :class:`DataNotAvailable` when the files are absent and cannot be obtained, :class:`DataError` when malformed.
    """
    root = resolve_data_dir(root) if root is None else Path(root).expanduser()
    found = cifar10_1_files(root, version)  # checks the version
    target = root / CIFAR10_1_DIRNAME
    hint = (
        f"Place {' and '.join(_names(version))} (from https://github.com/modestyachts/CIFAR-10.1, "
        f"folder datasets/) in {target} or {root}, or pass --data-dir / set RESETNET_DATA."
    )
    if found is None:
        if not download:
            raise DataNotAvailable(
                f"CIFAR-10.1 {version} not found in {root}. {hint} Or let resetnet download it: resetnet eval --download, or download=True in Python."
            )
        try:
            for kind, name in zip(("data", "labels"), _names(version)):
                if not (target / name).is_file():
                    download_url(CIFAR10_1_URL.format(version=version, kind=kind), target / name)
        except DataError as e:
            raise DataNotAvailable(f"CIFAR-10.1 {version} not found in {root} and could not be downloaded ({e}). {hint}") from e
        found = cifar10_1_files(root, version)
        assert found is not None
    data_path, labels_path = found
    images, labels = _load_npy(data_path), _load_npy(labels_path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(
            f"{data_path}: expected uint8 images of shape (N, 32, 32, 3), got {images.dtype} {images.shape}. Delete it and re-download. {hint}"
        )
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise DataError(f"{labels_path}: expected 1-D integer labels, got {labels.dtype} {labels.shape}. Delete it and re-download. {hint}")
    if len(labels) != len(images):
        raise DataError(
            f"{data_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
            f"the pair is inconsistent. Delete both and re-download. {hint}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{labels_path}: labels must lie in 0..9, got range {labels.min()}..{labels.max()}. {hint}")
    return np.ascontiguousarray(images), labels.astype(np.int64)
