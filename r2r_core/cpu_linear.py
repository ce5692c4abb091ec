"""Linear layers on oneDNN for fp32 inference on the CPU.

PyTorch runs an fp32 ``nn.Linear`` on the CPU through its BLAS -- MKL in the official wheels -- and a bf16 one
through oneDNN. On this project's AMD EPYC (AVX-512) MKL's sgemm reaches 84-92 GFLOP/s per core on SmolLM2's
linear shapes and oneDNN's 100-108 (2,560 x 1,536 x 576: 152 against 211 GFLOP/s on two threads). With the
linear layers on oneDNN an fp32 rerank is 9% faster on one thread (12 candidates of 156 tokens) and 11% faster
on two (48 candidates, two workers); margins move by rounding only (<= 3e-5). bf16 already runs on oneDNN and
is left as it is.

:func:`use_onednn_linears` switches the ``torch.nn.Linear`` layers of a loaded model (the backbone loader does
it); :func:`linear` is the function they call, also used for the folded expert weights of
:mod:`r2r_core.lora_fold`. The op is ``torch.ops.mkldnn._linear_pointwise``, the one inductor emits for frozen
linear layers on the CPU. Everything else -- gradients (training), another device or dtype, inputs of fewer
than two dimensions, ``torch.compile`` tracing, PyTorch builds without oneDNN, and ``R2R_ONEDNN_LINEAR=0`` --
runs ``torch.nn.functional.linear`` unchanged.
"""

from __future__ import annotations

import logging
import os
import types
from functools import lru_cache

import torch

__all__ = ["has_onednn_linear", "linear", "onednn_linear", "onednn_linear_available", "restore_linears",
           "use_onednn_linears"]

logger = logging.getLogger(__name__)
_ENV = "R2R_ONEDNN_LINEAR"


def has_onednn_linear() -> bool:
    """Whether this PyTorch build has oneDNN's linear op (:func:`onednn_linear`)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN's linear op, unconditionally (CPU tensors of one dtype; see
    :func:`has_onednn_linear`). :func:`linear` decides when to use it."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@lru_cache(maxsize=1)
def onednn_linear_available() -> bool:
    """Whether :func:`linear` can use oneDNN: PyTorch built with it, and not turned off with
    ``R2R_ONEDNN_LINEAR=0``."""
    if os.environ.get(_ENV, "1").strip().lower() in {"0", "false", "no", "off"}:
        logger.info("%s=0: fp32 linear layers stay on PyTorch's BLAS", _ENV)
        return False
    return has_onednn_linear()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight, bias)``, computed by oneDNN for fp32 inference on the CPU."""
    if (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() >= 2 and weight.dim() == 2
            and x.device.type == "cpu" and weight.device.type == "cpu" and x.numel() > 0
            and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"))
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and onednn_linear_available()):
        return onednn_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def _forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's name)
    return linear(input, self.weight, self.bias)


def _switched(module: torch.nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is _forward


def use_onednn_linears(model: torch.nn.Module) -> int:
    """Make every plain ``torch.nn.Linear`` of ``model`` compute through :func:`linear` (idempotent; subclasses,
    such as quantized linear layers, are left). Returns how many layers were switched now."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and not _switched(module):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count


def restore_linears(model: torch.nn.Module) -> int:
    """Undo :func:`use_onednn_linears`: the layers run ``torch.nn.Linear.forward`` again. Returns how many."""
    count = 0
    for module in model.modules():
        if _switched(module):
            del module.forward
            count += 1
    return count
