"""The inputs of ``benchmarks/speed.py`` (and ``flop_bound.py``): one-query workloads of equal-length random-word
documents or of MEDIQA answers, and a batch of queries with their experts fixed."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from r2r_core import R2RReranker

logger = logging.getLogger("speed")

__all__ = ["DOC_TOKENS", "DOMAIN_QUERIES", "EXPERTS", "QUERY", "SIZES", "Workload", "build_workloads",
           "equal_docs", "word_pool"]

QUERY = "What are the common side effects of long-term metformin use in elderly patients with kidney disease?"
DOMAIN_QUERIES = {  # fit the router and seed the 64-query batch
    "legal": ["Can the licensee terminate the agreement for convenience?",
              "What does the privacy policy say about sharing data with third parties?",
              "Which court has jurisdiction over disputes under this contract?",
              "Is there a non-compete clause in the agreement?"],
    "medical": ["What are the side effects of metformin?", "How is type 2 diabetes diagnosed?",
                "What is the recommended dose of ibuprofen for adults?", "What causes high blood pressure?"],
    "financial": ["What was the company's revenue growth in 2019?",
                  "How much did operating expenses change year over year?",
                  "What is the net income attributable to shareholders?",
                  "What was the total debt at the end of the fiscal year?"],
}
EXPERTS = list(DOMAIN_QUERIES)
# workload -> (full size, quick size); batch64: (queries, docs per query)
SIZES = {"equal20": (20, 2), "equal100": (100, 4), "equal1000": (1000, 6), "natural100": (100, 3),
         "batch64": ((64, 8), (3, 1)), "router": (20, 4)}
DOC_TOKENS = 150


@dataclass
class Workload:
    name: str
    queries: list[str]
    docs: list[list[str]]
    experts: list[str] | None = None
    note: str = ""
    tokens: dict = field(default_factory=dict)

    @property
    def n_docs(self) -> int:
        return sum(len(d) for d in self.docs)


def word_pool(tokenizer, doc_sep: str, seed: int = 0) -> list[str]:
    """Lower-case words that are one token each after ``doc_sep`` or a space."""
    words = sorted({t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isascii()
                    and t[1:].isalpha() and t[1:].islower() and 3 <= len(t) - 1 <= 9})
    ids = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    words = [w for w, i in zip(words, ids) if len(i) == 1]
    random.Random(seed).shuffle(words)
    return words[:8000]


def equal_docs(tokenizer, doc_sep: str, pool: list[str], n: int, n_tokens: int, seed: int) -> list[str]:
    """``n`` random-word documents, each exactly ``n_tokens`` tokens as the engine encodes them."""
    rng, docs = random.Random(seed), []
    for _ in range(n):
        words = [rng.choice(pool) for _ in range(n_tokens)]
        while True:
            length = len(tokenizer(doc_sep + " ".join(words), add_special_tokens=False)["input_ids"])
            if length == n_tokens:
                break
            words = words[:-1] if length > n_tokens else [*words, rng.choice(pool)]
        docs.append(" ".join(words))
    return docs


def natural_workload(rr: R2RReranker, n_docs: int, data_root: Path) -> Workload | None:
    """The MEDIQA dev query with the most answers; its answers, then other MEDIQA answers (run order) up to
    ``n_docs``; each cut so that the whole prompt fits ``max_length`` (no engine truncates)."""
    from r2r_core.data import load_beir

    root = data_root / "medical" / "mediqa"
    if not (root / "corpus.jsonl").is_file():
        return None
    ds = load_beir(root, "dev")
    qid = max(sorted(ds.run), key=lambda q: len(ds.run[q]))
    order = [d for d, _ in ds.run[qid]] + [d for q in sorted(ds.run) if q != qid for d, _ in ds.run[q]]
    order += sorted(ds.corpus)
    picked = list(dict.fromkeys(order))[:n_docs]
    tok, enc, query = rr.tokenizer, rr.encoder, ds.queries[qid].text
    sep = rr.template.doc_sep
    budget = enc.doc_budget(len(enc.prefix_ids(rr.instruction, query)), len(enc.suffix_ids(rr.instruction)))
    docs = []
    for did in picked:
        text = ds.corpus[did].full_text
        ids = full = tok(sep + text, add_special_tokens=False)["input_ids"]
        keep = budget
        while len(ids) > budget:  # re-encoding a decoded prefix may merge differently: check, cut further
            text = tok.decode(full[:keep]).removeprefix(sep)
            ids, keep = tok(sep + text, add_special_tokens=False)["input_ids"], keep - 1
        docs.append(text)
    return Workload("natural100", [query], [docs],
                    note=f"MEDIQA dev query {qid} ({len(ds.run[qid])} own answers, filled with other MEDIQA "
                         f"answers), documents cut to fit max_length={enc.max_length}")


def equal_workload(name: str, rr: R2RReranker, pool: list[str], n_docs: int, seed: int) -> Workload:
    """One query and ``n_docs`` random-word documents of exactly :data:`DOC_TOKENS` tokens each."""
    docs = equal_docs(rr.tokenizer, rr.template.doc_sep, pool, n_docs, DOC_TOKENS, seed=seed)
    return Workload(name, [QUERY], [docs], note=f"{DOC_TOKENS}-token random-word documents")


def batch_workload(rr: R2RReranker, pool: list[str], n_queries: int, per_query: int) -> Workload:
    """``n_queries`` queries of the three domains in turn, each with its expert fixed and ``per_query``
    equal-length documents (``rerank_batch``)."""
    queries = [f"{DOMAIN_QUERIES[EXPERTS[i % 3]][(i // 3) % 4]} Case {i}." for i in range(n_queries)]
    docs = [equal_docs(rr.tokenizer, rr.template.doc_sep, pool, per_query, DOC_TOKENS, seed=1000 + i)
            for i in range(n_queries)]
    return Workload("batch64", queries, docs, [EXPERTS[i % 3] for i in range(n_queries)],
                    note=f"{n_queries} queries x {per_query} docs, experts fixed per query, 3 experts")


def count_tokens(rr: R2RReranker, wl: Workload) -> Workload:
    """Fill ``wl.tokens`` with the prefix and tail lengths the engine actually processes."""
    prefix_lens, tails = [], []
    for q, d in zip(wl.queries, wl.docs):
        prefix, t = rr.encoder.encode(rr.instruction, q, d)
        prefix_lens.append(len(prefix))
        tails.append([len(x) for x in t])
    wl.tokens = {"prefix": prefix_lens, "tails": tails}
    return wl


def build_workloads(rr: R2RReranker, args, pool: list[str]) -> dict[str, Workload]:
    """The workloads of ``args.workloads`` at full or ``--quick`` size (natural100 only where its data is)."""
    def size(name):
        return SIZES[name][1] if args.quick else SIZES[name][0]

    builders = {
        "equal20": lambda: equal_workload("equal20", rr, pool, size("equal20"), seed=0),
        "equal100": lambda: equal_workload("equal100", rr, pool, size("equal100"), seed=1),
        "equal1000": lambda: equal_workload("equal1000", rr, pool, size("equal1000"), seed=2),
        "natural100": lambda: natural_workload(rr, size("natural100"), Path(args.data_root)),
        "batch64": lambda: batch_workload(rr, pool, *(size("batch64") if args.quick else
                                                      (SIZES["batch64"][0][0], args.batch_docs))),
    }
    out = {}
    for name, build in builders.items():
        if name not in args.workloads:
            continue
        wl = build()
        if wl is None:
            logger.warning("%s skipped: no MEDIQA data under %s (use --data-root)", name, args.data_root)
            continue
        out[name] = count_tokens(rr, wl)
    return out
