"""Behaviour shared by the LlamaIndex and LangChain adapters, and the small corpus both suites use.

The corpus is hand-written for these tests (no project data is copied): four short passages per
domain, each query below has exactly one passage that answers it.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("langchain_core")

from langchain_core.documents import Document  # noqa: E402
from llama_index.core.schema import NodeWithScore, TextNode  # noqa: E402

from r2r_core import R2RReranker  # noqa: E402

CORPUS: dict[str, tuple[str, str]] = {
    # id: (domain, text)
    "med-metformin": (
        "medical",
        "Metformin is a first-line medicine for type 2 diabetes. Common side effects are nausea, "
        "diarrhoea and stomach pain; rarely it causes lactic acidosis.",
    ),
    "med-asthma": (
        "medical",
        "Asthma inhalers: a reliever inhaler (salbutamol) opens the airways within minutes, a preventer "
        "inhaler (a corticosteroid) reduces airway inflammation when used every day.",
    ),
    "med-flu": (
        "medical",
        "Influenza vaccination is recommended every autumn for adults over 65, pregnant women and "
        "people with chronic heart or lung disease.",
    ),
    "med-migraine": (
        "medical",
        "Migraine attacks cause a throbbing headache on one side, often with nausea and sensitivity to "
        "light; triptans can stop an attack if taken early.",
    ),
    "law-termination": (
        "legal",
        "Either party may terminate this Agreement for convenience upon ninety (90) days prior written "
        "notice to the other party.",
    ),
    "law-cookies": (
        "legal",
        "We use cookies and similar tracking technologies to remember your preferences; you can disable "
        "cookies in your browser settings, but some features may stop working.",
    ),
    "law-liability": (
        "legal",
        "In no event shall either party's aggregate liability arising out of this Agreement exceed the "
        "fees paid in the twelve months preceding the claim.",
    ),
    "law-governing": (
        "legal",
        "This Agreement shall be governed by and construed in accordance with the laws of the State of "
        "Delaware, without regard to its conflict of laws principles.",
    ),
    "fin-revenue": (
        "financial",
        "Total revenue for fiscal 2019 was $4.2 billion, up 12% from $3.75 billion in fiscal 2018, driven "
        "by growth in subscription services.",
    ),
    "fin-dividend": (
        "financial",
        "The Board declared a quarterly cash dividend of $0.25 per share, payable on March 15 to "
        "shareholders of record on February 28.",
    ),
    "fin-debt": (
        "financial",
        "Long-term debt decreased to $1.1 billion at year end after the company repaid its 2020 senior "
        "notes with cash from operations.",
    ),
    "fin-margin": (
        "financial",
        "Gross margin improved to 41.3% from 39.8%, mainly because of lower component costs and a "
        "favourable product mix.",
    ),
}

QUERIES: dict[str, str] = {
    # query: the id of the passage that answers it
    "What are the side effects of metformin?": "med-metformin",
    "How much notice is needed to terminate the agreement?": "law-termination",
    "What was the total revenue in fiscal 2019?": "fin-revenue",
}


def corpus_texts() -> list[str]:
    return [text for _, text in CORPUS.values()]


def make_nodes() -> list[NodeWithScore]:
    """LlamaIndex nodes with retrieval scores and metadata, in corpus order."""
    return [
        NodeWithScore(
            node=TextNode(id_=doc_id, text=text, metadata={"domain": domain, "source": f"{doc_id}.txt"}),
            score=1.0 - i / 100,
        )
        for i, (doc_id, (domain, text)) in enumerate(CORPUS.items())
    ]


def make_documents() -> list[Document]:
    return [
        Document(id=doc_id, page_content=text, metadata={"domain": domain, "source": f"{doc_id}.txt"})
        for doc_id, (domain, text) in CORPUS.items()
    ]


def test_both_adapters_share_one_engine_without_loading(tiny_reranker, monkeypatch):
    from r2r_langchain import R2RRerank as LCRerank
    from r2r_llamaindex import R2RRerank as LIRerank

    def no_load(*args, **kwargs):
        raise AssertionError(f"an adapter given an engine must not load a model (called with {args})")

    monkeypatch.setattr(R2RReranker, "from_pretrained", classmethod(no_load))
    adapters = [
        LIRerank(reranker=tiny_reranker),
        LIRerank(reranker=tiny_reranker, top_n=1),
        LCRerank(reranker=tiny_reranker),
    ]
    assert all(a.engine is tiny_reranker for a in adapters)
    assert len({id(a.engine.backbone.model) for a in adapters}) == 1


@pytest.mark.parametrize("field", ["model", "device", "dtype", "batch_size"])
def test_engine_and_loading_options_are_exclusive(tiny_reranker, field):
    from r2r_langchain import R2RRerank as LCRerank
    from r2r_llamaindex import R2RRerank as LIRerank

    value = {"model": "default", "device": "cpu", "dtype": "float32", "batch_size": 4}[field]
    for cls in (LIRerank, LCRerank):
        with pytest.raises(ValueError, match=field):
            cls(reranker=tiny_reranker, **{field: value})


def test_both_adapters_give_the_same_ranking_as_the_core(tiny_reranker):
    from r2r_langchain import R2RRerank as LCRerank
    from r2r_llamaindex import R2RRerank as LIRerank

    query = next(iter(QUERIES))
    reference = tiny_reranker.rerank(query, corpus_texts(), top_n=5)
    li = LIRerank(reranker=tiny_reranker, top_n=5, metadata_mode="none").postprocess_nodes(
        make_nodes(), query_str=query
    )
    lc = LCRerank(reranker=tiny_reranker, top_n=5).compress_documents(make_documents(), query)
    ids = list(CORPUS)
    assert [n.node.node_id for n in li] == [ids[r.index] for r in reference]
    assert [d.id for d in lc] == [ids[r.index] for r in reference]
    assert [n.score for n in li] == pytest.approx([r.score for r in reference])
    assert [d.metadata["relevance_score"] for d in lc] == pytest.approx([r.score for r in reference])
    assert {n.node.metadata["r2r_expert"] for n in li} == {d.metadata["r2r_expert"] for d in lc}


def test_bad_input_behaves_like_the_core(tiny_reranker):
    from r2r_langchain import R2RRerank as LCRerank
    from r2r_llamaindex import R2RRerank as LIRerank

    li, lc = LIRerank(reranker=tiny_reranker, top_n=50), LCRerank(reranker=tiny_reranker, top_n=50)
    assert li.postprocess_nodes([], query_str="anything") == []
    assert lc.compress_documents([], "anything") == []
    with pytest.raises(ValueError, match="query"):
        li.postprocess_nodes(make_nodes())
    with pytest.raises(ValueError, match="query"):
        lc.compress_documents(make_documents(), "")
    assert len(li.postprocess_nodes(make_nodes(), query_str="notice period")) == len(CORPUS)
    assert len(lc.compress_documents(make_documents(), "notice period")) == len(CORPUS)
    for cls in (LIRerank, LCRerank):
        with pytest.raises(ValueError, match="top_n"):
            cls(reranker=tiny_reranker, top_n=0)
        with pytest.raises(KeyError, match="legal"):
            cls(reranker=tiny_reranker, expert="astrology")


def test_score_threshold_applies_after_top_n_in_the_core_and_both_adapters(tiny_reranker):
    from r2r_langchain import R2RRerank as LCRerank
    from r2r_llamaindex import R2RRerank as LIRerank

    query = next(iter(QUERIES))
    full = tiny_reranker.rerank(query, corpus_texts())
    scores = sorted({r.score for r in full}, reverse=True)
    cut = scores[len(scores) // 2]  # a threshold that keeps about half of them
    kept = tiny_reranker.rerank(query, corpus_texts(), score_threshold=cut)
    assert kept == [r for r in full if r.score >= cut] and 0 < len(kept) < len(full)
    top3 = tiny_reranker.rerank(query, corpus_texts(), top_n=3, score_threshold=cut)
    assert top3 == [r for r in full[:3] if r.score >= cut]
    [batch] = tiny_reranker.rerank_batch([query], [corpus_texts()], score_threshold=cut)
    assert [r.index for r in batch] == [r.index for r in kept]
    assert tiny_reranker.rerank(query, corpus_texts(), score_threshold=1.0) == [r for r in full if r.score >= 1.0]
    route, with_route = tiny_reranker.rerank_with_route(query, corpus_texts(), score_threshold=cut)
    assert with_route == kept and route == tiny_reranker.route(query)
    ids = list(CORPUS)
    li = LIRerank(reranker=tiny_reranker, top_n=None, score_threshold=cut, metadata_mode="none").postprocess_nodes(
        make_nodes(), query_str=query)
    lc = LCRerank(reranker=tiny_reranker, top_n=None, score_threshold=cut).compress_documents(make_documents(), query)
    assert [n.node.node_id for n in li] == [ids[r.index] for r in kept]
    assert [d.id for d in lc] == [ids[r.index] for r in kept]
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="score_threshold"):
            tiny_reranker.rerank(query, corpus_texts(), score_threshold=bad)
    for bad in (-0.1, 1.5):  # pydantic coerces "0.5" and True to floats, as for its other number fields
        with pytest.raises(ValueError, match="score_threshold"):
            LIRerank(reranker=tiny_reranker, score_threshold=bad)
        with pytest.raises(ValueError, match="score_threshold"):
            LCRerank(reranker=tiny_reranker, score_threshold=bad)
