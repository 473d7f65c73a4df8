"""Route analysis: routing vectors as image embeddings, paper Figures 4-6, ``resetnet analyze``.

Importing this package does not import matplotlib; :mod:`resetnet.analysis.figures` does.
"""
from .embeddings import cluster_purity, kmeans, knn_accuracy, knn_classify, knn_search, random_routes, vote
from .routes import (
    ModuleLayout,
    RouteLayout,
    RouteSet,
    class_mean_routes,
    collect_routes,
    count_distinct_routes,
    distinct_routes_per_class,
    hard_routes,
    layout_of_model,
    load_policy_log,
)


def analyze_model(*args, **kwargs):
    """See :func:`resetnet.analysis.command.analyze_model`."""
    from .command import analyze_model as _analyze_model

    return _analyze_model(*args, **kwargs)


def analyze_run(*args, **kwargs):
    """See :func:`resetnet.analysis.command.analyze_run`."""
    from .command import analyze_run as _analyze_run

    return _analyze_run(*args, **kwargs)


__all__ = [
    "ModuleLayout",
    "RouteLayout",
    "RouteSet",
    "analyze_model",
    "analyze_run",
    "class_mean_routes",
    "cluster_purity",
    "collect_routes",
    "count_distinct_routes",
    "distinct_routes_per_class",
    "hard_routes",
    "kmeans",
    "knn_accuracy",
    "knn_classify",
    "knn_search",
    "layout_of_model",
    "load_policy_log",
    "random_routes",
    "vote",
]
