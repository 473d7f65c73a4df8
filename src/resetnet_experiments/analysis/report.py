"""One-line readings of the analysis figures, computed from the data, and the ``report.md`` writer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from resetnet.analysis.routes import RouteLayout

__all__ = ["read_class_routes", "read_nearest", "read_policy", "read_score_std", "write_report"]

DETERMINISTIC = 0.9  # a mean score at least this high counts as "always chosen"


def num(v: float) -> str:
    """Two decimals, or two significant digits for small non-zero values (0.00031 -> 3.1e-04)."""
    v = float(v)
    if v != v:
        return "nan"
    return f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.1e}"


def _unit(layout_module, r: int) -> str:
    return "the zero unit" if layout_module.unit_name(r) == "zero" else layout_module.unit_name(r)


def read_score_std(std_blocks: Sequence[np.ndarray], layout: RouteLayout) -> str:
    """Which module has the largest score spread, where, and how small it is elsewhere."""
    maxima = [float(np.nanmax(b)) for b in std_blocks]
    best = int(np.argmax(maxima))
    j, r = np.unravel_index(int(np.nanargmax(std_blocks[best])), std_blocks[best].shape)
    mod = layout.modules[best]
    line = f"{mod.name.capitalize()} shows the largest score spread (max std {num(maxima[best])} at iteration {j + 1}, {_unit(mod, r)})"
    if len(maxima) > 1:
        others = ", ".join(f"{m.name} {num(v)}" for m, v in zip(layout.modules, maxima) if m is not mod)
        line += f"; max std elsewhere: {others}"
    low = [m.name for m, v in zip(layout.modules, maxima) if v < 0.05]
    if low:
        line += f". Routing is nearly static (max std < 0.05) in {', '.join(low)}"
    return line + "."


def read_nearest(query_labels: np.ndarray, neighbour_labels: np.ndarray, all_agreement: float, chance: float, k: int) -> str:
    """How many of the shown neighbours share their query's class, against the whole split and chance."""
    same = float((np.asarray(neighbour_labels) == np.asarray(query_labels)[:, None]).mean()) if len(query_labels) else float("nan")
    return (
        f"{same:.0%} of the {k} nearest routes of the {len(query_labels)} shown queries belong to the query's class; "
        f"over the whole split it is {all_agreement:.0%} (chance {chance:.0%})."
    )


def read_policy(steps: np.ndarray, mean_weights: Sequence[np.ndarray], names: Sequence[str], zero_unit: bool | Sequence[bool] = True) -> str:
    """At the last logged step: which modules route (nearly) deterministically, recurrently, or mixed."""
    parts = []
    zeros = [bool(zero_unit)] * len(names) if isinstance(zero_unit, (bool, np.bool_)) else list(zero_unit)
    for name, w, has_zero in zip(names, mean_weights, zeros):
        last = w[-1]  # (k, n+1)
        dominant = last.argmax(axis=1)
        score = last.max(axis=1)
        units = ["zero unit" if has_zero and d == last.shape[1] - 1 else f"CU {d + 1}" for d in dominant]
        if score.min() >= DETERMINISTIC:
            kind = "recurrent, one CU reused" if len(set(units)) == 1 and len(units) > 1 else "near-deterministic"
            parts.append(f"{name} picks {', '.join(units)} at iterations 1-{len(units)} (mean score >= {score.min():.2f}; {kind})")
        else:
            j = int(score.argmin())
            parts.append(
                f"{name} is mixed (highest mean score per iteration: {', '.join(units)}; the highest is only {score[j]:.2f} at iteration {j + 1})"
            )
    change = max(float(np.abs(w[-1] - w[0]).max()) for w in mean_weights)
    return (
        f"At step {int(steps[-1])} (the last of {len(steps)} logged): "
        + "; ".join(parts)
        + f". The largest change of a mean score since step {int(steps[0])} is {num(change)}."
    )


def read_class_routes(class_means: np.ndarray, class_names: Sequence[str], distinct: int, n_images: int, top_share: float) -> str:
    """Distinct routes, and which classes' mean routes are farthest apart and closest (L1)."""
    valid = ~np.isnan(class_means).any(axis=1)
    idx = np.flatnonzero(valid)
    line = f"{distinct} distinct hard routes over {n_images} images (the most common one taken by {top_share:.0%})"
    if len(idx) >= 2:
        d = np.abs(class_means[idx][:, None, :] - class_means[idx][None, :, :]).sum(-1)
        iu = np.triu_indices(len(idx), 1)
        far, near = int(np.argmax(d[iu])), int(np.argmin(d[iu]))
        a, b = idx[iu[0][far]], idx[iu[1][far]]
        c, e = idx[iu[0][near]], idx[iu[1][near]]
        line += (
            f"; the mean routes of {class_names[a]} and {class_names[b]} differ most (L1 {num(d[iu][far])}), "
            f"{class_names[c]} and {class_names[e]} least (L1 {num(d[iu][near])})"
        )
    return line + "."


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(out_dir: str | Path, summary: dict, figures: dict[str, tuple[str, str]]) -> Path:
    """Write ``out_dir/report.md``: the embedding numbers, then every figure with its reading.

    ``figures`` maps a heading to ``(file name, reading)``.
    """
    out_dir = Path(out_dir)
    lines = ["# Route analysis", ""]
    if summary.get("checkpoint"):
        lines.append(f"Checkpoint: `{summary['checkpoint']}`  ")
    if summary.get("run"):
        lines.append(f"Run: `{summary['run']}`  ")
    if "n_images" in summary:
        lines.append(f"Split: `{summary['split']}`, {summary['n_images']} images; kNN index: {summary.get('index_description', '')}  ")
        if summary.get("model_accuracy") is not None:
            lines.append(f"Model accuracy on these images: {summary['model_accuracy']:.3f}  ")
        lines += ["", "## Routes as embeddings", ""]
        k = summary.get("knn_k", 5)
        lines += [
            "| measure | routes | random routes (same marginals) | pooled features | chance |",
            "| --- | --- | --- | --- | --- |",
            f"| {k}-NN accuracy (L1) | {_fmt(summary['knn_accuracy'])} | {_fmt(summary['knn_accuracy_random_routes'])} | "
            f"{_fmt(summary['knn_accuracy_features'])} | {_fmt(summary['chance_accuracy'])} |",
            f"| k-means purity ({summary['n_clusters']} clusters) | {_fmt(summary['cluster_purity'])} | "
            f"{_fmt(summary['cluster_purity_random_routes'])} | {_fmt(summary.get('cluster_purity_features', float('nan')))} | "
            f"{_fmt(summary['chance_accuracy'])} |",
            "",
            f"Distinct hard routes (arg-max output per module and iteration): {summary['distinct_hard_routes']} of {summary['n_images']} images.  ",
            f"Random routes: `{summary['random_routes_mode']}` mode (see docs/analysis.md). "
            "Pooled features: the final stage's globally average-pooled features, same kNN.",
            "",
        ]
        lines += [_verdict(summary), ""]
    lines += ["## Figures", ""]
    for heading, (name, reading) in figures.items():
        lines += [f"### {heading}", "", f"![{heading}]({name})", "", reading, ""]
    lines += ["Numbers: `summary.json`. Routing vectors: `routes.npy`, `routes.csv`.", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _verdict(s: dict) -> str:
    acc, rnd, feat = s["knn_accuracy"], s["knn_accuracy_random_routes"], s["knn_accuracy_features"]
    gain = acc - rnd
    if gain > 0.05:
        head = f"Routes carry class information: kNN on routes beats random routes by {gain * 100:.1f} points"
    else:
        head = f"Routes carry little class information: kNN on routes is within {gain * 100:.1f} points of random routes"
    return head + f", and reaches {acc / feat:.0%} of the pooled-feature kNN accuracy." if feat > 0 else head + "."
