"""Fusion of a reranker's scores with the first-stage run (reported as separate ``<system>+fusion``
systems; the pure reranker numbers are always reported too)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["FUSION_METHODS", "fuse", "linear_fusion", "reciprocal_rank_fusion"]

FUSION_METHODS = ("rrf", "linear")


def _ranks(scores: Sequence[float]) -> list[int]:
    """1-based rank of each item when sorted by score (ties keep input order)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    ranks = [0] * len(scores)
    for rank, i in enumerate(order, start=1):
        ranks[i] = rank
    return ranks


def reciprocal_rank_fusion(rerank_scores: Sequence[float], k: float = 60.0) -> list[float]:
    """RRF of the reranker's order with the run order (candidate ``i`` has first-stage rank ``i+1``)."""
    if k <= 0:
        raise ValueError(f"`k` must be > 0, got {k}")
    return [1.0 / (k + r) + 1.0 / (k + i + 1) for i, r in enumerate(_ranks(rerank_scores))]


def _minmax(values: Sequence[float]) -> list[float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        return [0.0] * len(values)
    return [(v - lo) / (hi - lo) for v in values]


def linear_fusion(
    rerank_scores: Sequence[float], first_stage_scores: Sequence[float], alpha: float = 0.5
) -> list[float]:
    """``alpha * minmax(rerank) + (1 - alpha) * minmax(first_stage)`` per query."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}")
    if len(rerank_scores) != len(first_stage_scores):
        raise ValueError(f"score lists differ in length: {len(rerank_scores)} != {len(first_stage_scores)}")
    if not rerank_scores:
        return []
    a, b = _minmax(rerank_scores), _minmax(first_stage_scores)
    return [alpha * x + (1.0 - alpha) * y for x, y in zip(a, b, strict=True)]


def fuse(
    method: str,
    rerank_scores: Sequence[float],
    first_stage_scores: Sequence[float],
    *,
    alpha: float = 0.5,
    k: float = 60.0,
) -> list[float]:
    """Dispatch to :func:`reciprocal_rank_fusion` (``"rrf"``) or :func:`linear_fusion` (``"linear"``)."""
    if method == "rrf":
        return reciprocal_rank_fusion(rerank_scores, k=k)
    if method == "linear":
        return linear_fusion(rerank_scores, first_stage_scores, alpha=alpha)
    raise ValueError(f"fusion method must be one of {FUSION_METHODS}, got {method!r}")
