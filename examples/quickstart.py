"""R2R quickstart: rerank in three lines, see the route, then drop it into LlamaIndex and LangChain.

Runs offline on CPU in well under a minute (the default reranker is built on SmolLM2-135M):

    python examples/quickstart.py
"""

from __future__ import annotations

import logging

from r2r_core import R2RReranker

QUERY = "What are the common side effects of metformin?"
DOCUMENTS = [
    "Either party may terminate this Agreement upon ninety (90) days prior written notice.",
    "Metformin is a first-line medicine for type 2 diabetes; common side effects are nausea and diarrhoea.",
    "Total revenue for fiscal 2019 was $4.2 billion, up 12% from fiscal 2018.",
    "Migraine attacks cause a throbbing headache, often with nausea and sensitivity to light.",
]


def main() -> None:
    logging.basicConfig(level=logging.WARNING)

    # 1. The core API: load once, rerank, read the results.
    reranker = R2RReranker.from_pretrained("default")
    results = reranker.rerank(QUERY, DOCUMENTS, top_n=3)
    print(f"query: {QUERY}")
    for r in results:
        print(f"  #{r.index}  score={r.score:.3f}  expert={r.expert:<10}  {r.document[:70]}")

    # 2. Which expert did the router pick, and how sure was it?
    route = reranker.route(QUERY)
    probabilities = ", ".join(f"{k}={v:.2f}" for k, v in sorted(route.probabilities.items()))
    print(f"route: {route.expert}  ({probabilities or 'no router in this bundle'})")
    print(f"experts available: {['__base__', *reranker.experts]}")

    # 3. The same engine inside LlamaIndex and LangChain (loaded once, shared).
    try:
        from llama_index.core.schema import NodeWithScore, TextNode

        from r2r_llamaindex import R2RRerank as LlamaIndexRerank
    except ImportError:
        print('LlamaIndex part skipped: pip install "r2r-rerank[llamaindex]"')
    else:
        nodes = [NodeWithScore(node=TextNode(text=d), score=0.0) for d in DOCUMENTS]
        postprocessor = LlamaIndexRerank(reranker=reranker, top_n=2)
        for n in postprocessor.postprocess_nodes(nodes, query_str=QUERY):
            print(f"  llamaindex  {n.score:.3f}  {n.node.metadata['r2r_expert']:<10}  {n.node.text[:60]}")

    try:
        from langchain_core.documents import Document

        from r2r_langchain import R2RRerank as LangChainRerank
    except ImportError:
        print('LangChain part skipped: pip install "r2r-rerank[langchain]"')
    else:
        compressor = LangChainRerank(reranker=reranker, top_n=2)
        docs = compressor.compress_documents([Document(page_content=d) for d in DOCUMENTS], QUERY)
        for d in docs:
            print(f"  langchain   {d.metadata['relevance_score']:.3f}  {d.page_content[:60]}")


if __name__ == "__main__":
    main()
