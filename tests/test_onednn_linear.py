"""The oneDNN linear experiment (benchmarks/onednn_linear.py) gives torch's linear output, is really computed by
oneDNN for fp32 inference on the CPU, steps aside for training and other dtypes, and is not in r2r's own path."""

from __future__ import annotations

import pytest
import torch

from benchmarks.onednn_linear import has_onednn_linear, linear, restore_linears, use_onednn_linears

needs_onednn = pytest.mark.skipif(not has_onednn_linear(), reason="PyTorch built without oneDNN")


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
def test_training_and_other_dtypes_go_to_torch():
    x = torch.randn(5, 16)
    w = torch.randn(8, 16, requires_grad=True)
    out = linear(x, w)  # gradients on: torch's linear, which backpropagates
    assert onednn_calls(lambda: linear(x, w)) == 0
    out.sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(8, 16))
    with torch.inference_mode():
        assert onednn_calls(lambda: linear(x.bfloat16(), w.detach().bfloat16())) == 0
        assert onednn_calls(lambda: linear(x[0], w.detach())) == 0  # one dimension


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


def test_r2r_backbones_keep_torchs_linear_layers(tiny_model_dir):
    """The experiment is opt-in for the benchmarks only: a loaded backbone runs no private oneDNN op."""
    from r2r_core.backbone import load_backbone

    model = load_backbone(str(tiny_model_dir), device="cpu", dtype="float32").model
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" in m.__dict__]
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert onednn_calls(lambda: model(ids)) == 0
