"""The evaluation loop: every system reranks the same first-stage candidates of every dataset.

:func:`evaluate` returns a JSON-ready dict (the schema is documented on the function); the
reranked runs are written in TREC format when ``EvalConfig.runs_dir`` is set.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data import BeirDataset
from .cache import RunCache
from .fusion import FUSION_METHODS, fuse
from .metrics import MEASURES, latency_stats, mean_metrics, ranking_metrics, routing_metrics
from .runs import SystemRun, safe_name
from .systems import FirstStageSystem, MiniLMSystem, RerankerSystem, RoutedSystem, System

logger = logging.getLogger(__name__)

__all__ = [
    "EvalConfig",
    "SystemRun",
    "evaluate",
    "fused_run",
    "run_system",
    "safe_name",
    "select_queries",
    "write_trec_run",
]


@dataclass
class EvalConfig:
    split: str = "test"
    max_queries: int | None = None  # deterministic seeded subsample per dataset
    max_candidates: int = 100  # top of the first-stage run that is reranked
    seed: int = 0
    fusion: str | None = None  # "rrf" or "linear": adds "<system>+fusion" systems
    fusion_alpha: float = 0.5
    rrf_k: float = 60.0
    runs_dir: Path | None = None  # where reranked TREC runs go (None: not written)
    progress: bool = True
    forgetting_metric: str = "nDCG@10"
    cache_dir: Path | None = None  # finished (system, dataset) runs are stored here (see cache.py)
    resume: bool = False  # reuse runs in cache_dir whose key matches (same system files, queries, depth)

    def __post_init__(self) -> None:
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"`split` must be a non-empty str, got {self.split!r}")
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"`max_queries` must be >= 1 or None, got {self.max_queries}")
        if self.max_candidates < 1:
            raise ValueError(f"`max_candidates` must be >= 1, got {self.max_candidates}")
        if self.fusion is not None and self.fusion not in FUSION_METHODS:
            raise ValueError(f"`fusion` must be None or one of {FUSION_METHODS}, got {self.fusion!r}")
        if not 0.0 <= self.fusion_alpha <= 1.0:
            raise ValueError(f"`fusion_alpha` must be in [0, 1], got {self.fusion_alpha}")
        if self.rrf_k <= 0:
            raise ValueError(f"`rrf_k` must be > 0, got {self.rrf_k}")
        if self.forgetting_metric not in MEASURES:
            raise ValueError(f"`forgetting_metric` must be one of {list(MEASURES)}, got {self.forgetting_metric!r}")
        if self.runs_dir is not None:
            self.runs_dir = Path(self.runs_dir)
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)
        if self.resume and self.cache_dir is None:
            raise ValueError("`resume` needs a `cache_dir` holding the finished runs")


def select_queries(dataset: BeirDataset, max_queries: int | None = None, seed: int = 0) -> list[str]:
    """The split's query ids in file order, or a seeded subsample of ``max_queries`` of them."""
    qids = list(dataset.queries)
    if max_queries is None or max_queries >= len(qids):
        return qids
    picked = set(random.Random(f"{seed}:{dataset.name}:{dataset.split}").sample(sorted(qids), max_queries))
    return [q for q in qids if q in picked]


def _check_scores(scores, n: int, system: str, dataset: str, qid: str) -> list[float]:
    scores = [float(s) for s in scores]
    if len(scores) != n:
        raise ValueError(f"{system} returned {len(scores)} scores for {n} candidates (query {qid!r} of {dataset})")
    if not all(math.isfinite(s) for s in scores):
        raise ValueError(f"{system} returned a non-finite score (query {qid!r} of {dataset}): {scores}")
    return scores


def _ranked(doc_ids: Sequence[str], scores: Sequence[float]) -> list[tuple[str, float]]:
    """Sort by score, best first; ties keep the first-stage order."""
    order = sorted(range(len(doc_ids)), key=lambda i: (-scores[i], i))
    return [(doc_ids[i], scores[i]) for i in order]


def run_system(
    system: System,
    dataset: BeirDataset,
    query_ids: Sequence[str],
    *,
    max_candidates: int = 100,
    progress: bool = True,
) -> SystemRun:
    """Rerank the top ``max_candidates`` run candidates of each query with ``system``, timing each call."""
    from tqdm.auto import tqdm

    routed = isinstance(system, RoutedSystem)
    prepare = getattr(system, "prepare", None)
    if prepare is not None:  # untimed: validation, or a bi-encoder's document index
        prepare(dataset, query_ids, max_candidates=max_candidates, progress=progress)
    out = SystemRun(system=system.name, dataset=dataset.name)
    for qid in tqdm(query_ids, desc=f"{system.name} | {dataset.name}", unit="q", disable=not progress, leave=False):
        query = dataset.queries[qid]
        candidates = dataset.run.get(qid, [])[:max_candidates]
        docs = [dataset.corpus[doc_id] for doc_id, _ in candidates]
        start = time.perf_counter()
        if routed:
            expert = system.choose_expert(query)
            scores = system.rerank_with(query, docs, expert)
            out.experts[qid] = expert
        else:
            scores = system.rerank(query, docs)
        out.seconds[qid] = time.perf_counter() - start
        scores = _check_scores(scores, len(docs), system.name, dataset.name, qid)
        out.rankings[qid] = _ranked([d.id for d in docs], scores)
        out.n_docs[qid] = len(docs)
    return out


def fused_run(run: SystemRun, dataset: BeirDataset, config: EvalConfig) -> SystemRun:
    """``run`` fused with the first-stage scores (same timings: fusion costs nothing measurable)."""
    fused = SystemRun(
        system=f"{run.system}+fusion",
        dataset=run.dataset,
        experts=dict(run.experts),
        seconds=dict(run.seconds),
        n_docs=dict(run.n_docs),
    )
    for qid, ranking in run.rankings.items():
        candidates = dataset.run.get(qid, [])[: len(ranking)]
        by_doc = dict(ranking)
        doc_ids = [doc_id for doc_id, _ in candidates]
        scores = fuse(
            config.fusion,
            [by_doc[d] for d in doc_ids],
            [s for _, s in candidates],
            alpha=config.fusion_alpha,
            k=config.rrf_k,
        )
        fused.rankings[qid] = _ranked(doc_ids, scores)
    return fused


def write_trec_run(path: Path | str, rankings: dict[str, list[tuple[str, float]]], tag: str) -> Path:
    """Write ``qid Q0 docid rank score tag`` lines (rank from 1, the order that was evaluated)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = safe_name(tag)
    with open(path, "w", encoding="utf-8") as handle:
        for qid, ranking in rankings.items():
            for rank, (doc_id, score) in enumerate(ranking, start=1):
                handle.write(f"{qid} Q0 {doc_id} {rank} {score:.6f} {tag}\n")
    return path


def _describe(system: System) -> dict:
    if isinstance(system, RerankerSystem):
        return {"policy": system.policy, "expert": system.expert, "bundle": system.source}
    if isinstance(system, FirstStageSystem):
        return {"policy": "first-stage"}
    if isinstance(system, MiniLMSystem):
        return {"policy": "bi-encoder", "documents_precomputed": system.cache_documents}
    return {"policy": type(system).__name__}


def _reusable(
    system: System,
    dataset: BeirDataset,
    qids: Sequence[str],
    done: dict[str, SystemRun],
    systems: Sequence[System],
) -> SystemRun | None:
    """A fixed-expert run equals an oracle run of the same reranker when every query has that domain."""
    if not isinstance(system, RerankerSystem) or system.policy != "fixed":
        return None
    if not all(dataset.queries[q].domain == system.expert for q in qids):
        return None
    for other in systems:
        if (
            isinstance(other, RerankerSystem)
            and other.policy == "oracle"
            and other.reranker is system.reranker
            and other.name in done
        ):
            return done[other.name]
    return None


def _summarise(
    per_dataset: dict[str, dict],
    runs: list[SystemRun],
    domains: dict[str, str | None],
    gold: dict[str, dict[str, str | None]],
) -> dict:
    summary: dict = {
        "datasets": per_dataset,
        "macro": mean_metrics(v["metrics"] for v in per_dataset.values()),
    }
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for name, entry in per_dataset.items():
        if domains.get(name):
            by_domain[domains[name]].append(entry["metrics"])
    summary["domains"] = {d: mean_metrics(rows) for d, rows in sorted(by_domain.items())}
    seconds = [s for run in runs for s in run.seconds.values()]
    n_docs = [run.n_docs[q] for run in runs for q in run.seconds]
    summary["latency"] = latency_stats(seconds, n_docs)
    routed = [(gold[run.dataset][q], e) for run in runs for q, e in run.experts.items() if gold[run.dataset][q]]
    if routed and any("routing" in v for v in per_dataset.values()):
        summary["routing"] = routing_metrics([g for g, _ in routed], [p for _, p in routed])
    return summary


def evaluate(
    systems: Sequence[System],
    datasets: Sequence[BeirDataset],
    config: EvalConfig | None = None,
    *,
    forgetting_systems: Sequence[RerankerSystem] = (),
) -> dict:
    """Run every system (and every forgetting expert) on every dataset and compute the metrics.

    Returns ``{"config", "datasets", "systems", "forgetting"?}`` where ``systems[name]`` holds
    ``datasets[ds] = {"metrics", "latency", "routing"?, "run"?}``, the ``macro`` average over
    datasets, ``domains`` (average over the datasets of each domain), pooled ``latency`` and,
    for router systems, pooled ``routing`` (accuracy, macro-F1, confusion).
    """
    config = config or EvalConfig()
    if not systems and not forgetting_systems:
        raise ValueError("no systems to evaluate")
    if not datasets:
        raise ValueError("no datasets to evaluate")
    names = [s.name for s in (*systems, *forgetting_systems)]
    if len(set(names)) != len(names):
        raise ValueError(f"system names must be unique, got {names}")
    dataset_names = [d.name for d in datasets]
    if len(set(dataset_names)) != len(dataset_names):
        raise ValueError(f"dataset names must be unique, got {dataset_names}")

    all_systems = [*systems, *forgetting_systems]
    selected = {d.name: select_queries(d, config.max_queries, config.seed) for d in datasets}
    for system in all_systems:  # configuration errors (e.g. oracle domain without expert) before any work
        if isinstance(system, RerankerSystem):
            for dataset in datasets:
                system.check_dataset(dataset, selected[dataset.name])
    _warm_up(all_systems, datasets, selected, config)
    fusion_names = [f"{s.name}+fusion" for s in systems if config.fusion and not isinstance(s, FirstStageSystem)]

    per_system: dict[str, dict[str, dict]] = defaultdict(dict)
    runs_of: dict[str, list[SystemRun]] = defaultdict(list)
    gold = {d.name: {q: d.queries[q].domain for q in selected[d.name]} for d in datasets}
    cache = RunCache(config.cache_dir, read=config.resume) if config.cache_dir is not None else None
    for dataset in datasets:
        qids = selected[dataset.name]
        done: dict[str, SystemRun] = {}
        for system in all_systems:
            reused = _reusable(system, dataset, qids, done, systems)
            if reused is not None:
                logger.info(
                    "%s on %s: identical to %s (every query has domain %r), reused",
                    system.name,
                    dataset.name,
                    reused.system,
                    system.expert,
                )
                run = SystemRun(
                    system.name,
                    dataset.name,
                    reused.rankings,
                    dict(reused.experts),
                    reused.seconds,
                    reused.n_docs,
                )
            else:
                key = cache.key(system, dataset, qids, config.max_candidates) if cache else None
                run = cache.load(system, dataset, key) if cache else None
                if run is None:
                    run = run_system(
                        system, dataset, qids, max_candidates=config.max_candidates, progress=config.progress
                    )
                    if cache:
                        cache.save(run, dataset, key)
            done[system.name] = run
            runs = [run]
            if config.fusion and system in systems and not isinstance(system, FirstStageSystem):
                runs.append(fused_run(run, dataset, config))
            for r in runs:
                entry = _score_run(r, dataset, qids, config, report_routing=_reports_routing(system))
                per_system[r.system][dataset.name] = entry
                runs_of[r.system].append(r)

    domains = {d.name: d.domain for d in datasets}
    results: dict = {
        "config": {
            **asdict(config),
            "runs_dir": str(config.runs_dir) if config.runs_dir else None,
            "cache_dir": str(config.cache_dir) if config.cache_dir else None,
            "measures": dict(MEASURES),
        },
        "datasets": {
            d.name: {
                "path": str(d.root),
                "split": d.split,
                "domain": d.domain,
                "queries": len(d.queries),
                "evaluated_queries": len(selected[d.name]),
                "avg_candidates": _avg(min(len(d.run.get(q, [])), config.max_candidates) for q in selected[d.name]),
            }
            for d in datasets
        },
        "systems": {},
    }
    order = [s.name for s in systems] + fusion_names
    for name in sorted(order, key=lambda n: (order.index(n.removesuffix("+fusion")), n.endswith("+fusion"))):
        base = next(s for s in systems if s.name == name.removesuffix("+fusion"))
        results["systems"][name] = {
            "info": {**_describe(base), "fusion": config.fusion if name != base.name else None},
            **_summarise(per_system[name], runs_of[name], domains, gold),
        }
    if forgetting_systems:
        metric = config.forgetting_metric
        results["forgetting"] = {
            "metric": metric,
            "datasets": dataset_names,
            "experts": [s.expert for s in forgetting_systems],
            "table": {
                s.expert: {ds: per_system[s.name][ds]["metrics"][metric] for ds in dataset_names}
                for s in forgetting_systems
            },
            "metrics": {
                s.expert: {ds: per_system[s.name][ds]["metrics"] for ds in dataset_names} for s in forgetting_systems
            },
            "runs": {
                s.expert: {ds: per_system[s.name][ds].get("run") for ds in dataset_names} for s in forgetting_systems
            },
        }
    return results


def _avg(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


def _reports_routing(system: System) -> bool:
    return isinstance(system, RoutedSystem) and bool(getattr(system, "reports_routing", False))


def _score_run(
    run: SystemRun, dataset: BeirDataset, qids: Sequence[str], config: EvalConfig, report_routing: bool
) -> dict:
    rankings = {q: [doc for doc, _ in run.rankings.get(q, [])] for q in qids}
    metrics, _ = ranking_metrics(dataset.qrels, rankings, qids)
    entry: dict = {
        "metrics": metrics,
        "latency": latency_stats([run.seconds[q] for q in qids], [run.n_docs[q] for q in qids]),
        "queries": len(qids),
    }
    if report_routing:
        pairs = [(dataset.queries[q].domain, run.experts[q]) for q in qids if dataset.queries[q].domain]
        if pairs:
            entry["routing"] = routing_metrics([g for g, _ in pairs], [p for _, p in pairs])
            entry["routing"]["experts_used"] = dict(sorted(_count(run.experts[q] for q in qids).items()))
    if config.runs_dir is not None:
        path = config.runs_dir / f"{safe_name(dataset.name)}.{safe_name(dataset.split)}.{safe_name(run.system)}.trec"
        entry["run"] = str(write_trec_run(path, {q: run.rankings[q] for q in qids}, tag=run.system))
    logger.info("%s on %s: nDCG@10 %.4f over %d queries", run.system, dataset.name, metrics["nDCG@10"], len(qids))
    return entry


def _count(items) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for item in items:
        counts[item] += 1
    return counts


def _warm_up(
    systems: Sequence[System],
    datasets: Sequence[BeirDataset],
    selected: dict[str, list[str]],
    config: EvalConfig,
) -> None:
    """One untimed call per system so lazy initialisation does not land in the first query's latency."""
    for dataset in datasets:
        for qid in selected[dataset.name]:
            candidates = dataset.run.get(qid, [])[: min(config.max_candidates, 4)]
            if not candidates:
                continue
            docs = [dataset.corpus[d] for d, _ in candidates]
            query = dataset.queries[qid]
            for system in systems:
                if isinstance(system, RerankerSystem) and system.policy == "oracle":
                    continue  # the domain of this query may have no expert; checked per dataset later
                system.rerank(query, docs)
            return
