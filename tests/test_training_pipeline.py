"""`r2r train` end to end: smoke recipe on a toy BEIR collection with the tiny model -> loadable bundles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_training_helpers import write_toy_beir

from r2r_core.cli import main

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke.toml"


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu(fast_cpu_module):
    yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("pipeline")
    write_toy_beir(root / "data", n_train=10, n_dev=4)
    general = root / "general.jsonl"  # questions from no domain, as in the default recipe: `general` is a route
    general.write_text("".join(json.dumps({"text": t, "domain": "general", "dataset": "seed-general", "kind": "pseudo"})
                               + "\n" for t in ("How long should I boil an egg?", "Who won the last world cup?",
                                                 "What is the tallest mountain in Europe?")))
    out = root / "out"
    args = ["train", "--recipe", str(SMOKE), "--data", str(root / "data"), "--base-model", str(tiny_model_dir),
            "--out", str(out), "--precision", "fp32", "--no-progress", "--ablations", "single-lora", "direct-ft",
            "--set", "stage2.max_length=144",  # Stage 2 prompts shorter than [train]'s 160: the bundles record them
            "--set", f"router.queries=[{json.dumps(str(general))}]"]
    assert main(args) == 0
    return out, args


def test_bundle_loads_and_routes_its_training_queries(trained):
    from r2r_core import R2RReranker
    from r2r_core.data import find_datasets, load_beir

    out, _ = trained
    reranker = R2RReranker.from_pretrained(out / "bundle", device="cpu", dtype="float32")
    assert sorted(reranker.experts) == ["financial", "general", "legal", "medical"]
    # the generalist is a route of its own: the router learnt it from the labelled everyday questions
    assert reranker.router is not None
    assert sorted(reranker.router.labels) == ["financial", "general", "legal", "medical"]
    assert reranker.fallback == "general"  # Stage 1's generalist takes the queries the router is unsure of
    assert reranker.encoder.max_length == 144  # scored at the length the experts were trained at
    general = (out / "bundle" / "experts" / "general" / "adapter_model.safetensors").read_bytes()
    assert general == (out / "runs" / "stage1-eag" / "adapter" / "adapter_model.safetensors").read_bytes()
    data = [load_beir(f, "train") for f in find_datasets(out.parent / "data")]
    for ds in data:
        for q in ds.queries.values():
            route = reranker.route(q.text)
            assert max(route.probabilities, key=route.probabilities.get) == q.domain, q.text
            # the threshold comes from datasets the router never saw; on toy data with a random backbone it does not
            # generalise, so an unsure route goes to the generalist, saying why
            assert route.expert == q.domain or (route.expert == "general" and route.reason != "routed"), q.text
    docs = list(next(iter(data[0].corpus.values())).text for _ in range(1)) + ["unrelated"]
    results = reranker.rerank(next(iter(data[0].queries.values())).text, docs)
    assert len(results) == 2 and results[0].expert in reranker.experts


def test_layout_reports_and_ablation_bundles(trained):
    from r2r_core import R2RReranker
    from r2r_core.bundle import read_bundle

    out, _ = trained
    report = json.loads((out / "train_report.json").read_text())
    assert set(report["runs"]) == {"stage1-eag", "stage2-financial", "stage2-legal", "stage2-medical",
                                   "direct-financial", "direct-legal", "direct-medical", "single-lora"}
    assert all(r["completed"] and r["steps_done"] == 6 for r in report["runs"].values())
    assert report["router"]["dev"]["n"] == 12 and "description" in report["router"]["threshold"]
    assert report["abstraction"]["datasets"]["toyfin"]["mentions"] > 0
    assert (out / "abstraction_report.md").read_text().count("### ") == 3
    stage1 = [json.loads(x) for x in (out / "data" / "abstracted.jsonl").read_text().splitlines()]
    assert any("[" in g["query"] for g in stage1)
    cfg = read_bundle(out / "bundle")
    assert cfg.threshold == report["router"]["threshold"]["threshold"]
    assert cfg.max_length == 144  # the prompt length the domain experts were trained at
    assert cfg.metadata["router_threshold_rule"]["rule"] == "lodo"  # chosen on leave-one-dataset-out folds
    assert set(report["router"]["lodo"]["per_dataset"]) == {"toyfin", "toylaw", "toymed"}
    assert json.loads((out / "bundle" / "training_report.json").read_text())["router"]["dev"]["accuracy"] >= 0
    single = R2RReranker.from_pretrained(out / "ablations" / "single-lora", device="cpu", dtype="float32")
    assert single.experts == ["single-lora"] and single.router is None
    assert single.encoder.max_length == 160  # single-lora trains with [train]'s length, which it records
    direct = read_bundle(out / "ablations" / "direct-ft")
    # the ablation swaps the domain experts only; it keeps the router and the generalist it routes to
    assert sorted(direct.experts) == ["financial", "general", "legal", "medical"] and direct.router is not None
    assert direct.fallback == "general"
    assert direct.max_length == 144
    # one PNG of every run's loss and dev curve
    assert report["curves"] == str(out / "training_curves.png")
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_curves_read_resumed_and_torn_logs(tmp_path):
    from r2r_core.training.curves import find_run_logs, plot_training_curves, read_metrics

    log = tmp_path / "out" / "runs" / "stage1-eag" / "metrics.jsonl"
    log.parent.mkdir(parents=True)
    lines = [{"step": 1, "loss": 2.1}, {"step": 2, "loss": 1.9}, {"step": 2, "event": "eval", "ndcg@10": 0.5},
             {"step": 2, "loss": 1.8}, {"step": 3, "loss": 1.5}]  # step 2 logged again after a resume
    log.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "lo')
    steps, evals = read_metrics(log)
    assert [(r["step"], r["loss"]) for r in steps] == [(1, 2.1), (2, 1.8), (3, 1.5)]
    assert evals == [{"step": 2, "event": "eval", "ndcg@10": 0.5}]
    runs = find_run_logs(tmp_path / "out")
    assert list(runs) == ["stage1-eag"]
    png = plot_training_curves(runs, tmp_path / "c.png", group_size=8)
    assert png.stat().st_size > 1000
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        find_run_logs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        find_run_logs(tmp_path / "missing")


def test_resume_reuses_finished_work(trained):
    out, args = trained
    before = json.loads((out / "train_report.json").read_text())
    assert main([*args, "--resume"]) == 0
    after = json.loads((out / "train_report.json").read_text())
    for name, run in before["runs"].items():
        assert after["runs"][name]["best_metric"] == run["best_metric"]
        assert after["runs"][name]["wall_s"] < 1.0, f"{name} was retrained instead of reused"


def test_refuses_to_overwrite_without_resume(trained, capsys):
    out, args = trained
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--data", "/nonexistent/beir", "--out", str(out / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_router_only_refits_the_router_and_copies_the_experts(trained, tmp_path, capsys):
    from r2r_core import R2RReranker
    from r2r_core.bundle import read_bundle

    out, args = trained
    data = args[args.index("--data") + 1]
    refit = tmp_path / "refit"
    base = ["train", "--recipe", str(SMOKE), "--data", data, "--router-only", str(out / "bundle"),
            "--precision", "fp32", "--no-progress", "--set", "router.layer=1"]
    assert main(base) == 2 and "needs --out" in capsys.readouterr().err
    assert main([*base, "--out", str(refit)]) == 0
    assert "router on layer 1" in capsys.readouterr().out
    old, new = read_bundle(out / "bundle"), read_bundle(refit)
    assert new.experts == old.experts and new.template == old.template
    assert new.max_length == old.max_length == 144  # the experts are the same, so is their trained length
    for sub in old.experts.values():
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert (refit / sub / name).read_bytes() == (out / "bundle" / sub / name).read_bytes()
    report = json.loads((refit / "router_report.json").read_text())
    mode = (refit / "r2r.json").stat().st_mode & 0o777
    assert (refit / "router_report.json").stat().st_mode & 0o777 == mode  # as readable as the rest of the bundle
    assert new.threshold == report["threshold"]["threshold"] and report["dev"]["n"] == 12
    assert new.metadata["router_recipe"]["layer"] == 1
    reranker = R2RReranker.from_pretrained(refit, device="cpu", dtype="float32")
    assert reranker.router.layer == 1 and reranker.router.threshold == new.threshold


def test_warm_start_from_the_shipped_generalist(trained, tmp_path, monkeypatch):
    """Without a run folder, Stage 1 starts from the shipped bundle's `general` expert when its LoRA matches."""
    import r2r_core.reranker

    out, args = trained
    monkeypatch.setattr(r2r_core.reranker, "DEFAULT_BUNDLE_DIR", out / "bundle")
    warm = tmp_path / "warm"
    cmd = [a if a != str(out) else str(warm) for a in args if a not in ("--ablations", "single-lora", "direct-ft")]
    assert main([*cmd, "--set", "output.warm_start=true", "--max-steps", "1"]) == 0
    settings = json.loads((warm / "runs" / "stage1-eag" / "run_settings.json").read_text())
    assert settings["init_adapter"] == "experts/general"
    first = json.loads((out / "train_report.json").read_text())["runs"]["stage1-eag"]
    again = json.loads((warm / "train_report.json").read_text())["runs"]["stage1-eag"]
    # step 0 of the warm run evaluates the shipped generalist: the first run's best checkpoint, same dev set
    assert again["start_metric"] == pytest.approx(first["best_metric"], abs=1e-6)
    # other LoRA settings than the shipped ones: no warm start
    cold = tmp_path / "cold"
    cmd = [a if a != str(warm) else str(cold) for a in cmd]
    assert main([*cmd, "--set", "output.warm_start=true", "--set", "train.lora.r=2", "--max-steps", "1"]) == 0
    assert json.loads((cold / "runs" / "stage1-eag" / "run_settings.json").read_text())["init_adapter"] is None
    # a run folder that started cold resumes cold once warm_start is on, and a warm one resumes warm
    plain = tmp_path / "plain"
    cmd = [a if a != str(cold) else str(plain) for a in cmd]
    assert main([*cmd, "--max-steps", "1"]) == 0
    assert main([*cmd, "--max-steps", "1", "--set", "output.warm_start=true", "--resume"]) == 0
    cmd = [a if a != str(plain) else str(warm) for a in cmd]
    assert main([*cmd, "--max-steps", "1", "--set", "output.warm_start=true", "--resume"]) == 0
