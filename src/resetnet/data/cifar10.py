"""CIFAR-10 from the official binary release (``cifar-10-batches-bin``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .download import download_url, file_md5, safe_extract_tar
from .paths import DataError, resolve_data_dir

#: Per-channel mean / std of the CIFAR-10 training set on the 0-1 scale (RGB).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE_NAME = "cifar-10-binary.tar.gz"
ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_DIRNAME = "cifar-10-batches-bin"
CIFAR10_MD5: dict[str, str] = {
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
SPLITS: dict[str, tuple[str, ...]] = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}

RECORD_BYTES = 1 + 3 * 32 * 32  # 1 label byte + 1024 R + 1024 G + 1024 B
RECORDS_PER_FILE = 10_000

# (resolved path, size, mtime_ns) of files whose MD5 matched in this process.
_VERIFIED: set[tuple[str, int, int]] = set()


def _fix_hint(root: Path) -> str:
    return f"Download {ARCHIVE_NAME} from {CIFAR10_URL} and extract it into {root}, or pass --data-dir / set RESETNET_DATA."


def _check_file(path: Path, root: Path, verify: bool) -> int:
    """Validate size (and MD5 when ``verify``) of one batch file; return its record count."""
    st = path.stat()
    size, full = st.st_size, RECORDS_PER_FILE * RECORD_BYTES
    if size == 0 or size % RECORD_BYTES != 0 or (verify and size != full):
        expected = f"a positive multiple of the {RECORD_BYTES}-byte record size"
        if verify:
            expected = f"the expected {full} bytes ({RECORDS_PER_FILE} records of {RECORD_BYTES} bytes)"
        raise DataError(f"{path} is truncated or malformed: {size} bytes is not {expected}. Delete it and re-download. {_fix_hint(root)}")
    if verify and (key := (str(path.resolve()), size, st.st_mtime_ns)) not in _VERIFIED:
        digest, expected_md5 = file_md5(path), CIFAR10_MD5[path.name]
        if digest != expected_md5:
            raise DataError(
                f"{path} has MD5 {digest}, expected {expected_md5}: the file is corrupt or modified; delete it and "
                "re-download, or skip the check (resetnet eval/analyze: --no-verify; resetnet train: "
                f"--set data.verify=false; Python: verify=False). {_fix_hint(root)}"
            )
        _VERIFIED.add(key)
    return size // RECORD_BYTES


def load_cifar10(root: str | os.PathLike[str] | None, split: str, *, download: bool = False, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load a CIFAR-10 split as ``(uint8 images (N, 32, 32, 3) HWC RGB, int64 labels (N,))``.

    Args:
        root: directory containing ``cifar-10-batches-bin/`` (``None``: :func:`resolve_data_dir`).
        split: ``"train"`` (``data_batch_1..5.bin`` in order, 50000 images) or ``"test"`` (10000).
        download: fetch the official archive into ``root`` if files are missing.
        verify: check each file's size and MD5 (cached per process by size and mtime);
            with ``verify=False`` any positive whole number of records is accepted.

    Raises :class:`DataError` when files are missing (and not downloaded), truncated or corrupt.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown CIFAR-10 split {split!r}; valid splits: {', '.join(SPLITS)}")
    root = resolve_data_dir(root) if root is None else Path(root).expanduser()
    bdir = root if root.name == CIFAR10_DIRNAME else root / CIFAR10_DIRNAME  # root may be the batch dir itself
    files = [bdir / name for name in SPLITS[split]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        if not download:
            raise DataError(
                f"CIFAR-10 not found in {bdir} (missing {', '.join(missing)}). "
                f"{_fix_hint(root)} Or let resetnet download it: pass --download (resetnet train, eval and analyze; "
                "for train it sets data.download=true), or download=True in Python."
            )
        archive = bdir.parent / ARCHIVE_NAME
        try:
            download_url(CIFAR10_URL, archive, md5=ARCHIVE_MD5 if verify else None)
            try:
                safe_extract_tar(archive, bdir.parent)
            finally:
                archive.unlink(missing_ok=True)
        except DataError as e:
            raise DataError(f"CIFAR-10 not found in {bdir} and could not be downloaded ({e}). {_fix_hint(root)}") from e
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DataError(f"downloaded archive did not contain {', '.join(missing)} under {bdir}. {_fix_hint(root)}")

    counts = [_check_file(f, root, verify) for f in files]
    n = sum(counts)
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int64)
    start = 0
    for f, count in zip(files, counts):
        raw = np.fromfile(f, dtype=np.uint8)
        if raw.size != count * RECORD_BYTES:  # file changed between stat and read
            raise DataError(f"{f} changed size while reading; re-run or re-download it.")
        raw = raw.reshape(count, RECORD_BYTES)
        labels[start : start + count] = raw[:, 0]
        images[start : start + count] = raw[:, 1:].reshape(count, 3, 32, 32).transpose(0, 2, 3, 1)
        bad = raw[:, 0] > 9
        if bad.any():
            raise DataError(
                f"{f} is malformed: label {int(raw[bad.argmax(), 0])} at record {int(bad.argmax())} "
                f"is outside 0..9. Delete it and re-download. {_fix_hint(root)}"
            )
        start += count
    return images, labels


def train_val_split(images: np.ndarray, labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded, class-stratified hold-out split: ``(train_images, train_labels, val_images, val_labels)``.

    Classes contribute to the ``val_size`` samples in proportion to their frequency (largest
    remainder rounding), drawn with ``numpy.random.default_rng(seed)``; both parts keep the sample order.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if len(images) != n:
        raise ValueError(f"images ({len(images)}) and labels ({n}) differ in length")
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}), got {val_size}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (val_size / n)
    quota = np.floor(exact).astype(np.int64)
    remainder = val_size - int(quota.sum())
    if remainder > 0:
        # Largest fractional parts first; ties broken by class order (stable sort).
        order = np.argsort(-(exact - quota), kind="stable")
        quota[order[:remainder]] += 1
    val_mask = np.zeros(n, dtype=bool)
    for c, q in zip(classes, quota):
        idx = np.flatnonzero(labels == c)
        val_mask[rng.permutation(idx)[:q]] = True
    return images[~val_mask], labels[~val_mask], images[val_mask], labels[val_mask]
