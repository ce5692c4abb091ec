"""Bundle format: round trip, validation, base-model fingerprint, never unpickling."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from r2r_core import R2RReranker
from r2r_core.backbone import fingerprint_model, fingerprints_match, load_backbone
from r2r_core.bundle import read_bundle

DOCS = ["Termination requires notice.", "Metformin causes nausea.", "Revenue grew 12%."]


def _copy(src, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    return dst


def test_bundle_layout_is_peft_compatible(tiny_bundle_dir):
    from peft import PeftConfig

    config = read_bundle(tiny_bundle_dir)
    assert config.experts == {n: f"experts/{n}" for n in ["legal", "medical", "financial"]}
    for sub in config.experts.values():
        assert PeftConfig.from_pretrained(str(tiny_bundle_dir / sub)).r == 4
    assert (tiny_bundle_dir / "router.safetensors").is_file()


def test_save_pretrained_round_trip_gives_the_same_scores(tiny_reranker, tmp_path):
    path = tiny_reranker.save_pretrained(tmp_path / "saved")
    again = R2RReranker.from_pretrained(path, device="cpu", dtype="float32")
    assert again.experts == tiny_reranker.experts
    for expert in again.experts:
        assert again.score("q", DOCS, expert=expert) == pytest.approx(tiny_reranker.score("q", DOCS, expert=expert),
                                                                      abs=1e-6)
    q = "What was the company's revenue growth in 2019?"
    assert again.route(q).expert == tiny_reranker.route(q).expert
    assert again._experts.instruction("legal") == tiny_reranker._experts.instruction("legal")


def test_export_stores_bf16_adapters_at_half_size_with_close_scores(tiny_bundle_dir, tiny_reranker, tmp_path):
    from safetensors import safe_open

    from r2r_core.bundle import export_bundle

    out = export_bundle(tiny_bundle_dir, tmp_path / "bf16", adapter_dtype="bfloat16", metadata={"note": "x"})
    config = read_bundle(out)
    assert config.metadata["adapter_dtype"] == "bfloat16" and config.metadata["note"] == "x"
    assert config.base_fingerprint == read_bundle(tiny_bundle_dir).base_fingerprint
    for name, sub in config.experts.items():
        src = tiny_bundle_dir / read_bundle(tiny_bundle_dir).experts[name] / "adapter_model.safetensors"
        dst = out / sub / "adapter_model.safetensors"
        with safe_open(str(dst), framework="pt") as f:
            new = {k: f.get_tensor(k) for k in f.keys()}
        with safe_open(str(src), framework="pt") as f:
            old = {k: f.get_tensor(k) for k in f.keys()}
        assert new.keys() == old.keys()
        assert {str(t.dtype) for t in new.values()} == {"torch.bfloat16"}
        assert sum(t.nbytes for t in new.values()) * 2 == sum(t.nbytes for t in old.values())
    # Loaded on an fp32 backbone, each expert holds exactly the bf16-rounded weights of the original, in fp32.
    again = R2RReranker.from_pretrained(out, device="cpu", dtype="float32")
    assert again.threshold == tiny_reranker.threshold and again.experts == tiny_reranker.experts
    want = {k: p for k, p in tiny_reranker.model.named_parameters() if "lora_" in k}
    got = {k: p for k, p in again.model.named_parameters() if "lora_" in k}
    assert got.keys() == want.keys() and want
    for k, p in got.items():
        assert p.dtype == torch.float32
        assert torch.equal(p, want[k].to(torch.bfloat16).float()), k
    with pytest.raises(ValueError, match="adapter_dtype"):
        export_bundle(tiny_bundle_dir, tmp_path / "bad", adapter_dtype="int8")
    with pytest.raises(ValueError, match="other than its source"):
        export_bundle(out, out)


def test_missing_expert_file_is_named(tiny_bundle_dir, tmp_path):
    b = _copy(tiny_bundle_dir, tmp_path)
    (b / "experts" / "legal" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="legal.*adapter_model.safetensors"):
        R2RReranker.from_pretrained(b)


def test_corrupt_config_is_named(tiny_bundle_dir, tmp_path):
    b = _copy(tiny_bundle_dir, tmp_path)
    (b / "r2r.json").write_text("{not json")
    with pytest.raises(ValueError, match="r2r.json is not valid JSON"):
        R2RReranker.from_pretrained(b)
    data = json.loads((tiny_bundle_dir / "r2r.json").read_text())
    data["format_version"] = 99
    (b / "r2r.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format_version"):
        read_bundle(b)


def test_corrupt_router_weights_are_named(tiny_bundle_dir, tmp_path):
    b = _copy(tiny_bundle_dir, tmp_path)
    (b / "router.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="router.safetensors"):
        R2RReranker.from_pretrained(b, device="cpu", dtype="float32")


def test_mismatched_base_fingerprint_is_refused(tiny_bundle_dir, tmp_path):
    b = _copy(tiny_bundle_dir, tmp_path)
    data = json.loads((b / "r2r.json").read_text())
    data["base_fingerprint"]["probe"] = [v + 0.5 for v in data["base_fingerprint"]["probe"]]
    (b / "r2r.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="different base model"):
        R2RReranker.from_pretrained(b, device="cpu", dtype="float32")


def test_expert_for_another_base_is_refused(tiny_model_dir, tiny_bundle_dir, tmp_path):
    b = _copy(tiny_bundle_dir, tmp_path)
    meta_path = b / "experts" / "medical" / "r2r_expert.json"
    meta = json.loads(meta_path.read_text())
    meta["base_fingerprint"]["probe"] = [v * 3 + 1 for v in meta["base_fingerprint"]["probe"]]
    meta_path.write_text(json.dumps(meta))
    r = R2RReranker.from_pretrained(str(tiny_model_dir), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="different base model"):
        r.add_expert("medical", b / "experts" / "medical")


def test_pickled_adapters_are_never_loaded(tiny_model_dir, tiny_bundle_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_bundle_dir / "experts" / "legal" / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(b"not loaded")
    r = R2RReranker.from_pretrained(str(tiny_model_dir), device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="pickled"):
        r.add_expert("legal", folder)


def test_fingerprint_is_dtype_robust_but_tells_models_apart(tiny_model_dir):
    fp32 = load_backbone(str(tiny_model_dir), device="cpu", dtype="float32")
    bf16 = load_backbone(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert fingerprints_match(fp32.fingerprint, bf16.fingerprint)
    fp32.model.to(dtype=__import__("torch").bfloat16)
    assert fingerprints_match(fp32.fingerprint, fingerprint_model(fp32.model))
    import torch

    with torch.no_grad():
        for p in fp32.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert not fingerprints_match(fp32.fingerprint, fingerprint_model(fp32.model))


def test_not_a_bundle_and_bad_names(tmp_path):
    with pytest.raises(ValueError, match="name_or_path"):
        R2RReranker.from_pretrained("")
    with pytest.raises(OSError, match="Could not load the backbone"):
        R2RReranker.from_pretrained(str(tmp_path / "nothing-here"))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path, umask):
    import os

    from r2r_core.fsutil import atomic_json

    previous = os.umask(umask)
    try:
        atomic_json({"a": 1}, tmp_path / "report.json")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(previous)
    assert json.loads((tmp_path / "report.json").read_text()) == {"a": 1}
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o666 & ~umask
