"""LangChain conventions (issue #18): ``rerank()`` in CohereRerank's shape, ``BaseCrossEncoder`` for
``CrossEncoderReranker``, ``keep_retrieval_score`` with standard retrievers, callbacks through the run manager.

Real langchain-core / langchain-classic objects on the tiny bundle. The vector store is langchain-core's
``InMemoryVectorStore`` with its ``DeterministicFakeEmbedding`` (hash-based vectors): the retriever is the
standard ``VectorStoreRetriever``, which is what these tests are about; its ranking quality is not.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_classic")

from langchain_classic.retrievers import ContextualCompressionRetriever  # noqa: E402
from langchain_classic.retrievers.document_compressors import CrossEncoderReranker  # noqa: E402
from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.cross_encoders import BaseCrossEncoder  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.embeddings import DeterministicFakeEmbedding  # noqa: E402
from langchain_core.runnables import chain  # noqa: E402
from langchain_core.vectorstores import InMemoryVectorStore  # noqa: E402
from test_adapters_shared import CORPUS, QUERIES, corpus_texts, make_documents  # noqa: E402

from r2r_langchain import R2RCrossEncoder, R2RRerank  # noqa: E402


@pytest.fixture(scope="module")
def store():
    return InMemoryVectorStore.from_documents(make_documents(), DeterministicFakeEmbedding(size=64))


# --------------------------------------------------------------------------- rerank()


def test_rerank_returns_cohere_shaped_results(tiny_reranker):
    query = next(iter(QUERIES))
    reference = tiny_reranker.rerank(query, corpus_texts())
    rerank = R2RRerank(reranker=tiny_reranker, top_n=3)
    everything = rerank.rerank(corpus_texts(), query)  # top_n=None: every document, not the compressor's 3
    assert everything == [{"index": r.index, "relevance_score": r.score} for r in reference]
    assert rerank.rerank(make_documents(), query, top_n=2) == everything[:2]  # Documents or strings alike
    assert rerank.rerank([], query) == []
    with pytest.raises(ValueError, match="top_n"):
        rerank.rerank(corpus_texts(), query, top_n=0)
    with pytest.raises(TypeError, match=r"documents\[1\]"):
        rerank.rerank(["a passage", {"text": "a dict"}], query)
    cut = reference[len(reference) // 2].score
    thresholded = R2RRerank(reranker=tiny_reranker, score_threshold=cut).rerank(corpus_texts(), query)
    assert thresholded == [d for d in everything if d["relevance_score"] >= cut]


# --------------------------------------------------------------------------- BaseCrossEncoder


def test_cross_encoder_reranker_uses_r2r(tiny_reranker):
    encoder = R2RCrossEncoder(reranker=tiny_reranker)
    assert isinstance(encoder, BaseCrossEncoder)
    ids = list(CORPUS)
    for query in QUERIES:
        out = CrossEncoderReranker(model=encoder, top_n=3).compress_documents(make_documents(), query)
        assert [d.id for d in out] == [ids[r.index] for r in tiny_reranker.rerank(query, corpus_texts(), top_n=3)]


def test_cross_encoder_defaults_are_the_adapters_defaults():
    """R2RCrossEncoder is no pydantic model: its signature repeats the loading defaults, which must be those of
    the other adapters (EngineOptions), or an option left at its default would count as given."""
    import inspect

    from r2r_core.integration import load_defaults

    params = inspect.signature(R2RCrossEncoder.__init__).parameters
    own = {n: params[n].default for n in load_defaults()}
    assert {**own, "engine_kwargs": own["engine_kwargs"] or {}} == load_defaults()


def test_cross_encoder_scores_pairs_of_mixed_queries_in_order(tiny_reranker):
    queries = list(QUERIES)
    assert len({tiny_reranker.route(q).expert for q in queries}) >= 2  # the pairs mix experts
    docs = corpus_texts()
    pairs = [(queries[i % len(queries)], d) for i, d in enumerate(docs)]
    scores = R2RCrossEncoder(reranker=tiny_reranker).score(pairs)
    want = [tiny_reranker.score(q, [d])[0] for q, d in pairs]
    # each pair scored alone against all pairs in one rerank_batch: fp32 batching differs by ~1e-6
    assert scores == pytest.approx(want, abs=1e-4)
    fixed = R2RRerank(reranker=tiny_reranker, expert="legal").as_cross_encoder().score(pairs[:2])
    assert fixed == pytest.approx([tiny_reranker.score(q, [d], expert="legal")[0] for q, d in pairs[:2]], abs=1e-4)
    assert R2RCrossEncoder(reranker=tiny_reranker).score([]) == []
    with pytest.raises(TypeError, match=r"text_pairs\[0\]"):
        R2RCrossEncoder(reranker=tiny_reranker).score([("only a query",)])
    with pytest.raises(ValueError, match="max_length"):
        R2RCrossEncoder(max_length=8)
    with pytest.raises(ValueError, match="not both"):
        R2RCrossEncoder(reranker=tiny_reranker, batch_size=2)


# --------------------------------------------------------------------------- keep_retrieval_score


def test_keep_retrieval_score_with_a_standard_vector_store_retriever(tiny_reranker, store):
    base = store.as_retriever(search_kwargs={"k": 6})
    compressor = R2RRerank(reranker=tiny_reranker, top_n=3, keep_retrieval_score=True)
    retriever = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=base)
    query = next(iter(QUERIES))
    retrieved = [d.id for d in base.invoke(query)]
    docs = retriever.invoke(query)
    assert len(docs) == 3
    for d in docs:  # VectorStoreRetriever returns no scores, but its order is the retrieval's verdict
        assert d.metadata["retrieval_rank"] == retrieved.index(d.id)
        assert d.metadata["retrieval_score"] is None
    [plain] = R2RRerank(reranker=tiny_reranker, top_n=1).compress_documents(make_documents(), query)
    assert "retrieval_rank" not in plain.metadata and "retrieval_score" not in plain.metadata


def test_keep_retrieval_score_keeps_the_score_a_retriever_attaches(tiny_reranker, store):
    @chain
    def scored_retriever(query: str) -> list[Document]:  # LangChain's "add scores to retriever results" recipe
        docs, scores = zip(*store.similarity_search_with_score(query, k=6))
        for doc, score in zip(docs, scores):
            doc.metadata["score"] = score
        return list(docs)

    query = next(iter(QUERIES))
    by_id = {d.id: (rank, d.metadata["score"]) for rank, d in enumerate(scored_retriever.invoke(query))}
    out = R2RRerank(reranker=tiny_reranker, top_n=None, keep_retrieval_score=True).compress_documents(
        scored_retriever.invoke(query), query)
    assert len(out) == 6
    for d in out:
        assert (d.metadata["retrieval_rank"], d.metadata["retrieval_score"]) == by_id[d.id]
        assert d.metadata["score"] == by_id[d.id][1]  # the caller's key is left as it was


# --------------------------------------------------------------------------- callbacks


class _Runs(BaseCallbackHandler):
    def __init__(self):
        self.retrievers: list = []
        self.starts: list = []
        self.ends: list = []

    def on_retriever_start(self, serialized, query, *, run_id, parent_run_id=None, **kwargs):
        self.retrievers.append((run_id, kwargs.get("name") or (serialized or {}).get("name")))

    def on_chain_start(self, serialized, inputs, *, run_id, parent_run_id=None, metadata=None, **kwargs):
        self.starts.append({"run_id": run_id, "parent": parent_run_id, "name": kwargs.get("name"),
                            "inputs": inputs, "metadata": metadata or {}})

    def on_chain_end(self, outputs, *, run_id, **kwargs):
        self.ends.append({"run_id": run_id, "outputs": outputs})


def test_callbacks_see_a_child_run_of_the_retriever(tiny_reranker, tiny_bundle_dir, store):
    base = store.as_retriever(search_kwargs={"k": 6})
    retriever = ContextualCompressionRetriever(
        base_compressor=R2RRerank(reranker=tiny_reranker, top_n=2), base_retriever=base)
    query = "How much notice is needed to terminate the agreement?"
    route = tiny_reranker.route(query)
    for call in ("invoke", "ainvoke"):
        runs = _Runs()
        if call == "invoke":
            docs = retriever.invoke(query, config={"callbacks": [runs]})
        else:
            docs = asyncio.run(retriever.ainvoke(query, config={"callbacks": [runs]}))
        [start] = [s for s in runs.starts if s["name"] == "R2RRerank"]
        outer = [run_id for run_id, _ in runs.retrievers]
        assert start["parent"] == outer[0]  # the compression retriever's own run
        assert start["inputs"]["query"] == query and len(start["inputs"]["documents"]) == 6
        assert start["metadata"]["r2r_bundle"] == str(tiny_bundle_dir)
        [end] = [e for e in runs.ends if e["run_id"] == start["run_id"]]
        assert [d.id for d in end["outputs"]["documents"]] == [d.id for d in docs]
        assert end["outputs"]["r2r_expert"] == route.expert
        assert end["outputs"]["r2r_router_probabilities"] == pytest.approx(route.probabilities)
