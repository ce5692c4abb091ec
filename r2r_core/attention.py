"""Grouped-query attention with the query groups folded into the sequence, for inference on the CPU.

A model with grouped-query attention (SmolLM2: 9 query heads share 3 key/value heads) reaches PyTorch's SDPA
through transformers with its keys and values repeated to every query head, or with ``enable_gqa``; either way
the CPU flash kernel then runs ``batch x heads`` small problems of ``length`` query rows each, ~10% of the
useful speed of a matmul. Here the query heads that share a key/value head are stacked along the sequence
instead: ``[batch, kv_heads, groups * length, head_dim]`` against the unrepeated keys and values, with the mask
repeated per group. The kernel then runs a third as many problems with three times the rows (bigger, better
blocked tiles) and reads each key/value head once: the same attention, 10-35% faster on this project's CPU.
The result equals SDPA's exactly (the same kernel computes the same rows).

:func:`use_grouped_attention` switches a loaded model to it. Calls it cannot serve -- another device, gradients
(training), dropout, a single query token, extra options -- go to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["GROUPED_SDPA", "grouped_sdpa_attention", "use_grouped_attention"]

GROUPED_SDPA = "r2r_grouped_sdpa"


def grouped_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs):
    """A transformers attention function: ``query [B, H, L, D]``, ``key``/``value [B, KV, S, D]``, a boolean mask
    ``[B, 1, L, S]`` or None (causal); returns ``([B, L, H, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    mask_ok = attention_mask is None or (
        attention_mask.dtype == torch.bool and attention_mask.ndim == 4 and attention_mask.shape[1] == 1
    )
    extra = any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "sinks", "s_aux"))
    if (groups == 1 or length == 1 or query.device.type != "cpu" or dropout or extra or not mask_ok
            or torch.is_grad_enabled() or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal:  # bottom-right aligned: query row i is token (kv_length - length + i)
            rows = torch.arange(length, device=query.device)[:, None] + (kv_length - length)
            attention_mask = (torch.arange(kv_length, device=query.device)[None, :] <= rows)[None, None]
    if attention_mask is not None:
        attention_mask = attention_mask.expand(batch, groups, -1, -1).reshape(batch, 1, groups * length, kv_length)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, kv_heads, groups * length, dim), key, value, attn_mask=attention_mask, scale=scaling,
    )
    return out.view(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def use_grouped_attention(model: torch.nn.Module) -> bool:
    """Switch ``model`` (loaded with ``attn_implementation="sdpa"``) to :func:`grouped_sdpa_attention`; its
    masks stay SDPA's. Returns whether it was switched (models on other attention implementations are left)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", GROUPED_SDPA):
        return False
    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_SDPA, sdpa_mask)
    model.set_attn_implementation(GROUPED_SDPA)
    return True
