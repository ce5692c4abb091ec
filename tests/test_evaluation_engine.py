"""``r2r eval`` with the real R2R engine on the tiny random model and bundle from conftest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_evaluation_harness import LEGAL, MEDICAL, cli, write_dataset

from r2r_core.data import load_beir, read_run
from r2r_core.evaluation import EvalConfig, RerankerSystem, evaluate


def _fixture(request, name):
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        pytest.skip(f"fixture {name!r} is not provided by tests/conftest.py yet")


@pytest.fixture
def data_root(tmp_path) -> Path:
    write_dataset(tmp_path / "data" / "medical" / "medset", MEDICAL)
    write_dataset(tmp_path / "data" / "legal" / "legset", LEGAL)
    return tmp_path / "data"


@pytest.fixture(scope="module")
def single_lora_bundle(request, tmp_path_factory):
    """A one-expert bundle (no router) saved through the public API."""
    from r2r_core import R2RReranker

    model_dir = _fixture(request, "tiny_model_dir")
    adapters = _fixture(request, "tiny_adapters")
    reranker = R2RReranker.from_pretrained(model_dir, device="cpu", dtype="float32", batch_size=4)
    reranker.add_expert("pooled", adapters["legal"])
    path = tmp_path_factory.mktemp("single") / "bundle"
    reranker.save_pretrained(path)
    return path


def test_reranker_system_policies(request, data_root):
    reranker = _fixture(request, "tiny_reranker")
    ds = load_beir(data_root / "medical" / "medset", "dev")
    query = ds.queries["mq1"]
    docs = ds.candidates("mq1")
    texts = [d.full_text for d in docs]

    fixed = RerankerSystem("legal-only", reranker, "fixed", "legal")
    expected = {r.index: r.margin for r in reranker.rerank(query.text, texts, expert="legal")}
    assert fixed.rerank(query, docs) == pytest.approx([expected[i] for i in range(len(docs))])
    assert fixed.choose_expert(query) == "legal"

    oracle = RerankerSystem("oracle", reranker, "oracle")
    assert oracle.choose_expert(query) == "medical"
    assert not oracle.reports_routing

    routed = RerankerSystem("r2r", reranker, "router")
    assert routed.reports_routing
    assert routed.choose_expert(query) == reranker.route(query.text).expert

    with pytest.raises(KeyError, match="'sports' is not in the reranker; available"):
        RerankerSystem("x", reranker, "fixed", "sports")
    with pytest.raises(ValueError, match="`expert` is required"):
        RerankerSystem("x", reranker, "fixed")


def test_oracle_needs_an_expert_per_domain(request, tmp_path):
    reranker = _fixture(request, "tiny_reranker")
    sports = dict(LEGAL, domain="sports")
    ds = load_beir(write_dataset(tmp_path / "sportset", sports), "dev")
    oracle = RerankerSystem("r2r-oracle", reranker, "oracle", source="tiny")
    with pytest.raises(KeyError, match=r"domain 'sports'.*queries\.jsonl.*experts \['financial', 'legal', 'medical'\]"):
        evaluate([oracle], [ds], EvalConfig(split="dev", progress=False))


def test_router_policy_needs_a_router(request):
    single = _fixture(request, "tiny_model_dir")
    from r2r_core import R2RReranker

    reranker = R2RReranker.from_pretrained(single, device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="no router"):
        RerankerSystem("r2r", reranker, "router")


def test_eval_all_systems_with_bundles(request, data_root, tmp_path, single_lora_bundle):
    bundle = _fixture(request, "tiny_bundle_dir")
    reranker = _fixture(request, "tiny_reranker")
    out = tmp_path / "results.json"
    code = cli(
        [
            "--data",
            str(data_root),
            "--split",
            "dev",
            "--out",
            str(out),
            "--report",
            str(tmp_path / "r.md"),
            "--plots",
            str(tmp_path / "plots"),
            "--bundle",
            str(bundle),
            "--direct-ft-bundle",
            str(bundle),
            "--single-lora-bundle",
            str(single_lora_bundle),
            "--systems",
            "first-stage,base,single-lora,direct-ft,r2r-oracle,r2r",
            "forgetting",
            "--fusion",
            "linear",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--batch-size",
            "4",
            "--no-progress",
        ]
    )
    assert code == 0
    results = json.loads(out.read_text())
    systems = results["systems"]
    assert list(systems) == [
        "first-stage",
        "base",
        "base+fusion",
        "single-lora",
        "single-lora+fusion",
        "direct-ft",
        "direct-ft+fusion",
        "r2r-oracle",
        "r2r-oracle+fusion",
        "r2r",
        "r2r+fusion",
    ]
    assert results["skipped"] == {}
    assert systems["single-lora"]["info"] == {
        "policy": "fixed",
        "expert": "pooled",
        "bundle": str(single_lora_bundle),
        "fusion": None,
    }
    assert systems["r2r"]["info"]["policy"] == "router" and systems["r2r-oracle"]["info"]["policy"] == "oracle"

    # routing is reported for the router only, against metadata.domain
    assert "routing" not in systems["r2r-oracle"]
    routing = systems["r2r"]["routing"]
    assert routing["n"] == 5 and routing["labels"] == ["legal", "medical"]
    assert 0.0 <= routing["accuracy"] <= 1.0

    # forgetting: every expert on every dataset; the in-domain cell equals the oracle run
    forgetting = results["forgetting"]
    assert forgetting["experts"] == ["financial", "legal", "medical"]
    assert set(forgetting["table"]["legal"]) == {"legset", "medset"}
    assert forgetting["table"]["medical"]["medset"] == systems["r2r-oracle"]["datasets"]["medset"]["metrics"]["nDCG@10"]
    assert forgetting["metrics"]["legal"]["legset"] == systems["r2r-oracle"]["datasets"]["legset"]["metrics"]

    # the router's run is, query by query, the run of the expert it picked
    runs = tmp_path / "results.runs"
    for name, spec in (("medset", MEDICAL), ("legset", LEGAL)):
        r2r_run = read_run(runs / f"{name}.dev.r2r.trec")
        for qid, text in spec["queries"].items():
            expert = reranker.route(text).expert
            ref = runs / (f"{name}.dev.base.trec" if expert == "__base__" else f"{name}.dev.expert_{expert}.trec")
            assert [d for d, _ in r2r_run[qid]] == [d for d, _ in read_run(ref)[qid]], (qid, expert)

    report = (tmp_path / "r.md").read_text()
    assert "## Routing" in report and "## Forgetting" in report and "__base__ (no adapter)" in report
    assert "## The paper's claims on this data" in report and "`r2r` beats `first-stage`" in report
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "forgetting.png",
        "nDCG_at_10_per_dataset.png",
        "routing_confusion_r2r.png",
    ]


def test_single_lora_bundle_with_several_experts_needs_a_name(request, data_root, tmp_path, caplog):
    bundle = _fixture(request, "tiny_bundle_dir")
    code = cli(
        [
            "--data",
            str(data_root),
            "--split",
            "dev",
            "--out",
            str(tmp_path / "r.json"),
            "--single-lora-bundle",
            str(bundle),
            "--systems",
            "single-lora",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--no-progress",
        ]
    )
    assert code == 2
    assert "--single-lora-expert" in caplog.text
    code = cli(
        [
            "--data",
            str(data_root),
            "--split",
            "dev",
            "--out",
            str(tmp_path / "r.json"),
            "--single-lora-bundle",
            str(bundle),
            "--single-lora-expert",
            "legal",
            "--systems",
            "single-lora",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--no-progress",
        ]
    )
    assert code == 0


def test_resume_reuses_finished_runs_and_rescores_what_changed(request, data_root, tmp_path, monkeypatch):
    import os
    import shutil

    import r2r_core.evaluation.harness as harness

    bundle = tmp_path / "bundle"
    shutil.copytree(_fixture(request, "tiny_bundle_dir"), bundle)
    out = tmp_path / "results.json"
    argv = ["--data", str(data_root), "--split", "dev", "--out", str(out), "--bundle", str(bundle),
            "--device", "cpu", "--dtype", "float32", "--batch-size", "4", "--no-progress"]
    # Two processes' worth of work: each writes its finished runs to the shared runs dir.
    assert cli([*argv, "--systems", "first-stage,base"]) == 0
    assert cli([*argv, "--systems", "r2r"]) == 0
    finished = sorted(p.name for p in (tmp_path / "results.runs" / "finished").glob("*.json"))
    assert finished == [f"{d}.dev.{s}.json" for d in ("legset", "medset") for s in ("base", "first-stage", "r2r")]
    r2r_alone = json.loads(out.read_text())["systems"]["r2r"]["datasets"]
    separate = {d: r2r_alone[d]["metrics"] for d in ("legset", "medset")}

    scored: list[tuple[str, str]] = []
    real_run_system = harness.run_system

    def counting_run_system(system, dataset, *args, **kwargs):
        scored.append((system.name, dataset.name))
        return real_run_system(system, dataset, *args, **kwargs)

    monkeypatch.setattr(harness, "run_system", counting_run_system)
    assert cli([*argv, "--systems", "first-stage,base,r2r", "--resume"]) == 0
    assert scored == []  # everything came from the finished runs
    merged = json.loads(out.read_text())
    assert list(merged["systems"]) == ["first-stage", "base", "r2r"]
    for d in ("legset", "medset"):
        assert merged["systems"]["r2r"]["datasets"][d]["metrics"] == separate[d]

    # Without --resume everything is scored again; a changed bundle file or another subsample is too.
    assert cli([*argv, "--systems", "first-stage"]) == 0
    assert scored == [("first-stage", "legset"), ("first-stage", "medset")]
    scored.clear()
    st = (bundle / "router.json").stat()
    os.utime(bundle / "router.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cli([*argv, "--systems", "first-stage,base,r2r", "--resume"]) == 0
    # the router changed: r2r is scored again; the base model does not read the bundle's files
    assert sorted(scored) == [("r2r", "legset"), ("r2r", "medset")]
    scored.clear()
    assert cli([*argv, "--systems", "first-stage", "--resume", "--max-queries", "1"]) == 0
    assert sorted(scored) == [("first-stage", "legset"), ("first-stage", "medset")]
