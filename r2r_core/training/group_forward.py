"""Training forward pass that shares the prompt prefix across a group.

Every prompt of a group starts with the same prefix (system message, instruction, query), often more than
half of the tokens. The prefix is run once, with gradients, and its key/value cache is expanded to the
group's rows; each row then only runs ``document + suffix``. The margins equal those of the plain path
(:func:`r2r_core.scoring.yes_no_margins` on the whole prompts) up to float rounding, gradients flow into
the adapter through the prefix too, and a step costs ``P + n*T`` tokens instead of ``n*(P + T)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["group_margins"]


def group_margins(model, prefix: Sequence[int], tails: Sequence[Sequence[int]], pad_token_id: int) -> torch.Tensor:
    """Differentiable ``z_yes - z_no`` for ``prefix + tail`` of every tail (one group), shape ``[n]``, for a model
    with a :class:`r2r_core.scoring.YesNoHead`."""
    from transformers import DynamicCache

    from r2r_core.scoring import _layer_kv, _right_pad, cache_kwargs, check_yes_no_head, margin_at

    if not prefix or not tails:
        raise ValueError(f"a group needs a non-empty prefix and >= 1 tail, got {len(prefix)} and {len(tails)}")
    device = next(model.parameters()).device
    n = len(tails)
    check_yes_no_head(model)
    pre = torch.as_tensor([list(prefix)], dtype=torch.long, device=device)
    out = model(input_ids=pre, use_cache=True, logits_to_keep=1)
    kv = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in _layer_kv(out)]
    cache = DynamicCache(ddp_cache_data=kv, config=model.config)
    ids, mask = _right_pad(tails, pad_token_id, device)
    plen = len(prefix)
    position_ids = plen + torch.arange(ids.shape[1], device=device)[None].expand(n, -1)
    full_mask = torch.cat([torch.ones((n, plen), dtype=mask.dtype, device=device), mask], dim=1)
    logits = model(input_ids=ids, attention_mask=full_mask, position_ids=position_ids, use_cache=True,
                   **cache_kwargs(model, cache)).logits
    return margin_at(logits, mask.sum(dim=1) - 1)
