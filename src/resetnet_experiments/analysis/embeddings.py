"""Routing vectors as image embeddings: kNN search and classification, k-means purity, baselines.

* :func:`knn_search` finds the ``k`` nearest index points of each query by an
  ``L_p`` distance (Manhattan, ``p = 1``, by default, as in the paper), with
  ``torch.cdist`` over chunks of queries and of the index and a running top-k,
  so memory stays ``O(query_chunk * index_chunk)``.
* :func:`knn_classify` votes among the neighbours' labels (ties go to the class
  whose first neighbour is nearest).
* :func:`kmeans` (seeded k-means++ init, Lloyd iterations, squared Euclidean) and
  :func:`cluster_purity` (sum over clusters of the largest class count, over N).
* :func:`random_routes` is the "routes that ignore the image" baseline with the
  same marginals as real routes (see its docstring for the modes).
"""

from __future__ import annotations

import numpy as np
import torch

from resetnet.analysis.routes import RouteLayout

__all__ = ["cluster_purity", "kmeans", "knn_accuracy", "knn_classify", "knn_search", "random_routes", "vote"]


def _as_tensor(x, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return t.to(device=device, dtype=torch.float32)


@torch.no_grad()
def knn_search(
    queries,
    index=None,
    k: int = 5,
    *,
    p: float = 1.0,
    exclude_self: bool | None = None,
    query_chunk: int = 1024,
    index_chunk: int = 16384,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest index points of every query.

    Args:
        queries: ``(Q, D)`` points.
        index: ``(N, D)`` points searched; ``None`` means the queries themselves.
        k: neighbours per query.
        p: the distance's norm (1 = Manhattan / L1, 2 = Euclidean).
        exclude_self: do not return point ``i`` as a neighbour of query ``i`` (needs
            ``Q == N``: the query set is the index). Defaults to ``index is None``.
        query_chunk, index_chunk: block sizes of the distance matrix computed at once.
        device: where to compute.

    Returns:
        ``(distances, indices)``, both ``(Q, k)``, nearest first (float32 / int64 numpy).
    """
    device = torch.device(device)
    q = _as_tensor(queries, device)
    same = index is None
    x = q if same else _as_tensor(index, device)
    if exclude_self is None:
        exclude_self = same
    if q.dim() != 2 or x.dim() != 2 or q.shape[1] != x.shape[1]:
        raise ValueError(f"queries and index must be (Q, D) and (N, D) with the same D, got {tuple(q.shape)} and {tuple(x.shape)}")
    if exclude_self and q.shape[0] != x.shape[0]:
        raise ValueError(f"exclude_self needs the queries to be the index (same length), got {q.shape[0]} and {x.shape[0]}")
    available = x.shape[0] - int(bool(exclude_self))
    if not 1 <= k <= available:
        raise ValueError(f"k must be in 1..{available} (index size{' minus the query itself' if exclude_self else ''}), got {k}")
    if query_chunk < 1 or index_chunk < 1:
        raise ValueError("chunk sizes must be >= 1")
    nq = q.shape[0]
    out_d = torch.empty(nq, k, dtype=torch.float32, device=device)
    out_i = torch.empty(nq, k, dtype=torch.int64, device=device)
    for qs in range(0, nq, query_chunk):
        qb = q[qs : qs + query_chunk]
        best_d = torch.full((len(qb), 0), float("inf"), device=device)
        best_i = torch.empty((len(qb), 0), dtype=torch.int64, device=device)
        for xs in range(0, x.shape[0], index_chunk):
            xb = x[xs : xs + index_chunk]
            d = torch.cdist(qb.unsqueeze(0), xb.unsqueeze(0), p=p).squeeze(0)
            if exclude_self:
                rows = torch.arange(len(qb), device=device)
                cols = rows + qs - xs
                ok = (cols >= 0) & (cols < len(xb))
                d[rows[ok], cols[ok]] = float("inf")
            kk = min(k, d.shape[1])
            vals, idx = torch.topk(d, kk, dim=1, largest=False, sorted=True)
            cand_d = torch.cat([best_d, vals], dim=1)
            cand_i = torch.cat([best_i, idx + xs], dim=1)
            # stable merge: earlier (lower-index) candidates win ties
            order = torch.argsort(cand_d, dim=1, stable=True)[:, :k]
            best_d = torch.gather(cand_d, 1, order)
            best_i = torch.gather(cand_i, 1, order)
        out_d[qs : qs + len(qb)] = best_d
        out_i[qs : qs + len(qb)] = best_i
    return out_d.cpu().numpy(), out_i.cpu().numpy()


def vote(neighbour_labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Majority label of each row of ``(Q, k)`` neighbour labels (nearest first).

    Ties go to the tied class whose nearest neighbour comes first.
    """
    nl = np.asarray(neighbour_labels, dtype=np.int64)
    if nl.ndim != 2 or nl.shape[1] < 1:
        raise ValueError(f"neighbour labels must be (Q, k) with k >= 1, got {nl.shape}")
    c = int(num_classes if num_classes is not None else nl.max() + 1)
    q, k = nl.shape
    counts = np.zeros((q, c), dtype=np.float64)
    first = np.full((q, c), k, dtype=np.float64)
    rows = np.arange(q)
    for r in range(k - 1, -1, -1):  # walk backwards so the nearest rank is written last
        counts[rows, nl[:, r]] += 1
        first[rows, nl[:, r]] = r
    score = counts - first / (2.0 * (k + 1))  # the tie-breaker is < 0.5, so counts decide first
    score[counts == 0] = -np.inf
    return score.argmax(axis=1)


def knn_classify(
    queries,
    index,
    index_labels,
    k: int = 5,
    *,
    p: float = 1.0,
    exclude_self: bool | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    **chunks,
) -> np.ndarray:
    """Predict each query's label by a ``k``-nearest-neighbour vote over ``index`` (see :func:`knn_search`).

    ``index=None`` classifies the index itself leave-one-out (each point's own label is not used).
    """
    labels = np.asarray(index_labels, dtype=np.int64)
    n_index = len(queries) if index is None else len(index)
    if len(labels) != n_index:
        raise ValueError(f"{len(labels)} index labels for {n_index} index points")
    _, nn_idx = knn_search(queries, index, k, p=p, exclude_self=exclude_self, device=device, **chunks)
    c = num_classes if num_classes is not None else int(labels.max()) + 1
    return vote(labels[nn_idx], c)


def knn_accuracy(queries, query_labels, index=None, index_labels=None, k: int = 5, **kwargs) -> float:
    """Accuracy of :func:`knn_classify`. Without ``index`` it is leave-one-out on the queries."""
    query_labels = np.asarray(query_labels, dtype=np.int64)
    if len(query_labels) != len(queries):
        raise ValueError(f"{len(query_labels)} labels for {len(queries)} queries")
    if index is None:
        if index_labels is not None:
            raise ValueError("index_labels given without index")
        index_labels = query_labels
    elif index_labels is None:
        raise ValueError("index given without index_labels")
    pred = knn_classify(queries, index, index_labels, k, **kwargs)
    return float((pred == query_labels).mean())


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    d = (x * x).sum(1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1).unsqueeze(0)
    return d.clamp_min_(0.0)


@torch.no_grad()
def kmeans(
    x, n_clusters: int, *, seed: int = 0, n_init: int = 3, max_iter: int = 100, tol: float = 1e-6, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means (squared Euclidean) with seeded k-means++ initialisation.

    Runs ``n_init`` seeded restarts of Lloyd's algorithm and keeps the lowest
    inertia. An empty cluster is re-seeded at the point farthest from its centre.

    Returns:
        ``(assignments (N,) int64, centres (n_clusters, D) float32, inertia)``.
    """
    device = torch.device(device)
    pts = _as_tensor(x, device).to(torch.float64)
    if pts.dim() != 2:
        raise ValueError(f"k-means needs (N, D) points, got shape {tuple(pts.shape)}")
    n = pts.shape[0]
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in 1..{n} (number of points), got {n_clusters}")
    if n_init < 1 or max_iter < 1:
        raise ValueError("n_init and max_iter must be >= 1")
    best = None
    for run in range(n_init):
        g = torch.Generator(device="cpu").manual_seed(int(seed) * 1000003 + run)
        # k-means++: first centre uniform, then proportional to squared distance to the nearest centre
        first = int(torch.randint(n, (1,), generator=g))
        centres = [pts[first]]
        d2 = _sq_dist(pts, pts[first : first + 1]).squeeze(1)
        for _ in range(1, n_clusters):
            total = float(d2.sum())
            if total <= 0.0:  # all remaining points coincide with a centre: pick uniformly
                nxt = int(torch.randint(n, (1,), generator=g))
            else:
                nxt = int(torch.multinomial((d2 / total).cpu(), 1, generator=g))
            centres.append(pts[nxt])
            d2 = torch.minimum(d2, _sq_dist(pts, pts[nxt : nxt + 1]).squeeze(1))
        c = torch.stack(centres)
        prev = float("inf")
        for _ in range(max_iter):
            dist = _sq_dist(pts, c)
            mind, assign = dist.min(dim=1)
            inertia = float(mind.sum())
            counts = torch.bincount(assign, minlength=n_clusters)
            sums = torch.zeros_like(c).index_add_(0, assign, pts)
            new_c = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
            empty = (counts == 0).nonzero().flatten()
            if len(empty):
                far = torch.argsort(mind, descending=True)[: len(empty)]
                new_c[empty] = pts[far]
            c = new_c
            if prev - inertia <= tol * max(abs(prev), 1e-12) and not len(empty):
                break
            prev = inertia
        dist = _sq_dist(pts, c)
        mind, assign = dist.min(dim=1)
        inertia = float(mind.sum())
        if best is None or inertia < best[2]:
            best = (assign.cpu().numpy().astype(np.int64), c.float().cpu().numpy(), inertia)
    return best


def cluster_purity(assignments, labels) -> float:
    """Purity: sum over clusters of the count of the cluster's most frequent class, over N."""
    a = np.asarray(assignments, dtype=np.int64)
    y = np.asarray(labels, dtype=np.int64)
    if a.shape != y.shape or a.ndim != 1:
        raise ValueError(f"assignments and labels must be 1-D of one length, got {a.shape} and {y.shape}")
    if len(a) == 0:
        raise ValueError("purity of an empty set is undefined")
    if a.min() < 0 or y.min() < 0:
        raise ValueError("cluster ids and labels must be non-negative")
    table = np.zeros((a.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(table, (a, y), 1)
    return float(table.max(axis=1).sum() / len(a))


RANDOM_MODES = ("blocks", "columns", "sample")


def random_routes(routes: np.ndarray, layout: RouteLayout, *, seed: int = 0, mode: str = "blocks") -> np.ndarray:
    """Routes that ignore the image but keep the marginal statistics of ``routes``.

    Modes:
        ``blocks`` (default): for each module and iteration, the rows of that
            ``(N, n + 1)`` score-vector block are permuted independently across
            images. Every random score vector is a real one (it sums to 1), the
            distribution of each module/iteration's score vector is exactly the
            empirical one, and only the link to the image (and between iterations) is cut.
        ``columns``: every component permuted independently (per-component marginals
            only; rows no longer sum to 1).
        ``sample``: for each module and iteration, one output drawn per image from
            the empirical mean score vector, as a one-hot vector (hard random routes).
    """
    routes = np.asarray(routes, dtype=np.float32)
    if routes.ndim != 2 or routes.shape[1] != layout.dim:
        raise ValueError(f"routes must have shape (N, {layout.dim}), got {routes.shape}")
    if mode not in RANDOM_MODES:
        raise ValueError(f"unknown random-route mode {mode!r}; valid: {', '.join(RANDOM_MODES)}")
    rng = np.random.default_rng(seed)
    n = len(routes)
    out = np.empty_like(routes)
    if mode == "columns":
        for j in range(routes.shape[1]):
            out[:, j] = routes[rng.permutation(n), j]
        return out
    for _, _, cols in layout.blocks():
        block = routes[:, cols]
        if mode == "blocks":
            out[:, cols] = block[rng.permutation(n)]
        else:
            probs = np.clip(block.astype(np.float64).mean(axis=0), 0.0, None)
            probs = probs / probs.sum() if probs.sum() > 0 else np.full(len(probs), 1.0 / len(probs))
            choice = rng.choice(len(probs), size=n, p=probs)
            onehot = np.zeros_like(block)
            onehot[np.arange(n), choice] = 1.0
            out[:, cols] = onehot
    return out
