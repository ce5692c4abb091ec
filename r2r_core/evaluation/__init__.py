"""Evaluation of rerankers on BEIR-format folders: metrics, systems, harness, report and plots.

``r2r eval`` is the command-line entry point (:mod:`r2r_core.evaluation.cli`).
"""

from __future__ import annotations

from .fusion import linear_fusion, reciprocal_rank_fusion
from .harness import EvalConfig, SystemRun, evaluate, run_system, select_queries, write_trec_run
from .metrics import MEASURES, latency_stats, ranking_metrics, routing_metrics
from .report import format_report
from .systems import MAIN_SYSTEMS, FirstStageSystem, MiniLMSystem, RerankerSystem, RoutedSystem, System

__all__ = [
    "MAIN_SYSTEMS",
    "MEASURES",
    "EvalConfig",
    "FirstStageSystem",
    "MiniLMSystem",
    "RerankerSystem",
    "RoutedSystem",
    "System",
    "SystemRun",
    "evaluate",
    "format_report",
    "latency_stats",
    "linear_fusion",
    "ranking_metrics",
    "reciprocal_rank_fusion",
    "routing_metrics",
    "run_system",
    "select_queries",
    "write_trec_run",
]
