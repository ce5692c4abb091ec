"""LangChain document compressor that reranks retrieved documents with an R2R engine.

Thin by design: documents become strings for :class:`r2r_core.R2RReranker`, results become
*copies* of the documents with the score, the expert and the router probabilities in metadata.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict, Field, PrivateAttr, field_validator

from r2r_core import R2RReranker, RerankResult, Route
from r2r_core.integration import check_positive, check_score_threshold, check_top_n, resolve_engine

logger = logging.getLogger(__name__)

#: Metadata keys written on the returned documents.
RELEVANCE_SCORE_KEY = "relevance_score"
EXPERT_KEY = "r2r_expert"
ROUTER_PROBABILITIES_KEY = "r2r_router_probabilities"
RETRIEVAL_SCORE_KEY = "retrieval_score"


class R2RRerank(BaseDocumentCompressor):
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

    Pass ``reranker=`` to share one loaded engine between several compressors (or with the
    LlamaIndex adapter); the model is then loaded once.
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
    model: str = Field(
        default="default",
        description='"default" (the bundled reranker), a bundle directory or a causal LM id/path.',
    )
    device: str | None = Field(default=None, description="cuda / mps / cpu; None picks the best one.")
    dtype: str = Field(default="auto", description='"auto", "float32", "bfloat16" or "float16".')
    batch_size: int = Field(default=16, description="Query-document pairs per forward pass.")
    max_length: int = Field(default=512, description="Prompt length in tokens; only documents are cut.")
    keep_retrieval_score: bool = Field(
        default=False,
        description='Move an incoming metadata["relevance_score"] to metadata["retrieval_score"] '
        "instead of overwriting it.",
    )
    metadata_keys: list[str] = Field(
        default_factory=list,
        description='Metadata fields put before page_content as "key: value" lines in the scored text '
        "(the LangChain counterpart of LlamaIndex's metadata mode); empty scores page_content alone.",
    )
    expert: str | None = Field(
        default=None, description='Always use this expert ("__base__" = no adapter); None routes per query.'
    )
    reranker: R2RReranker | None = Field(
        default=None, exclude=True, description="An already loaded R2RReranker to share."
    )

    _engine: R2RReranker = PrivateAttr()

    @field_validator("top_n")
    @classmethod
    def _check_top_n(cls, value: int | None) -> int | None:
        return check_top_n(value)

    @field_validator("score_threshold")
    @classmethod
    def _check_threshold(cls, value: float | None) -> float | None:
        return check_score_threshold(value)

    @field_validator("batch_size", "max_length")
    @classmethod
    def _check_positive(cls, value: int, info: Any) -> int:
        return check_positive(info.field_name, value)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        self._engine = resolve_engine(
            self.reranker,
            self.model_fields_set,
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            batch_size=self.batch_size,
            max_length=self.max_length,
            expert=self.expert,
        )

    @property
    def engine(self) -> R2RReranker:
        """The loaded :class:`r2r_core.R2RReranker` (pass it as ``reranker=`` to share it)."""
        return self._engine

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """Return the ``top_n`` most relevant documents for ``query``, as scored copies, best first."""
        _check_query(query)
        if not documents:
            return []
        route, results = self._rerank(query, documents)
        return self._to_documents(documents, route, results)

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """Async :meth:`compress_documents`: the forward passes run in a worker thread."""
        _check_query(query)
        if not documents:
            return []
        # The expert is passed per call, so concurrent queries of different domains never share state.
        route, results = await asyncio.to_thread(self._rerank, query, documents)
        return self._to_documents(documents, route, results)

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
            if self.keep_retrieval_score and RELEVANCE_SCORE_KEY in metadata:
                metadata[RETRIEVAL_SCORE_KEY] = metadata[RELEVANCE_SCORE_KEY]
            metadata[RELEVANCE_SCORE_KEY] = result.score
            metadata[EXPERT_KEY] = result.expert
            metadata[ROUTER_PROBABILITIES_KEY] = dict(route.probabilities) if route is not None else {}
            out.append(original.model_copy(update={"metadata": metadata}))
        return out


def _check_query(query: Any) -> None:
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"R2RRerank needs a non-empty query string, got {query!r}")
