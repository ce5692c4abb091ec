"""A fourth domain the bundle has no expert for (issue 16): Python questions over Python's own reference docs.

Builds a small BEIR-format set, ``pydocs``, in ``--out`` from the ``pydoc_data.topics`` module of the running
Python (the language reference's topics, shipped with every CPython): each topic is cut into passages of about
``--chars`` characters at paragraph breaks; the queries are the hand-written questions of
``benchmarks/data/fourth_domain_queries.tsv`` (topic, question), each judged relevant to the first passage of its
topic (the topic's opening, which states what the construct does); the first-stage run is BM25 (curation's
``BM25Retriever``: bm25s, Lucene k1=1.5, b=0.75, English stemmer) top ``--depth`` over all passages. Then::

    r2r eval --data OUT --split dev --systems first-stage minilm r2r --bundle default --max-candidates 20 ...

compares the router's choice with the generalist and the backbone on a domain none of them was trained for.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

QUERIES = Path(__file__).resolve().parent / "data" / "fourth_domain_queries.tsv"


def passages(text: str, chars: int) -> list[str]:
    """Consecutive paragraphs joined up to about ``chars`` characters (a paragraph is never split)."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text.strip()):
        para = " ".join(para.split())
        if cur and len(cur) + len(para) > chars:
            out.append(cur)
            cur = ""
        cur = f"{cur} {para}".strip()
    if cur:
        out.append(cur)
    return out


def build(out: Path, chars: int = 700, depth: int = 20) -> Path:
    from pydoc_data.topics import topics

    from r2r_core.data import BeirDataset, Doc, Query
    from r2r_core.training.curation import BM25Retriever

    rows = [ln.split("\t") for ln in QUERIES.read_text(encoding="utf-8").splitlines() if ln.strip() and ln[0] != "#"]
    corpus = []
    first: dict[str, str] = {}
    for key in sorted(topics):
        for i, text in enumerate(passages(topics[key], chars)):
            doc_id = f"{key}-{i}"
            first.setdefault(key, doc_id)
            corpus.append({"_id": doc_id, "title": "", "text": text})
    unknown = sorted({k for k, _ in rows} - set(first))
    if unknown:
        raise ValueError(f"{QUERIES}: topics not in this Python's pydoc_data.topics: {unknown}")
    root = out / "code" / "pydocs"
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "runs").mkdir(exist_ok=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(d) + "\n" for d in corpus)
    queries = [{"_id": f"pydocs-q{i}", "text": q.strip(), "metadata": {"domain": "code", "dataset": "pydocs",
                                                                     "split": "dev"}} for i, (_, q) in enumerate(rows)]
    with open(root / "queries.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(q) + "\n" for q in queries)
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q['_id']}\t{first[k]}\t1\n" for q, (k, _) in zip(queries, rows)), encoding="utf-8")
    docs = {d["_id"]: Doc(d["_id"], d["title"], d["text"]) for d in corpus}
    index = BeirDataset(root, "pydocs", "dev", docs, {}, {}, {})  # the corpus BM25Retriever indexes
    bm25 = BM25Retriever()
    with open(root / "runs" / "dev.trec", "w", encoding="utf-8") as fh:
        for q in queries:
            for rank, (doc_id, score) in enumerate(bm25.scored(index, Query(q["_id"], q["text"]), depth), 1):
                fh.write(f"{q['_id']} Q0 {doc_id} {rank} {score:.4f} bm25\n")
    return root


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to write code/pydocs/ into")
    ap.add_argument("--chars", type=int, default=700)
    ap.add_argument("--depth", type=int, default=20)
    args = ap.parse_args(argv)
    print(build(Path(args.out), args.chars, args.depth))


if __name__ == "__main__":
    main()
