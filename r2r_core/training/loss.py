"""The group-wise contrastive loss of the paper (Eq. 5).

For a group of one positive and ``n`` negatives scored with the logit ``s = (z_yes - z_no) / tau``::

    L = -log( exp(s_pos) / sum_j exp(s_j) )

i.e. softmax cross-entropy over the group with the positive at index 0 (InfoNCE).

InfoNCE is blind to a shift of all margins, so ``sigmoid(z_yes - z_no)`` need not be a usable probability.
:func:`group_bce` adds a pointwise term on the raw margins (positive -> 1, negatives -> 0, the positive
weighted like all negatives together), and :func:`group_loss` combines the two.
"""

from __future__ import annotations

import torch

__all__ = ["group_bce", "group_infonce", "group_loss"]


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


def group_bce(margins: torch.Tensor) -> torch.Tensor:
    """Mean pointwise BCE of ``sigmoid(margin)`` over groups ``[G, n]``: column 0 relevant, the rest not.

    Per group it is ``(BCE(pos, 1) + mean_j BCE(neg_j, 0)) / 2``, so one positive weighs as much as all negatives.
    """
    if margins.ndim != 2 or margins.shape[1] < 2:
        raise ValueError(f"`margins` must be [groups, group_size >= 2], got shape {tuple(margins.shape)}")
    m = margins.float()
    pos = torch.nn.functional.softplus(-m[:, 0])  # -log sigmoid(m)
    neg = torch.nn.functional.softplus(m[:, 1:]).mean(dim=1)  # -log (1 - sigmoid(m))
    return ((pos + neg) / 2).mean()


def group_loss(margins: torch.Tensor, tau: float = 1.0, bce_weight: float = 0.0) -> torch.Tensor:
    """``group_infonce(margins, tau) + bce_weight * group_bce(margins)`` (the BCE term skipped at weight 0)."""
    loss = group_infonce(margins, tau=tau)
    if bce_weight:
        loss = loss + bce_weight * group_bce(margins)
    return loss
