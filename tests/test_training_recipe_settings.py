"""The cheap-recipe settings of the trainer (top-layer LoRA, the pointwise BCE term), the resume guard against
changed settings, and the bundle's fallback expert, on a tiny random Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

# the tiny backbone, its chat template and the one-thread CPU setting of the trainer tests
from test_training_trainer import _fast_cpu, backbone, template  # noqa: E402,F401

from r2r_core.training.curation import TrainGroup
from r2r_core.training.loss import group_bce, group_infonce, group_loss
from r2r_core.training.trainer import LoraSettings, RunMismatchError, TrainConfig, train_adapter

SUBJECTS = ["asthma", "revenue", "warranty", "migraine", "goodwill", "arbitration"]


def _groups() -> list[TrainGroup]:
    out = []
    for i, s in enumerate(SUBJECTS):
        others = [SUBJECTS[(i + k) % len(SUBJECTS)] for k in (1, 2, 3)]
        docs = [f"all about {s}"] + [f"all about {o}" for o in others]
        out.append(TrainGroup(f"g{i}", "toy", "misc", f"q{i}", f"tell me about {s}",
                              tuple(f"d{i}-{k}" for k in range(4)), tuple(docs)))
    return out


def _config(**kw) -> TrainConfig:
    base = dict(steps=3, groups_per_batch=2, lr=5e-3, max_length=64, eval_every=100, save_every=1, precision="fp32",
                warmup_ratio=0.0, eval_at_start=False, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    base.update(kw)
    return TrainConfig(**base)


def test_bce_term_is_the_pointwise_formula_and_adds_to_infonce():
    m = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    sig = torch.sigmoid(m)
    expected = torch.stack([(-torch.log(sig[g, 0]) - torch.log(1 - sig[g, 1:]).mean()) / 2 for g in range(2)]).mean()
    # fp32 elementwise log/softplus: a few ulps
    assert group_bce(m).item() == pytest.approx(expected.item(), rel=1e-5)
    assert group_loss(m, bce_weight=0.0).item() == pytest.approx(group_infonce(m).item(), rel=1e-6)
    assert group_loss(m, bce_weight=0.5).item() == pytest.approx(
        group_infonce(m).item() + 0.5 * expected.item(), rel=1e-5)
    # shifting every margin leaves InfoNCE unchanged but not the BCE term: that is what calibrates the score
    assert group_infonce(m + 5).item() == pytest.approx(group_infonce(m).item(), rel=1e-5)
    assert group_bce(m + 5).item() != pytest.approx(group_bce(m).item(), rel=1e-2)
    with pytest.raises(ValueError, match="margins"):
        group_bce(torch.zeros(3))


def test_top_layers_adapts_only_the_top_layers(backbone, template, tmp_path):
    n_layers = backbone.model.config.num_hidden_layers
    assert LoraSettings(top_layers=1).layers(n_layers) == [n_layers - 1]
    assert LoraSettings(top_layers=n_layers + 3).layers(n_layers) is None
    with pytest.raises(ValueError, match="top_layers"):
        LoraSettings(top_layers=0)
    cfg = _config(lora=LoraSettings(r=4, alpha=8, dropout=0.0, top_layers=1), bce_weight=0.5)
    res = train_adapter(backbone.model, backbone.tokenizer, template, "Judge", _groups(), cfg, tmp_path / "run",
                        progress=False)
    weights = load_file(f"{res.adapter_dir}/adapter_model.safetensors")
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in weights}
    assert layers == {n_layers - 1}
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [n_layers - 1]
    # the backbone is plain again after the run, with no LoRA left in any layer
    assert not any("lora_" in n for n, _ in backbone.model.named_parameters())

    # the engine serves a top-layers expert: its fast path (prefix cache, folding) equals peft's per-row path
    from r2r_core import R2RReranker

    rr = R2RReranker.from_pretrained(backbone.model_id, device="cpu", dtype="float32")
    rr.add_expert("top", res.adapter_dir)
    docs = ["all about asthma", "all about revenue and goodwill", "nothing"]
    fast = [r.margin for r in sorted(rr.rerank("tell me about asthma", docs, expert="top"), key=lambda r: r.index)]
    base = [r.margin for r in sorted(rr.rerank("tell me about asthma", docs, expert="__base__"),
                                     key=lambda r: r.index)]
    rr.use_prefix_cache = False
    plain = [r.margin for r in sorted(rr.rerank("tell me about asthma", docs, expert="top"), key=lambda r: r.index)]
    # fp32 matmul chains over two tiny layers, two kernel orders (cached prefix vs whole prompt): ~1e-4 absolute
    assert fast == pytest.approx(plain, abs=1e-3)
    assert fast != pytest.approx(base, abs=1e-3)


def test_resume_refuses_a_run_folder_made_with_other_settings(backbone, template, tmp_path):
    run = tmp_path / "run"
    train_adapter(backbone.model, backbone.tokenizer, template, "Judge", _groups(), _config(), run, progress=False,
                  stop_after=1)
    with pytest.raises(RunMismatchError) as info:
        train_adapter(backbone.model, backbone.tokenizer, template, "Judge", _groups(), _config(lr=1e-3), run,
                      progress=False)
    assert "lr" in str(info.value) and "0.005" in str(info.value)
    with pytest.raises(RunMismatchError, match="lora.r"):
        train_adapter(backbone.model, backbone.tokenizer, template, "Judge", _groups(),
                      _config(lora=LoraSettings(r=8, alpha=8, dropout=0.0)), run, progress=False)
    with pytest.raises(RunMismatchError, match="data"):
        train_adapter(backbone.model, backbone.tokenizer, template, "Judge", _groups()[:4], _config(), run,
                      progress=False)
    # a finished run is not reused either once the settings differ
    res = train_adapter(backbone.model, backbone.tokenizer, template, "Judge", _groups(), _config(), run,
                        progress=False)
    assert res.completed and res.steps_done == 3
    with pytest.raises(RunMismatchError, match="steps"):
        train_adapter(backbone.model, backbone.tokenizer, template, "Judge", _groups(), _config(steps=5), run,
                      progress=False)
    # a time budget may change on resume; a fresh start (resume=False) is always allowed
    again = train_adapter(backbone.model, backbone.tokenizer, template, "Judge", _groups(), _config(max_time_s=99.0),
                          run, progress=False)
    assert again.steps_done == 3
    fresh = train_adapter(backbone.model, backbone.tokenizer, template, "Judge", _groups(), _config(steps=2), run,
                          progress=False, resume=False)
    assert fresh.steps_done == 2


def test_bundle_fallback_expert_takes_low_confidence_queries(tiny_bundle_dir, tiny_adapters, tmp_path):
    from r2r_core import R2RReranker
    from r2r_core.bundle import export_bundle, read_bundle, write_bundle

    src = read_bundle(tiny_bundle_dir)
    assert src.fallback == "__base__"
    rr = R2RReranker.from_pretrained(tiny_bundle_dir, device="cpu", dtype="float32", batch_size=4)
    rr.add_expert("general", tiny_adapters["legal"])
    rr.fallback = "general"
    rr.threshold = 0.999999  # nothing is that confident: every query falls back
    route = rr.route("What are the side effects of metformin?")
    assert route.expert == "general" and math.isclose(sum(route.probabilities.values()), 1.0, rel_tol=1e-5)
    res = rr.rerank("What are the side effects of metformin?", ["a", "bb", "ccc"])
    assert {r.expert for r in res} == {"general"}
    assert [r.margin for r in res] == [r.margin for r in rr.rerank("What are the side effects of metformin?",
                                                                   ["a", "bb", "ccc"], expert="general")]
    saved = rr.save_pretrained(tmp_path / "b")
    assert read_bundle(saved).fallback == "general"
    assert read_bundle(export_bundle(saved, tmp_path / "c")).fallback == "general"
    again = R2RReranker.from_pretrained(saved, device="cpu", dtype="float32")
    assert again.fallback == "general"
    with pytest.raises(ValueError, match="fallback"):
        again.remove_expert("general")
    with pytest.raises(ValueError, match="route of the router"):
        again.remove_expert("legal")
    with pytest.raises(ValueError, match="fallback must be"):
        write_bundle(tmp_path / "d", base_model=src.base_model, base_fingerprint=src.base_fingerprint,
                     template=rr.template, experts={"legal": tiny_adapters["legal"]}, fallback="general")
    with pytest.raises(KeyError, match="unknown expert 'nope'"):
        rr.fallback = "nope"
