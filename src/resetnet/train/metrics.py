"""Metrics: one JSON object per line in ``DIR/metrics.jsonl``, plus TensorBoard scalars in ``DIR/tb``.

Every row has ``step`` (optimizer updates done), ``kind`` (``"train"``, ``"eval"``, ...) and ``time``, then the values (non-finite
floats as ``null``). TensorBoard, skipped with a warning when unavailable, gets every number as the scalar ``kind/key[/i/...]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_bytes

__all__ = ["MetricsLogger", "NullLogger", "read_metrics", "truncate_metrics"]

log = logging.getLogger("resetnet")


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _clean(value.item())
    return value


def _scalars(prefix: str, value: Any) -> Iterable[tuple[str, float]]:
    if isinstance(value, (list, tuple)):
        value = dict(enumerate(value))
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _scalars(f"{prefix}/{k}", v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        yield prefix, float(value)


class NullLogger:
    """A logger that drops everything (non-zero ranks)."""

    path = None

    def log(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLogger(NullLogger):
    """Append rows to ``out_dir/metrics.jsonl`` (flushed per row) and, optionally, TensorBoard."""

    def __init__(self, out_dir: str | os.PathLike[str], tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"))
            except Exception as err:  # ImportError, or a broken tensorboard install
                log.warning(
                    "TensorBoard logging disabled (%s: %s; pip install 'resetnet[train]'); metrics.jsonl is still written", type(err).__name__, err
                )

    def log(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
        row = {"step": int(step), "kind": kind, "time": round(time.time(), 3), **_clean(dict(values))}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for tag, v in _scalars(kind, {k: v for k, v in row.items() if k not in ("step", "kind", "time")}):
                self._tb.add_scalar(tag, v, int(step))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()  # idempotent


def _rows(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):  # skip an empty line, or one torn by a crash
            yield line, json.loads(line)


def read_metrics(path: str | os.PathLike[str], kind: str | None = None) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (a run dir or the file), optionally only those of ``kind``."""
    path = Path(path)
    with open(path / "metrics.jsonl" if path.is_dir() else path, encoding="utf-8") as f:
        return [row for _, row in _rows(f) if kind is None or row.get("kind") == kind]


def truncate_metrics(path: str | os.PathLike[str], last_step: int) -> int:
    """Drop rows with ``step > last_step`` (and torn lines), rewriting the file atomically; returns how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line if line.endswith("\n") else line + "\n" for line, row in _rows(lines) if int(row.get("step", 0)) <= last_step]
    dropped = len(lines) - len(kept)
    if dropped:
        atomic_write_bytes(path, "".join(kept).encode("utf-8"))
    return dropped
