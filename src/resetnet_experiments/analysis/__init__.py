"""The paper's route analysis (Sec. 5.6-5.7): routes as image embeddings (kNN, k-means purity), Figures 4-6,
a report, and ``resetnet analyze``. Route vectors themselves come from :mod:`resetnet.analysis.routes`.

Importing this package does not import matplotlib; :mod:`resetnet_experiments.analysis.figures` does.
"""

from .embeddings import cluster_purity, kmeans, knn_accuracy, knn_classify, knn_search, random_routes, vote


def analyze_model(*args, **kwargs):
    """See :func:`resetnet_experiments.analysis.command.analyze_model`."""
    from .command import analyze_model as _analyze_model

    return _analyze_model(*args, **kwargs)


def analyze_run(*args, **kwargs):
    """See :func:`resetnet_experiments.analysis.command.analyze_run`."""
    from .command import analyze_run as _analyze_run

    return _analyze_run(*args, **kwargs)


__all__ = ["analyze_model", "analyze_run", "cluster_purity", "kmeans", "knn_accuracy", "knn_classify", "knn_search", "random_routes", "vote"]
