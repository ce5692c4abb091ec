"""Checkpoint selection on dev data: a seeded dev subsample, reranked by the adapter being trained.

Metrics follow the standard (trec_eval) definitions: nDCG@k with linear gain and the ideal ranking taken
from all judged documents of the query, P@k and MRR@k with relevance = grade >= 1. The selection score
of a pooled dev set is the macro average over its datasets, so a big dataset does not drown small ones.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from r2r_core.data import BeirDataset
from r2r_core.training.curation import allocate, query_domain

logger = logging.getLogger(__name__)

__all__ = ["METRICS", "DevQuery", "build_dev_set", "evaluate_dev", "metric_value", "ndcg_at_k", "precision_at_k"]

METRICS = ("ndcg@10", "ndcg@5", "p@5", "mrr@10")


@dataclass(frozen=True)
class DevQuery:
    qid: str
    dataset: str
    domain: str
    query: str
    doc_ids: tuple[str, ...]
    docs: tuple[str, ...]
    qrels: dict


def build_dev_set(
    datasets: Sequence[BeirDataset],
    *,
    max_queries_per_domain: int | None = 60,
    depth: int = 20,
    max_doc_chars: int = 2000,
    seed: int = 0,
) -> list[DevQuery]:
    """Dev queries with their run candidates; at most ``max_queries_per_domain`` per domain (split evenly
    over the domain's datasets), drawn with a seeded rng. Queries whose candidates hold no relevant
    document stay in (they score 0 for every system, as in the standard evaluation)."""
    by_domain: dict[str, list[BeirDataset]] = defaultdict(list)
    for d in datasets:
        by_domain[d.domain or d.name].append(d)
    out: list[DevQuery] = []
    for members in by_domain.values():
        caps = {d.name: sum(1 for q in d.queries if d.run.get(q)) for d in members}
        quota = allocate(max_queries_per_domain, caps) if max_queries_per_domain else caps
        for d in members:
            qids = sorted(q for q in d.queries if d.run.get(q))
            rng = random.Random(f"{seed}|{d.name}|dev")
            qids = rng.sample(qids, quota[d.name]) if quota[d.name] < len(qids) else qids
            for qid in sorted(qids):
                cands = [doc for doc, _ in d.run[qid][:depth]]
                out.append(
                    DevQuery(
                        qid=qid, dataset=d.name, domain=query_domain(d, d.queries[qid]), query=d.queries[qid].text,
                        doc_ids=tuple(cands), docs=tuple(d.corpus[c].full_text[:max_doc_chars] for c in cands),
                        qrels=dict(d.qrels.get(qid, {})),
                    )
                )
    return out


def ndcg_at_k(ranked: Sequence[str], qrels: dict, k: int) -> float:
    dcg = sum(qrels.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]) if qrels.get(doc, 0) > 0)
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def precision_at_k(ranked: Sequence[str], qrels: dict, k: int) -> float:
    return sum(1 for doc in ranked[:k] if qrels.get(doc, 0) > 0) / k


def mrr_at_k(ranked: Sequence[str], qrels: dict, k: int) -> float:
    return next((1.0 / (i + 1) for i, doc in enumerate(ranked[:k]) if qrels.get(doc, 0) > 0), 0.0)


def _query_metrics(ranked: Sequence[str], qrels: dict) -> dict:
    return {
        "ndcg@10": ndcg_at_k(ranked, qrels, 10),
        "ndcg@5": ndcg_at_k(ranked, qrels, 5),
        "p@5": precision_at_k(ranked, qrels, 5),
        "mrr@10": mrr_at_k(ranked, qrels, 10),
    }


def metric_value(result: dict, metric: str) -> float:
    """The selection score: the macro average over datasets of ``metric``."""
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}")
    return result["macro"][metric]


def summarize(dev: Sequence[DevQuery], rankings: Sequence[Sequence[str]]) -> dict:
    per_dataset: dict[str, list[dict]] = defaultdict(list)
    for q, ranked in zip(dev, rankings):
        per_dataset[q.dataset].append(_query_metrics(ranked, q.qrels))
    datasets = {
        name: {m: sum(r[m] for r in rows) / len(rows) for m in METRICS} | {"queries": len(rows)}
        for name, rows in sorted(per_dataset.items())
    }
    macro = {m: sum(v[m] for v in datasets.values()) / max(1, len(datasets)) for m in METRICS}
    return {"macro": macro, "datasets": datasets}


def first_stage_result(dev: Sequence[DevQuery]) -> dict:
    """The metrics of the run's own order (a reference point for the logs)."""
    return summarize(dev, [q.doc_ids for q in dev])


def evaluate_dev(
    model,
    encoder,
    instruction: str,
    dev: Sequence[DevQuery],
    *,
    pad_token_id: int,
    batch_size: int = 16,
    adapter_name: str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """Rerank every dev query with ``model`` (eval mode, no grad) and compute the metrics.

    ``encoder`` is a :class:`r2r_core.scoring.PromptEncoder`; the prefix (system, instruction, query) of each
    query is encoded once and its KV cache shared by the candidates.
    """
    from r2r_core.scoring import BASE_ADAPTER, prefix_cached_margins

    was_training = model.training
    model.eval()
    name = adapter_name or BASE_ADAPTER
    device = next(model.parameters()).device
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    rankings = []
    try:
        with ctx, torch.inference_mode():
            # a few queries per call: prefixes of one call share batches of candidates
            for start in range(0, len(dev), 4):
                chunk = dev[start : start + 4]
                prefixes, rows = [], []
                for qi, q in enumerate(chunk):
                    prefix, tails = encoder.encode(instruction, q.query, list(q.docs))
                    prefixes.append(prefix)
                    rows.extend((qi, t) for t in tails)
                margins = prefix_cached_margins(
                    model, prefixes, [name] * len(prefixes), rows, pad_token_id, batch_size
                )
                pos = 0
                for q in chunk:
                    m = margins[pos : pos + len(q.docs)]
                    pos += len(q.docs)
                    order = sorted(range(len(m)), key=lambda i: (-m[i], i))
                    rankings.append([q.doc_ids[i] for i in order])
    finally:
        model.train(was_training)
    return summarize(dev, rankings)
