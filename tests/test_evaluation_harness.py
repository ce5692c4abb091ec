"""End to end: ``r2r eval`` on tiny BEIR folders with the real first-stage and MiniLM systems."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from r2r_core.data import Doc, Query, load_beir, read_run
from r2r_core.evaluation import EvalConfig, FirstStageSystem, evaluate, select_queries
from r2r_core.evaluation.cli import parse_systems, register

# Each query's relevant documents sit at the bottom of the first-stage run, so a sensible
# semantic reranker must beat the run order.
MEDICAL = {
    "docs": {
        "m1": ("Migraine treatment", "Triptans and rest in a dark room relieve migraine headaches."),
        "m2": ("Diabetes", "Insulin lowers blood sugar in people with type 1 diabetes."),
        "m3": ("", "The stock market closed higher on Friday after strong earnings."),
        "m4": ("Car repair", "Replace the brake pads when they wear thinner than three millimetres."),
        "m5": ("Flu", "Influenza vaccines are updated every year to match circulating strains."),
        "m6": ("Cooking", "Simmer the tomato sauce for twenty minutes and add basil."),
    },
    "queries": {
        "mq1": "how do I treat a migraine headache",
        "mq2": "what lowers blood sugar in diabetes",
        "mq3": "is there a yearly flu vaccine",
    },
    "qrels": [("mq1", "m1", 2), ("mq1", "m3", 0), ("mq2", "m2", 1), ("mq3", "m5", 1)],
    "run": {
        "mq1": ["m3", "m4", "m6", "m1"],
        "mq2": ["m6", "m3", "m4", "m2"],
        "mq3": ["m4", "m6", "m3", "m5"],
    },
    "domain": "medical",
}
LEGAL = {
    "docs": {
        "l1": ("Termination", "Either party may terminate this agreement with thirty days written notice."),
        "l2": ("Data retention", "We keep your personal data for two years after account closure."),
        "l3": ("", "Bake the bread at two hundred degrees for forty minutes."),
        "l4": ("Weather", "Tomorrow will be sunny with light winds from the west."),
    },
    "queries": {
        "lq1": "how can the contract be terminated",
        "lq2": "how long is my personal data kept",
    },
    "qrels": [("lq1", "l1", 1), ("lq2", "l2", 1)],
    "run": {"lq1": ["l3", "l4", "l2", "l1"], "lq2": ["l4", "l3", "l1", "l2"]},
    "domain": "legal",
}


def write_dataset(root: Path, spec: dict, split: str = "dev") -> Path:
    root.mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as f:
        for doc_id, (title, text) in spec["docs"].items():
            f.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for qid, text in spec["queries"].items():
            f.write(json.dumps({"_id": qid, "text": text, "metadata": {"domain": spec["domain"]}}) + "\n")
    (root / "qrels").mkdir()
    (root / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in spec["qrels"])
    )
    (root / "runs").mkdir()
    lines = [f"{q} Q0 {d} {r} {10.0 - r:.1f} bm25\n" for q, docs in spec["run"].items() for r, d in enumerate(docs, 1)]
    (root / "runs" / f"{split}.trec").write_text("".join(lines))
    return root


@pytest.fixture
def data_root(tmp_path) -> Path:
    write_dataset(tmp_path / "data" / "medical" / "medset", MEDICAL)
    write_dataset(tmp_path / "data" / "legal" / "legset", LEGAL)
    return tmp_path / "data"


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="r2r")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


def test_parse_systems():
    assert parse_systems(["all"])[0][:2] == ["first-stage", "minilm"]
    assert parse_systems(["minilm,first-stage", "forgetting"]) == (["first-stage", "minilm"], True)
    with pytest.raises(ValueError, match="unknown system"):
        parse_systems(["bm42"])


def test_select_queries_is_seeded(data_root):
    ds = load_beir(data_root / "medical" / "medset", "dev")
    assert select_queries(ds) == ["mq1", "mq2", "mq3"]
    a = select_queries(ds, 2, seed=0)
    assert len(a) == 2 and a == select_queries(ds, 2, seed=0)
    assert {tuple(select_queries(ds, 2, seed=s)) for s in range(20)} != {tuple(a)}


class ConstantSystem:
    """A real (trivial) system: every candidate gets the same score."""

    name = "constant"

    def rerank(self, query: Query, candidates: list[Doc]) -> list[float]:
        return [1.0] * len(candidates)


def test_ties_keep_first_stage_order_and_bad_scores_fail(data_root, tmp_path):
    ds = load_beir(data_root / "legal" / "legset", "dev")
    results = evaluate([FirstStageSystem(), ConstantSystem()], [ds], EvalConfig(split="dev", progress=False))
    fs, const = (results["systems"][n]["datasets"]["legset"]["metrics"] for n in ("first-stage", "constant"))
    assert fs == const

    class Broken:
        name = "broken"

        def rerank(self, query, candidates):
            return [0.0]

    with pytest.raises(ValueError, match="broken returned 1 scores for 4 candidates"):
        evaluate([Broken()], [ds], EvalConfig(split="dev", progress=False))


def test_eval_end_to_end_first_stage_and_minilm(data_root, tmp_path, caplog):
    out = tmp_path / "res" / "results.json"
    report = tmp_path / "res" / "results.md"
    plots = tmp_path / "res" / "plots"
    with caplog.at_level("WARNING"):
        code = cli(
            [
                "--data",
                str(data_root),
                "--split",
                "dev",
                "--out",
                str(out),
                "--report",
                str(report),
                "--plots",
                str(plots),
                "--systems",
                "first-stage",
                "minilm",
                "r2r",
                "--fusion",
                "rrf",
                "--no-progress",
            ]
        )
    assert code == 0
    assert "skipping r2r: no --bundle given" in caplog.text
    results = json.loads(out.read_text())
    assert list(results["datasets"]) == ["legset", "medset"]
    assert results["datasets"]["medset"] | {"path": None} == {
        "path": None,
        "split": "dev",
        "domain": "medical",
        "queries": 3,
        "evaluated_queries": 3,
        "avg_candidates": 4.0,
    }
    assert list(results["systems"]) == ["first-stage", "minilm", "minilm+fusion"]
    assert results["skipped"] == {"r2r": "no --bundle given"}
    fs, mini = results["systems"]["first-stage"], results["systems"]["minilm"]
    # the run puts every positive last: first-stage MRR@10 is exactly 1/4 everywhere
    for name in ("legset", "medset"):
        assert fs["datasets"][name]["metrics"]["MRR@10"] == pytest.approx(0.25)
        assert mini["datasets"][name]["metrics"]["nDCG@10"] > fs["datasets"][name]["metrics"]["nDCG@10"]
    assert mini["datasets"]["medset"]["metrics"]["MRR@10"] == pytest.approx(1.0)
    assert fs["macro"]["nDCG@10"] == pytest.approx(
        (fs["datasets"]["legset"]["metrics"]["nDCG@10"] + fs["datasets"]["medset"]["metrics"]["nDCG@10"]) / 2
    )
    assert set(fs["domains"]) == {"legal", "medical"}
    assert mini["latency"]["queries"] == 5 and mini["latency"]["docs_per_sec"] > 0
    assert "routing" not in mini
    assert results["systems"]["minilm+fusion"]["info"]["fusion"] == "rrf"

    # reranked runs: one per system and dataset, readable, in the order that was evaluated
    runs_dir = tmp_path / "res" / "results.runs"
    assert sorted(p.name for p in runs_dir.glob("*.trec")) == sorted(
        f"{d}.dev.{s}.trec" for d in ("legset", "medset") for s in ("first-stage", "minilm", "minilm+fusion")
    )
    # finished runs kept for --resume (fused runs are recomputed from them)
    assert sorted(p.name for p in (runs_dir / "finished").iterdir()) == sorted(
        f"{d}.dev.{s}.json" for d in ("legset", "medset") for s in ("first-stage", "minilm")
    )
    run = read_run(runs_dir / "medset.dev.minilm.trec")
    assert run["mq1"][0][0] == "m1"
    assert [d for d, _ in read_run(runs_dir / "medset.dev.first-stage.trec")["mq1"]] == MEDICAL["run"]["mq1"]
    assert mini["datasets"]["medset"]["run"] == str(runs_dir / "medset.dev.minilm.trec")

    text = report.read_text()
    assert "## nDCG@10 per dataset" in text and "## Macro average over datasets" in text
    assert "| minilm |" in text and "## Latency" in text and "Skipped: `r2r`" in text
    pngs = sorted(p.name for p in plots.iterdir())
    assert pngs == ["nDCG_at_10_per_dataset.png"]
    assert (plots / pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_single_folder_and_max_queries(data_root, tmp_path):
    out = tmp_path / "r.json"
    code = cli(
        [
            "--data",
            str(data_root / "medical" / "medset"),
            "--split",
            "dev",
            "--out",
            str(out),
            "--systems",
            "first-stage",
            "--max-queries",
            "2",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--no-progress",
        ]
    )
    assert code == 0
    results = json.loads(out.read_text())
    assert results["datasets"]["medset"]["evaluated_queries"] == 2
    assert results["config"]["max_queries"] == 2
    assert len(read_run(tmp_path / "runs" / "medset.dev.first-stage.trec")) == 2


def test_eval_bad_folders(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "r.json")
    assert cli(["--data", str(tmp_path / "empty"), "--split", "dev", "--out", out, "--systems", "first-stage"]) == 2
    assert "not a BEIR-format folder" in caplog.text
    assert cli(["--data", str(tmp_path / "missing"), "--split", "dev", "--out", out]) == 2
    assert "does not exist" in caplog.text
    bad = write_dataset(tmp_path / "bad", LEGAL)
    (bad / "runs" / "dev.trec").write_text("lq1 Q0 l1 1 2.0\n")
    caplog.clear()
    assert cli(["--data", str(bad), "--split", "dev", "--out", out, "--systems", "first-stage"]) == 2
    assert "dev.trec:1" in caplog.text and "6 fields" in caplog.text
    caplog.clear()
    assert cli(["--data", str(bad), "--split", "test", "--out", out, "--systems", "first-stage"]) == 2
    assert "no qrels/test.tsv in this dataset (splits: ['dev'])" in caplog.text
    caplog.clear()
    assert cli(["--data", str(bad), "--split", "dev", "--out", out, "--threads", "0"]) == 2
    assert "--threads must be >= 1" in caplog.text
    assert not Path(out).exists()


def test_minilm_document_cache_gives_the_same_scores(data_root):
    from r2r_core.evaluation import MiniLMSystem

    ds = load_beir(data_root / "medical" / "medset", "dev")
    system = MiniLMSystem()
    system.prepare(ds, ["mq1"], max_candidates=100, progress=False)
    assert len(system._cache) == 4
    query, docs = ds.queries["mq2"], ds.candidates("mq2")
    cached = system.rerank(query, docs)  # m2 is not indexed yet: encoded on the fly
    assert len(system._cache) == 5
    system.cache_documents = False
    # documents encoded in other batches (other padding, other GEMM shapes): fp32 chains, ~1e-4
    assert system.rerank(query, docs) == pytest.approx(cached, abs=1e-4)
    assert max(range(len(docs)), key=cached.__getitem__) == [d.id for d in docs].index("m2")
