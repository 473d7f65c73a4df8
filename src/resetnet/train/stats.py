"""Paired significance testing of two classifiers on the same test images."""

from __future__ import annotations

import math

import numpy as np


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray, exact_below: int = 25) -> dict[str, float]:
    """McNemar's test on per-image correctness of two models over the same images.

    ``b`` counts images A gets right and B wrong, ``c`` the reverse. With
    ``b + c < exact_below`` the exact two-sided binomial test is used, otherwise the
    chi-squared statistic with continuity correction, ``(|b - c| - 1)^2 / (b + c)``,
    with one degree of freedom. Returns ``{"b", "c", "statistic", "p_value"}``.
    """
    a = np.asarray(correct_a, dtype=bool)
    bb = np.asarray(correct_b, dtype=bool)
    if a.shape != bb.shape or a.ndim != 1:
        raise ValueError(f"mcnemar needs two 1-D correctness arrays of one length, got {a.shape} and {bb.shape}")
    b = int(np.sum(a & ~bb))
    c = int(np.sum(~a & bb))
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0}
    if n < exact_below:
        k = min(b, c)
        tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
        return {"b": b, "c": c, "statistic": float(k), "p_value": min(1.0, 2.0 * tail)}
    stat = (abs(b - c) - 1.0) ** 2 / n
    p = math.erfc(math.sqrt(stat / 2.0))  # chi-squared, 1 dof: P(X > stat)
    return {"b": b, "c": c, "statistic": stat, "p_value": p}


def format_p(p: float | None) -> str:
    """A p-value as the tables print it: ``-`` (none), ``<0.001`` or three decimals."""
    return "-" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")
