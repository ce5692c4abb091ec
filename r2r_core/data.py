"""BEIR-format reranking data: corpus, queries, graded qrels and a first-stage run.

A dataset folder holds::

    corpus.jsonl          {"_id", "title", "text"}
    queries.jsonl         {"_id", "text", "metadata": {"domain", ...}}
    qrels/<split>.tsv     header "query-id<TAB>corpus-id<TAB>score", integer grades
    runs/<split>.trec     "qid Q0 docid rank score tag" (the candidates to rerank)

Nothing here depends on folder names or domain names: the dataset name is the folder name and the
domain is read from each query's ``metadata.domain``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "BeirDataset",
    "DataFormatError",
    "Doc",
    "Query",
    "available_splits",
    "find_datasets",
    "load_beir",
    "load_datasets",
    "read_corpus",
    "read_qrels",
    "read_queries",
    "read_run",
]


class DataFormatError(ValueError):
    """A dataset file is malformed; the message names the file and the line."""

    def __init__(self, path: Path | str, line: int | None, message: str):
        self.path = Path(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Doc:
    """One corpus document."""

    id: str
    title: str
    text: str

    def __post_init__(self) -> None:
        for name in ("id", "title", "text"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"`Doc.{name}` must be a str, got {type(value).__name__}: {value!r}")
        if not self.id:
            raise ValueError("`Doc.id` must be a non-empty str, got ''")

    @property
    def full_text(self) -> str:
        """``"title\\ntext"``, or just the text when there is no title."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass(frozen=True)
class Query:
    """One query; ``domain`` comes from ``metadata.domain`` when present."""

    id: str
    text: str
    domain: str | None = None
    metadata: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("id", "text"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"`Query.{name}` must be a str, got {type(value).__name__}: {value!r}")
        if not self.id:
            raise ValueError("`Query.id` must be a non-empty str, got ''")
        if self.domain is not None and not isinstance(self.domain, str):
            raise TypeError(f"`Query.domain` must be a str or None, got {type(self.domain).__name__}: {self.domain!r}")
        if not isinstance(self.metadata, dict):
            raise TypeError(f"`Query.metadata` must be a dict, got {type(self.metadata).__name__}")


@dataclass
class BeirDataset:
    """One split of a BEIR-format dataset, with its first-stage run."""

    root: Path
    name: str
    split: str
    corpus: dict[str, Doc]
    queries: dict[str, Query]  # only the queries of this split (those in its qrels)
    qrels: dict[str, dict[str, int]]  # qid -> {docid: grade}
    run: dict[str, list[tuple[str, float]]]  # qid -> [(docid, score)] best first (by rank)

    def positives(self, qid: str, min_grade: int = 1) -> set[str]:
        """Ids of the documents judged with grade >= ``min_grade`` for ``qid``."""
        if qid not in self.qrels:
            raise KeyError(f"query {qid!r} is not in the {self.split!r} qrels of {self.name!r}")
        return {doc for doc, grade in self.qrels[qid].items() if grade >= min_grade}

    @property
    def domain(self) -> str | None:
        """The most common ``metadata.domain`` among the split's queries (None when none has one)."""
        counts = Counter(q.domain for q in self.queries.values() if q.domain)
        return counts.most_common(1)[0][0] if counts else None

    def candidates(self, qid: str) -> list[Doc]:
        """The run's candidate documents for ``qid``, in run order."""
        return [self.corpus[doc_id] for doc_id, _ in self.run.get(qid, [])]

    def __repr__(self) -> str:
        return (
            f"BeirDataset(name={self.name!r}, split={self.split!r}, corpus={len(self.corpus)}, "
            f"queries={len(self.queries)}, qrels={sum(len(v) for v in self.qrels.values())}, "
            f"run_queries={len(self.run)})"
        )


# --------------------------------------------------------------------------- readers


def _iter_lines(path: Path):
    """Yield ``(line_number, stripped_line)`` for the non-blank lines of a UTF-8 file."""
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                line = line.strip()
                if line:
                    yield number, line
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, None, f"not valid UTF-8 ({exc})") from exc


def _load_json_line(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, number, f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise DataFormatError(path, number, f"expected a JSON object, got {type(record).__name__}")
    return record


def _get_id(path: Path, number: int, record: dict) -> str:
    raw = record.get("_id")
    if isinstance(raw, bool) or not isinstance(raw, (str, int)) or raw == "":
        raise DataFormatError(path, number, f'"_id" must be a non-empty string, got {raw!r}')
    return str(raw)


def _get_str(path: Path, number: int, record: dict, key: str, required: bool) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise DataFormatError(path, number, f'missing "{key}" (keys present: {sorted(record)})')
        return ""
    if not isinstance(value, str):
        raise DataFormatError(path, number, f'"{key}" must be a string, got {type(value).__name__}')
    return value


def read_corpus(path: Path | str) -> dict[str, Doc]:
    """Read ``corpus.jsonl`` into ``{doc_id: Doc}`` (title optional, text required)."""
    path = Path(path)
    corpus: dict[str, Doc] = {}
    for number, line in _iter_lines(path):
        record = _load_json_line(path, number, line)
        doc_id = _get_id(path, number, record)
        if doc_id in corpus:
            raise DataFormatError(path, number, f"duplicate document id {doc_id!r}")
        title = _get_str(path, number, record, "title", required=False)
        text = _get_str(path, number, record, "text", required=True)
        corpus[doc_id] = Doc(id=doc_id, title=title, text=text)
    if not corpus:
        raise DataFormatError(path, None, "no documents (the file is empty)")
    return corpus


def read_queries(path: Path | str) -> dict[str, Query]:
    """Read ``queries.jsonl`` into ``{query_id: Query}``.

    The domain is ``metadata.domain``; a top-level ``"domain"`` key is accepted as a fallback.
    """
    path = Path(path)
    queries: dict[str, Query] = {}
    for number, line in _iter_lines(path):
        record = _load_json_line(path, number, line)
        qid = _get_id(path, number, record)
        if qid in queries:
            raise DataFormatError(path, number, f"duplicate query id {qid!r}")
        text = _get_str(path, number, record, "text", required=True)
        metadata = record.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise DataFormatError(path, number, f'"metadata" must be an object, got {type(metadata).__name__}')
        domain = metadata.get("domain", record.get("domain"))
        if domain is not None and not isinstance(domain, str):
            raise DataFormatError(path, number, f'"domain" must be a string, got {domain!r}')
        queries[qid] = Query(id=qid, text=text, domain=domain or None, metadata=dict(metadata))
    if not queries:
        raise DataFormatError(path, None, "no queries (the file is empty)")
    return queries


def read_qrels(path: Path | str) -> dict[str, dict[str, int]]:
    """Read a qrels file into ``{qid: {docid: grade}}``.

    BEIR TSV (``query-id corpus-id score``, header optional) and TREC qrels
    (``qid 0 docid grade``) are both accepted. Grades must be integers.
    """
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    header_seen = False
    for number, line in _iter_lines(path):
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields]
        if len(fields) == 3:
            qid, doc_id, grade_str = fields
        elif len(fields) == 4:
            qid, _, doc_id, grade_str = fields
        else:
            raise DataFormatError(
                path,
                number,
                f"expected 3 fields 'query-id<TAB>corpus-id<TAB>score', got {len(fields)}: {line!r}",
            )
        try:
            grade = int(grade_str)
        except ValueError:
            if not qrels and not header_seen:
                header_seen = True  # header line, e.g. "query-id<TAB>corpus-id<TAB>score"
                continue
            raise DataFormatError(path, number, f"relevance grade must be an integer, got {grade_str!r}") from None
        judged = qrels.setdefault(qid, {})
        if doc_id in judged:
            raise DataFormatError(path, number, f"duplicate judgment for query {qid!r} and document {doc_id!r}")
        judged[doc_id] = grade
    if not qrels:
        raise DataFormatError(path, None, "no judgments (the file is empty or only has a header)")
    return qrels


def read_run(path: Path | str) -> dict[str, list[tuple[str, float]]]:
    """Read a TREC run (``qid Q0 docid rank score tag``) into ``{qid: [(docid, score)]}`` ordered by rank."""
    path = Path(path)
    ranked: dict[str, list[tuple[int, int, str, float]]] = {}
    seen: dict[str, set[str]] = {}
    for number, line in _iter_lines(path):
        fields = line.split()
        if len(fields) != 6:
            raise DataFormatError(
                path, number, f"expected 6 fields 'qid Q0 docid rank score tag', got {len(fields)}: {line!r}"
            )
        qid, _, doc_id, rank_str, score_str, _tag = fields
        try:
            rank = int(rank_str)
        except ValueError:
            raise DataFormatError(path, number, f"rank must be an integer, got {rank_str!r}") from None
        try:
            score = float(score_str)
        except ValueError:
            raise DataFormatError(path, number, f"score must be a number, got {score_str!r}") from None
        docs = seen.setdefault(qid, set())
        if doc_id in docs:
            raise DataFormatError(path, number, f"document {doc_id!r} listed twice for query {qid!r}")
        docs.add(doc_id)
        ranked.setdefault(qid, []).append((rank, number, doc_id, score))
    if not ranked:
        raise DataFormatError(path, None, "no run lines (the file is empty)")
    return {qid: [(doc, score) for _, _, doc, score in sorted(rows)] for qid, rows in ranked.items()}


# --------------------------------------------------------------------------- datasets


def available_splits(root: Path | str) -> list[str]:
    """Splits that have a qrels file under ``root/qrels``."""
    qrels_dir = Path(root) / "qrels"
    if not qrels_dir.is_dir():
        return []
    return sorted(p.stem for p in qrels_dir.iterdir() if p.suffix == ".tsv" and p.is_file())


def _require_file(path: Path, what: str, root: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing {what}; {root} is not a BEIR-format dataset folder "
            "(expected corpus.jsonl, queries.jsonl, qrels/<split>.tsv and runs/<split>.trec)"
        )


def load_beir(root: Path | str, split: str, *, require_run: bool = True) -> BeirDataset:
    """Load one split of a BEIR-format dataset folder.

    Only the queries that appear in the split's qrels are kept. Every qrels and run id must
    resolve to a query / document; run lines of queries outside the split are ignored.
    Raises ``FileNotFoundError`` for missing files and :class:`DataFormatError` (a ``ValueError``)
    naming the file and line for malformed or dangling entries.
    """
    root = Path(root)
    if not isinstance(split, str) or not split:
        raise ValueError(f"`split` must be a non-empty str, got {split!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder does not exist or is not a directory")
    corpus_path, queries_path = root / "corpus.jsonl", root / "queries.jsonl"
    qrels_path, run_path = root / "qrels" / f"{split}.tsv", root / "runs" / f"{split}.trec"
    _require_file(corpus_path, "corpus file", root)
    _require_file(queries_path, "queries file", root)
    if not qrels_path.is_file():
        splits = available_splits(root)
        raise FileNotFoundError(
            f"{qrels_path}: no qrels for split {split!r}; splits available in {root}: {splits or 'none'}"
        )
    if require_run:
        _require_file(run_path, f"first-stage run for split {split!r}", root)

    corpus = read_corpus(corpus_path)
    all_queries = read_queries(queries_path)
    qrels = read_qrels(qrels_path)
    _check_ids(qrels_path, qrels, all_queries, corpus)
    queries = {qid: all_queries[qid] for qid in all_queries if qid in qrels}

    run: dict[str, list[tuple[str, float]]] = {}
    if run_path.is_file():
        full_run = read_run(run_path)
        _check_ids(
            run_path,
            {q: dict.fromkeys(d for d, _ in rows) for q, rows in full_run.items()},
            all_queries,
            corpus,
        )
        run = {qid: rows for qid, rows in full_run.items() if qid in queries}
        outside = len(full_run) - len(run)
        if outside:
            logger.info("%s: ignored %d run queries that are not in the %r qrels", run_path, outside, split)
        missing = [qid for qid in queries if qid not in run]
        if missing:
            logger.warning(
                "%s: %d of %d %r queries have no candidates (e.g. %r)",
                run_path,
                len(missing),
                len(queries),
                split,
                missing[0],
            )
    dataset = BeirDataset(root=root, name=root.name, split=split, corpus=corpus, queries=queries, qrels=qrels, run=run)
    logger.info("loaded %r", dataset)
    return dataset


def _check_ids(path: Path, pairs: dict[str, dict], queries: dict[str, Query], corpus: dict[str, Doc]) -> None:
    """Raise naming the first line of ``path`` whose query or document id does not resolve."""
    bad_query = next((q for q in pairs if q not in queries), None)
    bad_doc = next(((q, d) for q, docs in pairs.items() for d in docs if d not in corpus), None)
    if bad_query is None and bad_doc is None:
        return
    # Find the offending line again (rare path, so a second pass is fine).
    for number, line in _iter_lines(path):
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields]
        qid = fields[0]
        doc_id = fields[2] if len(fields) in (4, 6) else fields[1]
        if qid not in queries and qid in pairs:
            raise DataFormatError(path, number, f"unknown query id {qid!r} (not in queries.jsonl)")
        if doc_id not in corpus and qid in pairs and doc_id in pairs[qid]:
            raise DataFormatError(path, number, f"unknown document id {doc_id!r} (not in corpus.jsonl)")
    raise DataFormatError(path, None, f"unknown ids: query {bad_query!r}, document {bad_doc!r}")


def find_datasets(root: Path | str) -> list[Path]:
    """Folders at or below ``root`` that hold a ``corpus.jsonl`` (sorted; hidden folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    found = []
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "corpus.jsonl" in files:
            found.append(Path(current))
    return sorted(found)


def load_datasets(paths, split: str, *, required: bool = True, duplicate_names: str = "qualify") -> list[BeirDataset]:
    """``split`` of every BEIR dataset folder at or below each of ``paths`` (a dataset folder, or a folder
    holding several), in order, each folder once.

    Every path must exist and hold at least one dataset folder. With ``required`` a path that is itself one
    dataset folder must have ``split``, and a path holding several must have it in at least one (the others are
    skipped with a warning); without it every folder lacking ``split`` is skipped with a warning, possibly all.
    Two datasets of the same folder name are renamed ``<parent>-<name>`` (``duplicate_names="qualify"``) or
    refused (``"error"``, where names key reports and training rows)."""
    if duplicate_names not in ("qualify", "error"):
        raise ValueError(f"`duplicate_names` must be 'qualify' or 'error', got {duplicate_names!r}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    folders: list[Path] = []
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: data folder does not exist")
        found = find_datasets(path)
        if not found:
            raise FileNotFoundError(
                f"{path}: not a BEIR-format folder: no corpus.jsonl in it or below it "
                "(expected corpus.jsonl, queries.jsonl, qrels/<split>.tsv, runs/<split>.trec)")
        with_split = [f for f in found if split in available_splits(f)]
        if required and not with_split:
            where = "this dataset" if found == [path] else "any dataset below it"
            raise FileNotFoundError(f"{path}: no qrels/{split}.tsv in {where} (splits: "
                                    f"{sorted({s for f in found for s in available_splits(f)}) or 'none'})")
        for f in found:
            if f not in with_split:
                logger.warning("%s: no qrels/%s.tsv (splits: %s), skipped", f, split, available_splits(f) or "none")
        folders.extend(f for f in with_split if f not in folders)
    datasets = [load_beir(f, split) for f in folders]
    counts = Counter(ds.name for ds in datasets)
    dupes = sorted(n for n, c in counts.items() if c > 1)
    if dupes and duplicate_names == "error":
        raise ValueError(f"dataset folder names must be unique, got duplicates {dupes} under {list(paths)}")
    for ds in datasets:
        if counts[ds.name] > 1:
            ds.name = f"{ds.root.parent.name}-{ds.root.name}"
    return datasets
