"""Collect routing vectors: one row per image, the weights of every ReSet module and iteration. The *routing vector* of an
image is each module's ``Routing.weights`` ``(k_m, n_m + 1)`` flattened row-major (iteration-major, zero unit last),
concatenated in forward order: ``D = sum_m k_m * (n_m + 1)`` components, cut back by :class:`RouteLayout`."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import CIFAR10_MEAN, CIFAR10_STD
from ..nn import ReSet


def cifar10_normalization() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the training pipeline normalises with."""
    return CIFAR10_MEAN, CIFAR10_STD


@dataclass(frozen=True)
class ModuleLayout:
    """Shape of one ReSet module's block of the routing vector."""

    name: str
    iterations: int
    outputs: int  # units + zero unit
    zero_unit: bool = True

    @property
    def size(self) -> int:
        return self.iterations * self.outputs

    def unit_name(self, r: int) -> str:
        """Human label of output ``r``: ``CU 1``.. or ``zero`` for the zero unit."""
        return "zero" if self.zero_unit and r == self.outputs - 1 else f"CU {r + 1}"


@dataclass(frozen=True)
class RouteLayout:
    """How a routing vector splits into modules, iterations and units."""

    modules: tuple[ModuleLayout, ...]

    @property
    def dim(self) -> int:
        return sum(m.size for m in self.modules)

    @property
    def offsets(self) -> list[int]:
        return [sum(m.size for m in self.modules[:i]) for i in range(len(self.modules))]

    def split(self, routes: np.ndarray) -> list[np.ndarray]:
        """Cut ``(N, D)`` routes into per-module arrays ``(N, k_m, n_m + 1)``."""
        routes = np.asarray(routes)
        if routes.ndim != 2 or routes.shape[1] != self.dim:
            raise ValueError(f"routes must have shape (N, {self.dim}) for this layout, got {routes.shape}")
        return [routes[:, o : o + m.size].reshape(-1, m.iterations, m.outputs) for o, m in zip(self.offsets, self.modules)]

    def blocks(self) -> Iterator[tuple[int, int, slice]]:
        """``(module, iteration, column slice)`` for every score vector of the routing vector."""
        for mi, (o, m) in enumerate(zip(self.offsets, self.modules)):
            for j in range(m.iterations):
                yield mi, j, slice(o + j * m.outputs, o + (j + 1) * m.outputs)

    def column_names(self) -> list[str]:
        """``m1_it1_cu1``, ..., ``m1_it1_zero``, ... (1-based, as in the paper's figures)."""
        units = [[m.unit_name(r).lower().replace(" ", "") for r in range(m.outputs)] for m in self.modules]
        return [f"m{mi + 1}_it{j + 1}_{unit}" for mi, j, _ in self.blocks() for unit in units[mi]]

    def to_dict(self) -> list[dict]:
        return [asdict(m) for m in self.modules]

    @classmethod
    def from_shapes(cls, shapes: Sequence[tuple[int, int]], names: Sequence[str] | None = None, zero_unit: bool = True) -> RouteLayout:
        """Layout from ``(iterations, outputs)`` per module (e.g. read from metrics.jsonl)."""
        names = list(names) if names is not None else [f"module {i + 1}" for i in range(len(shapes))]
        if len(names) != len(shapes):
            raise ValueError(f"{len(names)} module names for {len(shapes)} modules")
        return cls(tuple(ModuleLayout(n, int(k), int(o), zero_unit) for n, (k, o) in zip(names, shapes)))


def layout_of_model(model: torch.nn.Module) -> RouteLayout:
    """The routing-vector layout of a model, read from its ReSet modules in forward order (no forward pass); they are named
    ``stage i`` (1-based) after the ``stages`` of a CifarNet-like model, else ``module i``."""
    mods = [m for m in model.modules() if isinstance(m, ReSet)]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no ReSet modules: there are no routes to analyse")
    names = [f"stage {i + 1}" for i, s in enumerate(getattr(model, "stages", None) or []) if isinstance(s, ReSet)]
    names = names or [f"module {i + 1}" for i in range(len(mods))]
    return RouteLayout(tuple(ModuleLayout(n, m.iterations, m.num_outputs, m.zero_unit) for n, m in zip(names, mods)))


def normalize_images(
    images: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """uint8 ``(B, H, W, C)`` images to a normalised float ``(B, C, H, W)`` tensor on ``device``."""
    x = torch.as_tensor(images).to(device)
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) for v in (mean, std))
    return (x - mean_t) / std_t


@dataclass
class RouteSet:
    """Routing vectors of images: ``routes`` ``(N, D)`` float32, true ``labels`` and arg-max ``predictions`` ``(N,)`` int64,
    their ``layout``, and the ``(N, C)`` float32 globally average-pooled final-stage ``features`` when collected."""

    routes: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray
    layout: RouteLayout
    features: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.routes)

    @property
    def accuracy(self) -> float:
        return float((self.predictions == self.labels).mean()) if len(self) else float("nan")


@torch.no_grad()
def collect_routes(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    features: bool = False,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    progress: bool = True,
    desc: str = "routes",
) -> RouteSet:
    """Route uint8 ``(N, H, W, C)`` un-normalised ``images`` (normalised with ``mean``/``std``) through ``model`` in eval mode
    and record every routing vector: ``model(x, return_routing=True)`` gives ``(logits, routing list)``. ``features`` also
    collects the globally average-pooled ``model.forward_features(x, return_routing=True)``, classified by ``model.fc``."""
    labels_np = np.asarray(torch.as_tensor(labels).cpu().numpy(), dtype=np.int64)
    n = len(labels_np)
    if len(images) != n:
        raise ValueError(f"{len(images)} images but {n} labels")
    if n == 0:
        raise ValueError("no images to route")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layout = layout_of_model(model)
    if features and not (hasattr(model, "forward_features") and hasattr(model, "fc")):
        raise ValueError(f"{type(model).__name__} has no forward_features/fc: cannot collect pooled features")
    was_training = model.training
    model.eval().to(device)
    batches = range(0, n, batch_size)
    if progress:
        with contextlib.suppress(ImportError):  # tqdm is optional
            from tqdm import tqdm

            batches = tqdm(batches, desc=desc, unit="batch", leave=False)
    routes, preds, feats = [], [], []
    try:
        for start in batches:
            x = normalize_images(images[start : start + batch_size], mean, std, device)
            if features:
                fmap, routing = model.forward_features(x, return_routing=True)
                pooled = fmap.mean(dim=(2, 3))
                logits = model.fc(pooled)
                feats.append(pooled.float().cpu().numpy())
            else:
                logits, routing = model(x, return_routing=True)
            row = torch.cat([r.weights.float().reshape(len(x), -1) for r in routing], dim=1)
            if row.shape[1] != layout.dim:
                raise ValueError(f"routing vector has {row.shape[1]} components, layout expects {layout.dim}")
            routes.append(row.cpu().numpy())
            preds.append(logits.argmax(dim=1).cpu().numpy())
    finally:
        model.train(was_training)
    return RouteSet(np.concatenate(routes), labels_np, np.concatenate(preds), layout, np.concatenate(feats) if features else None)


def hard_routes(routes: np.ndarray, layout: RouteLayout) -> np.ndarray:
    """``(N, total_iterations)`` arg-max output (unit or zero unit) per module and iteration."""
    return np.concatenate([block.argmax(axis=-1) for block in layout.split(routes)], axis=1).astype(np.int64)


def count_distinct_routes(hard: np.ndarray) -> int:
    """Number of distinct hard routes (unique rows of :func:`hard_routes`)."""
    hard = np.asarray(hard)
    if hard.ndim != 2:
        raise ValueError(f"hard routes must be 2-D (N, iterations), got shape {hard.shape}")
    return len(np.unique(hard, axis=0))


def route_counts(hard: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct hard routes and how many images take each, most frequent first."""
    uniq, counts = np.unique(np.asarray(hard), axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return uniq[order], counts[order]


def class_mean_routes(routes: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean routing vector per class: ``((C, D) means, (C,) counts)``; classes without images get NaN rows."""
    routes, labels = np.asarray(routes, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if len(routes) != len(labels):
        raise ValueError(f"{len(routes)} routes but {len(labels)} labels")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    c = int(num_classes if num_classes is not None else (labels.max() + 1 if labels.size else 0))
    if labels.size and labels.max() >= c:
        raise ValueError(f"label {labels.max()} out of range for {c} classes")
    counts = np.bincount(labels, minlength=c).astype(np.int64)
    sums = np.zeros((c, routes.shape[1]))
    np.add.at(sums, labels, routes)
    means = np.full_like(sums, np.nan)
    np.divide(sums, counts[:, None], out=means, where=counts[:, None] > 0)  # classes without images stay NaN
    return means, counts


def distinct_routes_per_class(hard: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C,)`` number of distinct hard routes used by the images of each class."""
    hard, labels = np.asarray(hard), np.asarray(labels)
    return np.array([count_distinct_routes(hard[labels == c]) for c in range(num_classes)], dtype=np.int64)


def policy_module_name(name: str) -> str:
    """A logged module name for figures: ``stages.2`` (a CifarNet ReSet stage) -> ``stage 3``."""
    m = re.fullmatch(r"(?:.*\.)?stages\.(\d+)", str(name))
    return f"stage {int(m.group(1)) + 1}" if m else str(name)


def load_policy_log(path, meta: bool = False):
    """Read the ``"kind": "routing"`` rows (``step``, ``mean_weights[module][iteration][unit]``) of a run's ``metrics.jsonl``:
    sorted by step, the last row of a repeated step wins, a truncated final line is ignored. Returns ``(steps (T,), [per module
    (T, k_m, n_m + 1)])``; with ``meta=True`` also ``{"modules": figure names or None, "zero_unit": flags or None}``."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics log at {path} (a training run writes RUN_DIR/metrics.jsonl)")
    lines = path.read_text().splitlines()
    by_step: dict[int, list] = {}
    info: dict = {"modules": None, "zero_unit": None}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == len(lines):
                break  # partial last line
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or row.get("kind") != "routing":
            continue
        if "step" not in row or "mean_weights" not in row:
            raise ValueError(f"{path}:{lineno}: routing row needs 'step' and 'mean_weights'")
        try:
            mods = [np.asarray(m, dtype=np.float64) for m in row["mean_weights"]]
        except (TypeError, ValueError):
            mods = []
        if not mods or any(m.ndim != 2 for m in mods):
            raise ValueError(f"{path}:{lineno}: mean_weights must be a nested list [module][iteration][unit] of numbers")
        shapes = [m.shape for m in mods]
        first = [m.shape for m in next(iter(by_step.values()), mods)]  # the first routing row's shapes
        if shapes != first:
            raise ValueError(f"{path}:{lineno}: mean_weights shapes {shapes} differ from earlier rows {first}")
        by_step[int(row["step"])] = mods
        for key, convert in (("modules", policy_module_name), ("zero_unit", bool)):
            if isinstance(row.get(key), list) and len(row[key]) == len(mods):
                info[key] = [convert(v) for v in row[key]]
    if not by_step:
        raise ValueError(f'{path} has no rows with "kind": "routing" (was the run logging routing statistics?)')
    steps = np.array(sorted(by_step), dtype=np.int64)
    per_module = [np.stack(module) for module in zip(*(by_step[s] for s in steps))]
    return (steps, per_module, info) if meta else (steps, per_module)
