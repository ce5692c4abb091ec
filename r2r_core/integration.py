"""What the framework adapters (LlamaIndex, LangChain) share: option checks and the engine they use.

Both adapters accept either loading options (``model``, ``device``, ``dtype``, ``batch_size``,
``max_length``) or an already loaded ``reranker`` to share, and an optional fixed ``expert``.
"""

from __future__ import annotations

from collections.abc import Iterable

from r2r_core.reranker import R2RReranker
from r2r_core.scoring import BASE_ADAPTER

__all__ = ["LOAD_FIELDS", "check_positive", "check_score_threshold", "check_top_n", "resolve_engine"]

#: The adapter fields that only matter when the adapter loads the engine itself.
LOAD_FIELDS = ("model", "device", "dtype", "batch_size", "max_length")


def check_top_n(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"`top_n` must be >= 1 or None, got {value}")
    return value


def check_score_threshold(value: float | None) -> float | None:
    if value is not None and (isinstance(value, bool) or not 0.0 <= value <= 1.0):
        raise ValueError(f"`score_threshold` must be in [0, 1] or None, got {value!r}")
    return value


def check_positive(name: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}")
    return value


def resolve_engine(
    reranker: R2RReranker | None,
    fields_set: Iterable[str],
    *,
    model: str,
    device: str | None,
    dtype: str,
    batch_size: int,
    max_length: int,
    expert: str | None,
) -> R2RReranker:
    """The shared ``reranker`` or a newly loaded one; ``expert``, when fixed, must be one of its experts.

    ``fields_set`` names the options the user passed explicitly: loading options next to a shared
    engine are refused, since they could not take effect.
    """
    if reranker is not None:
        clashing = sorted(set(LOAD_FIELDS) & set(fields_set))
        if clashing:
            raise ValueError(
                "pass either `reranker` (an already loaded engine) or loading options, not both; "
                f"got reranker and {', '.join(clashing)}"
            )
        engine = reranker
    else:
        engine = R2RReranker.from_pretrained(
            model, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length
        )
    if expert is not None and expert != BASE_ADAPTER and expert not in engine.experts:
        raise KeyError(f"`expert` {expert!r} is not in the reranker; available: {[BASE_ADAPTER, *engine.experts]}")
    return engine
