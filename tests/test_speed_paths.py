"""The fast scoring path (prefix KV cache, yes/no head, length-sorted batches, per-row experts) gives the scores
of the plain path and of a straightforward full-prompt reference: mixed lengths, mixed experts, documents
longer than ``max_length``, any batch size."""

from __future__ import annotations

import pytest
import torch
from conftest import DOMAIN_QUERIES

from r2r_core import BASE_ADAPTER, R2RReranker

MAX_LENGTH = 160  # small (the ChatML prefix alone is ~80 tokens), so that some documents below are cut

DOCS = [
    "ok",
    "Metformin commonly causes nausea and diarrhea.",
    "Either party may terminate this agreement with thirty days written notice to the other party. " * 3,
    "Revenue increased 12% to $4.2 million in fiscal 2019, driven by services.",
    "We may share personal information with service providers and affiliates. " * 40,  # > MAX_LENGTH tokens
    "High blood pressure is often caused by salt intake, stress and lack of exercise.",
    "x " * 500,  # > MAX_LENGTH tokens
]
QUERIES = [DOMAIN_QUERIES["legal"][0], DOMAIN_QUERIES["medical"][1], "revenue?", DOMAIN_QUERIES["financial"][2]]
EXPERTS = ["legal", "medical", BASE_ADAPTER, "financial"]


def _load(bundle, **kwargs) -> R2RReranker:
    return R2RReranker.from_pretrained(bundle, device="cpu", dtype="float32", max_length=MAX_LENGTH, **kwargs)


@pytest.fixture(scope="module")
def soft_bundle_dir(tmp_path_factory, tiny_model_dir):
    """A bundle on a tiny model whose attention is not saturated. In ``tiny_model_dir`` (every weight x8)
    attention is so peaked that attending to a masked-out key changes no score; here it does, so masking bugs
    (e.g. in the left-padded prefix caches of a mixed-query batch) show in the scores."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from r2r_core.backbone import load_backbone
    from r2r_core.bundle import write_bundle
    from r2r_core.templates import template_from_chat

    root = tmp_path_factory.mktemp("soft")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(AutoModelForCausalLM.from_pretrained(tiny_model_dir).config)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)  # tied: spreads the yes/no logits
        for name, p in model.named_parameters():
            if "proj" in name:
                p.mul_(4.0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    adapters = {}
    for seed, name in enumerate(["legal", "medical", "financial"], start=1):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            init_lora_weights=False)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "model"), config)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_" in pname:
                    p.normal_(0, 0.2)
        peft_model.save_pretrained(root / name)
        adapters[name] = root / name
    backbone = load_backbone(str(root / "model"), device="cpu", dtype="float32")
    return write_bundle(root / "bundle", base_model=str(root / "model"), base_fingerprint=backbone.fingerprint,
                        template=template_from_chat(backbone.tokenizer), experts=adapters,
                        expert_instructions={"legal": "Given a legal question, retrieve the clause that answers it"})


@pytest.fixture(scope="module", params=["tiny", "soft"])
def bundle(request, tiny_bundle_dir):
    return tiny_bundle_dir if request.param == "tiny" else request.getfixturevalue("soft_bundle_dir")


@pytest.fixture(scope="module")
def fast(bundle):
    return _load(bundle, batch_size=3)


@pytest.fixture(scope="module")
def plain(bundle):
    r = _load(bundle, batch_size=3)
    r.use_prefix_cache = False
    return r


@pytest.fixture(scope="module")
def reference(bundle):
    """A separately loaded copy of the bundle's model with its full LM head and the bundle's experts (peft)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r2r_core.bundle import read_bundle

    config = read_bundle(bundle)
    model = AutoModelForCausalLM.from_pretrained(config.base_model, dtype=torch.float32)
    for i, (name, sub) in enumerate(config.experts.items()):
        if i == 0:
            model = PeftModel.from_pretrained(model, str(bundle / sub), adapter_name=name)
        else:
            model.load_adapter(str(bundle / sub), adapter_name=name)
    tok = AutoTokenizer.from_pretrained(config.base_model)
    tok.padding_side = "left"
    return model.eval(), tok, config.expert_instructions


def reference_margins(reference, reranker: R2RReranker, query: str, docs: list[str], expert: str) -> list[float]:
    """Qwen3-Reranker's model-card recipe: prefix tokens + document tokens truncated to what ``max_length``
    leaves + suffix tokens, left-padded, one full forward with the full-vocabulary head, logits[:, -1]."""
    model, tok, expert_instructions = reference
    tpl = reranker.template
    instruction = expert_instructions.get(expert) or reranker.instruction
    prefix = tok(tpl.render_prefix(instruction, query), add_special_tokens=False)["input_ids"]
    suffix = tok(tpl.render_suffix(instruction), add_special_tokens=False)["input_ids"]
    budget = MAX_LENGTH - len(prefix) - len(suffix)
    body = tok([tpl.doc_sep + d for d in docs], add_special_tokens=False)["input_ids"]
    batch = tok.pad({"input_ids": [prefix + b[:budget] + suffix for b in body]}, return_tensors="pt")
    assert batch["input_ids"].shape[1] <= MAX_LENGTH
    with torch.inference_mode():
        if expert == BASE_ADAPTER:
            with model.disable_adapter():
                logits = model(**batch).logits[:, -1, :]
        else:
            model.set_adapter(expert)
            logits = model(**batch).logits[:, -1, :]
    yes, no = reranker.yes_no.yes, reranker.yes_no.no
    return (logits[:, yes] - logits[:, no]).tolist()


def margins_in_input_order(results) -> list[float]:
    return [r.margin for r in sorted(results, key=lambda r: r.index)]


def test_some_documents_are_longer_than_max_length(fast):
    prefix, tails = fast.encoder.encode(fast.instruction, QUERIES[0], DOCS)
    budget = fast.encoder.doc_budget(len(prefix), len(fast.encoder.suffix_ids(fast.instruction)))
    full = fast.tokenizer([fast.template.doc_sep + d for d in DOCS], add_special_tokens=False)["input_ids"]
    cut = [len(f) > budget for f in full]
    assert sum(cut) >= 2 and not all(cut)
    assert all(len(prefix) + len(t) <= MAX_LENGTH for t in tails)
    assert len({len(t) for t in tails}) >= 5  # mixed lengths


@pytest.mark.parametrize("expert", [BASE_ADAPTER, "legal", "financial"])
def test_prefix_cached_path_equals_plain_path_and_reference(fast, plain, reference, expert):
    query = DOMAIN_QUERIES["medical"][0]
    got = margins_in_input_order(fast.rerank(query, DOCS, expert=expert))
    assert got == pytest.approx(margins_in_input_order(plain.rerank(query, DOCS, expert=expert)), abs=1e-4)
    assert got == pytest.approx(reference_margins(reference, fast, query, DOCS, expert), abs=1e-4)
    assert len(set(round(m, 4) for m in got)) == len(DOCS)  # the scores actually differ between documents


def test_rerank_batch_with_mixed_experts_equals_plain_path_and_reference(fast, plain, reference):
    docs = [DOCS[i:] + DOCS[:i] for i in range(len(QUERIES))]  # different candidates, mixed lengths per query
    got = fast.rerank_batch(QUERIES, docs, experts=EXPERTS)
    slow = plain.rerank_batch(QUERIES, docs, experts=EXPERTS)
    for q, d, e, g, s in zip(QUERIES, docs, EXPERTS, got, slow):
        assert {r.expert for r in g} == {e}
        assert margins_in_input_order(g) == pytest.approx(margins_in_input_order(s), abs=1e-4)
        assert margins_in_input_order(g) == pytest.approx(reference_margins(reference, fast, q, d, e), abs=1e-4)
    # and each query alone gives what it gets inside the mixed batch
    for q, d, e, g in zip(QUERIES, docs, EXPERTS, got):
        alone = margins_in_input_order(fast.rerank(q, d, expert=e))
        assert margins_in_input_order(g) == pytest.approx(alone, abs=1e-4)


def test_expert_instructions_reach_the_prompt(fast, reference):
    assert reference[2].get("legal") not in (None, fast.instruction)  # the tiny bundle gives "legal" its own
    query = DOMAIN_QUERIES["legal"][1]
    got = margins_in_input_order(fast.rerank(query, DOCS[:4], expert="legal"))
    assert got == pytest.approx(reference_margins(reference, fast, query, DOCS[:4], "legal"), abs=1e-4)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 64])
def test_batch_size_does_not_change_scores(bundle, fast, batch_size):
    other = _load(bundle, batch_size=batch_size)
    docs = [DOCS, DOCS[2:], DOCS[:3], DOCS[::-1]]
    want = fast.rerank_batch(QUERIES, docs, experts=EXPERTS)
    have = other.rerank_batch(QUERIES, docs, experts=EXPERTS)
    for w, h in zip(want, have):
        assert margins_in_input_order(h) == pytest.approx(margins_in_input_order(w), abs=1e-4)


def test_plain_path_batch_size_does_not_change_scores(bundle, plain):
    other = _load(bundle, batch_size=1)
    other.use_prefix_cache = False
    query = DOMAIN_QUERIES["financial"][0]
    want = margins_in_input_order(plain.rerank(query, DOCS, expert="financial"))
    assert margins_in_input_order(other.rerank(query, DOCS, expert="financial")) == pytest.approx(want, abs=1e-4)


@pytest.mark.slow
def test_real_backbone_fp32_fast_path_equals_reference(default_reranker_fp32, smollm2_checkpoint):
    """SmolLM2-135M in fp32: prefix-cached scores equal the model-card reference within 1e-4, with mixed
    lengths and a document longer than max_length (512), on the bare backbone and with a shipped expert."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = default_reranker_fp32
    model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    query = "What are the common side effects of long-term metformin use in elderly patients?"
    docs = [
        "Metformin commonly causes nausea, diarrhea and abdominal discomfort; lactic acidosis is rare.",
        "The Company recognized revenue of $4.2 million in fiscal 2019.",
        "Vitamin B12 deficiency can develop with long-term metformin therapy. " * 12,
        "We may share personal information with service providers. " * 80,  # longer than 512 tokens
        "ok",
    ]
    prefix = tok(r.template.render_prefix(r.instruction, query), add_special_tokens=False)["input_ids"]
    suffix = tok(r.template.render_suffix(r.instruction), add_special_tokens=False)["input_ids"]
    budget = r.encoder.max_length - len(prefix) - len(suffix)
    body = tok([r.template.doc_sep + d for d in docs], add_special_tokens=False)["input_ids"]
    assert max(len(b) for b in body) > budget
    batch = tok.pad({"input_ids": [prefix + b[:budget] + suffix for b in body]}, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits[:, -1, :]
    ref = (logits[:, r.yes_no.yes] - logits[:, r.yes_no.no]).tolist()
    got = margins_in_input_order(r.rerank(query, docs, expert="__base__"))  # the reference has no adapter
    assert got == pytest.approx(ref, abs=1e-4)
    batch_one = R2RReranker.from_pretrained("default", device="cpu", dtype="float32", batch_size=1)
    assert margins_in_input_order(batch_one.rerank(query, docs, expert="__base__")) == pytest.approx(ref, abs=1e-4)
    # with a shipped expert (folded into the weights for r2r's uniform batches; peft's set_adapter path here)
    from peft import PeftModel

    from r2r_core.reranker import DEFAULT_BUNDLE_DIR

    expert_model = PeftModel.from_pretrained(model, str(DEFAULT_BUNDLE_DIR / "experts" / "medical")).eval()
    with torch.inference_mode():
        logits = expert_model(**batch).logits[:, -1, :]
    ref = (logits[:, r.yes_no.yes] - logits[:, r.yes_no.no]).tolist()
    assert margins_in_input_order(r.rerank(query, docs, expert="medical")) == pytest.approx(ref, abs=1e-4)
