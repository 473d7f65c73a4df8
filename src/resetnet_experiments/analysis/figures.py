"""The analysis figures (paper Figures 4-6 and the per-class routes), drawn with matplotlib's Agg backend.

Every figure has a deterministic pixel size: it is built at ``DPI`` dots per inch
from a size in pixels (a multiple of 25) that depends only on the layout of the
routes, and saved without ``bbox_inches="tight"``. Each function returns a
:class:`Figure` record with the path and the ``(height, width)`` in pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resetnet.analysis.routes import RouteLayout
from resetnet.errors import require

require("matplotlib", "plots", "drawing the analysis figures").use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402

__all__ = ["DPI", "Figure", "class_routes_figure", "figure_size", "nearest_routes_figure", "policy_evolution_figure", "score_std_figure"]

DPI = 100
_STEP = 25  # pixel sizes are rounded up to a multiple of this (exact in inches at DPI=100)


@dataclass(frozen=True)
class Figure:
    """A written figure: its path and pixel size ``(height, width)``."""

    path: Path
    size: tuple[int, int]


def _round(px: float) -> int:
    return int(-(-int(np.ceil(px)) // _STEP) * _STEP)


def figure_size(kind: str, layout: RouteLayout | None = None, **kw) -> tuple[int, int]:
    """Pixel size ``(height, width)`` a figure of ``kind`` gets (used by the functions and the tests).

    kinds: ``score_std`` (layout), ``nearest`` (layout, queries, neighbours),
    ``policy`` (rows, cols), ``class_routes`` (layout, classes).
    """
    if kind == "score_std":
        m = len(layout.modules)
        return _round(400), _round(300 * m + 80 * (m - 1) + 230)
    if kind == "nearest":
        q, k, m = kw["queries"], kw["neighbours"], len(layout.modules)
        return _round(150 * q + 75), _round(125 * (k + 1) + 225 * m + 100)
    if kind == "policy":
        rows, cols = kw["rows"], kw["cols"]
        return _round(175 * rows + 125), _round(250 * cols + 225)
    if kind == "class_routes":
        c = kw["classes"]
        return _round(2 * (28 * c + 25) + 250), _round(max(900, 11 * layout.dim + 400))
    raise ValueError(f"unknown figure kind {kind!r}")


def _new_figure(size: tuple[int, int]):
    h, w = size
    return plt.figure(figsize=(w / DPI, h / DPI), dpi=DPI)


def _save(fig, path: str | Path, size: tuple[int, int]) -> Figure:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Figure(path, size)


def _short(name: str) -> str:
    """``stage 3`` -> ``S3``, ``module 2`` -> ``M2``."""
    return name.replace("stage ", "S").replace("module ", "M")


def _unit_labels(layout_module) -> list[str]:
    return [layout_module.unit_name(r) for r in range(layout_module.outputs)]


def _num(v: float) -> str:
    v = float(v)
    return f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.0e}"


def _annotate(ax, values: np.ndarray, vmax: float) -> None:
    """Write each cell's value, in a colour readable on the viridis background."""
    if values.size > 80:
        return
    for (i, j), v in np.ndenumerate(values):
        if np.isnan(v):
            continue
        ax.text(j, i, _num(v), ha="center", va="center", fontsize=7, color="black" if vmax > 0 and v > 0.6 * vmax else "white")


# ------------------------------------------------------------------ Figure 4
def score_std_figure(
    std_blocks: Sequence[np.ndarray], layout: RouteLayout, path: str | Path, *, n_images: int | None = None, title: str | None = None
) -> Figure:
    """Figure 4: std over images of each score component, one iteration x unit heatmap per module.

    ``std_blocks[m]`` is ``(k_m, n_m + 1)``. All panels share one colour scale.
    """
    size = figure_size("score_std", layout)
    h, w = size
    fig = _new_figure(size)
    m = len(layout.modules)
    vmax = max(float(np.nanmax(b)) for b in std_blocks) if std_blocks else 1.0
    vmax = vmax if vmax > 0 else 1.0
    norm = mcolors.Normalize(vmin=0.0, vmax=vmax)
    panel_w = (w - 230 - 80 * (m - 1)) / m  # pixels: 70 left, 80 between panels, 160 right (colour bar)
    bottom, height = 95 / h, (h - 95 - 95) / h
    im = None
    for i, (block, mod) in enumerate(zip(std_blocks, layout.modules)):
        ax = fig.add_axes([(70 + i * (panel_w + 80)) / w, bottom, panel_w / w, height])
        im = ax.imshow(block, cmap="viridis", norm=norm, aspect="auto")
        _annotate(ax, block, vmax)
        ax.set_title(f"{mod.name}: max std {_num(np.nanmax(block))}", fontsize=10)
        ax.set_xticks(range(mod.outputs), _unit_labels(mod), fontsize=8, rotation=45)
        ax.set_yticks(range(mod.iterations), [str(j + 1) for j in range(mod.iterations)], fontsize=8)
        ax.set_xlabel("unit")
        ax.set_ylabel("iteration")
    cax = fig.add_axes([(w - 140) / w, bottom, 18 / w, height])
    cbar = fig.colorbar(im, cax=cax)
    cbar.set_label("std of score over images")
    what = f"{n_images} images" if n_images else "images"
    fig.suptitle(title or f"Figure 4: std of routing scores over {what}", fontsize=11, y=1 - 12 / h, va="top")
    return _save(fig, path, size)


# ------------------------------------------------------------------ Figure 5
def nearest_routes_figure(
    images: np.ndarray,
    routes: np.ndarray,
    layout: RouteLayout,
    queries: Sequence[int],
    neighbours: np.ndarray,
    distances: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    *,
    predictions: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Figure 5: each query image, its nearest images by L1 routing distance, and its routing scores.

    Args:
        images: uint8 ``(N, H, W, 3)`` images (un-normalised) of the analysed split.
        routes: ``(N, D)`` routing vectors.
        queries: indices of the query images.
        neighbours, distances: ``(len(queries), k)`` neighbour indices / distances, nearest first.
        labels, predictions: per image; class names label them.
    """
    queries = list(queries)
    neighbours = np.asarray(neighbours)
    distances = np.asarray(distances)
    if neighbours.ndim != 2 or len(neighbours) != len(queries) or distances.shape != neighbours.shape:
        raise ValueError(f"neighbours and distances must be (queries, k), got {neighbours.shape} and {distances.shape} for {len(queries)} queries")
    k = neighbours.shape[1]
    m = len(layout.modules)
    size = figure_size("nearest", layout, queries=len(queries), neighbours=k)
    fig = _new_figure(size)
    name = lambda c: class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)
    widths = [1.0] * (k + 1) + [1.6] * m
    gs = fig.add_gridspec(
        len(queries), k + 1 + m, width_ratios=widths, left=0.02, right=0.9, top=1 - 60 / size[0], bottom=0.02, wspace=0.4, hspace=0.45
    )
    norm = mcolors.Normalize(vmin=0.0, vmax=1.0)
    im = None
    blocks = layout.split(routes[queries]) if queries else []
    for row, qi in enumerate(queries):
        for col in range(k + 1):
            ax = fig.add_subplot(gs[row, col])
            idx = qi if col == 0 else int(neighbours[row, col - 1])
            ax.imshow(images[idx], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                pred = f"\npred {name(int(predictions[idx]))}" if predictions is not None else ""
                ax.set_title(f"query #{idx}\n{name(int(labels[idx]))}{pred}", fontsize=7, color="navy")
                for spine in ax.spines.values():
                    spine.set_edgecolor("navy")
                    spine.set_linewidth(2)
            else:
                same = int(labels[idx]) == int(labels[qi])
                ax.set_title(
                    f"#{idx} {name(int(labels[idx]))}\nL1 {_num(distances[row, col - 1])}", fontsize=7, color="darkgreen" if same else "darkred"
                )
        for mi, mod in enumerate(layout.modules):
            ax = fig.add_subplot(gs[row, k + 1 + mi])
            im = ax.imshow(blocks[mi][row], cmap="viridis", norm=norm, aspect="auto")
            ax.set_title(f"{mod.name} scores", fontsize=7)
            ax.set_xticks(range(mod.outputs), [u.replace("CU ", "") for u in _unit_labels(mod)], fontsize=6)
            ax.set_yticks(range(mod.iterations), [str(j + 1) for j in range(mod.iterations)], fontsize=6)
            if row == len(queries) - 1:
                ax.set_xlabel("unit", fontsize=7)
            if mi == 0:
                ax.set_ylabel("iteration", fontsize=7)
    if im is not None:
        cax = fig.add_axes([0.92, 0.15, 0.015, 0.7])
        cbar = fig.colorbar(im, cax=cax)
        cbar.set_label("routing score of the query", fontsize=9)
    fig.suptitle(
        title or f"Figure 5: {k} nearest images by L1 routing distance (green: same class as the query)", fontsize=10, y=1 - 10 / size[0], va="top"
    )
    return _save(fig, path, size)


# ------------------------------------------------------------------ Figure 6
def policy_evolution_figure(
    steps: np.ndarray,
    mean_weights: Sequence[np.ndarray],
    path: str | Path,
    *,
    module_names: Sequence[str] | None = None,
    zero_unit: bool | Sequence[bool] = True,
    title: str | None = None,
) -> Figure:
    """Figure 6: the mean score of every unit at every module and iteration against the training step.

    Args:
        steps: ``(T,)`` training steps of the logged rows.
        mean_weights: per module, ``(T, k_m, n_m + 1)`` mean routing weights (zero unit last).
        module_names: row labels (default ``module 1``...).
        zero_unit: whether the last output is the zero unit (one flag, or one per module).
    """
    steps = np.asarray(steps, dtype=np.float64)
    m = len(mean_weights)
    if m == 0:
        raise ValueError("no modules to plot")
    for i, w in enumerate(mean_weights):
        if w.ndim != 3 or len(w) != len(steps):
            raise ValueError(f"module {i}: mean weights must be (T={len(steps)}, iterations, units), got {w.shape}")
    names = list(module_names) if module_names is not None else [f"module {i + 1}" for i in range(m)]
    zeros = [bool(zero_unit)] * m if isinstance(zero_unit, (bool, np.bool_)) else [bool(z) for z in zero_unit]
    if len(names) != m or len(zeros) != m:
        raise ValueError(f"{m} modules but {len(names)} names and {len(zeros)} zero-unit flags")
    cols = max(w.shape[1] for w in mean_weights)
    size = figure_size("policy", rows=m, cols=cols)
    fig = _new_figure(size)
    scale, xlabel = (1e3, "step (thousands)") if steps.size and steps.max() >= 5000 else (1.0, "step")
    x = steps / scale
    max_outputs = max(w.shape[2] for w in mean_weights)
    colours = plt.get_cmap("tab10")
    axes = fig.subplots(m, cols, squeeze=False, sharex=True, sharey=True)
    handles = {}
    for mi, w in enumerate(mean_weights):
        k, outputs = w.shape[1], w.shape[2]
        for j in range(cols):
            ax = axes[mi, j]
            if j >= k:
                ax.set_visible(False)
                continue
            for r in range(outputs):
                is_zero = zeros[mi] and r == outputs - 1
                label = "zero unit" if is_zero else f"CU {r + 1}"
                (line,) = ax.plot(
                    x,
                    w[:, j, r],
                    lw=1.2,
                    marker="." if len(x) < 12 else None,
                    color="black" if is_zero else colours(r % 10),
                    ls="--" if is_zero else "-",
                )
                handles.setdefault(label, line)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if mi == 0:
                ax.set_title(f"iteration {j + 1}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{names[mi]}\nmean score", fontsize=8)
            if mi == m - 1 or (mi + 1 < m and j >= mean_weights[mi + 1].shape[1]):
                ax.set_xlabel(xlabel, fontsize=8)
                ax.xaxis.set_tick_params(labelbottom=True)
    order = [f"CU {r + 1}" for r in range(max_outputs)] + ["zero unit"]
    labels = [lab for lab in order if lab in handles]
    fig.legend([handles[lab] for lab in labels], labels, loc="center right", fontsize=8, title="unit", title_fontsize=8)
    fig.suptitle(title or "Figure 6: policy evolution (mean routing score per unit; rows: stages, columns: iterations)", fontsize=10)
    fig.subplots_adjust(
        left=0.09 if cols > 2 else 0.16,
        right=1 - 175 / size[1],
        bottom=0.5 * 125 / size[0] + 0.04,
        top=1 - 0.5 * 125 / size[0] - 0.02,
        wspace=0.12,
        hspace=0.3,
    )
    return _save(fig, path, size)


# ------------------------------------------------------------------ per-class routes
def class_routes_figure(
    class_means: np.ndarray,
    layout: RouteLayout,
    path: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    counts: np.ndarray | None = None,
    distinct_per_class: np.ndarray | None = None,
    overall_mean: np.ndarray | None = None,
    title: str | None = None,
) -> Figure:
    """Mean routing vector of each class (top) and its difference from the mean route of all images (bottom).

    Rows are classes, columns route components grouped by module (thick white lines)
    and iteration (thin lines). ``overall_mean`` defaults to the count-weighted mean
    of the class means.
    """
    class_means = np.asarray(class_means, dtype=np.float64)
    if class_means.ndim != 2 or class_means.shape[1] != layout.dim:
        raise ValueError(f"class means must be (classes, {layout.dim}), got {class_means.shape}")
    c = class_means.shape[0]
    if overall_mean is None:
        w = np.asarray(counts, dtype=np.float64) if counts is not None else np.ones(c)
        valid = ~np.isnan(class_means).any(axis=1)
        overall_mean = (class_means[valid] * w[valid, None]).sum(0) / max(w[valid].sum(), 1e-12)
    diff = class_means - np.asarray(overall_mean)[None, :]
    size = figure_size("class_routes", layout, classes=c)
    h, wpx = size
    fig = _new_figure(size)
    ylabels = []
    for i in range(c):
        lab = class_names[i] if class_names is not None and i < len(class_names) else f"class {i}"
        extra = []
        if counts is not None:
            extra.append(f"n={int(counts[i])}")
        if distinct_per_class is not None:
            extra.append(f"{int(distinct_per_class[i])} routes")
        ylabels.append(f"{lab} ({', '.join(extra)})" if extra else lab)
    centres, ticks, bounds = [], [], []
    for o, mod in zip(layout.offsets, layout.modules):
        for j in range(mod.iterations):
            start = o + j * mod.outputs
            centres.append(start + (mod.outputs - 1) / 2)
            ticks.append(f"{_short(mod.name)} it{j + 1}")
            if start > 0:
                bounds.append((start - 0.5, j == 0))
    panel_h = (h - 250) / 2  # pixels per heatmap: 50 top, 75 between, 125 bottom
    left, right = 250 / wpx, 1 - 150 / wpx
    lim = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 1.0
    lim = lim if lim > 0 else 1.0
    panels = [
        (class_means, dict(cmap="viridis", vmin=0.0, vmax=1.0), "mean routing score", title or "Mean route per class"),
        (diff, dict(cmap="RdBu_r", vmin=-lim, vmax=lim), "class mean - overall mean", "Difference from the mean route of all images"),
    ]
    for p_i, (data, style, clabel, ptitle) in enumerate(panels):
        top = 50 + p_i * (panel_h + 75)
        bottom = 1 - (top + panel_h) / h
        ax = fig.add_axes([left, bottom, right - left, panel_h / h])
        im = ax.imshow(data, aspect="auto", interpolation="nearest", **style)
        for x, major in bounds:
            ax.axvline(x, color="white" if p_i == 0 else "black", lw=2.5 if major else 0.5)
        ax.set_yticks(range(c), ylabels, fontsize=8)
        ax.set_title(ptitle, fontsize=10)
        ax.set_ylabel("class")
        if p_i == len(panels) - 1:
            ax.set_xticks(centres, ticks, fontsize=7, rotation=60)
            ax.set_xlabel("route component (stage, iteration; units left to right, zero unit last)")
        else:
            ax.set_xticks(centres, [])
        cax = fig.add_axes([1 - 125 / wpx, bottom, 18 / wpx, panel_h / h])
        cbar = fig.colorbar(im, cax=cax)
        cbar.set_label(clabel, fontsize=8)
    return _save(fig, path, size)
