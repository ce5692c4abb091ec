"""Grouped-query attention folded into the sequence gives transformers' SDPA result, for every mask shape the
scoring paths produce, and steps aside where it does not apply."""

from __future__ import annotations

import pytest
import torch

from r2r_core.attention import GROUPED_SDPA, grouped_sdpa_attention, grouped_sdpa_mask, use_grouped_attention


class _Attn(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def _sdpa(*args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)[0]


def _qkv(batch, heads, kv_heads, length, kv_length, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, length, 16, generator=g, dtype=torch.float32).to(dtype)
    k = torch.randn(batch, kv_heads, kv_length, 16, generator=g, dtype=torch.float32).to(dtype)
    v = torch.randn(batch, kv_heads, kv_length, 16, generator=g, dtype=torch.float32).to(dtype)
    return q, k, v


def _prefix_mask(batch, length, prefix, lengths):
    """A cached prefix of ``prefix`` keys (row r left-padded to it by ``prefix - lengths[r]``) plus a causal tail."""
    keys = torch.arange(prefix + length)
    rows = torch.arange(length)[:, None] + prefix
    mask = (keys[None, :] <= rows)[None].repeat(batch, 1, 1)
    for r, n in enumerate(lengths):
        mask[r, :, : prefix - n] = False
    return mask[:, None]


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["causal", "prefix", "mixed-prefix", "broadcast"])
def test_grouped_attention_equals_sdpa(case, dtype):
    batch, heads, kv_heads, length, prefix = 3, 6, 2, 7, 5
    module = _Attn(heads // kv_heads)
    if case == "causal":
        q, k, v = _qkv(batch, heads, kv_heads, length, length, dtype)
        mask = None
    else:
        q, k, v = _qkv(batch, heads, kv_heads, length, prefix + length, dtype)
        lengths = [prefix] * batch if case != "mixed-prefix" else [5, 3, 1]
        mask = _prefix_mask(batch, length, prefix, lengths)
        if case == "broadcast":
            mask = mask[:1]
    got, weights = grouped_sdpa_attention(module, q, k, v, mask, scaling=0.25)
    assert weights is None and got.shape == (batch, length, heads, 16)
    want = _sdpa(module, q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # the same kernel computes the same rows
    if case == "causal":  # and the causal mask really is applied: the last key changes only the last row
        k2, v2 = k.clone(), v.clone()
        k2[:, :, -1] += 1.0
        v2[:, :, -1] += 1.0
        moved = grouped_sdpa_attention(module, q, k2, v2, None, scaling=0.25)[0]
        torch.testing.assert_close(moved[:, :-1], got[:, :-1], atol=0, rtol=0)
        assert not torch.allclose(moved[:, -1], got[:, -1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_masks_are_additive_and_give_sdpa_results(dtype):
    padded = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]).bool()  # 5 cached keys + 3 new tokens
    kwargs = dict(batch_size=2, q_length=3, kv_length=8, q_offset=5, attention_mask=padded, dtype=dtype)
    with torch.no_grad():
        additive = grouped_sdpa_mask(**kwargs)
    boolean = grouped_sdpa_mask(**kwargs)  # gradients on (training): transformers' boolean mask, unchanged
    assert boolean.dtype == torch.bool and additive.dtype == dtype and additive.shape == boolean.shape == (2, 1, 3, 8)
    assert torch.equal(additive == 0, boolean) and bool((additive[~boolean] == float("-inf")).all())
    assert not boolean[1, 0, :, :3].any() and boolean[1, 0, 0, :6].sum() == 3  # left pads hidden, causal tail
    module = _Attn(3)
    q, k, v = _qkv(2, 6, 2, 3, 8, dtype)
    with torch.inference_mode():
        got = grouped_sdpa_attention(module, q, k, v, additive, scaling=0.25)[0]
        from_fp32 = grouped_sdpa_attention(module, q, k, v, additive.float(), scaling=0.25)[0]  # mask cast to q
        want = _sdpa(module, q, k, v, additive, scaling=0.25)
        with_bool = _sdpa(module, q, k, v, boolean, scaling=0.25)
    # the same attention to rounding: the grouped problem may be tiled differently, so its sums run in another
    # order. fp32: reordering 8 keys x 16 dims of products at |v| ~ 4 moves a result by at most ~16*8*4 eps;
    # bf16: the sums are fp32 inside the kernel, the output is rounded to bf16 (rtol 2 eps)
    eps = torch.finfo(dtype).eps
    atol = 16 * 8 * 4 * eps if dtype == torch.float32 else 1e-5
    for result in (got, from_fp32, with_bool):
        torch.testing.assert_close(result, want, atol=atol, rtol=2 * eps)


def test_grouped_attention_steps_aside_for_training_and_single_tokens(monkeypatch):
    import transformers.integrations.sdpa_attention as sa

    calls = []
    real = sa.sdpa_attention_forward
    monkeypatch.setattr(sa, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    module = _Attn(3)
    q, k, v = _qkv(2, 6, 2, 4, 4)
    q.requires_grad_(True)
    out = grouped_sdpa_attention(module, q, k, v, None)[0]  # gradients on: SDPA's own path (training)
    out.sum().backward()
    assert q.grad is not None and len(calls) == 1
    with torch.inference_mode():
        grouped_sdpa_attention(module, q.detach()[:, :, :1], k, v, None)  # one query token
        grouped_sdpa_attention(_Attn(1), *_qkv(2, 2, 2, 4, 4), None)  # no grouping
        assert len(calls) == 3
        grouped_sdpa_attention(module, q.detach(), k, v, None)
        assert len(calls) == 3


def test_loaded_backbones_use_it_and_score_as_sdpa(tiny_model_dir):
    from r2r_core.backbone import load_backbone
    from r2r_core.scoring import YesNoIds, install_yes_no_head, yes_no_margins

    backbone = load_backbone(str(tiny_model_dir), device="cpu", dtype="float32")
    install_yes_no_head(backbone.model, YesNoIds(1, 2))
    assert backbone.model.config._attn_implementation == GROUPED_SDPA
    ids = [backbone.tokenizer.encode(t) for t in ["a contract clause", "metformin side effects and dosing"]]
    with torch.inference_mode():
        got = yes_no_margins(backbone.model, ids, backbone.tokenizer.pad_token_id)
        backbone.model.set_attn_implementation("sdpa")
        want = yes_no_margins(backbone.model, ids, backbone.tokenizer.pad_token_id)
    # grouped against per-head SDPA through two fp32 layers: other tiles, other sums, ~1e-4 absolute
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert use_grouped_attention(backbone.model)  # back on
    backbone.model.set_attn_implementation("eager")
    assert not use_grouped_attention(backbone.model)  # other implementations are left as they are
    assert backbone.model.config._attn_implementation == "eager"


@pytest.mark.parametrize("missing", ["register", "sdpa module"])
def test_without_transformers_registry_api_the_model_stays_on_sdpa(tiny_model_dir, monkeypatch, caplog, missing):
    """A transformers without the registry API r2r uses: one warning, the model keeps transformers' SDPA and
    scores as the grouped attention does."""
    import logging
    import sys

    import transformers

    from r2r_core.attention import transformers_registry
    from r2r_core.backbone import load_backbone
    from r2r_core.scoring import YesNoIds, install_yes_no_head, yes_no_margins

    grouped = load_backbone(str(tiny_model_dir), device="cpu", dtype="float32")
    install_yes_no_head(grouped.model, YesNoIds(1, 2))
    assert transformers_registry() is not None  # the installed transformers has it
    ids = [grouped.tokenizer.encode(t) for t in ["a contract clause", "metformin side effects and dosing"]]
    with torch.inference_mode():
        want = yes_no_margins(grouped.model, ids, grouped.tokenizer.pad_token_id)
    if missing == "register":  # the attention and mask registries' classmethod
        monkeypatch.delattr(transformers.utils.generic.GeneralInterface, "register")
    else:  # a module that cannot be imported (transformers' own models hold their references already)
        monkeypatch.setitem(sys.modules, "transformers.integrations.sdpa_attention", None)
    transformers_registry.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="r2r_core.attention"):
            plain = load_backbone(str(tiny_model_dir), device="cpu", dtype="float32")
            assert not use_grouped_attention(plain.model)
        install_yes_no_head(plain.model, YesNoIds(1, 2))
        assert plain.model.config._attn_implementation == "sdpa"
        assert len([r for r in caplog.records if r.name == "r2r_core.attention"]) == 1
        with torch.inference_mode():
            got = yes_no_margins(plain.model, ids, plain.tokenizer.pad_token_id)
        # per-head SDPA against grouped through two fp32 layers: other tiles, other sums, ~1e-4 absolute
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    finally:
        monkeypatch.undo()
        transformers_registry.cache_clear()
    assert transformers_registry() is not None
