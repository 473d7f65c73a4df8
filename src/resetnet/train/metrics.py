"""Metrics: one JSON object per line in ``DIR/metrics.jsonl``, plus TensorBoard scalars in ``DIR/tb``.

Every row has ``step`` (optimizer updates done), ``kind`` (``"train"``, ``"eval"``,
``"routing"``, ...) and ``time`` (seconds since the epoch), then the values.
Non-finite floats are written as ``null`` so every line is valid JSON.
TensorBoard gets every numeric value as the scalar ``kind/key`` (nested lists
become ``kind/key/i/j/...``); it is imported lazily and skipped with a warning
when unavailable.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["MetricsLogger", "NullLogger", "read_metrics", "truncate_metrics"]


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
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            yield prefix, float(value)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _scalars(f"{prefix}/{i}", v)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _scalars(f"{prefix}/{k}", v)


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
                warnings.warn(f"TensorBoard logging disabled ({type(err).__name__}: {err}); metrics.jsonl is still written", stacklevel=2)

    def log(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
        row = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
        row.update(_clean(dict(values)))
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for tag, v in _scalars(kind, {k: v for k, v in row.items() if k not in ("step", "kind", "time")}):
                self._tb.add_scalar(tag, v, int(step))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | os.PathLike[str], kind: str | None = None) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (a run dir or the file), optionally only those of ``kind``."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash
            if kind is None or row.get("kind") == kind:
                rows.append(row)
    return rows


def truncate_metrics(path: str | os.PathLike[str], last_step: int) -> int:
    """Drop rows with ``step > last_step`` (written after the checkpoint a run resumes from).

    Returns the number of rows dropped. The file is rewritten atomically.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if int(row.get("step", 0)) > last_step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped
