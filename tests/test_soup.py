"""benchmarks/soup.py: the weighted mean of LoRA adapters written into a bundle's expert."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.soup import main, parse_sources
from r2r_core.training.averaging import weighted_mean


def test_weights_parse_and_bad_ones_are_refused():
    assert parse_sources("a,b@2,c@0.5") == [("a", 1.0), ("b", 2.0), ("c", 0.5)]
    for bad in ("a@x", "a@0", "@2", "a,,b"):
        with pytest.raises(ValueError):
            parse_sources(bad)


def test_the_soup_is_the_weighted_mean_of_each_lora_tensor(tiny_bundle_dir, tiny_adapters, tmp_path):
    legal, medical = tiny_adapters["legal"], tiny_adapters["medical"]
    a, b = (load_file(str(p / "adapter_model.safetensors")) for p in (legal, medical))
    mean = weighted_mean([(str(legal), 3.0), (str(medical), 1.0)])
    assert set(mean) == set(a)
    for k in a:
        torch.testing.assert_close(mean[k], 0.75 * a[k].float() + 0.25 * b[k].float())
    out = tmp_path / "soup"
    main(["--bundle", str(tiny_bundle_dir), "--out", str(out), "--expert", f"financial={legal}@3,{medical}"])
    written = load_file(str(out / "experts" / "financial" / "adapter_model.safetensors"))
    before = load_file(str(tiny_bundle_dir / "experts" / "financial" / "adapter_model.safetensors"))
    for k in written:  # stored in the dtype of the adapter it replaces (fp32 here: exact up to fp32 rounding)
        assert written[k].dtype == before[k].dtype
        torch.testing.assert_close(written[k], mean[k].to(before[k].dtype))
    untouched = (out / "experts" / "legal" / "adapter_model.safetensors").read_bytes()
    assert untouched == (tiny_bundle_dir / "experts" / "legal" / "adapter_model.safetensors").read_bytes()
    meta = json.loads((out / "r2r.json").read_text())["metadata"]["soup"]
    assert meta == {"financial": [[str(legal), 3.0], [str(medical), 1.0]]}
    with pytest.raises(SystemExit, match="exists"):
        main(["--bundle", str(tiny_bundle_dir), "--out", str(out), "--expert", f"financial={legal}"])
    with pytest.raises(SystemExit, match="one of"):
        main(["--bundle", str(tiny_bundle_dir), "--out", str(tmp_path / "x"), "--expert", f"nope={legal}"])
