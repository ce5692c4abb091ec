"""Shared fixtures: a tiny random Llama (fast tests), a tiny bundle with three experts and a router, and the
real offline SmolLM2 backbone (slow tests). Everything runs offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Tiny models run fastest on one thread, and one thread keeps the suite robust when the machine is shared
# (OpenMP threads spinning against other processes can slow small matmuls a hundredfold).
torch.set_num_threads(int(os.environ.get("R2R_TEST_THREADS", "1")))

DOMAIN_QUERIES = {
    "legal": [
        "Can the licensee terminate the agreement for convenience?",
        "What does the privacy policy say about sharing data with third parties?",
        "Which court has jurisdiction over disputes under this contract?",
        "Is there a non-compete clause in the agreement?",
    ],
    "medical": [
        "What are the side effects of metformin?",
        "How is type 2 diabetes diagnosed?",
        "What is the recommended dose of ibuprofen for adults?",
        "What causes high blood pressure?",
    ],
    "financial": [
        "What was the company's revenue growth in 2019?",
        "How much did operating expenses change year over year?",
        "What is the net income attributable to shareholders?",
        "What was the total debt at the end of the fiscal year?",
    ],
}


@pytest.fixture(scope="session")
def smollm2_checkpoint():
    """Path of the offline SmolLM2 safetensors checkpoint (converted from the GGUF once per cache)."""
    from r2r_core.backbone import offline_default_checkpoint

    return offline_default_checkpoint()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_checkpoint):
    """A 2-layer random Llama (hidden 32) with the SmolLM2 tokenizer, saved like any local HF model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger random weights so scores spread out instead of sitting at 0.5
        for p in model.parameters():
            p.mul_(8.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_random_adapter(model_dir, out_dir, seed: int, r: int = 4):
    """A random (not zero-initialised) LoRA adapter on q/k/v/o, saved in peft format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("tiny-adapters")
    return {name: make_random_adapter(tiny_model_dir, root / name, seed=i + 1)
            for i, name in enumerate(DOMAIN_QUERIES)}


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory, tiny_model_dir, tiny_adapters):
    """A bundle on the tiny model: experts legal/medical/financial and a router fitted on DOMAIN_QUERIES."""
    from r2r_core import LatentRouter
    from r2r_core.backbone import load_backbone
    from r2r_core.bundle import write_bundle
    from r2r_core.templates import template_from_chat

    backbone = load_backbone(str(tiny_model_dir), device="cpu", dtype="float32")
    router = LatentRouter(list(DOMAIN_QUERIES), threshold=0.0)
    queries = [q for qs in DOMAIN_QUERIES.values() for q in qs]
    labels = [d for d, qs in DOMAIN_QUERIES.items() for _ in qs]
    router.fit(router.encode(backbone.model, backbone.tokenizer, queries), labels, epochs=300)
    path = tmp_path_factory.mktemp("tiny-bundle") / "bundle"
    write_bundle(path, base_model=str(tiny_model_dir), base_fingerprint=backbone.fingerprint,
                 template=template_from_chat(backbone.tokenizer), experts=tiny_adapters, router=router,
                 expert_instructions={"legal": "Given a legal question, retrieve the clause that answers it"})
    return path


@pytest.fixture(scope="session")
def tiny_reranker(tiny_bundle_dir):
    from r2r_core import R2RReranker

    return R2RReranker.from_pretrained(tiny_bundle_dir, device="cpu", dtype="float32", batch_size=4)


@pytest.fixture(scope="session")
def default_reranker_fp32():
    """The real offline default (SmolLM2-135M), fp32."""
    from r2r_core import R2RReranker

    return R2RReranker.from_pretrained("default", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def fast_cpu_module():
    """For modules that train on the tiny model: its weights (scaled x8) yield subnormal activations that slow
    CPU matmuls ~100x, so denormals are flushed; and on a busy 2-core machine one thread beats two (no waiting
    on a descheduled sibling). Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)
