"""Router training: balanced labelled queries, classification report, threshold rule, fit on a tiny model."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch
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
    config = RouterConfig(epochs=200, threshold_rule="keep-correct", pseudo_per_dataset=0, ood_check=False)
    router, report = train_router(b.model, b.tokenizer, train, dev, config, progress=False)
    assert router.labels == ["financial", "legal", "medical"]
    assert report["train_accuracy"] == 1.0
    assert report["dev"]["n"] == 12 and set(report["dev"]["per_dataset_accuracy"]) == {"toyfin", "toylaw", "toymed"}
    assert 0.0 <= report["dev"]["macro_f1"] <= 1.0
    assert report["threshold"]["rule"] == "keep-correct" and router.threshold == report["threshold"]["threshold"]
    queries = [q.text for d in train for q in d.queries.values()]
    routes = router.route_features(router.encode(b.model, b.tokenizer, queries))
    truth = [q.domain for d in train for q in d.queries.values()]
    assert [r.expert for r in routes] == truth


def test_pseudo_query_kinds():
    from r2r_core.training.router_training import pseudo_query

    text = "Metformin lowers blood sugar. It may cause nausea and stomach upset in some adults. Rarely lactic acidosis."
    assert pseudo_query("Type 2 Diabetes Treatment", text, 24) == "Type 2 Diabetes Treatment"
    assert pseudo_query("x.com", text, 24) == "Metformin lowers blood sugar."  # a one-word title: the first sentence
    assert pseudo_query("", text, 3) == "Metformin lowers blood"
    rng = random.Random(0)
    sentences = {pseudo_query("", text, 24, "sentence", rng) for _ in range(20)}
    assert sentences <= {"Metformin lowers blood sugar.", "It may cause nausea and stomach upset in some adults."}
    for _ in range(20):
        span = pseudo_query("", text, 8, "span", rng).split()
        assert 6 <= len(span) <= 8 and " ".join(span) in " ".join(text.split())
    table = "| | 2019 | 2018\nRevenue | $ 1,452.4 | $ 1,146.2"
    assert pseudo_query("", table, 24) == "2019 2018 Revenue $ 1,452.4 $ 1,146.2"  # cells count as words
    assert pseudo_query("", "too short", 24) is None and pseudo_query("", "", 24, "span") is None
    with pytest.raises(ValueError, match="kind"):
        pseudo_query("", text, 24, "title")


def test_pseudo_queries_are_labelled_and_nested(toy):
    from r2r_core.training.router_training import pseudo_queries

    law = next(d for d in toy[0] if d.name == "toylaw")
    big = pseudo_queries(law, 8, ["lead", "span"])
    assert {(r.domain, r.dataset, r.kind) for r in big} == {("legal", "toylaw", "pseudo")}
    assert len(big) == 16
    assert pseudo_queries(law, 5, ["span"]) == [r for r in big[8:]][:5]  # fewer give a subset: features cache by text


def test_row_weights_balance_domains_datasets_and_pseudo_queries():
    from r2r_core.training.router_training import RoutingExample as R
    from r2r_core.training.router_training import row_weights

    rows = ([R("q", "legal", "cuad")] * 2 + [R("q", "legal", "policyqa")] * 8
            + [R("p", "legal", "policyqa", "pseudo")] * 5 + [R("q", "medical", "medquad")] * 30)
    w = row_weights(rows, "dataset", pseudo_share=0.2)
    assert float(w.sum()) == pytest.approx(1.0)
    assert float(w[:2].sum()) == pytest.approx(0.25)  # half of legal, alone of its kind in cuad
    assert float(w[2:10].sum()) == pytest.approx(0.25 * 0.8) and float(w[10:15].sum()) == pytest.approx(0.25 * 0.2)
    assert float(w[15:].sum()) == pytest.approx(0.5)
    d = row_weights(rows, "domain")
    assert float(d[:15].sum()) == pytest.approx(0.5) and len(set(d[:15].tolist())) == 1


def _fold(logits, truth, dist=None):
    from r2r_core.training.router_training import HeldOut

    logits, truth = torch.tensor(logits), torch.tensor(truth)
    return HeldOut(logits, truth, torch.zeros(len(truth)) if dist is None else torch.tensor(dist), "test")


def test_lodo_threshold_keeps_confident_wrong_routes_under_the_limit():
    """Two held-out datasets of 10 queries: the threshold is the smallest top probability at which wrong routes above
    it are at most 10% of each dataset's queries on average."""
    from r2r_core.training.router_training import summarize_lodo

    def logits(p):  # two labels: [log p, log (1 - p)] gives probability p to label 0
        return [math.log(p), math.log(1 - p)]

    a = _fold([logits(p) for p in [0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55]], [0] * 8 + [1, 1])
    b = _fold([logits(p) for p in [0.99] * 7 + [0.97, 0.6, 0.58]], [0] * 7 + [1, 1, 1])
    config = RouterConfig(calibrate=False, ood_check=False, max_confident_wrong=0.1)
    out = summarize_lodo({"a": a, "b": b}, ["x", "y"], config)
    # a's wrong routes sit at 0.6 and 0.55, b's at 0.97, 0.6 and 0.58: at t = 0.6, a has 1/10 and b 2/10 -> 0.15;
    # just above 0.6 (the next value, 0.65) a has 0 and b 1/10 -> 0.05 <= 0.1
    assert out["threshold"] == pytest.approx(0.65) and out["temperature"] == 1.0
    assert out["confident_wrong"] == pytest.approx(0.05) and out["worst_confident_wrong"] == pytest.approx(0.1)
    assert out["per_dataset"]["a"]["accuracy"] == pytest.approx(0.8)
    assert out["per_dataset"]["b"]["predicted"] == {"x": 10}
    assert out["mean"] == pytest.approx(0.75) and out["min"] == pytest.approx(0.7)
    assert out["threshold_choice"]["rule"] == "lodo" and out["ood_cutoff"] is None


def test_a_route_to_the_fallback_label_is_a_fallback_not_a_confident_wrong_route():
    """With labelled questions from no domain the fallback expert is a label of the router: a held-out query routed to
    it is wrong for accuracy but lands on the fallback, so it is no confident wrong route and no threshold is needed
    to catch it; a route to another domain still is one."""
    from r2r_core.training.router_training import summarize_lodo

    def logits(i):  # probability 0.9 to label i of three
        return [math.log(0.9) if k == i else math.log(0.05) for k in range(3)]

    fold = _fold([logits(0)] * 6 + [logits(1)] * 3 + [logits(2)], [0] * 10)  # labels x, general, z; truth x
    config = RouterConfig(calibrate=False, ood_check=False, max_confident_wrong=0.05)
    out = summarize_lodo({"a": fold}, ["x", "general", "z"], config, "general")
    per = out["per_dataset"]["a"]
    assert per["accuracy"] == pytest.approx(0.6) and per["to_fallback"] == pytest.approx(0.3)
    assert out["threshold"] > 0.9 and out["confident_wrong"] == 0.0  # only the route to z needs the threshold
    relaxed = summarize_lodo({"a": fold}, ["x", "general", "z"],
                             RouterConfig(calibrate=False, ood_check=False, max_confident_wrong=0.15), "general")
    assert relaxed["threshold"] == 0.0 and relaxed["confident_wrong"] == pytest.approx(0.1)
    assert relaxed["fallback_share"] == pytest.approx(0.3)
    plain = summarize_lodo({"a": fold}, ["x", "general", "z"],
                           RouterConfig(calibrate=False, ood_check=False, max_confident_wrong=0.15))  # no fallback
    assert plain["threshold"] > 0.9 and plain["per_dataset"]["a"]["to_fallback"] == 0.0  # 4 wrong routes of 10


def test_temperature_and_distance_cutoff_from_the_folds():
    from r2r_core.training.router_training import fit_temperature, summarize_lodo

    gen = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 3, (2000,), generator=gen)
    clean = torch.nn.functional.one_hot(truth, 3).float() * 2.0 + torch.randn(2000, 3, generator=gen)
    assert fit_temperature(clean * 3.0, truth) == pytest.approx(3.0 * fit_temperature(clean, truth), rel=0.1)
    fold = _fold(clean[:100].tolist(), truth[:100].tolist(), [float(i) for i in range(100)])
    out = summarize_lodo({"a": fold}, ["x", "y", "z"], RouterConfig(ood_keep=0.9, threshold_rule="none"))
    assert out["ood_cutoff"] == pytest.approx(89.0)  # lets 90 of the 100 held-out queries through
    assert out["ood_share"] == pytest.approx(0.1) and out["threshold"] == 0.0


def test_lodo_folds_hold_out_whole_datasets(toy, tiny_model_dir):
    """Every toy dataset is alone in its domain: its fold learns the domain from its pseudo-queries; without
    pseudo-queries the folds cannot be measured and say why."""
    from r2r_core.training.router_training import lodo_predictions, routing_examples

    train, _ = toy
    config = RouterConfig(epochs=50, pseudo_per_dataset=6)
    rows = routing_examples(train, config)
    gen = torch.Generator().manual_seed(0)
    domains = sorted({r.domain for r in rows})
    centers = {d: torch.randn(8, generator=gen) * 3 for d in domains}
    x = torch.stack([centers[r.domain] + torch.randn(8, generator=gen) for r in rows])
    folds, unmeasured = lodo_predictions(x, rows, domains, config)
    assert sorted(folds) == ["toyfin", "toylaw", "toymed"] and not unmeasured
    assert "pseudo-queries only" in folds["toylaw"].trained_on
    assert len(folds["toylaw"].truth) == 10 and bool((folds["toylaw"].logits.argmax(1) == folds["toylaw"].truth).all())
    queries_only = [r for r in rows if r.kind == "query"]
    folds, unmeasured = lodo_predictions(x[[i for i, r in enumerate(rows) if r.kind == "query"]], queries_only,
                                         domains, config)
    assert not folds and set(unmeasured) == {"toyfin", "toylaw", "toymed"}
    assert "no pseudo-queries" in unmeasured["toylaw"]


def test_train_router_reports_held_out_datasets_and_calibrates(toy, tiny_model_dir):
    from r2r_core.backbone import load_backbone

    train, dev = toy
    b = load_backbone(str(tiny_model_dir), device="cpu", dtype="float32")
    config = RouterConfig(epochs=100, layer=1, pooling="mean", pseudo_per_dataset=10, pseudo_kinds=["lead"])
    router, report = train_router(b.model, b.tokenizer, train, dev, config, progress=False,
                                  labels=["financial", "general", "legal", "medical"])
    assert router.labels == ["financial", "legal", "medical"] and report["experts_without_queries"] == ["general"]
    assert router.pooling == "mean" and router.layer == 1
    lodo = report["lodo"]
    assert set(lodo["per_dataset"]) == {"toyfin", "toylaw", "toymed"}
    assert {"mean", "min", "confident_wrong", "temperature", "threshold", "ood_cutoff"} <= set(lodo)
    assert router.temperature == lodo["temperature"] == report["temperature"]
    assert router.ood_cutoff == lodo["ood_cutoff"] and router.threshold == lodo["threshold"]
    assert report["threshold"]["rule"] == "lodo" and report["threshold"]["threshold"] == router.threshold
    assert lodo["confident_wrong"] <= config.max_confident_wrong
    assert report["train_rows"]["toylaw"] == {"query": 10, "pseudo": 10}
    assert report["dev"]["n"] == 12


def test_labelled_query_files(tmp_path):
    from r2r_core.training.router_training import read_labelled_queries

    folder = tmp_path / "support"
    folder.mkdir()
    (folder / "queries.jsonl").write_text(
        json.dumps({"_id": "1", "text": "how do I reset my password", "metadata": {"domain": "it"}}) + "\n\n"
        + json.dumps({"text": "printer is offline", "domain": "it", "dataset": "helpdesk"}) + "\n")
    rows = read_labelled_queries(folder)
    assert [(r.text, r.domain, r.dataset, r.kind) for r in rows] == [
        ("how do I reset my password", "it", "support", "query"), ("printer is offline", "it", "helpdesk", "query")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a query without its domain"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*'domain'"):
        read_labelled_queries(bad)
    with pytest.raises(FileNotFoundError, match="queries.jsonl"):
        read_labelled_queries(tmp_path / "nowhere")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"text": "q", "domain": "it", "kind": "synthetic"}) + "\n")
    with pytest.raises(ValueError, match=r"odd.jsonl:1: 'kind'"):
        read_labelled_queries(odd)


def test_written_examples_of_kind_pseudo_are_trained_on_but_never_a_held_out_fold():
    from pathlib import Path

    from r2r_core.training.router_training import PSEUDO, RoutingExample, lodo_predictions, read_labelled_queries

    seed = Path(__file__).resolve().parent.parent / "recipes" / "data" / "router_seed_queries.jsonl"
    rows = read_labelled_queries(seed)  # the file recipes/default.toml trains the shipped router with
    assert {r.kind for r in rows} == {PSEUDO}
    assert Counter(r.domain for r in rows) == {"legal": 45, "medical": 45, "financial": 45}
    real = [RoutingExample(f"{d} question {i}", d, f"{d}-set", "query") for d in ("legal", "medical") for i in range(4)]
    features = torch.randn(len(real) + len(rows), 8, generator=torch.Generator().manual_seed(0))
    config = RouterConfig(epochs=5, pseudo_per_dataset=0)
    folds, unmeasured = lodo_predictions(features, real + rows, ["financial", "legal", "medical"], config)
    # the seed sets are no fold; each real set is held out with its domain learnt from the seed examples only
    assert set(folds) == {"legal-set", "medical-set"} and not unmeasured
    assert folds["legal-set"].trained_on == "without legal-set: legal learnt from seed-legal"


def test_a_domain_without_an_expert_is_refused(toy, tiny_model_dir, tmp_path):
    from r2r_core.backbone import load_backbone

    extra = tmp_path / "sports.jsonl"
    extra.write_text("".join(json.dumps({"text": f"who won the match number {i}", "domain": "sports"}) + "\n"
                             for i in range(4)))
    b = load_backbone(str(tiny_model_dir), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match=r"domain\(s\) \['sports'\] \(from \['sports'\]\) that have no expert"):
        train_router(b.model, b.tokenizer, toy[0], [], RouterConfig(epochs=5, layer=1, queries=[str(extra)]),
                     labels=["financial", "legal", "medical"], progress=False)


CODE_QUERIES = [
    "how do I reverse a list in python", "git rebase onto another branch", "segfault after a double free in C",
    "center a div with flexbox", "read a csv file with pandas", "rust borrow checker mutable borrow error",
    "javascript promise versus async await", "undo the last git commit", "install node on ubuntu",
    "regular expression for an email address",
]


def test_add_a_domain_from_labelled_queries_and_an_expert(tmp_path, tiny_bundle_dir, tiny_model_dir):
    """The README's path: add an expert to a bundle, then refit its router on the bundle's data plus a file of
    queries labelled with the new domain; the new router routes them to the new expert, and its report says the
    new domain could not be held out (one set, no passages)."""
    from conftest import make_random_adapter
    from test_training_helpers import write_toy_beir

    from r2r_core import R2RReranker
    from r2r_core.training.pipeline import refit_router
    from r2r_core.training.recipe import Recipe

    write_toy_beir(tmp_path / "data", n_train=10, n_dev=4)
    reranker = R2RReranker.from_pretrained(tiny_bundle_dir, device="cpu", dtype="float32")
    reranker.add_expert("code", make_random_adapter(tiny_model_dir, tmp_path / "code-adapter", seed=9))
    reranker.save_pretrained(tmp_path / "with-code")
    queries = tmp_path / "code" / "queries.jsonl"
    queries.parent.mkdir()
    queries.write_text("".join(json.dumps({"text": q, "domain": "code"}) + "\n" for q in CODE_QUERIES))
    recipe = Recipe.from_dict({"data": {"paths": [str(tmp_path / "data")]}, "train": {"precision": "fp32"},
                               "router": {"layer": 1, "epochs": 200, "pseudo_per_dataset": 10,
                                          "queries": [str(queries.parent)]}})
    report = refit_router(recipe, tmp_path / "with-code", tmp_path / "routed", progress=False)
    routed = R2RReranker.from_pretrained(tmp_path / "routed", device="cpu", dtype="float32")
    assert routed.router.labels == ["code", "financial", "legal", "medical"] and "code" in routed.experts
    assert "no pseudo-queries" in report["lodo_unmeasured"]["code"]
    assert report["train_rows"]["code"] == {"query": len(CODE_QUERIES)}
    probs = [routed.router.predict_proba(routed.router.encode(routed.model, routed.tokenizer, [q]))[0]
             for q in CODE_QUERIES]
    assert sum(int(p.argmax()) == 0 for p in probs) >= 9  # the training queries of the new domain go to it
