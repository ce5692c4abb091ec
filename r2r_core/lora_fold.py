"""Experts routed per thread on r2r's own LoRA layers, with uniform-expert batches folded into the weight.

peft routes rows to experts (``adapter_names``) by registering forward hooks on the shared LoRA layers for the
length of a call, so two forward passes of one model at once would see each other's experts.
:func:`install_lora_folding` gives the LoRA layers that carry only r2r's experts a forward that takes its rows'
experts from the calling thread (:func:`thread_routing`) instead; :func:`r2r_core.runtime.map_batches` runs CPU
batches side by side that way. In the same forward, a batch whose rows all use one expert computes
``x @ (W + s * B A)^T`` with the folded weight built for that call and dropped after it (one ``addmm`` instead of
peft's per-row gather, two thin matmuls and scatter, when the batch has enough tokens for that to be less work).
Nothing is merged into the model and nothing outlives the call. Mixed batches, the bare backbone
(:data:`BASE_ADAPTER`), LoRA variants (DoRA, ...) and anything with gradients go to peft's own forward.

The forward reads fields of peft's LoRA ``Linear`` (:data:`LAYER_FIELDS`). They are checked when it is installed:
where a peft version lacks one, nothing is installed, one warning says so, and scoring uses peft's public
``adapter_names`` path (one batch at a time).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

import torch

__all__ = ["BASE_ADAPTER", "LAYER_FIELDS", "folds_for", "install_lora_folding", "missing_fields", "routes_by_thread",
           "thread_routing"]

logger = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # the name peft's ``adapter_names`` gives a row that runs without any adapter
# What the folding forward reads on a peft LoRA ``Linear`` (besides torch's ``training``)
LAYER_FIELDS = ("base_layer", "lora_A", "lora_B", "scaling", "lora_dropout", "lora_variant", "merged",
                "disable_adapters", "fan_in_fan_out")

_MARK = "_r2r_fold_forward"
_ROUTES = "_r2r_routes_by_thread"  # (adapter names, answer) of routes_by_thread, kept on the model
_local = threading.local()
_warned: set[tuple[str, ...]] = set()


@contextmanager
def thread_routing(adapter_names: Sequence[str]) -> Iterator[None]:
    """Within this block, the calling thread's forward passes route row ``i`` to expert ``adapter_names[i]``
    in every layer installed by :func:`install_lora_folding` (call the model *without* ``adapter_names``).
    Other threads are not affected."""
    previous = getattr(_local, "names", None)
    _local.names = list(adapter_names)
    try:
        yield
    finally:
        _local.names = previous


def routes_by_thread(model: torch.nn.Module) -> bool:
    """True when every LoRA layer of ``model`` takes its experts from :func:`thread_routing` (also when it has
    none): only then may several threads run its forward passes at once.

    The answer is kept on ``model`` (walking every module on every call would cost milliseconds) for as long as
    its adapters (``peft_config``) stay the same; installing the folding layers forgets it."""
    from peft.tuners.lora import LoraLayer

    adapters = tuple(sorted(getattr(model, "peft_config", None) or ()))
    known = model.__dict__.get(_ROUTES)
    if known is not None and known[0] == adapters:
        return known[1]
    answer = all(getattr(m, _MARK, False) for m in model.modules() if isinstance(m, LoraLayer))
    model.__dict__[_ROUTES] = (adapters, answer)
    return answer


def _uniform_expert(adapter_names) -> str | None:
    if not adapter_names:
        return None
    first = adapter_names[0]
    return first if all(a == first for a in adapter_names) else None


def folds_for(layer, name: str, tokens: int) -> bool:
    """Whether ``layer`` (a peft LoRA ``Linear``) folds expert ``name`` for a batch of ``tokens`` tokens."""
    base = layer.base_layer
    if name not in layer.lora_A or name in layer.lora_variant or layer.merged:
        return False
    if layer.disable_adapters or layer.fan_in_fan_out or type(base) is not torch.nn.Linear:
        return False
    if layer.lora_B[name].bias is not None or torch.is_grad_enabled():
        return False
    if layer.training and not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return False
    return tokens * (base.in_features + base.out_features) >= base.in_features * base.out_features


def _folding_forward(layer, peft_forward):
    def forward(x: torch.Tensor, *args, adapter_names=None, **kwargs) -> torch.Tensor:
        if adapter_names is None:
            adapter_names = getattr(_local, "names", None)
        name = _uniform_expert(adapter_names)
        if name is not None and not args and not kwargs and len(x) == len(adapter_names):
            base = layer.base_layer
            if name == BASE_ADAPTER and not layer.merged:
                return base(x)
            if folds_for(layer, name, x.numel() // x.shape[-1]):
                w = base.weight
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                folded = torch.addmm(w, b.to(w.dtype), a.to(w.dtype), alpha=layer.scaling[name])
                return torch.nn.functional.linear(x, folded, base.bias)
        return peft_forward(x, *args, adapter_names=adapter_names, **kwargs)

    return forward


def missing_fields(layer) -> list[str]:
    """The :data:`LAYER_FIELDS` that ``layer`` (a peft LoRA ``Linear``) does not have."""
    return [f for f in LAYER_FIELDS if not hasattr(layer, f)]


def install_lora_folding(model: torch.nn.Module, experts: Collection[str]) -> int:
    """Give every peft LoRA ``Linear`` of ``model`` whose adapters are all among ``experts`` (the ones r2r loaded)
    the per-thread routing and folding forward (idempotent); layers carrying any other adapter keep peft's. Returns
    how many layers got it now: 0, with one warning, when peft's layers lack a field it reads."""
    from peft.tuners.lora import Linear as LoraLinear

    experts = set(experts)
    for module in model.modules():
        module.__dict__.pop(_ROUTES, None)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear) and not getattr(m, _MARK, False)
              and set(getattr(m, "lora_A", ())) <= experts]
    missing = tuple(sorted({f for m in layers for f in missing_fields(m)}))
    if missing:
        if missing not in _warned:
            _warned.add(missing)
            import peft

            logger.warning("peft %s's LoRA layers have no %s: experts are routed with peft's adapter_names, one "
                           "batch at a time, without folding", peft.__version__, ", ".join(missing))
        return 0
    for module in layers:
        module.forward = _folding_forward(module, module.forward)
        setattr(module, _MARK, True)
    return len(layers)
