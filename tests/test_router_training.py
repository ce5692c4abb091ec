"""Router training: balanced labelled queries, classification report, threshold rule, fit on a tiny model."""

from __future__ import annotations

import pytest
from test_training_helpers import write_toy_beir

from r2r_core.data import load_beir
from r2r_core.training.router_training import (
    RouterConfig,
    choose_threshold,
    classification_report,
    labelled_queries,
    train_router,
)


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu(fast_cpu_module):
    yield


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folders = write_toy_beir(tmp_path_factory.mktemp("toy-router"), n_train=10, n_dev=4)
    return [load_beir(f, "train") for f in folders], [load_beir(f, "dev") for f in folders]


def test_classification_report_by_hand():
    rep = classification_report(["a", "a", "b", "b", "c"], ["a", "b", "b", "b", "a"], ["a", "b", "c"])
    assert rep["accuracy"] == pytest.approx(3 / 5)
    assert rep["per_label"]["a"]["precision"] == pytest.approx(1 / 2)
    assert rep["per_label"]["b"]["f1"] == pytest.approx(0.8)
    assert rep["per_label"]["c"]["f1"] == 0.0
    assert rep["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert rep["confusion"]["a"] == {"a": 1, "b": 1}


def test_threshold_keeps_the_share_of_correct_routes():
    probs = [0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.4]
    correct = [True] * 8 + [False, False]
    choice = choose_threshold(probs, correct, keep_correct=0.75)  # may drop 2 of the 8 correct
    assert choice["threshold"] == pytest.approx(0.6)
    assert choice["dev_correct_kept"] == pytest.approx(0.75)
    assert choice["dev_wrong_caught"] == 1.0 and "75%" in choice["description"]
    assert choose_threshold(probs, correct, keep_correct=1.0)["threshold"] == pytest.approx(0.5)
    assert choose_threshold([0.9], [False])["threshold"] == 0.0
    with pytest.raises(ValueError, match="keep_correct"):
        RouterConfig(keep_correct=0.0)


def test_labelled_queries_balance_domains(toy):
    train, _ = toy
    rows = labelled_queries(train, per_domain=4, seed=0)
    counts = {}
    for _, domain, _ in rows:
        counts[domain] = counts.get(domain, 0) + 1
    assert counts == {"legal": 4, "medical": 4, "financial": 4}
    assert labelled_queries(train, per_domain=4, seed=0) == rows
    assert len(labelled_queries(train)) == 30


def test_train_router_reports_dev_metrics_and_threshold(toy, tiny_model_dir):
    from r2r_core.backbone import load_backbone

    train, dev = toy
    b = load_backbone(str(tiny_model_dir), device="cpu", dtype="float32")
    router, report = train_router(b.model, b.tokenizer, train, dev, RouterConfig(epochs=200), progress=False)
    assert router.labels == ["financial", "legal", "medical"]
    assert report["train_accuracy"] == 1.0
    assert report["dev"]["n"] == 12 and set(report["dev"]["per_dataset_accuracy"]) == {"toyfin", "toylaw", "toymed"}
    assert 0.0 <= report["dev"]["macro_f1"] <= 1.0
    assert report["threshold"]["rule"] == "keep-correct" and router.threshold == report["threshold"]["threshold"]
    queries = [q.text for d in train for q in d.queries.values()]
    routes = router.route_features(router.encode(b.model, b.tokenizer, queries))
    truth = [q.domain for d in train for q in d.queries.values()]
    assert [r.expert for r in routes] == truth
