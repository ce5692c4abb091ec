"""Folding a uniform batch's expert into the weight (for that call only) gives peft's per-row LoRA output, is
used only where it is the smaller amount of work, and leaves mixed batches, the bare backbone and training to
peft; it is installed only on layers of r2r's own experts, and where peft's layer lacks a field it reads, not at
all (peft's adapter_names path, one warning, the same scores)."""

from __future__ import annotations

import pytest
import torch

from r2r_core.lora_fold import BASE_ADAPTER, folds_for, install_lora_folding

EXPERTS = ("legal", "medical")


@pytest.fixture
def peft_model(tiny_model_dir, tiny_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(tiny_adapters["legal"]), adapter_name="legal")
    model.load_adapter(str(tiny_adapters["medical"]), adapter_name="medical")
    return model.eval()


def lora_linears(model):
    from peft.tuners.lora import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def peft_output(layer, x, names):
    """What peft's own per-row path computes (the folding forward bypassed)."""
    return type(layer).forward(layer, x, adapter_names=names)


def test_install_is_idempotent_and_covers_every_lora_layer(peft_model):
    n = len(lora_linears(peft_model))
    assert n == 2 * 4  # 2 layers x q/k/v/o
    assert install_lora_folding(peft_model, EXPERTS) == n
    assert install_lora_folding(peft_model, EXPERTS) == 0


@torch.inference_mode()
def test_folded_uniform_batch_equals_peft_per_row_output(peft_model):
    install_lora_folding(peft_model, EXPERTS)
    torch.manual_seed(0)
    for layer in lora_linears(peft_model):
        x = torch.randn(3, 40, layer.base_layer.in_features)
        assert folds_for(layer, "legal", 3 * 40)
        folded = layer(x, adapter_names=["legal"] * 3)
        expected = peft_output(layer, x, ["legal"] * 3)
        # x @ (W + s B A)^T against x @ W^T + s (x @ A^T) @ B^T: fp32 sums in another order, ~1e-4 absolute
        torch.testing.assert_close(folded, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(folded, layer.base_layer(x), atol=1e-3)  # the expert does change the output


@torch.inference_mode()
def test_the_whole_model_gives_peft_scores_with_folding(peft_model, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(["what does the contract say about termination " * 3] * 2, return_tensors="pt")
    want = peft_model(**ids, adapter_names=["medical", "medical"]).logits
    install_lora_folding(peft_model, EXPERTS)
    got = peft_model(**ids, adapter_names=["medical", "medical"]).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    peft_model.set_adapter("medical")
    torch.testing.assert_close(got, peft_model(**ids).logits, atol=1e-4, rtol=1e-4)  # and set_adapter's


def test_folding_only_where_it_is_less_work(peft_model):
    layer = lora_linears(peft_model)[0]  # q_proj: 32 -> 32, rank 4: folding pays from 16 tokens on
    assert layer.base_layer.in_features == layer.base_layer.out_features == 32
    with torch.inference_mode():
        assert folds_for(layer, "legal", 16) and not folds_for(layer, "legal", 15)
        assert not folds_for(layer, "unknown", 1000)
    assert not folds_for(layer, "legal", 1000)  # gradients on: training goes through peft


@torch.inference_mode()
def test_mixed_batches_and_the_bare_backbone_go_through_peft(peft_model, monkeypatch):
    install_lora_folding(peft_model, EXPERTS)
    calls = []
    real_addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(1) or real_addmm(*a, **k))
    layer = lora_linears(peft_model)[0]
    x = torch.randn(3, 40, 32)
    names = ["legal", "medical", BASE_ADAPTER]
    mixed = layer(x, adapter_names=names)
    for i, name in enumerate(names):  # each row as peft computes it alone (a GEMM of another shape: ~1e-4)
        torch.testing.assert_close(mixed[i : i + 1], peft_output(layer, x[i : i + 1], [name]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer(x, adapter_names=[BASE_ADAPTER] * 3), layer.base_layer(x))
    assert not calls
    layer(x, adapter_names=["legal"] * 3)
    assert calls  # the uniform batch did fold


@torch.inference_mode()
def test_thread_routing_gives_peft_per_row_output_without_hooks(peft_model, tiny_model_dir):
    from transformers import AutoTokenizer

    from r2r_core.lora_fold import routes_by_thread, thread_routing

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(["what does the contract say about termination " * 3] * 3, return_tensors="pt")
    assert not routes_by_thread(peft_model)  # peft's own layers only know adapter_names
    for names in (["medical"] * 3, ["legal", BASE_ADAPTER, "medical"]):
        want = peft_model(**ids, adapter_names=names).logits
        install_lora_folding(peft_model, EXPERTS)
        assert routes_by_thread(peft_model)
        with thread_routing(names):
            got = peft_model(**ids).logits  # no adapter_names: no peft hooks on the shared layers
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    peft_model.set_adapter("legal")  # outside the block, the model is peft's again (its active adapter)
    # folded against peft's per-row sums through two fp32 layers: ~1e-4 (2.3e-5 seen on an Intel CPU)
    torch.testing.assert_close(peft_model(**ids).logits, peft_model(**ids, adapter_names=["legal"] * 3).logits,
                               atol=1e-4, rtol=1e-4)


def test_threads_running_one_model_at_once_keep_their_own_experts(peft_model, tiny_model_dir):
    """Two threads forward the same model at the same time, each with other experts, many times over: every
    result equals that thread's experts computed alone (with peft's hooks, one thread's names leak into the
    other's pass)."""
    import threading

    from transformers import AutoTokenizer

    from r2r_core.lora_fold import thread_routing

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(["the licensee may terminate for convenience " * 4] * 2, return_tensors="pt")
    install_lora_folding(peft_model, EXPERTS)
    plans = {"a": ["legal", "legal"], "b": ["medical", BASE_ADAPTER]}
    with torch.inference_mode():
        want = {k: peft_model(**ids, adapter_names=v).logits for k, v in plans.items()}
    assert not torch.allclose(want["a"], want["b"], atol=1e-3)
    errors: list[str] = []
    start = threading.Barrier(2)

    def work(key: str) -> None:
        start.wait()
        with torch.inference_mode(), thread_routing(plans[key]):
            for _ in range(20):
                if not torch.allclose(peft_model(**ids).logits, want[key], atol=1e-4, rtol=1e-4):
                    errors.append(key)

    threads = [threading.Thread(target=work, args=(k,)) for k in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_routes_by_thread_is_recomputed_when_the_adapters_change(peft_model):
    """The answer is kept on the model, but an adapter that adds LoRA layers the folding does not cover yet (here
    on the MLP) makes it False again, until the folding is installed on them."""
    from peft import LoraConfig

    from r2r_core.lora_fold import routes_by_thread

    install_lora_folding(peft_model, EXPERTS)
    assert routes_by_thread(peft_model)
    peft_model.add_adapter("mlp", LoraConfig(r=2, target_modules=["gate_proj"]))
    assert not routes_by_thread(peft_model)
    assert install_lora_folding(peft_model, EXPERTS) == 0  # not one of r2r's experts: its layers stay peft's
    assert not routes_by_thread(peft_model)
    assert install_lora_folding(peft_model, [*EXPERTS, "mlp"]) > 0
    assert routes_by_thread(peft_model)


def test_layers_carrying_another_adapter_keep_pefts_forward(peft_model):
    """Folding is installed only where every adapter of a layer is one of the experts r2r names."""
    from r2r_core.lora_fold import routes_by_thread

    assert install_lora_folding(peft_model, ["legal"]) == 0  # every layer also carries "medical"
    assert not any("forward" in m.__dict__ for m in lora_linears(peft_model))
    assert not routes_by_thread(peft_model)


@pytest.fixture
def peft_without_fan_in_fan_out(monkeypatch):
    """peft's LoRA ``Linear`` as a version without the ``fan_in_fan_out`` field would build it (peft's own forward
    does not read it; the folding forward does)."""
    from peft.tuners.lora import Linear

    from r2r_core import lora_fold

    real_init = Linear.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        del self.fan_in_fan_out

    monkeypatch.setattr(Linear, "__init__", init)
    monkeypatch.setattr(lora_fold, "_warned", set())  # the warning is given once per process


def test_a_peft_layer_without_a_needed_field_falls_back_to_peft_with_one_warning(
        peft_without_fan_in_fan_out, tiny_bundle_dir, tiny_reranker, caplog):
    import logging

    from r2r_core import R2RReranker
    from r2r_core.lora_fold import routes_by_thread

    with caplog.at_level(logging.WARNING, logger="r2r_core.lora_fold"):
        rr = R2RReranker.from_pretrained(tiny_bundle_dir, device="cpu", dtype="float32", batch_size=4)
    warnings = [r for r in caplog.records if r.name == "r2r_core.lora_fold"]
    assert len(warnings) == 1 and "fan_in_fan_out" in warnings[0].getMessage()  # three experts, one warning
    assert len(rr.experts) == 3 and not routes_by_thread(rr.model)
    assert not any("forward" in m.__dict__ for m in lora_linears(rr.model))
    assert routes_by_thread(tiny_reranker.model)  # the same bundle with peft's fields: folded and routed by thread
    docs = ["the licensee may terminate the agreement for convenience", "metformin lowers blood sugar",
            "revenue grew by ten percent", "a clause on governing law and jurisdiction " * 3]
    for expert in (None, "legal", "medical", BASE_ADAPTER):
        got = {r.index: r.margin for r in rr.rerank("can the licensee terminate the contract?", docs, expert=expert)}
        want = {r.index: r.margin for r in tiny_reranker.rerank("can the licensee terminate the contract?", docs,
                                                                expert=expert)}
        # folded weight against peft's two thin matmuls, through two fp32 layers: the same sums in another order.
        # Rounding grows with the logits' scale (~10), not with the margin (their difference), so the bound is
        # absolute: fp32 eps x 64-term dot products x 2 layers x logit scale 10, with 8x headroom (~1.2e-3);
        # 2e-4 was seen on one x86 CPU.
        tol = torch.finfo(torch.float32).eps * 64 * 2 * 10 * 8
        assert got == pytest.approx(want, rel=0, abs=tol)
    batch = rr.rerank_batch(["can the licensee terminate?", "side effects of metformin?"], [docs, docs],
                            experts=["legal", "medical"])  # a batch that mixes experts, through peft's hooks
    ref = tiny_reranker.rerank_batch(["can the licensee terminate?", "side effects of metformin?"], [docs, docs],
                                     experts=["legal", "medical"])
    for a, b in zip(batch, ref):
        assert {r.index: r.margin for r in a} == pytest.approx({r.index: r.margin for r in b}, rel=1e-4, abs=1e-4)
