"""Small, dependency-free download and archive helpers (tqdm is optional)."""

from __future__ import annotations

import hashlib
import os
import posixpath
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .paths import DataError

__all__ = ["DEFAULT_TIMEOUT", "download_url", "file_md5", "safe_extract_tar"]

#: Socket timeout (seconds) for connecting and for each read; keeps offline failures fast.
DEFAULT_TIMEOUT = 10.0
_CHUNK = 1 << 20


def file_md5(path: str | os.PathLike[str], chunk_size: int = _CHUNK) -> str:
    """Hex MD5 digest of a file, read in chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def _progress(total: int | None, desc: str):
    """A tqdm bar if tqdm is installed, else ``None``."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)


def download_url(url: str, dest: str | os.PathLike[str], md5: str | None = None, timeout: float = DEFAULT_TIMEOUT, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` atomically and return it; a network, file or MD5 failure raises :class:`DataError`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    h = hashlib.md5(usedforsecurity=False)
    bar = None
    try:
        with os.fdopen(fd, "wb") as out:
            req = urllib.request.Request(url, headers={"User-Agent": "resetnet-data/0.1"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                bar = _progress(total, dest.name) if progress else None
                for block in iter(lambda: resp.read(_CHUNK), b""):
                    out.write(block)
                    h.update(block)
                    if bar is not None:
                        bar.update(len(block))
        if md5 is not None and h.hexdigest() != md5.lower():
            raise DataError(f"downloaded {url} has MD5 {h.hexdigest()}, expected {md5}; the download is corrupt or the file changed upstream")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DataError(f"could not download {url}: {getattr(e, 'reason', None) or e}") from e
    finally:
        tmp.unlink(missing_ok=True)  # a no-op once renamed into place
        if bar is not None:
            bar.close()
    return dest


def _inside(root: str, path: str) -> bool:
    """True if the normalized ``path`` is ``root`` or lies below it."""
    return path == root or path.startswith(root + os.sep)


def _check_member(member: tarfile.TarInfo, root: str) -> None:
    """Raise DataError if extracting ``member`` under ``root`` would be unsafe."""
    name = member.name
    if name.startswith(("/", "\\")) or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"unsafe tar member {name!r}: absolute path")
    target = os.path.normpath(os.path.join(root, name))
    if not _inside(root, target):
        raise DataError(f"unsafe tar member {name!r}: path escapes the destination")
    if member.isdev() or not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise DataError(f"unsafe tar member {name!r}: device or special file")
    if member.issym() or member.islnk():
        link = member.linkname
        if os.path.isabs(link) or link.startswith(("/", "\\")):
            raise DataError(f"unsafe tar member {name!r}: absolute link target {link!r}")
        # Symlinks resolve relative to the member's directory, hard links relative to the archive root.
        base = os.path.dirname(target) if member.issym() else root
        link_target = os.path.normpath(os.path.join(base, posixpath.normpath(link)))
        if not _inside(root, link_target):
            raise DataError(f"unsafe tar member {name!r}: link target {link!r} escapes the destination")


def safe_extract_tar(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Extract a (possibly compressed) tar archive into ``dest``; returns ``dest``.

    Every member is checked before anything is written (no absolute paths, no ``..``, no links leaving
    ``dest``, no device/FIFO files; :class:`DataError` otherwise); ``filter="data"`` applies where available.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                _check_member(m, root)
            data_filter = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12 / 3.11.4
            tar.extractall(root, members=members, **data_filter)
    except tarfile.TarError as e:
        raise DataError(f"could not extract {archive}: {e}") from e
    return dest
