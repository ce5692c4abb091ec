"""LangChain integration for R2R: ``R2RRerank`` (a document compressor) and ``R2RCrossEncoder`` (a
``BaseCrossEncoder``), backed by :mod:`r2r_core`."""

from __future__ import annotations

try:
    import langchain_core  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('r2r_langchain needs langchain-core: pip install "r2r-rerank[langchain]"') from exc

from r2r_langchain.cross_encoder import R2RCrossEncoder
from r2r_langchain.rerank import (
    EXPERT_KEY,
    RELEVANCE_SCORE_KEY,
    RETRIEVAL_RANK_KEY,
    RETRIEVAL_SCORE_KEY,
    ROUTER_PROBABILITIES_KEY,
    R2RRerank,
)

__all__ = [
    "R2RRerank",
    "R2RCrossEncoder",
    "RELEVANCE_SCORE_KEY",
    "EXPERT_KEY",
    "ROUTER_PROBABILITIES_KEY",
    "RETRIEVAL_SCORE_KEY",
    "RETRIEVAL_RANK_KEY",
]
