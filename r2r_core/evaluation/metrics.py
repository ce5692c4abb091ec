"""Ranking, routing and latency metrics.

Ranking measures are computed with ``ir-measures`` (trec_eval definitions): nDCG uses the graded
qrels as linear gains; MRR (``RR@k``), precision and recall treat grade >= 1 as relevant. Queries
without candidates count as 0, so every evaluated query weighs the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "MEASURES",
    "latency_stats",
    "mean_metrics",
    "ranking_metrics",
    "routing_metrics",
    "run_from_rankings",
]

# Display name -> ir-measures measure string.
MEASURES: dict[str, str] = {
    "nDCG@5": "nDCG@5",
    "nDCG@10": "nDCG@10",
    "MRR@5": "RR@5",
    "MRR@10": "RR@10",
    "P@5": "P@5",
    "R@5": "R@5",
    "R@10": "R@10",
}


def _ir_measures():
    try:
        import ir_measures
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('ranking metrics need ir-measures: pip install "r2r-rerank[eval]"') from exc
    return ir_measures


def run_from_rankings(rankings: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float]]:
    """Turn ``{qid: [docid best first]}`` into an ir-measures run with strictly decreasing scores.

    trec_eval breaks score ties by document id, so scores that tie would not keep the order a
    system produced; rank-derived scores make the evaluated order exactly the given one.
    """
    run: dict[str, dict[str, float]] = {}
    for qid, docs in rankings.items():
        n = len(docs)
        if len(set(docs)) != n:
            raise ValueError(f"ranking for query {qid!r} lists a document twice")
        run[qid] = {doc: float(n - rank) for rank, doc in enumerate(docs)}
    return run


def ranking_metrics(
    qrels: Mapping[str, Mapping[str, int]],
    rankings: Mapping[str, Sequence[str]],
    query_ids: Sequence[str] | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Per-query and mean ranking metrics.

    ``rankings`` maps a query id to its document ids, best first. ``query_ids`` (default: the
    ranked queries) is the evaluated set; each must have qrels. Returns ``(mean, per_query)``
    where ``mean`` maps each name in :data:`MEASURES` to the average over ``query_ids`` and
    ``per_query`` maps query id -> {name: value}.
    """
    ir_measures = _ir_measures()
    qids = list(rankings) if query_ids is None else list(query_ids)
    if not qids:
        raise ValueError("no queries to evaluate")
    missing = [q for q in qids if q not in qrels]
    if missing:
        raise KeyError(f"{len(missing)} evaluated queries have no qrels, e.g. {missing[0]!r}")
    sub_qrels = {q: {d: int(g) for d, g in qrels[q].items()} for q in qids}
    run = run_from_rankings({q: rankings[q] for q in qids if rankings.get(q)})
    parsed = {ir_measures.parse_measure(m): name for name, m in MEASURES.items()}
    per_query: dict[str, dict[str, float]] = {q: dict.fromkeys(MEASURES, 0.0) for q in qids}
    if run:
        for metric in ir_measures.iter_calc(list(parsed), sub_qrels, run):
            if metric.query_id in per_query:
                per_query[metric.query_id][parsed[metric.measure]] = float(metric.value)
    return mean_metrics(per_query.values()), per_query


def mean_metrics(rows) -> dict[str, float]:
    """Average a collection of ``{name: value}`` dicts key by key (keys of the first row)."""
    rows = list(rows)
    if not rows:
        return {}
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


def routing_metrics(gold: Sequence[str], predicted: Sequence[str]) -> dict:
    """Accuracy, macro-F1 and confusion counts of routing decisions against gold domains.

    Macro-F1 averages the per-class F1 over the gold labels; a prediction outside them (e.g.
    ``"__base__"`` for a low-confidence route) counts as an error for its query's class.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"gold and predicted differ in length: {len(gold)} != {len(predicted)}")
    if not gold:
        raise ValueError("no routing decisions to score")
    labels = sorted(set(gold))
    columns = labels + sorted(set(predicted) - set(labels))
    confusion = {g: dict.fromkeys(columns, 0) for g in labels}
    for g, p in zip(gold, predicted, strict=True):
        confusion[g][p] += 1
    per_class = {}
    for label in labels:
        tp = confusion[label][label]
        predicted_as = sum(confusion[g].get(label, 0) for g in labels)
        support = sum(confusion[label].values())
        precision = tp / predicted_as if predicted_as else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    correct = sum(g == p for g, p in zip(gold, predicted, strict=True))
    return {
        "accuracy": correct / len(gold),
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "n": len(gold),
        "labels": labels,
        "predicted_labels": columns,
        "confusion": confusion,
        "per_class": per_class,
    }


def latency_stats(seconds: Sequence[float], documents: Sequence[int]) -> dict[str, float | None]:
    """p50 / p95 / mean latency per query in milliseconds and documents scored per second.

    Values that cannot be computed (no queries, zero total time) are ``None`` so results stay JSON.
    """
    if len(seconds) != len(documents):
        raise ValueError(f"seconds and documents differ in length: {len(seconds)} != {len(documents)}")
    if not seconds:
        return {"queries": 0, "p50_ms": None, "p95_ms": None, "mean_ms": None, "docs_per_sec": None}
    arr = np.asarray(seconds, dtype=float) * 1000.0
    total = float(np.sum(seconds))
    return {
        "queries": len(seconds),
        "p50_ms": float(np.percentile(arr, 50)),
        "p95_ms": float(np.percentile(arr, 95)),
        "mean_ms": float(arr.mean()),
        "docs_per_sec": float(sum(documents) / total) if total > 0 else None,
    }
