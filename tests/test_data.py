from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from r2r_core.data import (
    BeirDataset,
    DataFormatError,
    Doc,
    Query,
    available_splits,
    find_datasets,
    load_beir,
    load_datasets,
)

SHARED = Path("/work/shared/data")

CORPUS = [
    {"_id": "d1", "title": "Aspirin", "text": "Aspirin relieves pain."},
    {"_id": "d2", "title": "", "text": "Ibuprofen is an NSAID."},
    {"_id": "d3", "text": "Paracetamol lowers fever."},
    {"_id": 4, "title": "Numeric id", "text": "Ids may be integers in the file."},
]
QUERIES = [
    {"_id": "q1", "text": "what relieves pain", "metadata": {"domain": "medical", "split": "test"}},
    {"_id": "q2", "text": "fever drug", "metadata": {"domain": "medical"}},
    {"_id": "q3", "text": "a legal question", "metadata": {"domain": "legal"}},
    {"_id": "q9", "text": "train-only query", "metadata": {"domain": "medical"}},
]
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\nq2\td3\t1\nq3\t4\t1\nq9\td1\t1\n"
TEST_QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\nq2\td3\t1\nq3\t4\t1\n"
RUN = (
    "q1 Q0 d2 1 9.5 bm25\n"
    "q1 Q0 d1 2 8.0 bm25\n"
    "q1 Q0 d3 3 1.0 bm25\n"
    "q2 Q0 d1 2 3.0 bm25\n"  # out of order in the file: rank decides
    "q2 Q0 d3 1 4.0 bm25\n"
    "q3 Q0 4 1 2.0 bm25\n"
    "q9 Q0 d1 1 2.0 bm25\n"  # not in the test split: ignored
)


def write_beir(root: Path, *, corpus=CORPUS, queries=QUERIES, qrels=TEST_QRELS, run=RUN, split="test") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus), encoding="utf-8")
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / f"{split}.tsv").write_text(qrels, encoding="utf-8")
    if run is not None:
        (root / "runs").mkdir(exist_ok=True)
        (root / "runs" / f"{split}.trec").write_text(run, encoding="utf-8")
    return root


def test_load_good_dataset(tmp_path):
    root = write_beir(tmp_path / "toyset")
    (root / "qrels" / "train.tsv").write_text(QRELS, encoding="utf-8")
    ds = load_beir(root, "test")
    assert isinstance(ds, BeirDataset)
    assert ds.name == "toyset" and ds.split == "test" and ds.root == root
    assert set(ds.corpus) == {"d1", "d2", "d3", "4"}
    assert ds.corpus["d1"] == Doc("d1", "Aspirin", "Aspirin relieves pain.")
    assert ds.corpus["d1"].full_text == "Aspirin\nAspirin relieves pain."
    assert ds.corpus["d2"].full_text == "Ibuprofen is an NSAID."
    assert ds.corpus["d3"].title == ""
    # queries restricted to the split's qrels
    assert list(ds.queries) == ["q1", "q2", "q3"]
    assert ds.queries["q1"].domain == "medical"
    assert ds.queries["q1"].metadata["split"] == "test"
    assert ds.qrels == {"q1": {"d1": 2, "d2": 0}, "q2": {"d3": 1}, "q3": {"4": 1}}
    assert ds.positives("q1") == {"d1"}
    assert ds.positives("q1", min_grade=0) == {"d1", "d2"}
    assert ds.positives("q1", min_grade=2) == {"d1"}
    with pytest.raises(KeyError, match="q9"):
        ds.positives("q9")
    # run ordered by rank, restricted to the split
    assert ds.run["q1"] == [("d2", 9.5), ("d1", 8.0), ("d3", 1.0)]
    assert ds.run["q2"] == [("d3", 4.0), ("d1", 3.0)]
    assert "q9" not in ds.run
    assert [d.id for d in ds.candidates("q2")] == ["d3", "d1"]
    assert ds.domain == "medical"
    assert available_splits(root) == ["test", "train"]
    # the train split keeps its own query set
    train = load_beir(root, "train", require_run=False)
    assert list(train.queries) == ["q1", "q2", "q3", "q9"] and train.run == {}


def test_qrels_without_header_and_trec_qrels(tmp_path):
    root = write_beir(tmp_path / "a", qrels="q1\td1\t1\nq2\td3\t2\n")
    assert load_beir(root, "test").qrels == {"q1": {"d1": 1}, "q2": {"d3": 2}}
    root = write_beir(tmp_path / "b", qrels="q1 0 d1 1\nq2 0 d3 2\n")
    assert load_beir(root, "test").qrels == {"q1": {"d1": 1}, "q2": {"d3": 2}}


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_beir(tmp_path / "nope", "test")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="corpus.jsonl.*not a BEIR-format"):
        load_beir(empty, "test")
    root = write_beir(tmp_path / "toy")
    with pytest.raises(FileNotFoundError, match=r"dev\.tsv.*available.*\['test'\]"):
        load_beir(root, "dev")
    root = write_beir(tmp_path / "norun", run=None)
    with pytest.raises(FileNotFoundError, match=r"runs/test\.trec"):
        load_beir(root, "test")
    assert load_beir(root, "test", require_run=False).run == {}


def _error(tmp_path, **kwargs) -> DataFormatError:
    root = write_beir(tmp_path / "bad", **kwargs)
    with pytest.raises(DataFormatError) as info:
        load_beir(root, "test")
    assert isinstance(info.value, ValueError)
    return info.value


def test_malformed_corpus(tmp_path):
    root = write_beir(tmp_path / "bad")
    text = (root / "corpus.jsonl").read_text()
    (root / "corpus.jsonl").write_text(text + "{not json\n")
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:5: invalid JSON"):
        load_beir(root, "test")


@pytest.mark.parametrize(
    ("corpus", "pattern"),
    [
        (CORPUS + [{"_id": "d1", "text": "again"}], r"corpus\.jsonl:5: duplicate document id 'd1'"),
        (CORPUS + [{"_id": "d9", "title": "no text"}], r'corpus\.jsonl:5: missing "text"'),
        (CORPUS + [{"text": "no id"}], r'corpus\.jsonl:5: "_id" must be'),
        (CORPUS + [{"_id": "d9", "text": 3}], r'corpus\.jsonl:5: "text" must be a string'),
        (CORPUS + [["a", "list"]], r"corpus\.jsonl:5: expected a JSON object"),
    ],
)
def test_bad_corpus_lines(tmp_path, corpus, pattern):
    err = _error(tmp_path, corpus=corpus)
    assert err.line == 5
    assert err.path.name == "corpus.jsonl"
    assert re.search(pattern, str(err)), str(err)


def test_bad_queries(tmp_path):
    err = _error(tmp_path, queries=QUERIES + [{"_id": "q1", "text": "dup"}])
    assert "queries.jsonl:5" in str(err) and "duplicate query id 'q1'" in str(err)
    err = _error(tmp_path / "x", queries=QUERIES + [{"_id": "q8", "text": "t", "metadata": "medical"}])
    assert "queries.jsonl:5" in str(err) and "metadata" in str(err)


def test_bad_qrels(tmp_path):
    err = _error(tmp_path / "a", qrels="query-id\tcorpus-id\tscore\nq1\td1\tyes\n")
    assert "test.tsv:2" in str(err) and "integer" in str(err)
    err = _error(tmp_path / "b", qrels="query-id\tcorpus-id\tscore\nq1\td1\n")
    assert "test.tsv:2" in str(err) and "3 fields" in str(err)
    err = _error(tmp_path / "c", qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t2\n")
    assert "test.tsv:3" in str(err) and "duplicate judgment" in str(err)
    err = _error(tmp_path / "d", qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\tdX\t1\n")
    assert "test.tsv:3" in str(err) and "unknown document id 'dX'" in str(err)
    err = _error(tmp_path / "e", qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\nqX\td1\t1\n")
    assert "test.tsv:3" in str(err) and "unknown query id 'qX'" in str(err)
    err = _error(tmp_path / "f", qrels="query-id\tcorpus-id\tscore\n")
    assert "test.tsv" in str(err) and "no judgments" in str(err)


def test_bad_run(tmp_path):
    err = _error(tmp_path / "a", run="q1 Q0 d1 1 1.0\n")
    assert "test.trec:1" in str(err) and "6 fields" in str(err)
    err = _error(tmp_path / "b", run="q1 Q0 d1 1 1.0 t\nq1 Q0 d2 first 1.0 t\n")
    assert "test.trec:2" in str(err) and "rank must be an integer" in str(err)
    err = _error(tmp_path / "c", run="q1 Q0 d1 1 high t\n")
    assert "test.trec:1" in str(err) and "score must be a number" in str(err)
    err = _error(tmp_path / "d", run="q1 Q0 d1 1 2.0 t\nq1 Q0 d1 2 1.0 t\n")
    assert "test.trec:2" in str(err) and "listed twice" in str(err)
    err = _error(tmp_path / "e", run="q1 Q0 d1 1 2.0 t\nq2 Q0 dZ 1 1.0 t\n")
    assert "test.trec:2" in str(err) and "unknown document id 'dZ'" in str(err)
    err = _error(tmp_path / "f", run="q1 Q0 d1 1 2.0 t\nqZ Q0 d1 1 1.0 t\n")
    assert "test.trec:2" in str(err) and "unknown query id 'qZ'" in str(err)


def test_query_without_candidates_is_kept(tmp_path, caplog):
    root = write_beir(tmp_path / "toy", run="q1 Q0 d1 1 2.0 t\n")
    with caplog.at_level("WARNING", logger="r2r_core.data"):
        ds = load_beir(root, "test")
    assert set(ds.queries) == {"q1", "q2", "q3"}
    assert ds.candidates("q2") == []
    assert "have no candidates" in caplog.text


def test_dataclass_validation():
    with pytest.raises(TypeError, match="Doc.text"):
        Doc("d", "", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Doc.id"):
        Doc("", "", "x")
    with pytest.raises(TypeError, match="Query.domain"):
        Query("q", "text", 3)  # type: ignore[arg-type]
    q = Query("q", "text", "legal", {"a": 1})
    assert hash(q) == hash(Query("q", "text", "legal"))


def test_find_datasets(tmp_path):
    a = write_beir(tmp_path / "legal" / "alpha")
    b = write_beir(tmp_path / "medical" / "beta")
    (tmp_path / "routing").mkdir()
    (tmp_path / "routing" / "queries.jsonl").write_text("{}\n")
    hidden = write_beir(tmp_path / ".cache" / "gamma")
    assert find_datasets(tmp_path) == [a, b]
    assert hidden not in find_datasets(tmp_path)
    assert find_datasets(a) == [a]
    assert find_datasets(tmp_path / "routing") == []
    with pytest.raises(FileNotFoundError):
        find_datasets(tmp_path / "missing")


def test_load_datasets_skips_folders_without_the_split_and_names_what_is_wrong(tmp_path, caplog):
    """One loader for training and evaluation: a root's folders without the split are skipped with a warning, a
    named dataset folder without it is an error, and same-named folders are qualified or refused."""
    a = write_beir(tmp_path / "legal" / "alpha")
    write_beir(tmp_path / "medical" / "beta", split="train")
    dup = write_beir(tmp_path / "other" / "alpha")
    got = load_datasets([tmp_path, a], "test")  # a twice: loaded once
    assert [d.root for d in got] == [a, dup]
    assert [d.name for d in got] == ["legal-alpha", "other-alpha"]
    assert "beta" in caplog.text and "skipped" in caplog.text
    with pytest.raises(ValueError, match="must be unique.*alpha"):
        load_datasets(tmp_path, "test", duplicate_names="error")
    with pytest.raises(FileNotFoundError, match=r"no qrels/test.tsv in this dataset \(splits: \['train'\]\)"):
        load_datasets(tmp_path / "medical" / "beta", "test")
    assert load_datasets(tmp_path / "medical", "test", required=False) == []
    with pytest.raises(FileNotFoundError, match="no qrels/test.tsv in any dataset below it"):
        load_datasets(tmp_path / "medical", "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_datasets(tmp_path / "missing", "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a BEIR-format folder"):
        load_datasets(tmp_path / "empty", "test")


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared data folder not present")
def test_shared_datasets_match_manifests():
    roots = find_datasets(SHARED)
    assert len(roots) >= 5
    for root in roots:
        manifest = json.loads((root / "manifest.json").read_text())
        for split, stats in manifest["splits"].items():
            ds = load_beir(root, split)
            assert ds.name == manifest["name"]
            assert len(ds.corpus) == manifest["corpus_docs"], (root, split)
            assert len(ds.queries) == stats["queries"], (root, split)
            assert sum(len(v) for v in ds.qrels.values()) == stats["qrels"], (root, split)
            assert sum(len(ds.positives(q)) for q in ds.queries) == stats["qrels_positive"], (root, split)
            avg = sum(len(v) for v in ds.run.values()) / len(ds.queries)
            assert avg == pytest.approx(stats["avg_candidates"], abs=0.01), (root, split)
            assert set(ds.run) == set(ds.queries)
            assert ds.domain == manifest["domain"]
            assert all(q.domain == manifest["domain"] for q in ds.queries.values())
