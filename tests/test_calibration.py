"""Score calibration: the Platt fit, its validation, the bundle field, the reranker applying it, and
``r2r calibrate`` on toy BEIR data with the tiny bundle of ``conftest.py``."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
from test_training_helpers import write_toy_beir

from r2r_core import R2RReranker
from r2r_core.bundle import export_bundle, read_bundle
from r2r_core.calibration import apply_calibration, check_calibration, fit_calibration, fit_platt
from r2r_core.cli import main

LOAD = {"device": "cpu", "dtype": "float32", "batch_size": 4}


def test_platt_recovers_the_scale_and_bias_it_was_sampled_from():
    rng = random.Random(0)
    margins = [rng.uniform(-4, 4) for _ in range(20000)]
    labels = [int(rng.random() < 1 / (1 + math.exp(-(2.0 * m - 1.0)))) for m in margins]
    scale, bias = fit_platt(margins, labels)
    # 20k Bernoulli draws: the MLE's standard errors are ~0.03 (scale) and ~0.02 (bias)
    assert scale == pytest.approx(2.0, abs=0.15) and bias == pytest.approx(-1.0, abs=0.1)


def test_balanced_weights_put_half_at_the_class_boundary():
    # 1 positive per 9 negatives, margins separated: unweighted, the prior pulls every score down; balanced
    # weights (what fit_calibration uses) put relevant above 0.5 and the rest below
    samples = {"medical": [("ds", 1.0 + 0.1 * i, 1) for i in range(10)]
               + [("ds", -1.0 - 0.05 * i, 0) for i in range(90)]}
    scale, bias = fit_calibration(samples)["medical"]
    assert scale > 0
    assert all(apply_calibration(m, (scale, bias)) > 0.5 for _, m, y in samples["medical"] if y)
    assert all(apply_calibration(m, (scale, bias)) < 0.5 for _, m, y in samples["medical"] if not y)


def test_the_scale_stays_positive_so_order_never_flips():
    # labels that prefer a negative slope: the fit flattens the slope instead of reversing it
    scale, _ = fit_platt([-2, -1, 1, 2], [1, 1, 0, 0])
    assert 0 < scale < 0.05


def test_an_expert_without_both_labels_is_left_uncalibrated():
    assert fit_calibration({"legal": [("a", 0.3, 0), ("a", 0.1, 0)]}) == {}


@pytest.mark.parametrize("bad", [{"legal": [0.0, 1.0]}, {"legal": [-1.0, 0.0]}, {"legal": [1.0]},
                                 {"legal": [float("nan"), 0.0]}, {"legal": [True, 0.0]}, {"legal": "1,0"},
                                 ["legal"]])
def test_bad_calibrations_are_refused(bad):
    with pytest.raises(ValueError, match="calibration"):
        check_calibration(bad)


def test_fit_platt_needs_both_labels_and_matching_lengths():
    with pytest.raises(ValueError, match="relevant and one non-relevant"):
        fit_platt([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="as many labels"):
        fit_platt([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="0 or 1"):
        fit_platt([0.1, 0.2], [2, 0])


def test_the_reranker_applies_the_bundles_calibration_and_saves_it(tiny_bundle_dir, tmp_path, tiny_reranker):
    dst = export_bundle(tiny_bundle_dir, tmp_path / "cal", calibration={"legal": [2.0, 1.5]})
    assert read_bundle(dst).calibration == {"legal": [2.0, 1.5]}
    assert "calibration" not in json.loads((tiny_bundle_dir / "r2r.json").read_text())  # empty: not written
    with pytest.raises(ValueError, match="not experts"):
        export_bundle(tiny_bundle_dir, tmp_path / "bad", calibration={"tax": [1.0, 0.0]})
    engine = R2RReranker.from_pretrained(dst, **LOAD)
    docs = ["The seller disclaims all implied warranties.", "Revenue grew 12% in the third quarter."]
    query = "Which clause disclaims warranties?"
    for expert, pair in (("legal", (2.0, 1.5)), ("medical", None)):
        plain = tiny_reranker.rerank(query, docs, expert=expert)
        calibrated = engine.rerank(query, docs, expert=expert)
        assert [r.index for r in calibrated] == [r.index for r in plain]  # order unchanged
        for p, c in zip(plain, calibrated):
            assert c.margin == pytest.approx(p.margin, abs=1e-5)
            expected = 1 / (1 + math.exp(-((pair[0] * c.margin + pair[1]) if pair else c.margin)))
            assert c.score == pytest.approx(expected, abs=1e-6)
    again = engine.save_pretrained(tmp_path / "saved")
    assert read_bundle(again).calibration == {"legal": [2.0, 1.5]}


def test_r2r_calibrate_fits_the_experts_on_judged_data(tiny_bundle_dir, tmp_path, capsys):
    data = tmp_path / "data"
    write_toy_beir(data, n_train=4, n_dev=4)
    src = tmp_path / "src"
    shutil.copytree(tiny_bundle_dir, src)
    out = tmp_path / "calibrated"
    assert main(["calibrate", "--bundle", str(src), "--data", str(data), "--split", "dev", "--out", str(out),
                 "--max-queries", "4", "--max-candidates", "4"]) == 0
    config = read_bundle(out)
    # each toy dataset is one domain: its expert is fitted, and so is the fallback (the backbone) over all three
    assert set(config.calibration) == {"legal", "medical", "financial", "__base__"}
    assert all(scale > 0 for scale, _ in config.calibration.values())
    assert config.metadata["calibration"]["split"] == "dev"
    assert read_bundle(src).calibration == {}  # the source bundle is left as it was
    printed = capsys.readouterr().out
    assert "relevant above 0.5" in printed and str(out) in printed
    with pytest.raises(SystemExit, match="not an R2R bundle"):
        main(["calibrate", "--bundle", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "x")])
