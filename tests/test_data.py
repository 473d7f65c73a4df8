"""Tests for resetnet.data: file formats, validation, downloads and the device loader."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from resetnet import data
from resetnet.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CLASSES,
    DataError,
    DataNotAvailable,
    DeviceLoader,
    cifar10_1_available,
    download_url,
    file_md5,
    load_cifar10,
    load_cifar10_1,
    resolve_data_dir,
    safe_extract_tar,
    train_val_split,
)
from resetnet.data import cifar10 as cifar10_mod

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
UNREACHABLE = "http://127.0.0.1:9/x"


# --------------------------------------------------------------------------- helpers
def _records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """Official CIFAR-10 binary records: label byte + R plane + G plane + B plane."""
    out = bytearray()
    for img, lab in zip(images, labels):
        out.append(int(lab))
        for c in range(3):
            out += img[:, :, c].tobytes()  # row-major 32x32 plane
    return bytes(out)


def _fake_cifar10(root: Path, n_per_file: int = 4, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write a small fake cifar-10-batches-bin under root; return the arrays per file."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in cifar10_mod.CIFAR10_MD5:
        imgs = rng.integers(0, 256, (n_per_file, 32, 32, 3), dtype=np.uint8)
        labs = rng.integers(0, 10, n_per_file).astype(np.int64)
        (d / name).write_bytes(_records(imgs, labs))
        out[name] = (imgs, labs)
    return out


def _fake_cifar10_1(d: Path, version: str = "v6", n: int = 20, *, dtype=np.uint8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    d.mkdir(parents=True, exist_ok=True)
    imgs = rng.integers(0, 256, (n, 32, 32, 3)).astype(dtype)
    labs = (np.arange(n) % 10).astype(np.int32)  # the official files store int32 labels
    np.save(d / f"cifar10.1_{version}_data.npy", imgs)
    np.save(d / f"cifar10.1_{version}_labels.npy", labs)
    return imgs, labs


def _synthetic(n: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def _epoch(loader: DeviceLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def _normalize_ref(img_nhwc: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(img_nhwc).permute(0, 3, 1, 2).double() / 255.0
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return ((x - mean) / std).float()


# --------------------------------------------------------------------------- paths
def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RESETNET_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("RESETNET_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir(None) == tmp_path / "xdg" / "resetnet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir(None) == Path.home() / ".cache" / "resetnet"


def test_constants():
    assert len(CLASSES) == 10 and CLASSES[0] == "airplane" and CLASSES[9] == "truck"
    assert len(CIFAR10_MEAN) == len(CIFAR10_STD) == 3
    assert issubclass(DataError, RuntimeError) and issubclass(DataNotAvailable, DataError)


# --------------------------------------------------------------------------- CIFAR-10 format
def test_cifar10_pixel_layout(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    rec = bytearray(3073 * 2)
    rec[0], rec[3073] = 7, 2  # labels of record 0 and 1
    # Record 0: R plane pixel (h=2, w=5) = 200, G (h=31, w=0) = 17, B (h=0, w=31) = 99.
    rec[1 + 0 * 1024 + 2 * 32 + 5] = 200
    rec[1 + 1 * 1024 + 31 * 32 + 0] = 17
    rec[1 + 2 * 1024 + 0 * 32 + 31] = 99
    (d / "test_batch.bin").write_bytes(bytes(rec))
    imgs, labs = load_cifar10(tmp_path, "test", verify=False)
    assert imgs.shape == (2, 32, 32, 3) and imgs.dtype == np.uint8 and imgs.flags.c_contiguous
    assert labs.dtype == np.int64 and labs.tolist() == [7, 2]
    assert imgs[0, 2, 5, 0] == 200 and imgs[0, 31, 0, 1] == 17 and imgs[0, 0, 31, 2] == 99
    assert int(imgs.sum()) == 200 + 17 + 99


def test_cifar10_train_concatenates_in_order(tmp_path):
    written = _fake_cifar10(tmp_path)
    imgs, labs = load_cifar10(tmp_path, "train", verify=False)
    exp_i = np.concatenate([written[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    exp_l = np.concatenate([written[f"data_batch_{i}.bin"][1] for i in range(1, 6)])
    np.testing.assert_array_equal(imgs, exp_i)
    np.testing.assert_array_equal(labs, exp_l)
    t_imgs, t_labs = load_cifar10(tmp_path, "test", verify=False)
    np.testing.assert_array_equal(t_imgs, written["test_batch.bin"][0])
    # root may also point at the batch directory itself
    np.testing.assert_array_equal(load_cifar10(tmp_path / "cifar-10-batches-bin", "test", verify=False)[1], t_labs)


def test_cifar10_bad_split(tmp_path):
    with pytest.raises(ValueError, match="train.*test"):
        load_cifar10(tmp_path, "valid")


def test_cifar10_md5_verified_and_cached(tmp_path, monkeypatch):
    _fake_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    monkeypatch.setattr(cifar10_mod, "RECORDS_PER_FILE", 4)
    monkeypatch.setitem(cifar10_mod.CIFAR10_MD5, "test_batch.bin", file_md5(path))
    calls = []
    monkeypatch.setattr(cifar10_mod, "file_md5", lambda p: calls.append(p) or file_md5(p))
    load_cifar10(tmp_path, "test")
    load_cifar10(tmp_path, "test")
    assert len(calls) == 1  # second load reuses the (size, mtime) verification


def test_cifar10_md5_mismatch(tmp_path, monkeypatch):
    _fake_cifar10(tmp_path)
    monkeypatch.setattr(cifar10_mod, "RECORDS_PER_FILE", 4)  # right size, wrong content
    with pytest.raises(DataError, match=r"test_batch\.bin.*corrupt or modified; delete it and re-download"):
        load_cifar10(tmp_path, "test")


def test_cifar10_truncated(tmp_path):
    _fake_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"data_batch_3\.bin is truncated"):
        load_cifar10(tmp_path, "train", verify=False)
    # With verify=True the record count must be the official 10000.
    with pytest.raises(DataError, match=r"data_batch_1\.bin is truncated.*30730000"):
        load_cifar10(tmp_path, "train")


def test_cifar10_bad_label(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    (d / "test_batch.bin").write_bytes(bytes([12]) + bytes(3072))
    with pytest.raises(DataError, match="outside 0..9"):
        load_cifar10(tmp_path, "test", verify=False)


def test_cifar10_missing_no_download(tmp_path):
    with pytest.raises(DataError, match="cifar-10-binary.tar.gz") as ei:
        load_cifar10(tmp_path, "test")
    assert str(tmp_path) in str(ei.value) and "RESETNET_DATA" in str(ei.value)


def test_cifar10_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10_mod, "CIFAR10_URL", UNREACHABLE)
    t0 = time.monotonic()
    with pytest.raises(DataError) as ei:
        load_cifar10(tmp_path, "train", download=True)
    assert time.monotonic() - t0 < 15
    msg = str(ei.value)
    assert "could not be downloaded" in msg
    assert f"extract it into {tmp_path}" in msg and "--data-dir" in msg and "RESETNET_DATA" in msg
    assert not any(tmp_path.iterdir())  # no partial files left behind


def test_cifar10_download_from_archive(tmp_path, monkeypatch):
    src = tmp_path / "src"
    written = _fake_cifar10(src)
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    monkeypatch.setattr(cifar10_mod, "CIFAR10_URL", archive.as_uri())
    root = tmp_path / "root"
    imgs, labs = load_cifar10(root, "test", download=True, verify=False)
    np.testing.assert_array_equal(imgs, written["test_batch.bin"][0])
    assert not (root / "cifar-10-binary.tar.gz").exists()


# --------------------------------------------------------------------------- downloads / tar
def test_download_url_file_and_md5(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello" * 1000)
    dest = tmp_path / "out" / "dest.bin"
    assert download_url(src.as_uri(), dest, md5=file_md5(src), progress=False) == dest
    assert dest.read_bytes() == src.read_bytes()
    bad = tmp_path / "out" / "bad.bin"
    with pytest.raises(DataError, match="MD5"):
        download_url(src.as_uri(), bad, md5="0" * 32, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dest.bin"]  # no temp files


def test_download_url_unreachable(tmp_path):
    with pytest.raises(DataError, match="could not download http://127.0.0.1:9/x"):
        download_url(UNREACHABLE, tmp_path / "x", timeout=5)
    assert not any(tmp_path.iterdir())


def _tar_with(tmp_path: Path, info: tarfile.TarInfo, payload: bytes = b"evil") -> Path:
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        ok = tarfile.TarInfo("ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        if info.isfile():
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        else:
            tar.addfile(info)
    return archive


@pytest.mark.parametrize(
    "name,kind,link",
    [
        ("../evil", tarfile.REGTYPE, ""),
        ("sub/../../evil", tarfile.REGTYPE, ""),
        ("/tmp/resetnet_abs_evil", tarfile.REGTYPE, ""),
        ("link", tarfile.SYMTYPE, "../outside"),
        ("link", tarfile.SYMTYPE, "/etc/passwd"),
        ("hard", tarfile.LNKTYPE, "../outside"),
        ("dev", tarfile.CHRTYPE, ""),
    ],
)
def test_safe_extract_rejects(tmp_path, name, kind, link):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    archive = _tar_with(tmp_path, info)
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="unsafe tar member"):
        safe_extract_tar(archive, dest)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/resetnet_abs_evil").exists()
    assert not any(dest.iterdir())  # nothing extracted: members are checked first


def test_safe_extract_ok(tmp_path):
    info = tarfile.TarInfo("d/inner.txt")
    archive = _tar_with(tmp_path, info, b"data")
    safe_extract_tar(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "d" / "inner.txt").read_bytes() == b"data"


# --------------------------------------------------------------------------- CIFAR-10.1
@pytest.mark.parametrize("sub", [False, True])
def test_cifar10_1_load(tmp_path, sub):
    d = tmp_path / "cifar-10.1" if sub else tmp_path
    exp_i, exp_l = _fake_cifar10_1(d, "v4", n=21)
    assert cifar10_1_available(tmp_path, "v4") and not cifar10_1_available(tmp_path, "v6")
    imgs, labs = load_cifar10_1(tmp_path, "v4")
    assert imgs.dtype == np.uint8 and imgs.shape == (21, 32, 32, 3) and labs.dtype == np.int64
    np.testing.assert_array_equal(imgs, exp_i)
    np.testing.assert_array_equal(labs, exp_l)


def test_cifar10_1_wrong_dtype(tmp_path):
    _fake_cifar10_1(tmp_path, dtype=np.float32)
    with pytest.raises(DataError, match=r"cifar10\.1_v6_data\.npy: expected uint8"):
        load_cifar10_1(tmp_path)


def test_cifar10_1_mismatched_lengths_and_labels(tmp_path):
    _fake_cifar10_1(tmp_path)
    np.save(tmp_path / "cifar10.1_v6_labels.npy", np.arange(5, dtype=np.int64))
    with pytest.raises(DataError, match="inconsistent"):
        load_cifar10_1(tmp_path)
    np.save(tmp_path / "cifar10.1_v6_labels.npy", np.full(20, 10, dtype=np.int64))
    with pytest.raises(DataError, match="0..9"):
        load_cifar10_1(tmp_path)


def test_cifar10_1_missing(tmp_path, monkeypatch):
    d = tmp_path / "cifar-10.1"
    d.mkdir()
    np.save(d / "cifar10.1_v6_labels.npy", np.zeros(20, dtype=np.int32))  # images absent
    assert not cifar10_1_available(tmp_path, "v6")
    with pytest.raises(DataNotAvailable, match="not found"):
        load_cifar10_1(tmp_path, "v6")
    monkeypatch.setattr(data.cifar10_1, "CIFAR10_1_URL", UNREACHABLE + "/{version}_{kind}")
    with pytest.raises(DataNotAvailable, match="could not be downloaded"):
        load_cifar10_1(tmp_path, "v6", download=True)
    with pytest.raises(ValueError, match="v4, v6"):
        load_cifar10_1(tmp_path, "v5")


# --------------------------------------------------------------------------- real data
def _require_real(*parts: str) -> Path:
    p = REAL_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not present at {p}")
    return p


def test_real_cifar10():
    _require_real("cifar-10-batches-bin", "test_batch.bin")
    imgs, labs = load_cifar10(REAL_DATA, "train")
    assert imgs.shape == (50000, 32, 32, 3) and labs.shape == (50000,)
    assert labs[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert imgs[0, 0, 0].tolist() == [59, 62, 63]
    assert np.bincount(labs).tolist() == [5000] * 10
    # The published normalisation constants match the data.
    np.testing.assert_allclose(imgs.reshape(-1, 3).mean(0) / 255.0, CIFAR10_MEAN, atol=1e-3)
    timgs, tlabs = load_cifar10(REAL_DATA, "test")
    assert timgs.shape == (10000, 32, 32, 3)
    assert tlabs[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


def test_real_cifar10_1_labels():
    d = _require_real("cifar-10.1", "cifar10.1_v6_labels.npy")
    v6 = np.load(d, allow_pickle=False)
    assert v6.shape == (2000,) and np.bincount(v6, minlength=10).tolist() == [200] * 10
    v4 = np.load(d.with_name("cifar10.1_v4_labels.npy"), allow_pickle=False)
    assert v4.shape == (2021,) and v4.min() >= 0 and v4.max() <= 9
    if not (d.parent / "cifar10.1_v6_data.npy").exists():
        assert not cifar10_1_available(REAL_DATA, "v6")


# --------------------------------------------------------------------------- split
def test_train_val_split():
    imgs, labs = _synthetic(1000)
    tr_i, tr_l, va_i, va_l = train_val_split(imgs, labs, 100, seed=3)
    assert len(va_l) == 100 and len(tr_l) == 900
    counts, val_counts = np.bincount(labs, minlength=10), np.bincount(va_l, minlength=10)
    assert np.all(np.abs(val_counts - counts * 0.1) <= 1)  # stratified
    # disjoint and complete: every image appears exactly once
    allv = np.concatenate([tr_i, va_i]).reshape(1000, -1)
    assert len(np.unique(allv, axis=0)) == len(np.unique(imgs.reshape(1000, -1), axis=0))
    again = train_val_split(imgs, labs, 100, seed=3)
    np.testing.assert_array_equal(again[3], va_l)
    np.testing.assert_array_equal(again[2], va_i)
    assert not np.array_equal(train_val_split(imgs, labs, 100, seed=4)[2], va_i)
    with pytest.raises(ValueError):
        train_val_split(imgs, labs, 1000, seed=0)


# --------------------------------------------------------------------------- DeviceLoader
def test_loader_shapes_labels_and_len():
    imgs, labs = _synthetic(50)
    tr = DeviceLoader(imgs, labs, 8, train=True, seed=1)
    assert len(tr) == 6
    batches = _epoch(tr)
    assert len(batches) == 6
    for x, y in batches:
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # shuffled, augmented batches keep each image's label: collect ids via the plan order
    perm = tr._epoch_plan(0)["perm"]
    np.testing.assert_array_equal(torch.cat([y for _, y in batches]).numpy(), labs[perm.numpy()])
    ev = DeviceLoader(imgs, labs, 8, train=False)
    assert len(ev) == 7 and [len(y) for _, y in ev][-1] == 2
    assert len(DeviceLoader(imgs, labs, 8, train=True, limit=20)) == 2
    assert DeviceLoader(imgs, labs, 8, train=False, dtype=torch.bfloat16).get_batch(0, 0)[0].dtype == torch.bfloat16


def test_loader_eval_normalization_and_channels_last():
    imgs, labs = _synthetic(20)
    for cl in (False, True):
        ev = DeviceLoader(imgs, labs, 8, train=False, channels_last=cl)
        got = torch.cat([x for x, _ in ev])
        torch.testing.assert_close(got, _normalize_ref(imgs), atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(torch.cat([y for _, y in ev]).numpy(), labs)
        if cl:
            assert ev.get_batch(0, 0)[0].is_contiguous(memory_format=torch.channels_last)


def test_loader_augmentation_matches_reference():
    imgs, labs = _synthetic(40)
    aug = DeviceLoader(imgs, labs, 8, train=True, seed=5)
    plain = DeviceLoader(imgs, labs, 8, train=True, seed=5, augment=False)
    x_aug = torch.cat([x for x, _ in aug])
    x_plain = torch.cat([x for x, _ in plain])
    plan = aug._epoch_plan(0)
    perm, offs, flip = plan["perm"].numpy(), plan["offsets"].numpy(), plan["flip"].numpy()
    assert flip.any() and (~flip).any() and (offs != 4).any()
    padded = np.pad(imgs, ((0, 0), (4, 4), (4, 4), (0, 0)))  # zero pad on raw uint8 pixels
    ref = np.stack([(lambda c: c[:, ::-1] if f else c)(padded[i, dy : dy + 32, dx : dx + 32]) for i, (dy, dx), f in zip(perm, offs, flip)])
    torch.testing.assert_close(x_aug, _normalize_ref(ref), atol=1e-5, rtol=1e-5)
    # flip / crop really change pixels for some samples
    changed = (x_aug != x_plain).flatten(1).any(1)
    assert changed.sum() >= len(changed) // 2


def test_loader_alternating_flip():
    imgs, labs = _synthetic(48)
    alt = DeviceLoader(imgs, labs, 8, train=True, seed=5, flip="alternating")
    per_image = []
    for e in range(3):
        plan = alt._epoch_plan(e)
        flips = np.empty(48, dtype=bool)
        flips[plan["perm"].numpy()] = plan["flip"].numpy()
        per_image.append(flips)
    assert per_image[0].any() and (~per_image[0]).any()
    np.testing.assert_array_equal(per_image[1], ~per_image[0])  # each image is mirrored in exactly one of two epochs
    np.testing.assert_array_equal(per_image[2], per_image[0])
    alt.set_epoch(1)  # and the batches follow the plan
    plan = alt._epoch_plan(1)
    padded = np.pad(imgs, ((0, 0), (4, 4), (4, 4), (0, 0)))
    ref = np.stack(
        [
            (lambda c: c[:, ::-1] if f else c)(padded[i, dy : dy + 32, dx : dx + 32])
            for i, (dy, dx), f in zip(*(plan[k].numpy() for k in ("perm", "offsets", "flip")))
        ]
    )
    torch.testing.assert_close(torch.cat([x for x, _ in _epoch(alt)]), _normalize_ref(ref), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="flip must be"):
        DeviceLoader(imgs, labs, 8, train=True, flip="sometimes")


def test_loader_determinism_and_epochs():
    imgs, labs = _synthetic(48)
    a = DeviceLoader(imgs, labs, 8, train=True, seed=7)
    b = DeviceLoader(imgs, labs, 8, train=True, seed=7)
    e0a, e0b = _epoch(a), _epoch(b)
    assert _same(e0a, e0b)
    e1a = _epoch(a)  # iterating again moves on to epoch 1
    assert a.epoch == 2 and not _same(e0a, e1a)
    b.set_epoch(1)
    assert _same(_epoch(b), e1a)
    assert not _same(_epoch(DeviceLoader(imgs, labs, 8, train=True, seed=8)), e0a)


def test_loader_sharding_matches_single_process():
    imgs, labs = _synthetic(50)
    for train in (True, False):
        bs = 8 if train else 6
        kw = dict(train=train, seed=11)
        single = DeviceLoader(imgs, labs, bs, **kw)
        shards = [DeviceLoader(imgs, labs, bs, rank=r, world_size=2, **kw) for r in range(2)]
        for epoch in (0, 3):
            for loader in [single, *shards]:
                loader.set_epoch(epoch)
            ref = _epoch(single)
            parts = [_epoch(s) for s in shards]
            assert all(len(p) == len(ref) for p in parts)
            for i, (x, y) in enumerate(ref):
                assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
                assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
    # uneven last eval batch over 3 ranks (50 = 8*6 + 2 -> chunks 1, 1, 0)
    single = DeviceLoader(imgs, labs, 6, train=False)
    shards = [DeviceLoader(imgs, labs, 6, train=False, rank=r, world_size=3) for r in range(3)]
    last = [s.get_batch(0, len(s) - 1)[1] for s in shards]
    assert [len(t) for t in last] == [1, 1, 0]
    assert torch.equal(torch.cat(last), single.get_batch(0, len(single) - 1)[1])
    with pytest.raises(ValueError, match="divisible by world_size"):
        DeviceLoader(imgs, labs, 10, train=True, world_size=4, rank=0)


def test_loader_resume_state_dict():
    imgs, labs = _synthetic(50)
    a = DeviceLoader(imgs, labs, 8, train=True, seed=3)
    a.set_epoch(2)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    assert state == {"epoch": 2, "batch": 3}
    rest = [(x.clone(), y.clone()) for x, y in it]
    b = DeviceLoader(imgs, labs, 8, train=True, seed=3)
    b.load_state_dict(state)
    b.set_epoch(2)  # usual resume pattern keeps the restored batch position
    assert _same(_epoch(b), rest)
    assert b.state_dict() == {"epoch": 3, "batch": 0}
    b.set_epoch(2)  # a plain set_epoch starts the epoch from batch 0
    assert len(_epoch(b)) == len(b)


def test_loader_batches_stream():
    imgs, labs = _synthetic(50)
    a = DeviceLoader(imgs, labs, 8, train=True, seed=3)
    n = len(a)
    stream = a.batches(start_step=n - 2)
    got = [next(stream) for _ in range(4)]
    assert [(s, e) for s, e, _, _ in got] == [(n - 2, 0), (n - 1, 0), (n, 1), (n + 1, 1)]
    assert a.state_dict() == {"epoch": 1, "batch": 2}
    ref = DeviceLoader(imgs, labs, 8, train=True, seed=3)
    ref.set_epoch(1)
    first = next(iter(ref))
    assert torch.equal(got[2][2], first[0]) and torch.equal(got[2][3], first[1])
