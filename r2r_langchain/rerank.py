"""LangChain document compressor that reranks retrieved documents with an R2R engine.

Thin by design: documents become strings for :class:`r2r_core.R2RReranker`, results become
*copies* of the documents with the score, the expert and the router probabilities in metadata.
Besides the compressor interface it has ``rerank(documents, query, *, top_n=None)``, the
``[{"index", "relevance_score"}]`` method of ``CohereRerank`` and ``JinaRerank``, and
:meth:`R2RRerank.as_cross_encoder` for ``CrossEncoderReranker(model=...)``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManager, CallbackManager, Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict, Field, field_validator

from r2r_core import RerankResult, Route
from r2r_core.integration import (
    EngineOptions,
    check_score_threshold,
    check_top_n,
    engine_name,
)

logger = logging.getLogger(__name__)

#: Metadata keys written on the returned documents.
RELEVANCE_SCORE_KEY = "relevance_score"
EXPERT_KEY = "r2r_expert"
ROUTER_PROBABILITIES_KEY = "r2r_router_probabilities"
RETRIEVAL_SCORE_KEY = "retrieval_score"
RETRIEVAL_RANK_KEY = "retrieval_rank"
#: Where ``keep_retrieval_score`` looks for the retriever's score, in this order: an earlier reranker's
#: (``CohereRerank``, ``FlashrankRerank``, ...) and the key of LangChain's "add scores to retriever results" recipe.
RETRIEVAL_SCORE_SOURCES = ("relevance_score", "score")


class R2RRerank(EngineOptions, BaseDocumentCompressor):
    """Rerank documents with a domain-routed R2R reranker.

    The query is routed to a domain expert (a LoRA adapter on the shared backbone) unless
    ``expert`` fixes one; the ``top_n`` best documents come back, best first, as copies carrying
    ``metadata["relevance_score"]`` (a probability in [0, 1]), ``metadata["r2r_expert"]`` and
    ``metadata["r2r_router_probabilities"]``. The caller's documents are never modified.

    Example:
        >>> from langchain_classic.retrievers import ContextualCompressionRetriever
        >>> from r2r_langchain import R2RRerank
        >>> retriever = ContextualCompressionRetriever(
        ...     base_compressor=R2RRerank(top_n=3), base_retriever=store.as_retriever(search_kwargs={"k": 10})
        ... )
        >>> retriever.invoke("What are the side effects of metformin?")

    Without ``reranker=``, compressors with equal loading options share one engine (loaded on first use,
    freed when none holds it; see :mod:`r2r_core.engines`), so building one per request is cheap. Pass
    ``reranker=`` to use an engine of your own; the loading fields then report that engine's options.

    Callbacks: each ``compress_documents`` / ``acompress_documents`` call is a child run named ``R2RRerank``
    of the run that passed ``callbacks`` (a ``ContextualCompressionRetriever`` passes its run manager's
    child), so handlers and tracers see ``on_chain_start`` with the query, the documents and, in
    ``metadata``, the bundle, and ``on_chain_end`` with the reranked documents, the expert and the router
    probabilities (``on_chain_error`` on failure).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    top_n: int | None = Field(
        default=3, description="Number of documents to return, best first; None keeps all (reordered)."
    )
    score_threshold: float | None = Field(
        default=None,
        description="Keep only documents whose score (a calibrated probability of relevance) is at least this; "
        "applied after top_n. None keeps them all.",
    )
    keep_retrieval_score: bool = Field(
        default=False,
        description='Keep what the retriever said: metadata["retrieval_rank"] is the document\'s 0-based position '
        'in the retrieved list (every retriever orders its results), metadata["retrieval_score"] the score it '
        'arrived with in metadata["relevance_score"] or metadata["score"] (None if it had neither).',
    )
    metadata_keys: list[str] = Field(
        default_factory=list,
        description='Metadata fields put before page_content as "key: value" lines in the scored text '
        "(the LangChain counterpart of LlamaIndex's metadata mode); empty scores page_content alone.",
    )

    @field_validator("top_n")
    @classmethod
    def _check_top_n(cls, value: int | None) -> int | None:
        return check_top_n(value)

    @field_validator("score_threshold")
    @classmethod
    def _check_threshold(cls, value: float | None) -> float | None:
        return check_score_threshold(value)

    def as_cross_encoder(self):
        """An :class:`r2r_langchain.R2RCrossEncoder` on this compressor's engine and expert, for
        ``CrossEncoderReranker(model=...)``."""
        from r2r_langchain.cross_encoder import R2RCrossEncoder

        return R2RCrossEncoder(reranker=self._engine, expert=self.expert)

    def rerank(self, documents: Sequence[str | Document], query: str, *, top_n: int | None = None
               ) -> list[dict[str, Any]]:
        """``[{"index": i, "relevance_score": s}, ...]`` best first, as ``CohereRerank.rerank`` returns: ``index``
        is the position in ``documents`` (strings or Documents), ``s`` the probability of relevance. ``top_n``
        None returns every document; ``score_threshold`` and ``expert`` apply as in :meth:`compress_documents`."""
        _check_query(query)
        check_top_n(top_n)
        texts = []
        for i, d in enumerate(documents):
            if isinstance(d, Document):
                texts.append(self._text_of(d))
            elif isinstance(d, str):
                texts.append(d)
            else:
                raise TypeError(f"`documents[{i}]` must be a str or a langchain Document, got {type(d).__name__}")
        results = self._engine.rerank(query, texts, top_n=top_n, expert=self.expert,
                                      score_threshold=self.score_threshold)
        return [{"index": r.index, "relevance_score": r.score} for r in results]

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """Return the ``top_n`` most relevant documents for ``query``, as scored copies, best first."""
        _check_query(query)
        run = CallbackManager.configure(
            inheritable_callbacks=callbacks, local_metadata=self._run_metadata()
        ).on_chain_start(None, {"query": query, "documents": list(documents)}, name="R2RRerank")
        try:
            route, results = self._rerank(query, documents) if documents else (None, [])
            out = self._to_documents(documents, route, results)
        except BaseException as exc:
            run.on_chain_error(exc)
            raise
        run.on_chain_end(self._run_outputs(out, route, results))
        return out

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """Async :meth:`compress_documents`: the forward passes run in a worker thread."""
        _check_query(query)
        run = await AsyncCallbackManager.configure(
            inheritable_callbacks=callbacks, local_metadata=self._run_metadata()
        ).on_chain_start(None, {"query": query, "documents": list(documents)}, name="R2RRerank")
        try:
            # The expert is passed per call, so concurrent queries of different domains never share state.
            route, results = await asyncio.to_thread(self._rerank, query, documents) if documents else (None, [])
            out = self._to_documents(documents, route, results)
        except BaseException as exc:
            await run.on_chain_error(exc)
            raise
        await run.on_chain_end(self._run_outputs(out, route, results))
        return out

    def _run_metadata(self) -> dict[str, Any]:
        return {"r2r_bundle": engine_name(self._engine), "r2r_fixed_expert": self.expert}

    @staticmethod
    def _run_outputs(out: list[Document], route: Route | None, results: list[RerankResult]) -> dict[str, Any]:
        return {
            "documents": out,
            EXPERT_KEY: results[0].expert if results else route.expert if route is not None else None,
            ROUTER_PROBABILITIES_KEY: dict(route.probabilities) if route is not None else {},
        }

    # -- translation to and from the core --------------------------------------------------------

    def _text_of(self, document: Document) -> str:
        if not self.metadata_keys:
            return document.page_content
        lines = [f"{k}: {document.metadata[k]}" for k in self.metadata_keys if k in document.metadata]
        return "\n".join(lines) + "\n\n" + document.page_content if lines else document.page_content

    def _rerank(self, query: str, documents: Sequence[Document]) -> tuple[Route | None, list[RerankResult]]:
        texts = [self._text_of(d) for d in documents]
        route, results = self._engine.rerank_with_route(query, texts, top_n=self.top_n, expert=self.expert,
                                                        score_threshold=self.score_threshold)
        logger.debug("reranked %d documents with expert %r for %r", len(texts),
                     results[0].expert if results else self.expert, query[:80])
        return route, results

    def _to_documents(
        self, documents: Sequence[Document], route: Route | None, results: list[RerankResult]
    ) -> list[Document]:
        out = []
        for result in results:
            original = documents[result.index]
            metadata = dict(original.metadata)
            if self.keep_retrieval_score:
                metadata[RETRIEVAL_RANK_KEY] = result.index
                metadata[RETRIEVAL_SCORE_KEY] = next(
                    (metadata[k] for k in RETRIEVAL_SCORE_SOURCES if metadata.get(k) is not None), None)
            metadata[RELEVANCE_SCORE_KEY] = result.score
            metadata[EXPERT_KEY] = result.expert
            metadata[ROUTER_PROBABILITIES_KEY] = dict(route.probabilities) if route is not None else {}
            out.append(original.model_copy(update={"metadata": metadata}))
        return out


def _check_query(query: Any) -> None:
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"R2RRerank needs a non-empty query string, got {query!r}")
