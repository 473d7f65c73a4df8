"""Routes as data: the routing vector of every image (what each controller chose, at every iteration of every module),
their layout, hard routes and class means (:mod:`.routes`). The paper's analysis of them (Figures 4-6, routes as
embeddings, the agreement of Sec. 5.1, ``resetnet analyze``) is in :mod:`resetnet_experiments.analysis`.
"""

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

__all__ = ["ModuleLayout", "RouteLayout", "RouteSet", "class_mean_routes", "collect_routes", "count_distinct_routes", "distinct_routes_per_class"]
__all__ += ["hard_routes", "layout_of_model", "load_policy_log"]
