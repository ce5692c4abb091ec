from __future__ import annotations

import math

import pytest

from r2r_core.evaluation.fusion import fuse, linear_fusion, reciprocal_rank_fusion
from r2r_core.evaluation.metrics import (
    MEASURES,
    latency_stats,
    ranking_metrics,
    routing_metrics,
    run_from_rankings,
)
from r2r_core.evaluation.report import markdown_table

QRELS = {"q1": {"a": 2, "b": 0, "c": 1}, "q2": {"x": 1}, "q3": {"k": 1}}
RANKINGS = {"q1": ["b", "c", "a", "d"], "q2": ["y", "z", "w", "v", "u", "x"]}

# Hand-computed (trec_eval definitions, linear graded gains, log2 discount):
# q1: DCG = 0/log2(2) + 1/log2(3) + 2/log2(4); IDCG = 2/log2(2) + 1/log2(3)
Q1_NDCG = (1 / math.log2(3) + 1.0) / (2.0 + 1 / math.log2(3))
# q2: the only relevant doc at rank 6
Q2_NDCG10 = (1 / math.log2(7)) / 1.0
EXPECTED = {
    "q1": {"nDCG@5": Q1_NDCG, "nDCG@10": Q1_NDCG, "MRR@5": 0.5, "MRR@10": 0.5, "P@5": 0.4, "R@5": 1.0, "R@10": 1.0},
    "q2": {"nDCG@5": 0.0, "nDCG@10": Q2_NDCG10, "MRR@5": 0.0, "MRR@10": 1 / 6, "P@5": 0.0, "R@5": 0.0, "R@10": 1.0},
}


def test_measure_names():
    assert list(MEASURES) == ["nDCG@5", "nDCG@10", "MRR@5", "MRR@10", "P@5", "R@5", "R@10"]


def test_ranking_metrics_hand_computed():
    mean, per_query = ranking_metrics(QRELS, RANKINGS)
    assert set(per_query) == {"q1", "q2"}
    for qid, expected in EXPECTED.items():
        for name, value in expected.items():
            assert per_query[qid][name] == pytest.approx(value, abs=1e-9), (qid, name)
    for name in MEASURES:
        assert mean[name] == pytest.approx((EXPECTED["q1"][name] + EXPECTED["q2"][name]) / 2, abs=1e-9)
    assert Q1_NDCG == pytest.approx(0.6199062, abs=1e-6)


def test_query_without_candidates_counts_as_zero():
    mean, per_query = ranking_metrics(QRELS, {**RANKINGS, "q3": []}, ["q1", "q2", "q3"])
    assert per_query["q3"] == dict.fromkeys(MEASURES, 0.0)
    assert mean["R@10"] == pytest.approx(2 / 3)
    assert mean["MRR@10"] == pytest.approx((0.5 + 1 / 6) / 3)


def test_rank_order_is_kept_whatever_the_doc_ids():
    # trec_eval would break score ties by doc id; rank-derived scores keep the given order.
    run = run_from_rankings({"q": ["a", "z", "m"]})
    assert sorted(run["q"], key=run["q"].get, reverse=True) == ["a", "z", "m"]
    worse, _ = ranking_metrics({"q": {"a": 1}}, {"q": ["z", "a"]})
    better, _ = ranking_metrics({"q": {"a": 1}}, {"q": ["a", "z"]})
    assert better["MRR@10"] == 1.0 and worse["MRR@10"] == 0.5
    with pytest.raises(ValueError, match="twice"):
        run_from_rankings({"q": ["a", "a"]})


def test_ranking_metrics_errors():
    with pytest.raises(KeyError, match="no qrels"):
        ranking_metrics(QRELS, RANKINGS, ["q1", "nope"])
    with pytest.raises(ValueError, match="no queries"):
        ranking_metrics(QRELS, {}, [])


def test_routing_metrics_hand_computed():
    gold = ["medical", "medical", "legal", "legal", "financial"]
    pred = ["medical", "legal", "legal", "__base__", "financial"]
    r = routing_metrics(gold, pred)
    assert r["accuracy"] == pytest.approx(3 / 5)
    # medical P=1 R=.5 F1=2/3; legal P=.5 R=.5 F1=.5; financial F1=1; __base__ is not a gold class
    assert r["per_class"]["medical"]["f1"] == pytest.approx(2 / 3)
    assert r["per_class"]["legal"]["precision"] == pytest.approx(0.5)
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert r["labels"] == ["financial", "legal", "medical"]
    assert r["predicted_labels"] == ["financial", "legal", "medical", "__base__"]
    assert r["confusion"]["legal"] == {"financial": 0, "legal": 1, "medical": 0, "__base__": 1}
    assert routing_metrics(["a", "b"], ["a", "b"])["macro_f1"] == 1.0
    with pytest.raises(ValueError, match="length"):
        routing_metrics(["a"], [])


def test_latency_stats():
    s = latency_stats([0.1, 0.2, 0.3, 0.4], [10, 10, 10, 10])
    assert s["p50_ms"] == pytest.approx(250.0)
    assert s["p95_ms"] == pytest.approx(385.0)  # linear interpolation between 300 and 400
    assert s["mean_ms"] == pytest.approx(250.0)
    assert s["docs_per_sec"] == pytest.approx(40.0)
    assert s["queries"] == 4
    empty = latency_stats([], [])
    assert empty["p50_ms"] is None and empty["docs_per_sec"] is None


def test_fusion():
    rrf = reciprocal_rank_fusion([0.1, 0.9, 0.5], k=60)
    assert rrf == pytest.approx([1 / 63 + 1 / 61, 1 / 61 + 1 / 62, 1 / 62 + 1 / 63])
    assert linear_fusion([0.1, 0.9, 0.5], [10.0, 5.0, 0.0], alpha=0.5) == pytest.approx([0.5, 0.75, 0.25])
    assert linear_fusion([1.0, 1.0], [2.0, 1.0], alpha=1.0) == [0.0, 0.0]
    assert fuse("linear", [], []) == []
    with pytest.raises(ValueError, match="alpha"):
        linear_fusion([1.0], [1.0], alpha=2.0)
    with pytest.raises(ValueError, match="fusion method"):
        fuse("max", [1.0], [1.0])


def test_markdown_table_bolds_best():
    table = markdown_table(["system", "x", "y"], [["a", 0.5, 0.1], ["b", 0.25, 0.1]], bold_best=True)
    lines = table.splitlines()
    assert lines[1] == "|:---|---:|---:|"
    assert lines[2] == "| a | **0.5000** | 0.1000 |"  # a column that ties everywhere is not bolded
    assert lines[3] == "| b | 0.2500 | 0.1000 |"


def _results(ndcg: dict[str, dict[str, float]], accuracy: float = 1.0) -> dict:
    datasets = ["a", "b"]
    systems = {}
    for name, per in ndcg.items():
        systems[name] = {
            "datasets": {d: {"metrics": {"nDCG@10": per[d]}} for d in datasets},
            "macro": {"nDCG@10": sum(per[d] for d in datasets) / 2},
        }
    systems["r2r"]["routing"] = {"accuracy": accuracy, "confusion": {"x": {"x": 3, "y": 1}, "y": {"y": 4}}}
    return {"datasets": dict.fromkeys(datasets, {}), "systems": systems}


def test_check_claims_passes_and_fails_each_paper_claim():
    from r2r_core.evaluation.report import check_claims

    good = _results({
        "first-stage": {"a": 0.5, "b": 0.5}, "minilm": {"a": 0.6, "b": 0.4}, "single-lora": {"a": 0.6, "b": 0.6},
        "direct-ft": {"a": 0.6, "b": 0.7}, "r2r-oracle": {"a": 0.7, "b": 0.7}, "r2r": {"a": 0.7, "b": 0.695},
    })
    claims = check_claims(good)
    assert [c["met"] for c in claims] == [True, True, True, True, True, True]
    assert "8 queries" in claims[4]["measured"]
    bad = _results({
        "first-stage": {"a": 0.5, "b": 0.8}, "minilm": {"a": 0.6, "b": 0.4}, "single-lora": {"a": 0.9, "b": 0.9},
        "direct-ft": {"a": 0.9, "b": 0.9}, "r2r-oracle": {"a": 0.8, "b": 0.8}, "r2r": {"a": 0.7, "b": 0.7},
    }, accuracy=0.9)
    met = {c["claim"]: c["met"] for c in check_claims(bad)}
    assert list(met.values()) == [False, True, False, False, False, False]
    assert "(worst: b)" in check_claims(bad)[0]["measured"]
    assert check_claims({"datasets": {}, "systems": {}}) == []
