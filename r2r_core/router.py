"""The Latent Semantic Router: ``p(d|q) = softmax(W h_q + b)`` on the frozen backbone's query encoding.

``h_q`` is the hidden state of the last token of the query (rendered in a fixed query template) at a chosen
layer, computed with every adapter disabled (per row, through ``adapter_names="__base__"``). The forward pass
stops at that layer: a router on layer ``k`` of ``L`` costs ``k / L`` of a full pass over the query. Features are
standardized with the training mean and standard deviation; the head is trained with cross-entropy and
weight decay. Below ``threshold`` confidence a query goes to the base model (``"__base__"``), so an
out-of-domain query loses nothing to a wrong expert. Saved as ``router.safetensors`` + ``router.json``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from r2r_core.lora_fold import routes_by_thread
from r2r_core.scoring import BASE_ADAPTER, TemplateTokenizer, _right_pad, _routed_forward

logger = logging.getLogger(__name__)

__all__ = ["LatentRouter", "Route", "ROUTER_WEIGHTS", "ROUTER_CONFIG"]

ROUTER_WEIGHTS = "router.safetensors"
ROUTER_CONFIG = "router.json"
MAX_QUERY_TOKENS = 512  # queries are cut to this many tokens before encoding


class _Exit(Exception):
    """Raised by :func:`_forward_until`'s hook to end a forward pass early, carrying the layer's output."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def _decoder(model) -> torch.nn.Module | None:
    """The decoder (embeddings, layers, final norm) of a (peft-wrapped) causal LM, or None where it is hidden."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)


def _decoder_layers(model) -> torch.nn.ModuleList | None:
    """The decoder layers of a (peft-wrapped) causal LM, or None where the architecture hides them."""
    layers = getattr(_decoder(model), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def _exit_layer(layer: int, n_layers: int) -> int | None:
    """Index of the decoder layer whose output is ``hidden_states[layer]`` (that tuple holds the embeddings,
    then one entry per layer, the last one after the final norm), or None where a full pass is needed: the
    last entry, the embeddings, or an index out of range."""
    if not -(n_layers + 1) <= layer <= n_layers:
        return None
    k = layer % (n_layers + 1)
    return k - 1 if 1 <= k < n_layers else None


def _forward_until(forward, layer: torch.nn.Module) -> torch.Tensor:
    """``forward()`` (a model's forward pass) stopped right after ``layer``; returns that layer's hidden states.
    The hook acts only for the calling thread: other threads' passes through the same model go on untouched.
    ``forward`` must leave nothing behind when it raises (peft's ``adapter_names`` hooks would stay installed).
    """
    owner = threading.get_ident()

    def hook(module, args, output):
        if threading.get_ident() == owner:
            raise _Exit(output[0] if isinstance(output, tuple) else output)

    handle = layer.register_forward_hook(hook)
    try:
        forward()
    except _Exit as stop:
        return stop.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"the forward pass never reached {type(layer).__name__}; cannot read the router's layer")


@dataclass(frozen=True)
class Route:
    """The expert chosen for a query and the router's probability for every expert."""

    expert: str
    probabilities: dict[str, float] = field(default_factory=dict)


class LatentRouter:
    def __init__(self, labels: Sequence[str], layer: int = -1, query_template: str = "<Query>: {query}",
                 threshold: float = 0.0, weight_decay: float = 1e-2):
        labels = list(labels)
        if len(labels) < 1 or len(set(labels)) != len(labels):
            raise ValueError(f"`labels` must be distinct expert names, at least one, got {labels!r}")
        if "{query}" not in query_template:
            raise ValueError(f"`query_template` must contain '{{query}}', got {query_template!r}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"`threshold` must be in [0, 1), got {threshold!r}")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}")
        self.labels = labels
        self.layer = int(layer)
        self.query_template = query_template
        self.threshold = float(threshold)
        self.weight_decay = float(weight_decay)
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None  # [K, H]
        self.bias: torch.Tensor | None = None  # [K]
        self._warned_long_query = False

    @property
    def is_fitted(self) -> bool:
        return self.weight is not None

    # ------------------------------------------------------------------ features
    @torch.inference_mode()
    def encode(self, model, tokenizer, queries: Sequence[str], batch_size: int = 32,
               max_query_tokens: int = MAX_QUERY_TOKENS) -> torch.Tensor:
        """``h_q`` for each query: [N, H] float32, from the backbone with adapters disabled. A query is read as
        plain text (its ``<|im_end|>`` is characters, not a control token) and cut to ``max_query_tokens``."""
        if isinstance(max_query_tokens, bool) or not isinstance(max_query_tokens, int) or max_query_tokens < 1:
            raise ValueError(f"`max_query_tokens` must be an int >= 1, got {max_query_tokens!r}")
        text = TemplateTokenizer(tokenizer, self.query_template)
        device = next(model.parameters()).device
        layers = _decoder_layers(model)
        if layers is not None and not -(len(layers) + 1) <= self.layer <= len(layers):
            raise ValueError(f"the router reads layer {self.layer}, but the backbone has {len(layers)} layers: "
                             f"`layer` must be in [{-(len(layers) + 1)}, {len(layers)}] (0 = embeddings, -1 = last)")
        by_thread = routes_by_thread(model)
        stop = _exit_layer(self.layer, len(layers)) if layers is not None else None
        if stop is not None and hasattr(model, "peft_config") and not by_thread:
            stop = None  # peft's adapter_names hooks are not removed when a forward raises: no early exit
        feats = []
        for start in range(0, len(queries), batch_size):
            batch, cut = text.truncate(queries[start : start + batch_size], max_query_tokens)
            if cut and not self._warned_long_query:
                logger.warning("the router cut a query longer than %d tokens to that length; further long queries "
                               "are cut without a warning", max_query_tokens)
                self._warned_long_query = True
            ids = text.render(self.query_template, [{"query": q} for q in batch])
            input_ids, mask = _right_pad(ids, tokenizer.pad_token_id, device)
            forward = partial(_routed_forward, model, [BASE_ADAPTER] * len(ids), by_thread, input_ids=input_ids,
                              attention_mask=mask, use_cache=False, logits_to_keep=1)
            if stop is None:
                hidden = forward(output_hidden_states=True).hidden_states[self.layer]
            else:
                hidden = _forward_until(forward, layers[stop])
            last = mask.sum(dim=1) - 1
            feats.append(hidden[torch.arange(len(ids), device=device), last].float().cpu())
        if not feats:
            return torch.zeros((0, 0))
        return torch.cat(feats)

    # ------------------------------------------------------------------ head
    def _standardize(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.mean) / self.std

    def fit(self, features: torch.Tensor, labels: Sequence[str], epochs: int = 300, lr: float = 1e-2,
            seed: int = 0, class_balanced: bool = True) -> dict:
        """Train the linear head with full-batch AdamW on cross-entropy; returns the loss history."""
        if features.ndim != 2 or features.shape[0] != len(labels):
            raise ValueError(f"`features` must be [N, H] with N == len(labels); got {tuple(features.shape)} "
                             f"and {len(labels)} labels")
        unknown = sorted(set(labels) - set(self.labels))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the router's labels {self.labels}")
        x = features.float()
        self.mean = x.mean(dim=0)
        self.std = x.std(dim=0).clamp_min(1e-6)
        x = self._standardize(x)
        y = torch.tensor([self.labels.index(lab) for lab in labels])
        counts = torch.bincount(y, minlength=len(self.labels)).float()
        weights = (counts.sum() / (len(self.labels) * counts.clamp_min(1))) if class_balanced else None
        gen = torch.Generator().manual_seed(seed)
        w = (torch.randn(len(self.labels), x.shape[1], generator=gen) * 0.01).requires_grad_(True)
        b = torch.zeros(len(self.labels), requires_grad=True)
        opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=self.weight_decay)
        history = []
        with torch.enable_grad():
            for _ in range(epochs):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(x @ w.T + b, y, weight=weights)
                loss.backward()
                opt.step()
                history.append(loss.item())
        self.weight, self.bias = w.detach(), b.detach()
        return {"loss": history}

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        if not self.is_fitted:
            raise RuntimeError("the router is not fitted; call fit() or load a trained router")
        if features.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"features have size {features.shape[-1]}, the router expects {self.weight.shape[1]}")
        return torch.softmax(self._standardize(features) @ self.weight.T + self.bias, dim=-1)

    def route_features(self, features: torch.Tensor, threshold: float | None = None,
                       fallback: str = BASE_ADAPTER) -> list[Route]:
        """One :class:`Route` per row: the most probable label, or ``fallback`` below ``threshold``."""
        thr = self.threshold if threshold is None else threshold
        routes = []
        for row in self.predict_proba(features):
            probs = {lab: float(p) for lab, p in zip(self.labels, row)}
            best = max(probs, key=probs.get)
            routes.append(Route(best if probs[best] >= thr else fallback, probs))
        return routes

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        return {
            "labels": self.labels,
            "layer": self.layer,
            "query_template": self.query_template,
            "threshold": self.threshold,
            "weight_decay": self.weight_decay,
            "hidden_size": None if self.weight is None else int(self.weight.shape[1]),
        }

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        if not self.is_fitted:
            raise RuntimeError("cannot save an unfitted router")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / ROUTER_WEIGHTS))
        (directory / ROUTER_CONFIG).write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path, weights_file: str = ROUTER_WEIGHTS,
             config_file: str = ROUTER_CONFIG) -> LatentRouter:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, w_path = directory / config_file, directory / weights_file
        for path in (cfg_path, w_path):
            if not path.is_file():
                raise FileNotFoundError(f"router file {path} not found")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc
        try:
            tensors = load_file(str(w_path))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{w_path} is not a valid safetensors file: {exc}") from exc
        try:
            router = cls(cfg["labels"], cfg.get("layer", -1), cfg.get("query_template", "<Query>: {query}"),
                         cfg.get("threshold", 0.0), cfg.get("weight_decay", 1e-2))
            router.weight, router.bias = tensors["weight"].float(), tensors["bias"].float()
            router.mean, router.std = tensors["mean"].float(), tensors["std"].float()
        except KeyError as exc:
            raise ValueError(f"{cfg_path} / {w_path}: missing entry {exc}") from exc
        k, h = router.weight.shape
        if k != len(router.labels) or router.bias.shape != (k,) or router.mean.shape != (h,):
            raise ValueError(f"{w_path}: tensor shapes do not match {len(router.labels)} labels")
        return router
