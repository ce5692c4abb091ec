"""Uniform-expert batches run with the expert folded into the weight, for that one call.

peft's per-row routing (``adapter_names``) gathers each expert's rows, runs its two rank-r matmuls and
scatters the result back, in every adapted layer. That is right for batches that mix experts, but the common
batch -- all candidates of one query -- uses a single expert, and there the thin rank-r matmuls and the
gather/scatter cost ~10% of a rerank on a CPU. For such a batch the layer here computes
``x @ (W + s * B A)^T`` instead: the folded weight is built inside the call (one ``addmm``), used once
(through :func:`r2r_core.cpu_linear.linear`, like the backbone's own linear layers) and dropped. Nothing is
merged into the model and nothing outlives the call, so routing stays per row and there is no state to switch
between queries; batches with mixed experts, the bare backbone (``"__base__"``), LoRA
variants (DoRA, ...) and anything with gradients go through peft unchanged.

Folding does ``in * out * r`` multiply-adds once instead of ``tokens * (in + out) * r``; it is used when the
batch has enough tokens for that to be the smaller amount of work.

The layers installed here also take their rows' experts from the calling thread (:func:`thread_routing`)
instead of from peft's ``adapter_names`` forward hooks. peft registers those hooks on the shared modules for
the length of a call, so two forward passes at once would see each other's experts; the thread-local names
let several threads run forward passes of one model at the same time, each with its own experts
(:func:`r2r_core.runtime.map_batches` runs CPU batches that way).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from r2r_core.cpu_linear import linear

__all__ = ["folds_for", "install_lora_folding", "routes_by_thread", "thread_routing"]

_MARK = "_r2r_fold_forward"
_ROUTES = "_r2r_routes_by_thread"  # (adapter names, answer) of routes_by_thread, kept on the model
_local = threading.local()


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

    Walking every module costs ~5 ms on SmolLM2 with three experts, on every route and rerank call, so the
    answer is kept on ``model`` for as long as its adapters (``peft_config``) stay the same; installing the
    folding layers forgets it."""
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
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) or layer.merged:
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
            if name == "__base__" and not layer.merged:
                return base(x)
            if folds_for(layer, name, x.numel() // x.shape[-1]):
                w = base.weight
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                folded = torch.addmm(w, b.to(w.dtype), a.to(w.dtype), alpha=layer.scaling[name])
                return linear(x, folded, base.bias)
        return peft_forward(x, *args, adapter_names=adapter_names, **kwargs)

    return forward


def install_lora_folding(model: torch.nn.Module) -> int:
    """Give every peft LoRA ``Linear`` of ``model`` the folding fast path (idempotent); returns how many layers
    got it now."""
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in model.modules():
        module.__dict__.pop(_ROUTES, None)
        if isinstance(module, LoraLinear) and not getattr(module, _MARK, False):
            module.forward = _folding_forward(module, module.forward)
            setattr(module, _MARK, True)
            count += 1
    return count
