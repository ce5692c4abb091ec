"""LlamaIndex integration for R2R: ``R2RRerank``, a node postprocessor backed by :mod:`r2r_core`."""

from __future__ import annotations

try:
    import llama_index.core  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('r2r_llamaindex needs llama-index-core: pip install "r2r-rerank[llamaindex]"') from exc

from r2r_llamaindex.rerank import EXPERT_KEY, RETRIEVAL_SCORE_KEY, ROUTER_PROBABILITIES_KEY, R2RRerank

__all__ = ["R2RRerank", "EXPERT_KEY", "ROUTER_PROBABILITIES_KEY", "RETRIEVAL_SCORE_KEY"]
