"""``R2RCrossEncoder``: langchain-core's ``BaseCrossEncoder`` on an R2R engine.

For code built around ``CrossEncoderReranker(model=...)`` (langchain-classic) or any other consumer of
``BaseCrossEncoder.score``. Pairs may mix queries: each distinct query is routed to its expert (unless
``expert`` fixes one) and all pairs are scored in one ``rerank_batch`` call. Scores are probabilities of
relevance in [0, 1], in the order of the pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.cross_encoders import BaseCrossEncoder

from r2r_core import R2RReranker
from r2r_core.integration import (
    check_engine_kwargs,
    check_max_length,
    check_positive,
    load_defaults,
    resolve_engine,
)

__all__ = ["R2RCrossEncoder"]


class R2RCrossEncoder(BaseCrossEncoder):
    """Score ``(query, document)`` pairs with a domain-routed R2R reranker.

    Example:
        >>> from langchain_classic.retrievers.document_compressors import CrossEncoderReranker
        >>> from r2r_langchain import R2RCrossEncoder
        >>> compressor = CrossEncoderReranker(model=R2RCrossEncoder(), top_n=3)

    Pass ``reranker=`` to use a loaded engine; otherwise the loading options select a shared engine exactly as
    :class:`r2r_langchain.R2RRerank`'s do (equal options share one; ``max_length=None`` is the bundle's trained
    length, else 512).
    """

    def __init__(self, reranker: R2RReranker | None = None, *, model: str = "default", device: str | None = None,
                 dtype: str = "auto", batch_size: int = 16, max_length: int | None = None,
                 template: str | None = None, instruction: str | None = None, trust_remote_code: bool = False,
                 engine_kwargs: dict[str, Any] | None = None, expert: str | None = None):
        values = {"model": model, "device": device, "dtype": dtype, "batch_size": batch_size,
                  "max_length": max_length, "template": template, "instruction": instruction,
                  "trust_remote_code": trust_remote_code, "engine_kwargs": engine_kwargs or {}}
        given = {name for name, default in load_defaults().items() if values[name] != default}
        self.expert = expert
        self.engine = resolve_engine(
            reranker, given, model=model, device=device, dtype=dtype,
            batch_size=check_positive("batch_size", batch_size),
            max_length=None if max_length is None else check_max_length(max_length), template=template,
            instruction=instruction, trust_remote_code=trust_remote_code,
            engine_kwargs=check_engine_kwargs(engine_kwargs), expert=expert,
        )

    def score(self, text_pairs: Sequence[tuple[str, str]]) -> list[float]:
        """The probability that each pair's document answers its query, in the order of ``text_pairs``."""
        queries: dict[str, int] = {}
        docs: list[list[str]] = []
        where: list[tuple[int, int]] = []
        for i, pair in enumerate(text_pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise TypeError(f"`text_pairs[{i}]` must be a (query, document) pair of strings, got {pair!r}")
            q = queries.setdefault(pair[0], len(queries))
            if q == len(docs):
                docs.append([])
            where.append((q, len(docs[q])))
            docs[q].append(pair[1])
        if not where:
            return []
        experts = [self.expert] * len(docs) if self.expert is not None else None
        ranked = self.engine.rerank_batch(list(queries), docs, experts=experts)
        by_index = [{r.index: r.score for r in rs} for rs in ranked]
        return [by_index[q][j] for q, j in where]
