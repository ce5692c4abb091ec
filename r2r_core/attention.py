"""Grouped-query attention with the query groups folded into the sequence, for inference on the CPU.

A model with grouped-query attention (SmolLM2: 9 query heads share 3 key/value heads) reaches PyTorch's SDPA
through transformers with its keys and values repeated to every query head (or ``enable_gqa``), so the CPU flash
kernel runs ``batch x heads`` small problems. Here the query heads that share a key/value head are stacked along
the sequence instead, ``[batch, kv_heads, groups * length, head_dim]`` against the unrepeated keys and values:
fewer, taller problems, each key/value head read once, the same result as SDPA's. :func:`grouped_sdpa_mask` gives
the matching mask, additive (0 / -inf) in the model's dtype and built once per forward pass instead of in every
layer. Measurements: ``benchmarks/RESULTS.md``.

:func:`use_grouped_attention` switches a loaded model to it by registering both functions under
:data:`GROUPED_SDPA` in transformers' attention and mask registries (a name of r2r's own; no other entry
changes). Where the installed transformers lacks that registry API, the model stays on transformers' SDPA, with
one warning. Calls the grouped function cannot serve -- another device, gradients (training), dropout, a single
query token, extra options -- go to transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from types import SimpleNamespace

import torch

__all__ = ["GROUPED_SDPA", "grouped_sdpa_attention", "grouped_sdpa_mask", "transformers_registry",
           "use_grouped_attention"]

GROUPED_SDPA = "r2r_grouped_sdpa"
logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def transformers_registry() -> SimpleNamespace | None:
    """What :func:`use_grouped_attention` needs from transformers -- ``AttentionInterface.register``, the mask
    registry's ``register``, ``sdpa_mask``, ``sdpa_attention_forward`` and ``set_attn_implementation`` -- or None,
    with one warning, where the installed version lacks any of them. Checked once, when the first backbone is
    loaded (transformers is imported then anyway; ``import r2r_core`` does not import it)."""
    try:
        from transformers import AttentionInterface, PreTrainedModel
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: F401 (checked here, imported per call)
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # noqa: F401 (likewise)
    except ImportError as exc:
        missing = str(exc)
    else:
        needs = {"AttentionInterface.register": getattr(AttentionInterface, "register", None),
                 "ALL_MASK_ATTENTION_FUNCTIONS.register": getattr(ALL_MASK_ATTENTION_FUNCTIONS, "register", None),
                 "PreTrainedModel.set_attn_implementation": getattr(PreTrainedModel, "set_attn_implementation", None)}
        missing = ", ".join(name for name, fn in needs.items() if not callable(fn))
        if not missing:
            return SimpleNamespace(attention=AttentionInterface, masks=ALL_MASK_ATTENTION_FUNCTIONS)
    import transformers

    logger.warning("transformers %s has no %s: attention stays on transformers' SDPA (the grouped attention is "
                   "not used)", transformers.__version__, missing)
    return None


def grouped_sdpa_mask(*args, dtype: torch.dtype = torch.float32, device="cpu", **kwargs) -> torch.Tensor | None:
    """transformers' SDPA mask (a transformers mask function), made additive in ``dtype`` -- 0 where a key is
    attended, -inf where not, what SDPA itself would convert a boolean mask to -- for inference on the CPU.
    With gradients, or on another device, it stays boolean."""
    from transformers.masking_utils import sdpa_mask

    mask = sdpa_mask(*args, device=device, **kwargs)
    if mask is None or mask.dtype != torch.bool or not mask.is_cpu or torch.is_grad_enabled():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def grouped_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs):
    """A transformers attention function: ``query [B, H, L, D]``, ``key``/``value [B, KV, S, D]``, a boolean or
    additive mask ``[B, 1, L, S]`` or None (causal); returns ``([B, L, H, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    mask_ok = attention_mask is None or (
        (attention_mask.dtype == torch.bool or attention_mask.dtype.is_floating_point)
        and attention_mask.ndim == 4 and attention_mask.shape[1] == 1
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
        if attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
            attention_mask = attention_mask.to(query.dtype)
        attention_mask = attention_mask.expand(batch, groups, -1, -1).reshape(batch, 1, groups * length, kv_length)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, kv_heads, groups * length, dim), key, value, attn_mask=attention_mask, scale=scaling,
    )
    return out.view(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def use_grouped_attention(model: torch.nn.Module) -> bool:
    """Switch ``model`` (loaded with ``attn_implementation="sdpa"``) to :func:`grouped_sdpa_attention` and its
    masks to :func:`grouped_sdpa_mask`. Returns whether it was switched (models on other attention
    implementations, and every model where transformers lacks the registry API, are left)."""
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", GROUPED_SDPA):
        return False
    registry = transformers_registry()
    if registry is None:
        return False
    registry.attention.register(GROUPED_SDPA, grouped_sdpa_attention)
    registry.masks.register(GROUPED_SDPA, grouped_sdpa_mask)
    model.set_attn_implementation(GROUPED_SDPA)
    return True
