"""fp32 linear layers on oneDNN give torch's linear output, are really computed by oneDNN for inference on the CPU,
and step aside for training, other dtypes and when turned off."""

from __future__ import annotations

import pytest
import torch

from r2r_core import cpu_linear
from r2r_core.cpu_linear import linear, onednn_linear_available, restore_linears, use_onednn_linears

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="PyTorch built without oneDNN")


def onednn_calls(fn) -> int:
    """How many oneDNN linear ops ``fn`` runs (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")


CASES = {
    "2d": ((37, 24), True),
    "3d": ((3, 11, 24), False),
    "one row": ((1, 24), True),
    "strided": ((4, 9, 48), True),  # a view every second column (a non-contiguous input)
}


@needs_onednn
@pytest.mark.parametrize("case", list(CASES))
def test_linear_equals_torch_and_runs_on_onednn(case):
    shape, with_bias = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    if case == "strided":
        x = x[..., ::2]
    w = torch.randn(40, x.shape[-1], generator=g)
    b = torch.randn(40, generator=g) if with_bias else None
    with torch.inference_mode():
        got = linear(x, w, b)
        assert onednn_calls(lambda: linear(x, w, b)) == 1
    # oneDNN's GEMM against MKL's: the same fp32 products summed in another order, ~1e-4
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4)


@needs_onednn
def test_training_other_dtypes_and_the_switch_off_go_to_torch(monkeypatch):
    x = torch.randn(5, 16)
    w = torch.randn(8, 16, requires_grad=True)
    out = linear(x, w)  # gradients on: torch's linear, which backpropagates
    assert onednn_calls(lambda: linear(x, w)) == 0
    out.sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(8, 16))
    with torch.inference_mode():
        assert onednn_calls(lambda: linear(x.bfloat16(), w.detach().bfloat16())) == 0
        assert onednn_calls(lambda: linear(x[0], w.detach())) == 0  # one dimension
        monkeypatch.setenv("R2R_ONEDNN_LINEAR", "0")
        cpu_linear.onednn_linear_available.cache_clear()
        try:
            assert not onednn_linear_available()
            assert onednn_calls(lambda: linear(x, w.detach())) == 0
        finally:
            monkeypatch.delenv("R2R_ONEDNN_LINEAR")
            cpu_linear.onednn_linear_available.cache_clear()
    assert onednn_linear_available()


@needs_onednn
def test_a_switched_model_gives_the_same_logits_and_can_be_restored(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = model(ids).logits
        assert use_onednn_linears(model) == linears
        assert use_onednn_linears(model) == 0  # idempotent
        switched = model(ids).logits
        assert onednn_calls(lambda: model(ids)) == linears
        torch.testing.assert_close(switched, plain, atol=1e-4, rtol=1e-4)
        assert restore_linears(model) == linears
        assert onednn_calls(lambda: model(ids)) == 0
        torch.testing.assert_close(model(ids).logits, plain)


def test_the_backbone_loader_switches_the_linears(tiny_model_dir):
    from r2r_core.backbone import load_backbone

    model = load_backbone(str(tiny_model_dir), device="cpu", dtype="float32").model
    switched = [type(m) is torch.nn.Linear and "forward" in m.__dict__ for m in model.modules()]
    linears = [type(m) is torch.nn.Linear for m in model.modules()]
    assert any(linears)
    assert switched == linears  # oneDNN or not is decided per call (torch's linear where it is unavailable)


@needs_onednn
def test_a_folded_expert_runs_on_onednn(tiny_model_dir, tiny_adapters):
    from peft import PeftModel
    from peft.tuners.lora import Linear as LoraLinear
    from transformers import AutoModelForCausalLM

    from r2r_core.lora_fold import install_lora_folding

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(tiny_adapters["legal"]), adapter_name="legal").eval()
    install_lora_folding(model)
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    x = torch.randn(2, 30, layer.base_layer.in_features)
    with torch.inference_mode():
        assert onednn_calls(lambda: layer(x, adapter_names=["legal"] * 2)) == 1  # the folded weight, once
        expected = type(layer).forward(layer, x, adapter_names=["legal"] * 2)  # peft's own per-row path
        # folded weight against peft's two thin matmuls: fp32 sums in another order, ~1e-4
        torch.testing.assert_close(layer(x, adapter_names=["legal"] * 2), expected, atol=1e-4, rtol=1e-4)
