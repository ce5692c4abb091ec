"""The Latent Semantic Router: ``p(d|q) = softmax((W h_q + b) / T)`` on the frozen backbone's query encoding.

* ``h_q`` is read from the backbone with every adapter disabled (per row, through ``adapter_names="__base__"``)
  at one layer or several (``layer=16`` or ``layer=[12, 16]``, concatenated), for the query rendered in a fixed
  query template. ``pooling="last"`` takes the state of the last token (the paper's ``h_q``); ``"mean"`` the mean
  over the query's own tokens (the template's fixed prefix, the same for every query, is left out). The forward
  pass stops at the deepest layer read: a router on layer ``k`` of ``L`` costs ``k / L`` of a pass over the query.
* Features are standardized with the training mean and standard deviation; the linear head is trained with
  (weighted) cross-entropy and weight decay; ``temperature`` divides its logits (router training fits it on
  datasets the head never saw, so the probabilities mean what they say on new data).
* A query goes to the fallback expert (the bundle's ``general`` generalist, or ``"__base__"``) when its top
  probability is below ``threshold`` (``Route.reason == "below_threshold"``), or when it is out of distribution:
  its standardized features are farther than ``ood_cutoff`` from the centroid of every domain's training queries
  (``"out_of_distribution"``), however confident the softmax is. ``ood_cutoff=None`` turns that check off.
* Saved as ``router.safetensors`` + ``router.json``. A ``router.json`` written before pooling, temperature and the
  distance check existed loads as last-token pooling, temperature 1 and no distance check.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from r2r_core.lora_fold import routes_by_thread
from r2r_core.scoring import BASE_ADAPTER, TemplateTokenizer, _right_pad, _routed_forward

logger = logging.getLogger(__name__)

__all__ = ["LatentRouter", "Route", "ROUTER_WEIGHTS", "ROUTER_CONFIG", "POOLINGS", "ROUTED", "BELOW_THRESHOLD",
           "OUT_OF_DISTRIBUTION", "NO_ROUTER"]

ROUTER_WEIGHTS = "router.safetensors"
ROUTER_CONFIG = "router.json"
MAX_QUERY_TOKENS = 512  # queries are cut to this many tokens before encoding
POOLINGS = ("last", "mean")

# Route.reason: why a query went where it went
ROUTED = "routed"  # the most probable expert, confident and in distribution
BELOW_THRESHOLD = "below_threshold"  # top probability below the threshold: the fallback
OUT_OF_DISTRIBUTION = "out_of_distribution"  # far from every domain's training queries: the fallback
NO_ROUTER = "no_router"  # the reranker has no router: the fallback


class _Exit(Exception):
    """Raised by :func:`_forward_until`'s hook to end a forward pass early."""


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


def _forward_until(forward, layers: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    """``forward()`` (a model's forward pass) stopped right after the last of ``layers`` (given in the order the
    pass reaches them); returns each layer's hidden states. The hooks act only for the calling thread: other
    threads' passes through the same model go on untouched. ``forward`` must leave nothing behind when it raises
    (peft's ``adapter_names`` hooks would stay installed)."""
    owner = threading.get_ident()
    got: dict[int, torch.Tensor] = {}

    def hook(index, module, args, output):
        if threading.get_ident() == owner:
            got[index] = output[0] if isinstance(output, tuple) else output
            if index == len(layers) - 1:
                raise _Exit

    handles = [layer.register_forward_hook(partial(hook, i)) for i, layer in enumerate(layers)]
    try:
        forward()
    except _Exit:
        return [got[i] for i in range(len(layers))]
    finally:
        for handle in handles:
            handle.remove()
    raise RuntimeError(f"the forward pass never reached {type(layers[-1]).__name__}; cannot read the router's layer")


def _pool(hidden: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, H] -> [B, H]: the last real token's state, or the mean over positions ``starts[i]`` .. last."""
    last = mask.sum(dim=1) - 1
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    keep = (mask.bool() & (positions[None, :] >= starts[:, None])).unsqueeze(-1)
    return (hidden.float() * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1)


@dataclass(frozen=True)
class Route:
    """The expert chosen for a query, the router's probability for every expert, and why: ``reason`` is
    ``"routed"``, ``"below_threshold"`` or ``"out_of_distribution"`` (both: the fallback), or ``"no_router"``.
    ``distance`` is the query's distance to the nearest domain (None where the router has no distance check)."""

    expert: str
    probabilities: dict[str, float] = field(default_factory=dict)
    reason: str = ROUTED
    distance: float | None = None


def _layers_tuple(layer) -> tuple[int, ...]:
    layers = (layer,) if isinstance(layer, int) and not isinstance(layer, bool) else tuple(layer)
    if not layers or any(isinstance(v, bool) or not isinstance(v, int) for v in layers):
        raise ValueError(f"`layer` must be an int or a non-empty list of ints, got {layer!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"`layer` must not repeat a layer, got {list(layers)}")
    return layers


class LatentRouter:
    def __init__(self, labels: Sequence[str], layer: int | Sequence[int] = -1,
                 query_template: str = "<Query>: {query}", threshold: float = 0.0, weight_decay: float = 1e-2,
                 pooling: str = "last", temperature: float = 1.0, ood_cutoff: float | None = None):
        labels = list(labels)
        if len(labels) < 1 or len(set(labels)) != len(labels):
            raise ValueError(f"`labels` must be distinct expert names, at least one, got {labels!r}")
        if "{query}" not in query_template:
            raise ValueError(f"`query_template` must contain '{{query}}', got {query_template!r}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"`threshold` must be in [0, 1), got {threshold!r}")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {POOLINGS}, got {pooling!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}")
        if ood_cutoff is not None and (isinstance(ood_cutoff, bool) or not isinstance(ood_cutoff, (int, float))
                                       or not ood_cutoff > 0):
            raise ValueError(f"`ood_cutoff` must be a number > 0 or None, got {ood_cutoff!r}")
        self.labels = labels
        self.layers = _layers_tuple(layer)
        self.query_template = query_template
        self.threshold = float(threshold)
        self.weight_decay = float(weight_decay)
        self.pooling = pooling
        self.temperature = float(temperature)
        self.ood_cutoff = None if ood_cutoff is None else float(ood_cutoff)
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None  # [K, H]
        self.bias: torch.Tensor | None = None  # [K]
        self.centroids: torch.Tensor | None = None  # [K, H]: each label's mean standardized training feature
        self._warned_long_query = False

    @property
    def layer(self) -> int | tuple[int, ...]:
        """The layer read (an int), or the layers read and concatenated (a tuple)."""
        return self.layers[0] if len(self.layers) == 1 else self.layers

    @layer.setter
    def layer(self, value: int | Sequence[int]) -> None:
        self.layers = _layers_tuple(value)

    @property
    def is_fitted(self) -> bool:
        return self.weight is not None

    # ------------------------------------------------------------------ features
    @torch.inference_mode()
    def encode(self, model, tokenizer, queries: Sequence[str], batch_size: int = 32,
               max_query_tokens: int = MAX_QUERY_TOKENS) -> torch.Tensor:
        """``h_q`` for each query: [N, H * len(layers)] float32, from the backbone with adapters disabled. A query
        is read as plain text (its ``<|im_end|>`` is characters, not a control token) and cut to
        ``max_query_tokens``."""
        feats = encode_queries(model, tokenizer, queries, self.layers, (self.pooling,), self.query_template,
                               batch_size, max_query_tokens, warn=self._warn_long_query)
        return torch.cat([feats[(self.pooling, layer)] for layer in self.layers], dim=1)

    def _warn_long_query(self, budget: int) -> None:
        if not self._warned_long_query:
            logger.warning("the router cut a query longer than %d tokens to that length; further long queries "
                           "are cut without a warning", budget)
            self._warned_long_query = True

    # ------------------------------------------------------------------ head
    def _standardize(self, features: torch.Tensor) -> torch.Tensor:
        return (features.float() - self.mean) / self.std

    def fit(self, features: torch.Tensor, labels: Sequence[str], epochs: int = 300, lr: float = 1e-2,
            seed: int = 0, class_balanced: bool = True, sample_weight: torch.Tensor | None = None) -> dict:
        """Train the linear head with full-batch AdamW on cross-entropy; returns the loss history.

        ``sample_weight`` (one weight per row) replaces the class balancing; the domain centroids of the
        distance check are weighted means with the same weights."""
        if features.ndim != 2 or features.shape[0] != len(labels):
            raise ValueError(f"`features` must be [N, H] with N == len(labels); got {tuple(features.shape)} "
                             f"and {len(labels)} labels")
        unknown = sorted(set(labels) - set(self.labels))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the router's labels {self.labels}")
        y = torch.tensor([self.labels.index(lab) for lab in labels])
        if sample_weight is not None:
            w_rows = torch.as_tensor(sample_weight, dtype=torch.float32)
            if w_rows.shape != (len(labels),) or not bool((w_rows >= 0).all()) or not float(w_rows.sum()) > 0:
                raise ValueError(f"`sample_weight` must be {len(labels)} weights >= 0, not all 0")
        else:
            counts = torch.bincount(y, minlength=len(self.labels)).float()
            per_class = counts.sum() / (len(self.labels) * counts.clamp_min(1)) if class_balanced else None
            w_rows = per_class[y] if per_class is not None else torch.ones(len(labels))
        x = features.float()
        self.mean = x.mean(dim=0)
        self.std = x.std(dim=0).clamp_min(1e-6)
        x = self._standardize(x)
        gen = torch.Generator().manual_seed(seed)
        w = (torch.randn(len(self.labels), x.shape[1], generator=gen) * 0.01).requires_grad_(True)
        b = torch.zeros(len(self.labels), requires_grad=True)
        opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=self.weight_decay)
        history = []
        norm = w_rows / w_rows.sum()
        with torch.enable_grad():
            for _ in range(epochs):
                opt.zero_grad()
                losses = torch.nn.functional.cross_entropy(x @ w.T + b, y, reduction="none")
                loss = (losses * norm).sum()
                loss.backward()
                opt.step()
                history.append(loss.item())
        self.weight, self.bias = w.detach(), b.detach()
        self.centroids = torch.zeros(len(self.labels), x.shape[1])
        for k in range(len(self.labels)):
            rows = y == k
            if rows.any():
                self.centroids[k] = (x[rows] * w_rows[rows, None]).sum(0) / w_rows[rows].sum().clamp_min(1e-12)
            else:  # a label without training rows is never near: its centroid cannot accept a query
                self.centroids[k] = float("inf")
        return {"loss": history}

    def _check_features(self, features: torch.Tensor) -> None:
        if not self.is_fitted:
            raise RuntimeError("the router is not fitted; call fit() or load a trained router")
        if features.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"features have size {features.shape[-1]}, the router expects {self.weight.shape[1]}")

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``W h + b`` on the standardized features, before the temperature."""
        self._check_features(features)
        return self._standardize(features) @ self.weight.T + self.bias

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        """``softmax(logits / temperature)``, one row per query."""
        return torch.softmax(self.logits(features) / self.temperature, dim=-1)

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Per query, the root-mean-square distance of its standardized features to the nearest domain centroid
        (0 at a centroid; a typical training query sits at about 1)."""
        self._check_features(features)
        if self.centroids is None:
            raise RuntimeError("this router has no domain centroids (saved before the distance check existed)")
        return nearest_centroid_distance(self._standardize(features), self.centroids)

    def route_features(self, features: torch.Tensor, threshold: float | None = None,
                       fallback: str = BASE_ADAPTER) -> list[Route]:
        """One :class:`Route` per row: the most probable label, or ``fallback`` below ``threshold`` or beyond
        :attr:`ood_cutoff` (``reason`` says which)."""
        thr = self.threshold if threshold is None else threshold
        probs = self.predict_proba(features)
        far = self.distance(features) if self.centroids is not None else None
        routes = []
        for i, row in enumerate(probs):
            p = {lab: float(v) for lab, v in zip(self.labels, row)}
            best = max(p, key=p.get)
            d = None if far is None else float(far[i])
            if self.ood_cutoff is not None and d is not None and d > self.ood_cutoff:
                routes.append(Route(fallback, p, OUT_OF_DISTRIBUTION, d))
            elif p[best] < thr:
                routes.append(Route(fallback, p, BELOW_THRESHOLD, d))
            else:
                routes.append(Route(best, p, ROUTED, d))
        return routes

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        return {
            "labels": self.labels,
            "layer": self.layer if isinstance(self.layer, int) else list(self.layer),
            "pooling": self.pooling,
            "query_template": self.query_template,
            "temperature": self.temperature,
            "threshold": self.threshold,
            "ood_cutoff": self.ood_cutoff,
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
        if self.centroids is not None:
            tensors["centroids"] = self.centroids
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
                         cfg.get("threshold", 0.0), cfg.get("weight_decay", 1e-2), pooling=cfg.get("pooling", "last"),
                         temperature=cfg.get("temperature", 1.0), ood_cutoff=cfg.get("ood_cutoff"))
            router.weight, router.bias = tensors["weight"].float(), tensors["bias"].float()
            router.mean, router.std = tensors["mean"].float(), tensors["std"].float()
        except KeyError as exc:
            raise ValueError(f"{cfg_path} / {w_path}: missing entry {exc}") from exc
        if "centroids" in tensors:
            router.centroids = tensors["centroids"].float()
        elif router.ood_cutoff is not None:
            raise ValueError(f"{cfg_path} sets an ood_cutoff but {w_path} holds no 'centroids'")
        k, h = router.weight.shape
        if k != len(router.labels) or router.bias.shape != (k,) or router.mean.shape != (h,) or (
                router.centroids is not None and router.centroids.shape != (k, h)):
            raise ValueError(f"{w_path}: tensor shapes do not match {len(router.labels)} labels")
        return router


def nearest_centroid_distance(standardized: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Per row, the root-mean-square distance to the nearest of ``centroids`` (both in standardized units)."""
    finite = torch.isfinite(centroids).all(dim=1)
    if not bool(finite.any()):
        return torch.full((standardized.shape[0],), math.inf)
    d = torch.cdist(standardized.float(), centroids[finite].float()) / math.sqrt(standardized.shape[1])
    return d.min(dim=1).values


@torch.inference_mode()
def encode_queries(model, tokenizer, queries: Sequence[str], layers: Sequence[int], poolings: Sequence[str] = ("last",),
                   query_template: str = "<Query>: {query}", batch_size: int = 32,
                   max_query_tokens: int = MAX_QUERY_TOKENS, warn=None) -> dict[tuple[str, int], torch.Tensor]:
    """``{(pooling, layer): [N, H] float32}`` for every pooling and layer, from one pass per batch that stops at
    the deepest layer (adapters disabled). :meth:`LatentRouter.encode` reads its own features from here, and a
    benchmark comparing layers and poolings reads them all at once. ``warn(max_query_tokens)`` is called when
    a batch had a query cut."""
    if isinstance(max_query_tokens, bool) or not isinstance(max_query_tokens, int) or max_query_tokens < 1:
        raise ValueError(f"`max_query_tokens` must be an int >= 1, got {max_query_tokens!r}")
    layers = _layers_tuple(layers)
    bad = [p for p in poolings if p not in POOLINGS]
    if bad or not poolings:
        raise ValueError(f"`poolings` must be among {POOLINGS}, got {list(poolings)!r}")
    text = TemplateTokenizer(tokenizer, query_template)
    device = next(model.parameters()).device
    decoder_layers = _decoder_layers(model)
    if decoder_layers is not None:
        n = len(decoder_layers)
        out_of_range = [v for v in layers if not -(n + 1) <= v <= n]
        if out_of_range:
            raise ValueError(f"the router reads layer {out_of_range[0]}, but the backbone has {n} layers: "
                             f"`layer` must be in [{-(n + 1)}, {n}] (0 = embeddings, -1 = last)")
        if len({v % (n + 1) for v in layers}) != len(layers):
            raise ValueError(f"`layer` {list(layers)} names the same layer twice")
    by_thread = routes_by_thread(model)
    stops = [_exit_layer(v, len(decoder_layers)) for v in layers] if decoder_layers is not None else [None]
    early = None not in stops and not (hasattr(model, "peft_config") and not by_thread)
    # (peft's adapter_names hooks are not removed when a forward raises: no early exit through them)
    prefix = text.render(query_template, [{"query": ""}])[0]
    out: dict[tuple[str, int], list[torch.Tensor]] = {(p, v): [] for p in poolings for v in layers}
    for start in range(0, len(queries), batch_size):
        batch, cut = text.truncate(queries[start : start + batch_size], max_query_tokens)
        if cut and warn is not None:
            warn(max_query_tokens)
        ids = text.render(query_template, [{"query": q} for q in batch])
        input_ids, mask = _right_pad(ids, tokenizer.pad_token_id, device)
        starts = torch.tensor([min(_common_prefix(row, prefix), len(row) - 1) for row in ids], device=device)
        forward = partial(_routed_forward, model, [BASE_ADAPTER] * len(ids), by_thread, input_ids=input_ids,
                          attention_mask=mask, use_cache=False, logits_to_keep=1)
        if early:
            order = sorted(range(len(layers)), key=lambda i: stops[i])
            got = _forward_until(forward, [decoder_layers[stops[i]] for i in order])
            hidden = {layers[i]: h for i, h in zip(order, got)}
        else:
            states = forward(output_hidden_states=True).hidden_states
            hidden = {v: states[v] for v in layers}
        for (pooling, v), acc in out.items():
            acc.append(_pool(hidden[v], mask, starts, pooling).cpu())
    if not queries:
        return {key: torch.zeros((0, 0)) for key in out}
    return {key: torch.cat(acc) for key, acc in out.items()}


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
