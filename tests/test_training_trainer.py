"""The contrastive loss and the LoRA trainer on a tiny random Llama: learning, selection, exact resuming."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from r2r_core.training.checkpoint import load_checkpoint
from r2r_core.training.curation import TrainGroup
from r2r_core.training.loss import group_infonce
from r2r_core.training.selection import DevQuery, ndcg_at_k, precision_at_k
from r2r_core.training.trainer import LoraSettings, TrainConfig, resolve_precision, train_adapter

SUBJECTS = ["asthma", "revenue", "warranty", "migraine", "goodwill", "arbitration", "anemia", "dividends",
            "licensing", "insomnia", "leases", "indemnity"]


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu(fast_cpu_module):
    yield


@pytest.fixture(scope="module")
def backbone(tiny_model_dir):
    from r2r_core.backbone import load_backbone

    return load_backbone(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def template(backbone):
    from r2r_core.templates import template_from_chat

    return template_from_chat(backbone.tokenizer)


def _groups() -> list[TrainGroup]:
    out = []
    for i, s in enumerate(SUBJECTS):
        others = [SUBJECTS[(i + k) % len(SUBJECTS)] for k in (3, 5, 7)]
        docs = [f"all about {s}: {s} explained"] + [f"all about {o}: {o} explained" for o in others]
        out.append(TrainGroup(f"g{i}", "toy", "misc", f"q{i}", f"tell me about {s}",
                              tuple(f"d{i}-{k}" for k in range(4)), tuple(docs)))
    return out


def _dev() -> list[DevQuery]:
    return [DevQuery(f"q{i}", "toy", "misc", f"tell me about {s}", (f"a{i}", f"b{i}", f"c{i}"),
                     (f"all about {SUBJECTS[i + 1]}", f"all about {s}: {s} explained", "nothing"), {f"b{i}": 1})
            for i, s in enumerate(SUBJECTS[:4])]


def _config(**kw) -> TrainConfig:
    base = dict(steps=12, groups_per_batch=2, lr=5e-3, max_length=96, eval_every=6, save_every=4, precision="fp32",
                warmup_ratio=0.1, lora=LoraSettings(r=4, alpha=8, dropout=0.1))
    base.update(kw)
    return TrainConfig(**base)


def test_group_infonce_matches_the_formula():
    margins = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 1.0]])
    for tau in (1.0, 0.5):
        s = margins / tau
        manual = -(s[:, 0] - torch.logsumexp(s, dim=1)).mean()
        assert torch.allclose(group_infonce(margins, tau=tau), manual)
    assert group_infonce(margins, reduction="none").shape == (2,)
    assert group_infonce(torch.tensor([[50.0, -50.0]])) < 1e-6
    with pytest.raises(ValueError, match="group_size"):
        group_infonce(torch.zeros(3))
    with pytest.raises(ValueError, match="tau"):
        group_infonce(margins, tau=0)


def test_metrics_use_standard_definitions():
    qrels = {"a": 2, "b": 1, "z": 1}  # z is judged but never retrieved: it counts in the ideal ranking
    import math

    ideal = 2 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(["b", "x", "a"], qrels, 10) == pytest.approx((1 + 2 / math.log2(4)) / ideal)
    assert precision_at_k(["b", "x", "a"], qrels, 5) == pytest.approx(2 / 5)


def _set_loss(backbone, template, adapter_dir, groups) -> float:
    """Mean InfoNCE over ``groups`` with the adapter (or the bare backbone when None), eval mode."""
    from peft import PeftModel

    from r2r_core.scoring import PromptEncoder, YesNoIds, install_yes_no_head, yes_no_margins

    enc = PromptEncoder(backbone.tokenizer, template, 96)
    install_yes_no_head(backbone.model, YesNoIds.from_tokenizer(backbone.tokenizer, template))  # as training does
    model = backbone.model if adapter_dir is None else PeftModel.from_pretrained(backbone.model, adapter_dir)
    try:
        model.eval()
        losses = []
        with torch.inference_mode():
            for g in groups:
                prefix, tails = enc.encode(template.default_instruction, g.query, list(g.docs))
                m = yes_no_margins(model, [prefix + t for t in tails], backbone.tokenizer.pad_token_id)
                losses.append(group_infonce(m.view(1, -1)).item())
    finally:
        if adapter_dir is not None:
            model.unload()
    return sum(losses) / len(losses)


def test_shared_prefix_forward_equals_the_plain_path(backbone, template):
    from peft import LoraConfig, get_peft_model

    from r2r_core.scoring import PromptEncoder, YesNoIds, install_yes_no_head, yes_no_margins
    from r2r_core.training.group_forward import group_margins

    install_yes_no_head(backbone.model, YesNoIds.from_tokenizer(backbone.tokenizer, template))  # as training does
    prefix, tails = PromptEncoder(backbone.tokenizer, template, 128).encode(
        "judge", "what is asthma", ["asthma is an airway disease", "short", "a longer document " * 8])
    pad = backbone.tokenizer.pad_token_id
    torch.manual_seed(0)
    model = get_peft_model(backbone.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    try:
        grads = []
        for fn in (lambda: group_margins(model, prefix, tails, pad),
                   lambda: yes_no_margins(model, [prefix + t for t in tails], pad)):
            model.zero_grad()
            margins = fn()
            margins.sum().backward()
            grads.append((margins.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        (m1, g1), (m2, g2) = grads
        assert torch.allclose(m1, m2, atol=1e-4)
        for a, b in zip(g1, g2):  # same gradients up to float rounding (relative to the tensor's scale)
            assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-8
    finally:
        model.unload()


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_tiny_model_learns_and_its_loss_falls(backbone, template, tmp_path, shared_prefix):
    groups = _groups()
    before = _set_loss(backbone, template, None, groups)
    cfg = _config(steps=30, groups_per_batch=4, lr=1e-2, eval_every=15, save_every=15, shared_prefix=shared_prefix)
    result = train_adapter(backbone.model, backbone.tokenizer, template, template.default_instruction, groups, cfg,
                           tmp_path / "run", progress=False)
    assert result.completed and result.steps_done == 30 and result.pairs_per_s > 0
    after = _set_loss(backbone, template, result.adapter_dir, groups)
    assert after < 0.7 * before, f"training loss did not fall: {before:.3f} -> {after:.3f}"
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 31))
    assert not hasattr(backbone.model, "peft_config"), "LoRA layers must be removed after the run"
    cfg_json = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg_json["r"] == 4 and sorted(cfg_json["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_resume_after_interruption_equals_uninterrupted_run(tiny_model_dir, template, tmp_path):
    from r2r_core.backbone import load_backbone

    groups, dev = _groups(), _dev()
    cfg = _config(grad_accum=2)

    def fresh():  # a new process would load the backbone again
        return load_backbone(str(tiny_model_dir), device="cpu", dtype="float32")

    b = fresh()
    full = train_adapter(b.model, b.tokenizer, template, "judge", groups, cfg, tmp_path / "full", dev=dev,
                         progress=False)
    b = fresh()
    killed = train_adapter(b.model, b.tokenizer, template, "judge", groups, cfg, tmp_path / "resumed", dev=dev,
                           progress=False, stop_after=7)  # last checkpoint at step 6: steps 7.. are redone
    assert not killed.completed and killed.steps_done == 7
    assert not (tmp_path / "resumed" / "adapter").exists()
    b = fresh()
    resumed = train_adapter(b.model, b.tokenizer, template, "judge", groups, cfg, tmp_path / "resumed", dev=dev,
                            progress=False)
    assert resumed.completed and resumed.best_step == full.best_step
    assert resumed.best_metric == full.best_metric
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    r = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == r.keys() and all(torch.equal(a[k], r[k]) for k in a)
    fa = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["trainable"]
    fr = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["trainable"]
    assert all(torch.equal(fa[k], fr[k]) for k in fa), "final (not only best) weights must match too"
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 13)), "the log keeps one record per step after resuming"
    # a finished run is reused, not retrained
    again = train_adapter(b.model, b.tokenizer, template, "judge", groups, cfg, tmp_path / "resumed", dev=dev,
                          progress=False)
    assert again.best_metric == resumed.best_metric and again.steps_done == 12


def test_stage2_starts_from_the_stage1_adapter(backbone, template, tmp_path):
    groups = _groups()
    stage1 = train_adapter(backbone.model, backbone.tokenizer, template, "judge", groups, _config(steps=4),
                           tmp_path / "s1", progress=False)
    zero_lr = _config(steps=1, lr=1e-12, warmup_ratio=0.0, max_grad_norm=None)
    stage2 = train_adapter(backbone.model, backbone.tokenizer, template, "judge", groups[:4], zero_lr,
                           tmp_path / "s2", init_adapter=stage1.adapter_dir, progress=False)
    w1 = load_file(f"{stage1.adapter_dir}/adapter_model.safetensors")
    w2 = load_file(f"{stage2.adapter_dir}/adapter_model.safetensors")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)
    with pytest.raises(FileNotFoundError, match="init_adapter"):
        train_adapter(backbone.model, backbone.tokenizer, template, "judge", groups, zero_lr, tmp_path / "s3",
                      init_adapter=tmp_path / "nowhere", progress=False)


def test_dev_selection_keeps_the_best_checkpoint(backbone, template, tmp_path):
    res = train_adapter(backbone.model, backbone.tokenizer, template, "judge", _groups(), _config(), tmp_path / "r",
                        dev=_dev(), progress=False)
    evals = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x).get("event") == "eval"]
    assert [e["step"] for e in evals] == [0, 6, 12]
    assert res.best_metric == max(e["ndcg@10"] for e in evals)
    assert res.best_step == next(e["step"] for e in evals if e["ndcg@10"] == res.best_metric)
    best = load_file(str(tmp_path / "r" / "best.safetensors"))
    saved = load_file(f"{res.adapter_dir}/adapter_model.safetensors")
    assert len(best) == len(saved) and all(
        any(torch.equal(v, b) for b in best.values()) for v in saved.values()
    ), "the exported adapter is the best checkpoint"


def test_config_validation_and_precision():
    with pytest.raises(ValueError, match="`steps` must be an int >= 1, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="metric"):
        TrainConfig(metric="map")
    with pytest.raises(ValueError, match="lora.r"):
        LoraSettings(r=0)
    assert TrainConfig(lora={"r": 8}).lora.r == 8
    assert resolve_precision("fp32", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16


def test_wall_clock_budget_stops_early_and_keeps_the_best(backbone, template, tmp_path):
    res = train_adapter(backbone.model, backbone.tokenizer, template, "judge", _groups(),
                        _config(steps=500, eval_every=400, max_time_s=0.5), tmp_path / "t", dev=_dev(), progress=False)
    assert res.completed and res.stopped == "time" and 1 <= res.steps_done < 500
    evals = [json.loads(x)["step"] for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x).get("event") == "eval"]
    assert evals == [0, res.steps_done], "the stopping point is evaluated before the adapter is exported"
    assert (tmp_path / "t" / "adapter" / "adapter_model.safetensors").is_file()


def test_checkpoints_hold_only_tensors_and_json_and_resume_without_unpickling(backbone, template, tmp_path):
    """checkpoint.pt loads with torch.load(weights_only=True) and nothing allowed besides; a pickle that would run
    code on load is refused and does not run."""
    train_adapter(backbone.model, backbone.tokenizer, template, "judge", _groups(), _config(steps=4, save_every=2),
                  tmp_path / "r", progress=False, stop_after=2)
    raw = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert set(raw) == {"tensors", "json"} and all(isinstance(t, torch.Tensor) for t in raw["tensors"].values())
    meta = json.loads(raw["json"])
    assert meta["state"]["step"] == 2 and "numpy" in meta["rng"] and "param_groups" in meta["optimizer"]
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert ckpt["state"]["step"] == 2 and ckpt["trainable"] and ckpt["optimizer"]["state"]

    ran = tmp_path / "ran"
    import pathlib

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (ran,))

    torch.save({"trainable": Payload(), "optimizer": {}, "scheduler": {}, "rng": {}, "state": {}},
               tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a readable r2r training checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not ran.exists(), "loading a checkpoint must never run code"


def test_a_checkpoint_of_the_pickled_format_still_resumes(tmp_path):
    """Checkpoints written before the tensor + JSON format (the NumPy RNG state pickled as an array) load with
    weights_only=True and NumPy's array types allowed, so an interrupted run of an older version resumes."""
    import random

    import numpy as np

    from r2r_core.training.checkpoint import atomic_save, capture_rng, restore_rng

    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([w])
    rng = capture_rng()
    atomic_save({"trainable": {"w": w.detach()}, "optimizer": opt.state_dict(), "scheduler": {}, "rng": rng,
                 "state": {"step": 5}, "config": {}}, tmp_path / "checkpoint.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    restore_rng(ckpt["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert ckpt["state"] == {"step": 5} and torch.equal(ckpt["trainable"]["w"], w.detach())


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path):
    from r2r_core.training.trainer import _truncate_log

    log = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "lo')  # killed mid-write
    _truncate_log(log, 4)
    assert [json.loads(x) for x in log.read_text().splitlines()] == records[:4]
    _truncate_log(log, 4)  # and again: idempotent
    assert log.read_text().endswith("\n") and len(log.read_text().splitlines()) == 4


def test_resume_after_a_kill_mid_log_write(backbone, template, tmp_path):
    cfg = _config(steps=6, save_every=2, eval_every=100)
    train_adapter(backbone.model, backbone.tokenizer, template, "judge", _groups(), cfg, tmp_path / "r",
                  progress=False, stop_after=3)  # checkpoint at 2, log up to 3
    with open(tmp_path / "r" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "loss": 0.')
    res = train_adapter(backbone.model, backbone.tokenizer, template, "judge", _groups(), cfg, tmp_path / "r",
                        progress=False)
    steps = [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert res.completed and steps == list(range(1, 7))


def test_the_adapter_is_the_mean_of_the_last_snapshots_and_survives_a_resume(backbone, template, tmp_path):
    from r2r_core.training.averaging import lora_tensors

    cfg = _config(steps=12, eval_every=100, save_every=100, average_every=4, average_last=2)
    res = train_adapter(backbone.model, backbone.tokenizer, template, "judge", _groups(), cfg, tmp_path / "a",
                        dev=_dev(), progress=False)
    snaps = tmp_path / "a" / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["step12.safetensors", "step4.safetensors",
                                                      "step8.safetensors"]
    assert res.averaged_steps == [8, 12] and res.average_metric is not None
    assert json.loads((tmp_path / "a" / "done.json").read_text())["averaged_steps"] == [8, 12]
    s8, s12 = (load_file(str(snaps / f"step{s}.safetensors")) for s in (8, 12))
    assert all(t.dtype == torch.bfloat16 for t in s12.values())
    adapter = lora_tensors(tmp_path / "a" / "adapter")
    assert len(adapter) == len(s12)
    for name, mean in adapter.items():
        key = name.replace(".weight", ".default.weight")
        torch.testing.assert_close(mean, (s8[key].float() + s12[key].float()) / 2)
    assert not torch.equal(s8[key], s12[key]), "the snapshots are of different steps"

    # killed after step 6 (the checkpoint of step 4 is the last), resumed: the same snapshots and the same mean
    train_adapter(backbone.model, backbone.tokenizer, template, "judge", _groups(), cfg, tmp_path / "b",
                  dev=_dev(), progress=False, stop_after=6)
    resumed = train_adapter(backbone.model, backbone.tokenizer, template, "judge", _groups(), cfg, tmp_path / "b",
                            dev=_dev(), progress=False)
    assert resumed.averaged_steps == [8, 12]
    for name, t in lora_tensors(tmp_path / "b" / "adapter").items():
        torch.testing.assert_close(t, adapter[name], rtol=0, atol=0)

    # a fresh run in the same folder starts without the old snapshots
    train_adapter(backbone.model, backbone.tokenizer, template, "judge", _groups(),
                  _config(steps=4, eval_every=100, save_every=100, average_every=3), tmp_path / "a", resume=False,
                  progress=False)
    assert sorted(p.name for p in snaps.iterdir()) == ["step3.safetensors", "step4.safetensors"]


def test_averaging_settings_are_checked():
    with pytest.raises(ValueError, match="average_every"):
        _config(average_every=0)
    with pytest.raises(ValueError, match="average_last"):
        _config(average_every=2, average_last=0)
