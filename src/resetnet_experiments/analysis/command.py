"""``resetnet analyze``: route analysis of a trained ReSet (paper Sec. 5.6-5.7, Figures 4-6), measured.

In-process entry points (no checkpoint or data package needed):

* :func:`analyze_model` routes given images through a model and writes every file.
* :func:`analyze_run` draws the policy evolution (Figure 6) from a run's ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from resetnet.analysis.routes import (
    RouteSet,
    class_mean_routes,
    collect_routes,
    count_distinct_routes,
    distinct_routes_per_class,
    hard_routes,
    load_policy_log,
    route_counts,
)

from .embeddings import RANDOM_MODES, cluster_purity, kmeans, knn_accuracy, knn_search, random_routes

HELP = "Analyse learned routes: Figures 4-6, per-class routes, routes as embeddings (kNN, k-means)."

FILES = {"fig4": "fig4_score_std.png", "fig5": "fig5_nearest_routes.png", "fig6": "fig6_policy_evolution.png", "class_routes": "class_routes.png"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", nargs="?", help="run directory or checkpoint.safetensors to analyse")
    parser.add_argument(
        "--run",
        metavar="RUN_DIR",
        help="training run: draw the policy evolution from RUN_DIR/metrics.jsonl (and analyse RUN_DIR's checkpoint too when it has one)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--data-dir", help="data root (default: $RESETNET_DATA or the user cache)")
    parser.add_argument("--download", action="store_true", help="download CIFAR-10 into the data root when it is missing")
    parser.add_argument("--no-verify", action="store_true", help="skip the CIFAR-10 MD5 check")
    parser.add_argument("--split", default="test", help="split to analyse (default: test)")
    parser.add_argument("--limit", type=int, help="analyse only the first N images of the split")
    parser.add_argument(
        "--index-split", default="train", help="split whose routes are the kNN index (default: train; the analysed split itself means leave-one-out)"
    )
    parser.add_argument("--index-limit", type=int, default=10000, help="first N images of the index split (default: 10000)")
    parser.add_argument("--queries", type=int, nargs="+", metavar="I", help="Figure 5 query image indices (default: seeded random)")
    parser.add_argument("--num-queries", type=int, default=6, help="number of seeded random queries (default: 6)")
    parser.add_argument("--neighbours", type=int, default=5, help="images shown per query in Figure 5 (default: 5)")
    parser.add_argument("--k", type=int, default=5, help="neighbours of the kNN classifier (default: 5)")
    parser.add_argument("--clusters", type=int, help="k-means clusters (default: number of classes)")
    parser.add_argument("--random-mode", choices=RANDOM_MODES, default="blocks", help="random-route baseline (default: blocks)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the queries, k-means and random routes (default: 0)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------- in-process API
def _check_labels(images, labels, what: str) -> None:
    if images is None or labels is None:
        raise ValueError(f"{what}: images and labels must both be given")
    if len(images) != len(labels):
        raise ValueError(f"{what}: {len(images)} images but {len(labels)} labels")
    arr = np.asarray(images) if not isinstance(images, torch.Tensor) else images
    if arr.dtype not in (np.uint8, torch.uint8) or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{what}: images must be uint8 (N, H, W, 3) as load_cifar10 returns them, got {arr.dtype} {tuple(arr.shape)}")


def pick_queries(n: int, queries: Sequence[int] | None, num_queries: int, seed: int) -> list[int]:
    """Explicit query indices (checked), or ``num_queries`` distinct seeded random ones."""
    if queries:
        bad = [q for q in queries if not 0 <= q < n]
        if bad:
            raise ValueError(f"query indices {bad} out of range for {n} images")
        return [int(q) for q in queries]
    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n, size=min(num_queries, n), replace=False))


def save_routes(out_dir: Path, rs: RouteSet) -> None:
    """``routes.npy`` (N, D) float32 and ``routes.csv`` (index, label, prediction, one column per component)."""
    np.save(out_dir / "routes.npy", rs.routes.astype(np.float32))
    header = ",".join(["index", "label", "prediction"] + rs.layout.column_names())
    with open(out_dir / "routes.csv", "w") as f:
        f.write(header + "\n")
        for i in range(len(rs)):
            f.write(f"{i},{rs.labels[i]},{rs.predictions[i]}," + ",".join(f"{v:.6g}" for v in rs.routes[i]) + "\n")


def analyze_model(
    model: torch.nn.Module,
    images,
    labels,
    out_dir: str | Path,
    *,
    index_images=None,
    index_labels=None,
    split: str = "test",
    checkpoint: str | None = None,
    index_description: str | None = None,
    class_names: Sequence[str] | None = None,
    queries: Sequence[int] | None = None,
    num_queries: int = 6,
    neighbours: int = 5,
    k: int = 5,
    n_clusters: int | None = None,
    random_mode: str = "blocks",
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
    metrics_path: str | Path | None = None,
) -> dict:
    """Route ``images`` through ``model`` and write every analysis file to ``out_dir``.

    Args:
        model: a model with ReSet modules (``forward_features(x, return_routing=True)``).
        images, labels: the analysed split, uint8 ``(N, H, W, 3)`` un-normalised images and labels.
        index_images, index_labels: the kNN index (training images); without them the
            kNN classifier runs leave-one-out on the analysed split.
        class_names: names of the classes (default ``0``, ``1``, ...).
        queries / num_queries: Figure 5 query indices, or how many seeded random ones.
        neighbours: images per query in Figure 5. k: kNN classifier neighbours.
        n_clusters: k-means clusters (default: number of classes).
        random_mode: random-route baseline, see :func:`resetnet.analysis.random_routes`.
        metrics_path: a run's ``metrics.jsonl``: also draw Figure 6.

    Returns:
        The summary dictionary also written to ``out_dir/summary.json``.
    """
    from . import figures
    from .report import read_class_routes, read_nearest, read_score_std, write_report

    _check_labels(images, labels, "analysed images")
    has_index = index_images is not None or index_labels is not None
    if has_index:
        _check_labels(index_images, index_labels, "index images")
    if random_mode not in RANDOM_MODES:
        raise ValueError(f"unknown random-route mode {random_mode!r}; valid: {', '.join(RANDOM_MODES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    images_np = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if len(images_np) < 2:
        raise ValueError("need at least 2 images to analyse routes")
    q = pick_queries(len(images_np), queries, num_queries, seed)

    rs = collect_routes(model, images_np, labels, batch_size=batch_size, device=device, features=True, progress=progress, desc=f"routes ({split})")
    idx = None
    if has_index:
        idx = collect_routes(
            model, index_images, index_labels, batch_size=batch_size, device=device, features=True, progress=progress, desc="routes (index)"
        )
    layout = rs.layout
    n = len(rs)
    num_classes = len(class_names) if class_names is not None else int(max(rs.labels.max(), idx.labels.max() if idx is not None else 0)) + 1
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if rs.labels.max() >= num_classes:
        raise ValueError(f"label {rs.labels.max()} out of range for {num_classes} class names")
    save_routes(out_dir, rs)

    figs: dict[str, tuple[str, str]] = {}
    # Figure 4: score spread
    std_blocks = [b.std(axis=0) for b in layout.split(rs.routes.astype(np.float64))]
    figures.score_std_figure(std_blocks, layout, out_dir / FILES["fig4"], n_images=n)
    figs["Figure 4: spread of routing scores"] = (FILES["fig4"], read_score_std(std_blocks, layout))

    # Figure 5: nearest routes within the split (L1, the query itself excluded)
    kk = min(neighbours, n - 1)
    loo_d, loo_i = knn_search(rs.routes, None, k=kk, p=1, device=device)
    figures.nearest_routes_figure(
        images_np,
        rs.routes,
        layout,
        q,
        loo_i[q, :kk],
        loo_d[q, :kk],
        rs.labels,
        out_dir / FILES["fig5"],
        predictions=rs.predictions,
        class_names=names,
    )
    counts_all = np.bincount(rs.labels, minlength=num_classes)
    chance = float((counts_all / n) ** 2 @ np.ones(num_classes))  # P(two random images share a class)
    agreement = float((rs.labels[loo_i[:, :kk]] == rs.labels[:, None]).mean())
    figs["Figure 5: nearest routes"] = (FILES["fig5"], read_nearest(rs.labels[q], rs.labels[loo_i[q, :kk]], agreement, chance, kk))

    # Per-class routes and hard routes
    hard = hard_routes(rs.routes, layout)
    distinct = count_distinct_routes(hard)
    _, route_n = route_counts(hard)
    class_means, class_counts = class_mean_routes(rs.routes, rs.labels, num_classes)
    per_class = distinct_routes_per_class(hard, rs.labels, num_classes)
    figures.class_routes_figure(
        class_means,
        layout,
        out_dir / FILES["class_routes"],
        class_names=names,
        counts=class_counts,
        distinct_per_class=per_class,
        overall_mean=rs.routes.mean(axis=0),
    )
    figs["Mean route per class"] = (FILES["class_routes"], read_class_routes(class_means, names, distinct, n, float(route_n[0] / n)))

    # Routes as embeddings, with baselines
    if idx is not None:
        index_routes, index_labels_np, index_feats = idx.routes, idx.labels, idx.features
        index_desc = index_description or f"{len(idx)} index images"
    else:
        index_routes = index_labels_np = index_feats = None
        index_desc = index_description or f"leave-one-out on the {n} analysed images"
    n_index = len(idx) if idx is not None else n - 1
    kn = min(k, n_index)
    common = dict(k=kn, num_classes=num_classes, device=device)
    acc = knn_accuracy(rs.routes, rs.labels, index_routes, index_labels_np, **common)
    rand_q = random_routes(rs.routes, layout, seed=seed, mode=random_mode)
    rand_i = random_routes(index_routes, layout, seed=seed + 1, mode=random_mode) if idx is not None else None
    acc_rand = knn_accuracy(rand_q, rs.labels, rand_i, index_labels_np, **common)
    acc_feat = knn_accuracy(rs.features, rs.labels, index_feats, index_labels_np, **common)
    index_label_counts = np.bincount(index_labels_np if idx is not None else rs.labels, minlength=num_classes)
    chance_acc = float(index_label_counts.max() / index_label_counts.sum())

    n_clusters = n_clusters or num_classes
    n_clusters = min(n_clusters, n)
    assign, _, _ = kmeans(rs.routes, n_clusters, seed=seed, device=device)
    assign_rand, _, _ = kmeans(rand_q, n_clusters, seed=seed, device=device)
    assign_feat, _, _ = kmeans(rs.features, n_clusters, seed=seed, device=device)

    summary = {
        "checkpoint": checkpoint,
        "split": split,
        "n_images": n,
        "n_index": n_index,
        "index_description": index_desc,
        "num_classes": num_classes,
        "model_accuracy": rs.accuracy,
        "knn_k": kn,
        "knn_accuracy": acc,
        "knn_accuracy_random_routes": acc_rand,
        "knn_accuracy_features": acc_feat,
        "chance_accuracy": chance_acc,
        "n_clusters": n_clusters,
        "cluster_purity": cluster_purity(assign, rs.labels),
        "cluster_purity_random_routes": cluster_purity(assign_rand, rs.labels),
        "cluster_purity_features": cluster_purity(assign_feat, rs.labels),
        "random_routes_mode": random_mode,
        "distinct_hard_routes": distinct,
        "distinct_hard_routes_per_class": {names[c]: int(per_class[c]) for c in range(num_classes)},
        "most_common_route_share": float(route_n[0] / n),
        "neighbour_label_agreement": agreement,
        "queries": q,
        "route_dim": layout.dim,
        "layout": layout.to_dict(),
        "max_score_std": {m.name: float(b.max()) for m, b in zip(layout.modules, std_blocks)},
        "seed": seed,
    }
    if metrics_path is not None:
        reading = _policy(metrics_path, out_dir, [m.name for m in layout.modules])
        figs["Figure 6: policy evolution"] = (FILES["fig6"], reading)
        summary["metrics"] = str(metrics_path)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out_dir, summary, figs)
    return summary


def _policy(metrics_path, out_dir: Path, names: Sequence[str] | None) -> str:
    """Draw Figure 6 from a metrics log; returns its reading. ``names``: the model's module names, if known."""
    from . import figures
    from .report import read_policy

    steps, weights, info = load_policy_log(metrics_path, meta=True)
    if not names or len(names) != len(weights):
        names = info["modules"] or [f"module {i + 1}" for i in range(len(weights))]
    zero = info["zero_unit"] or [True] * len(weights)
    figures.policy_evolution_figure(steps, weights, out_dir / FILES["fig6"], module_names=names, zero_unit=zero)
    return read_policy(steps, weights, names, zero)


def analyze_run(metrics_path: str | Path, out_dir: str | Path, *, module_names: Sequence[str] | None = None, run: str | None = None) -> dict:
    """Policy evolution only: Figure 6 from a run's ``metrics.jsonl`` (or its run directory), plus report.md."""
    from .report import write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps, weights = load_policy_log(metrics_path)
    reading = _policy(metrics_path, out_dir, module_names)
    summary = {
        "run": run or str(metrics_path),
        "metrics": str(metrics_path),
        "logged_steps": len(steps),
        "first_step": int(steps[0]),
        "last_step": int(steps[-1]),
        "final_mean_weights": [w[-1].tolist() for w in weights],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out_dir, summary, {"Figure 6: policy evolution": (FILES["fig6"], reading)})
    return summary


# ---------------------------------------------------------------- CLI
def _find_checkpoint(run_dir: Path) -> Path | None:
    from resetnet.checkpoint import checkpoint_exists

    return run_dir if checkpoint_exists(run_dir) else None


def run(args: argparse.Namespace) -> int:
    """``resetnet analyze``: every user error is one line on stderr and exit code 2, checked before the work."""
    from resetnet.cli import fail
    from resetnet.errors import UserError

    try:
        return _run(args)
    except UserError as err:  # device, output directory, checkpoint, data
        return fail("analyze", err)


def _run(args: argparse.Namespace) -> int:
    from resetnet.cli import fail
    from resetnet.train.runtime import resolve_device

    def error(message: object) -> int:
        return fail("analyze", message)

    out = Path(args.out)
    checkpoint = args.checkpoint
    for flag, value in (
        ("--limit", args.limit),
        ("--index-limit", args.index_limit),
        ("--batch-size", args.batch_size),
        ("--k", args.k),
        ("--neighbours", args.neighbours),
        ("--num-queries", args.num_queries),
        ("--clusters", args.clusters),
    ):
        if value is not None and value < 1:
            return error(f"{flag} must be >= 1, got {value}")
    metrics = None
    if args.run:
        run_dir = Path(args.run)
        if not run_dir.is_dir():
            return error(f"--run {run_dir} is not a directory; give a run directory written by resetnet train")
        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            metrics = None
        if checkpoint is None:
            found = _find_checkpoint(run_dir)
            checkpoint = str(found) if found else None
        if metrics is None and checkpoint is None:
            return error(f"{run_dir} has neither metrics.jsonl nor a checkpoint; give a run directory written by resetnet train")
    if checkpoint is None and not args.run:
        return error("give a CHECKPOINT (run directory or checkpoint .safetensors), or --run RUN_DIR")
    device = resolve_device(args.device)  # before any work
    if metrics is not None:
        try:
            load_policy_log(metrics)
        except ValueError as err:
            if checkpoint is None:
                return error(f"{metrics}: {err}")
            print(f"resetnet analyze: warning: no policy evolution: {' '.join(str(err).split())}", file=sys.stderr)
            metrics = None
    from resetnet.train.runlock import prepare_run_dir, remove_empty_dirs

    created = prepare_run_dir(out, what="output directory")  # writable before any work
    try:
        if checkpoint is None:
            analyze_run(metrics, out, run=args.run)
            print(f"policy evolution of {args.run} written to {out} (report.md)")
            return 0
        return _analyze_checkpoint(args, checkpoint, metrics, out, device, error)
    finally:
        remove_empty_dirs(created)  # only when nothing was written


def _analyze_checkpoint(args: argparse.Namespace, checkpoint: str, metrics: Path | None, out: Path, device: torch.device, error) -> int:
    if metrics is None and not args.run and Path(checkpoint).is_dir() and (Path(checkpoint) / "metrics.jsonl").is_file():
        metrics = Path(checkpoint) / "metrics.jsonl"  # a run directory given as CHECKPOINT: draw its policy too
        try:
            load_policy_log(metrics)
        except ValueError as err:
            print(f"resetnet analyze: warning: no policy evolution: {' '.join(str(err).split())}", file=sys.stderr)
            metrics = None
    from resetnet.data import CLASSES, DataError, load_cifar10, resolve_data_dir
    from resetnet.models import load_model

    model, _meta = load_model(checkpoint, device=device)  # CheckpointError: one line, exit 2
    root = resolve_data_dir(args.data_dir)
    data_kwargs = {"download": True} if args.download else {}
    if args.no_verify:
        data_kwargs["verify"] = False
    try:
        images, labels = load_cifar10(root, args.split, **data_kwargs)
        index_images = index_labels = None
        index_desc = None
        if args.index_split != args.split:
            index_images, index_labels = load_cifar10(root, args.index_split, **data_kwargs)
            if args.index_limit is not None:
                index_images, index_labels = index_images[: args.index_limit], index_labels[: args.index_limit]
            index_desc = f"the first {len(index_labels)} images of the {args.index_split} split"
    except (DataError, OSError, ValueError) as err:
        return error(err)
    if args.limit is not None:
        images, labels = images[: args.limit], labels[: args.limit]
    try:
        summary = analyze_model(
            model,
            images,
            labels,
            out,
            index_images=index_images,
            index_labels=index_labels,
            split=args.split,
            checkpoint=str(checkpoint),
            index_description=index_desc,
            class_names=list(CLASSES),
            queries=args.queries,
            num_queries=args.num_queries,
            neighbours=args.neighbours,
            k=args.k,
            n_clusters=args.clusters,
            random_mode=args.random_mode,
            seed=args.seed,
            batch_size=args.batch_size,
            device=device,
            progress=not args.no_progress,
            metrics_path=metrics,
        )
    except ValueError as err:
        return error(err)
    print(
        f"{summary['n_images']} {args.split} images analysed: kNN accuracy {summary['knn_accuracy']:.3f} "
        f"(random routes {summary['knn_accuracy_random_routes']:.3f}, features {summary['knn_accuracy_features']:.3f}), "
        f"purity {summary['cluster_purity']:.3f}, {summary['distinct_hard_routes']} distinct hard routes; see {out / 'report.md'}"
    )
    return 0
