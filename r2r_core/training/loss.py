"""The group-wise contrastive loss of the paper (Eq. 5).

For a group of one positive and ``n`` negatives scored with the logit ``s = (z_yes - z_no) / tau``::

    L = -log( exp(s_pos) / sum_j exp(s_j) )

i.e. softmax cross-entropy over the group with the positive at index 0 (InfoNCE).
"""

from __future__ import annotations

import torch

__all__ = ["group_infonce"]


def group_infonce(margins: torch.Tensor, tau: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """InfoNCE over groups: ``margins`` is ``[G, n]`` (``z_yes - z_no``), the positive in column 0.

    Returns the mean (or sum, or per-group with ``reduction="none"``) of the per-group losses.
    """
    if margins.ndim != 2 or margins.shape[1] < 2:
        raise ValueError(f"`margins` must be [groups, group_size >= 2], got shape {tuple(margins.shape)}")
    if not tau > 0:
        raise ValueError(f"`tau` must be > 0, got {tau!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"`reduction` must be 'mean', 'sum' or 'none', got {reduction!r}")
    logits = margins.float() / tau
    target = torch.zeros(margins.shape[0], dtype=torch.long, device=margins.device)
    return torch.nn.functional.cross_entropy(logits, target, reduction=reduction)
