"""LlamaIndex node postprocessor that reranks retrieved nodes with an R2R engine.

The adapter is thin on purpose: it turns ``NodeWithScore`` objects into strings, hands them to
:class:`r2r_core.R2RReranker` and turns the results back into *new* ``NodeWithScore`` objects.
Routing, expert choice and scoring all live in the core.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from llama_index.core.bridge.pydantic import Field, field_validator
from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from r2r_core import RerankResult, Route
from r2r_core.integration import (
    EngineOptions,
    check_score_threshold,
    check_top_n,
    engine_name,
    event_model_name,
)

logger = logging.getLogger(__name__)
dispatcher = get_dispatcher(__name__)

#: Metadata keys written on the returned nodes. They are excluded from the LLM and embedding text.
EXPERT_KEY = "r2r_expert"
ROUTER_PROBABILITIES_KEY = "r2r_router_probabilities"
RETRIEVAL_SCORE_KEY = "retrieval_score"


class R2RRerank(EngineOptions, BaseNodePostprocessor):
    """Rerank nodes with a domain-routed R2R reranker.

    The query is routed to a domain expert (a LoRA adapter on the shared backbone) unless
    ``expert`` fixes one; every node is scored by that expert and the ``top_n`` best come back as
    new ``NodeWithScore`` objects. The caller's nodes are never modified. Each returned node is a
    copy carrying ``metadata["r2r_expert"]`` and ``metadata["r2r_router_probabilities"]`` (and
    ``metadata["retrieval_score"]`` when ``keep_retrieval_score``), all hidden from the LLM and the
    embedding text.

    Example:
        >>> from r2r_llamaindex import R2RRerank
        >>> engine = index.as_query_engine(similarity_top_k=10, node_postprocessors=[R2RRerank(top_n=3)])
        >>> engine.query("What are the side effects of metformin?")

    Without ``reranker=``, postprocessors with equal loading options share one engine (loaded on first use,
    freed when none holds it; see :mod:`r2r_core.engines`), so building one per request is cheap. Pass
    ``reranker=`` to use an engine of your own; the loading fields then report that engine's options, so
    ``to_dict()`` says what really runs. Events (``ReRankStartEvent.model_name`` and the callback payload's
    ``MODEL_NAME``) name the bundle and the expert: ``"<bundle>:<expert>"``, e.g. ``"default:medical"``.
    """

    top_n: int | None = Field(
        default=3, description="Number of nodes to return, best first; None keeps all (reordered)."
    )
    score_threshold: float | None = Field(
        default=None,
        description="Keep only nodes whose score (a calibrated probability of relevance) is at least this; "
        "applied after top_n. None keeps them all.",
    )
    keep_retrieval_score: bool = Field(
        default=False, description='Keep the retriever\'s score in metadata["retrieval_score"].'
    )
    metadata_mode: MetadataMode = Field(
        default=MetadataMode.EMBED, description="Which node metadata goes into the text that is scored."
    )

    @field_validator("top_n")
    @classmethod
    def _check_top_n(cls, value: int | None) -> int | None:
        return check_top_n(value)

    @field_validator("score_threshold")
    @classmethod
    def _check_threshold(cls, value: float | None) -> float | None:
        return check_score_threshold(value)

    @classmethod
    def class_name(cls) -> str:
        return "R2RRerank"

    # -- the two entry points -------------------------------------------------------------------

    # The query is routed before the start events, so they can name the expert; scoring then runs with that
    # expert fixed, which gives exactly the results of routing inside the rerank call.

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        query = self._query_of(query_bundle)
        expert, route = self._route(query) if nodes else (None, None)
        name = self._model_name(expert)
        dispatcher.event(self._start_event(nodes, query_bundle, name))
        payload = self._callback_payload(nodes, query, name)
        with self.callback_manager.event(CBEventType.RERANKING, payload=payload) as event:
            results = self._rerank(query, nodes, expert) if nodes else []
            reranked = self._to_nodes(nodes, route, results)
            event.on_end(payload={EventPayload.NODES: reranked, EventPayload.MODEL_NAME: name})
        dispatcher.event(ReRankEndEvent(nodes=reranked))
        return reranked

    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        query = self._query_of(query_bundle)
        # The forward passes run in worker threads so the event loop keeps serving other queries; the
        # expert is passed per call, so concurrent queries never share state.
        expert, route = await asyncio.to_thread(self._route, query) if nodes else (None, None)
        name = self._model_name(expert)
        dispatcher.event(self._start_event(nodes, query_bundle, name))
        payload = self._callback_payload(nodes, query, name)
        with self.callback_manager.event(CBEventType.RERANKING, payload=payload) as event:
            results = await asyncio.to_thread(self._rerank, query, nodes, expert) if nodes else []
            reranked = self._to_nodes(nodes, route, results)
            event.on_end(payload={EventPayload.NODES: reranked, EventPayload.MODEL_NAME: name})
        dispatcher.event(ReRankEndEvent(nodes=reranked))
        return reranked

    # -- translation to and from the core --------------------------------------------------------

    @staticmethod
    def _query_of(query_bundle: QueryBundle | None) -> str:
        if query_bundle is None or not query_bundle.query_str.strip():
            raise ValueError(
                "R2RRerank needs a non-empty query: call postprocess_nodes(nodes, query_str=...) "
                f"or pass query_bundle=QueryBundle(...); got {query_bundle!r}"
            )
        return query_bundle.query_str

    def _route(self, query: str) -> tuple[str, Route | None]:
        """The expert for ``query``: the fixed one, or the router's choice (with its decision)."""
        if self.expert is not None:
            return self.expert, None
        route = self._engine.route(query)
        return route.expert, route

    def _rerank(self, query: str, nodes: list[NodeWithScore], expert: str) -> list[RerankResult]:
        texts = [n.node.get_content(metadata_mode=self.metadata_mode) for n in nodes]
        results = self._engine.rerank(query, texts, top_n=self.top_n, expert=expert,
                                      score_threshold=self.score_threshold)
        logger.debug("reranked %d nodes with expert %r for %r", len(texts), expert, query[:80])
        return results

    def _to_nodes(
        self, nodes: list[NodeWithScore], route: Route | None, results: list[RerankResult]
    ) -> list[NodeWithScore]:
        new_keys = [EXPERT_KEY, ROUTER_PROBABILITIES_KEY]
        if self.keep_retrieval_score:
            new_keys.append(RETRIEVAL_SCORE_KEY)
        out = []
        for result in results:
            original = nodes[result.index]
            metadata = dict(original.node.metadata)
            metadata[EXPERT_KEY] = result.expert
            metadata[ROUTER_PROBABILITIES_KEY] = dict(route.probabilities) if route is not None else {}
            if self.keep_retrieval_score:
                metadata[RETRIEVAL_SCORE_KEY] = original.score
            node = original.node.model_copy(
                update={
                    "metadata": metadata,
                    "excluded_llm_metadata_keys": _merged(original.node.excluded_llm_metadata_keys, new_keys),
                    "excluded_embed_metadata_keys": _merged(original.node.excluded_embed_metadata_keys, new_keys),
                }
            )
            out.append(NodeWithScore(node=node, score=result.score))
        return out

    def _model_name(self, expert: str | None) -> str:
        """``"<bundle>:<expert>"``; the bundle alone when there was nothing to route."""
        return event_model_name(self._engine, expert) if expert is not None else engine_name(self._engine)

    def _start_event(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None, model_name: str
    ) -> ReRankStartEvent:
        return ReRankStartEvent(query=query_bundle, nodes=nodes, top_n=self.top_n or len(nodes), model_name=model_name)

    def _callback_payload(self, nodes: list[NodeWithScore], query: str, model_name: str) -> dict[str, Any]:
        return {
            EventPayload.NODES: nodes,
            EventPayload.MODEL_NAME: model_name,
            EventPayload.QUERY_STR: query,
            EventPayload.TOP_K: self.top_n or len(nodes),
        }


def _merged(existing: list[str], extra: list[str]) -> list[str]:
    return [*existing, *(k for k in extra if k not in existing)]
