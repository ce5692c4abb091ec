"""Experiment, not part of r2r: fp32 linear layers on oneDNN's linear op for inference on the CPU.

PyTorch runs an fp32 ``nn.Linear`` on the CPU through its BLAS (MKL in the official wheels) and a bf16 one through
oneDNN. On some CPUs oneDNN's fp32 kernel is faster; this module lets the benchmarks measure that
(:func:`benchmarks.matmul_peak` times both kernels, ``speed.py --onednn-linears`` switches r2r's backbone).
The op, ``torch.ops.mkldnn._linear_pointwise``, is private to PyTorch, which is why r2r itself does not use it.
Measurements: ``benchmarks/RESULTS.md``.

:func:`use_onednn_linears` switches the plain ``torch.nn.Linear`` layers of a loaded model to :func:`linear`;
:func:`restore_linears` undoes it. :func:`linear` calls the op for fp32 CPU inputs without gradients and
``torch.nn.functional.linear`` for everything else (training, other dtypes or devices, ``torch.compile`` tracing,
PyTorch builds without oneDNN).
"""

from __future__ import annotations

import types

import torch

__all__ = ["has_onednn_linear", "linear", "onednn_linear", "restore_linears", "use_onednn_linears"]


def has_onednn_linear() -> bool:
    """Whether this PyTorch build has oneDNN's linear op (:func:`onednn_linear`)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN's linear op, unconditionally (CPU tensors of one dtype; see
    :func:`has_onednn_linear`). :func:`linear` decides when to use it."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight, bias)``, computed by oneDNN for fp32 inference on the CPU."""
    if (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() >= 2 and weight.dim() == 2
            and x.device.type == "cpu" and weight.device.type == "cpu" and x.numel() > 0
            and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"))
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and has_onednn_linear()):
        return onednn_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def _forward(self: torch.nn.Linear, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's name)
    return linear(input, self.weight, self.bias)


def _switched(module: torch.nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is _forward


def use_onednn_linears(model: torch.nn.Module) -> int:
    """Make every plain ``torch.nn.Linear`` of ``model`` compute through :func:`linear` (idempotent; subclasses,
    such as peft's LoRA layers or quantized layers, are left). Returns how many layers were switched now."""
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
