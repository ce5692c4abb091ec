"""``R2RReranker``: the public facade -- route the query, then score its candidates with the chosen expert.

The prompt length (``max_length``) defaults to the one a bundle's experts were trained at (its recorded
``max_length``; :func:`resolve_max_length`), else 512; an explicit value always wins.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from r2r_core.backbone import Backbone, fingerprints_match, load_backbone
from r2r_core.bundle import is_bundle, read_bundle, write_bundle
from r2r_core.calibration import apply_calibration
from r2r_core.experts import ExpertSet
from r2r_core.router import NO_ROUTER, LatentRouter, Route
from r2r_core.scoring import (
    BASE_ADAPTER,
    DEFAULT_MAX_LENGTH,
    PromptEncoder,
    YesNoIds,
    check_max_length,
    install_yes_no_head,
    prefix_cached_margins,
    yes_no_margins,
)
from r2r_core.templates import PromptTemplate, get_template, template_from_chat

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_BUNDLE_DIR", "R2RReranker", "RerankResult", "Route", "resolve_max_length"]

DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "default_bundle"


def _model_path(name_or_path: str | Path) -> Path:
    return DEFAULT_BUNDLE_DIR if str(name_or_path) == "default" else Path(name_or_path)


def resolve_max_length(name_or_path: str | Path, max_length: int | None = None) -> int:
    """The prompt length ``R2RReranker.from_pretrained(name_or_path, max_length=max_length)`` uses.

    ``max_length`` when given (checked); else the length the bundle's experts were trained at (``max_length``
    in its ``r2r.json``); else :data:`~r2r_core.scoring.DEFAULT_MAX_LENGTH` (512), for a plain causal LM or a
    bundle that records none. Reads only ``r2r.json``: no model is loaded.
    """
    path = _model_path(name_or_path)
    return _max_length(read_bundle(path) if max_length is None and is_bundle(path) else None, max_length)


def _max_length(config, max_length: int | None) -> int:
    """:func:`resolve_max_length` for a bundle already read (``config``; None for a plain causal LM)."""
    if max_length is not None:
        return check_max_length(max_length)
    trained = config.max_length if config is not None else None
    return DEFAULT_MAX_LENGTH if trained is None else trained


@dataclass(frozen=True)
class RerankResult:
    """One reranked document: its position in the input, its score, the text and the expert that scored it.

    ``margin`` is the raw ``z_yes - z_no``; ``score`` is ``sigmoid(margin)``, or the expert's calibrated
    ``sigmoid(scale * margin + bias)`` (:attr:`R2RReranker.calibration`), in [0, 1].
    """

    index: int
    score: float
    document: str
    expert: str
    margin: float


def _check_query(query) -> str:
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"`query` must be a non-empty string, got {query!r}")
    return query


def _check_documents(documents, name: str = "documents") -> list[str]:
    if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise TypeError(f"`{name}` must be a sequence of strings, got {type(documents).__name__}")
    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise TypeError(f"`{name}[{i}]` must be a string, got {type(doc).__name__}")
    return list(documents)


def _check_top_n(top_n, n: int) -> int:
    if top_n is None:
        return n
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n <= 0:
        raise ValueError(f"`top_n` must be an int >= 1 or None, got {top_n!r}")
    return min(top_n, n)


def _check_threshold(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`score_threshold` must be a number in [0, 1] or None, got {value!r}")
    return float(value)


def _guess_template(model_id: str, tokenizer) -> PromptTemplate:
    lowered = model_id.lower()
    if "qwen3-reranker" in lowered:
        return get_template("qwen3")
    if "bge-reranker-v2-gemma" in lowered:
        return get_template("bge-gemma")
    if getattr(tokenizer, "chat_template", None):
        return template_from_chat(tokenizer)
    return get_template("qwen3")


class R2RReranker:
    """Domain-routed decoder-only reranker: one frozen backbone, LoRA experts, a latent semantic router.

    Load once (``from_pretrained``) and reuse; every call is thread-safe and routes experts per row.
    ``max_length`` (tokens per prompt; None: 512 here, a bundle's trained length in :meth:`from_pretrained`)
    is read back as ``encoder.max_length``.
    """

    def __init__(self, backbone: Backbone, template: PromptTemplate, *, instruction: str | None = None,
                 router: LatentRouter | None = None, threshold: float | None = None, batch_size: int = 16,
                 max_length: int | None = None, use_prefix_cache: bool = True, fallback: str = BASE_ADAPTER):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
        self.backbone = backbone
        self.template = template
        self.instruction = instruction or template.default_instruction
        self.batch_size = batch_size
        self.encoder = PromptEncoder(backbone.tokenizer, template,
                                     DEFAULT_MAX_LENGTH if max_length is None else max_length)
        self.yes_no = YesNoIds.from_tokenizer(backbone.tokenizer, template)
        install_yes_no_head(backbone.model, self.yes_no)
        self._experts = ExpertSet(backbone.model, backbone.fingerprint)
        self.router = router
        self.threshold = threshold
        self._fallback = fallback
        #: ``{expert: [scale, bias]}``: :attr:`RerankResult.score` is ``sigmoid(scale * margin + bias)`` for
        #: those experts (:mod:`r2r_core.calibration`), ``sigmoid(margin)`` for the others. Bundles carry it.
        self.calibration: dict[str, list[float]] = {}
        self.use_prefix_cache = use_prefix_cache
        self._lock = threading.RLock()
        self._sources: dict[str, Path] = {}
        #: What :meth:`from_pretrained` loaded this engine with (the model as given, the device and dtype it
        #: picked, ...); None for an engine built directly. Adapters report it instead of their own defaults.
        self.load_options: dict | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "default", *, device=None, dtype="auto",
                        batch_size: int = 16, max_length: int | None = None, trust_remote_code: bool = False,
                        template: str | PromptTemplate | None = None, instruction: str | None = None,
                        use_prefix_cache: bool = True) -> R2RReranker:
        """``"default"`` (the bundle shipped in the package), an R2R bundle folder, or any causal LM
        (hub id or local folder), which is then used as a generalist with no experts.

        ``template`` (a built-in name or a :class:`PromptTemplate`) and ``instruction`` replace the bundle's;
        experts that carry an instruction of their own keep it. ``max_length`` (tokens per prompt) None means the
        length the bundle's experts were trained at (its recorded ``max_length``), else 512; an explicit value
        always wins (see :func:`resolve_max_length`). ``batch_size`` and ``max_length`` are checked before
        anything is loaded. The options used are kept in :attr:`load_options` (``max_length``: the resolved
        value)."""
        if not isinstance(name_or_path, (str, Path)) or not str(name_or_path).strip():
            raise ValueError(f"`name_or_path` must be 'default', a bundle folder or a model id, got {name_or_path!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
        path = _model_path(name_or_path)
        config = read_bundle(path) if is_bundle(path) else None  # r2r.json, read once
        max_length = _max_length(config, max_length)
        if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
            raise ValueError(f"`instruction` must be a non-empty string or None, got {instruction!r}")
        if config is not None:
            self = cls._from_bundle(path, config, device=device, dtype=dtype, batch_size=batch_size,
                                    max_length=max_length, trust_remote_code=trust_remote_code, template=template,
                                    instruction=instruction, use_prefix_cache=use_prefix_cache)
        elif str(name_or_path) == "default":
            raise FileNotFoundError(f"the default bundle is missing ({DEFAULT_BUNDLE_DIR / 'r2r.json'}); "
                                    "reinstall r2r-rerank")
        else:
            backbone = load_backbone(str(name_or_path), device=device, dtype=dtype,
                                     trust_remote_code=trust_remote_code)
            tpl = get_template(template) if isinstance(template, str) else template
            tpl = tpl or _guess_template(str(name_or_path), backbone.tokenizer)
            self = cls(backbone, tpl, instruction=instruction, batch_size=batch_size, max_length=max_length,
                       use_prefix_cache=use_prefix_cache)
        self.load_options = {
            "model": str(name_or_path), "device": str(self.backbone.device),
            "dtype": str(self.backbone.dtype).removeprefix("torch."), "batch_size": batch_size,
            "max_length": max_length, "trust_remote_code": trust_remote_code,
            "template": template.name if isinstance(template, PromptTemplate) else template,
            "instruction": instruction, "use_prefix_cache": use_prefix_cache,
        }
        return self

    @classmethod
    def _from_bundle(cls, path: Path, config, *, template=None, instruction=None, **kwargs) -> R2RReranker:
        base = config.base_model
        backbone = load_backbone(base, device=kwargs["device"], dtype=kwargs["dtype"],
                                 trust_remote_code=kwargs["trust_remote_code"])
        if not fingerprints_match(config.base_fingerprint, backbone.fingerprint):
            raise ValueError(
                f"{path / 'r2r.json'} was made for a different base model: the weights loaded for {base!r} do "
                "not match the fingerprint recorded in the bundle"
            )
        tpl = get_template(template) if isinstance(template, str) else template
        tpl = tpl or PromptTemplate.from_dict(config.template)
        router = None
        if config.router is not None:
            router = LatentRouter.load(path, config.router["weights"], config.router["config"])
        self = cls(backbone, tpl, instruction=instruction or config.instruction, router=router,
                   threshold=config.threshold, batch_size=kwargs["batch_size"], max_length=kwargs["max_length"],
                   use_prefix_cache=kwargs["use_prefix_cache"])
        for name, sub in config.experts.items():
            self.add_expert(name, path / sub, instruction=config.expert_instructions.get(name))
        self.fallback = config.fallback
        self.calibration = dict(config.calibration)
        if router is not None:
            missing = sorted(set(router.labels) - set(self.experts))
            if missing:
                raise ValueError(f"{path / 'r2r.json'}: the router routes to {missing}, which are not experts")
        return self

    def save_pretrained(self, path: str | Path, *, adapter_dtype: str | None = None) -> Path:
        """Write this reranker as a bundle (experts, router, template, instructions, base fingerprint, and
        ``encoder.max_length`` as the bundle's ``max_length``, the default of the next load, and
        :attr:`calibration` for the experts it has).

        ``adapter_dtype="bfloat16"`` stores the experts' weights in bf16 (half the size of fp32).
        """
        with self._lock:
            return write_bundle(
                path, base_model=self.backbone.model_id, base_fingerprint=self.backbone.fingerprint,
                template=self.template, instruction=self.instruction, experts=dict(self._sources),
                router=self.router, threshold=self.threshold,
                expert_instructions={n: i for n in self.experts if (i := self._experts.instruction(n))},
                adapter_dtype=adapter_dtype, fallback=self._fallback, max_length=self.encoder.max_length,
                calibration={n: c for n, c in self.calibration.items() if n in self.experts or n == BASE_ADAPTER},
            )

    # ------------------------------------------------------------------ experts
    @property
    def experts(self) -> list[str]:
        return self._experts.names

    @property
    def model(self) -> torch.nn.Module:
        return self._experts.model

    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    def add_expert(self, name: str, adapter_dir: str | Path, instruction: str | None = None) -> None:
        with self._lock:
            self._experts.add(name, adapter_dir, instruction)
            self._sources[name] = Path(adapter_dir)

    def remove_expert(self, name: str) -> None:
        """Unload expert ``name``. Refused while the router routes to it or it is the fallback: a removed
        expert's queries would otherwise be scored by another model under its name."""
        with self._lock:
            if self.router is not None and name in self.router.labels:
                raise ValueError(f"expert {name!r} is a route of the router ({self.router.labels}); refit the "
                                 "router without it (r2r train --router-only) or drop the router first "
                                 "(reranker.router = None)")
            if name == self._fallback:
                raise ValueError(f"expert {name!r} is the fallback; set reranker.fallback to another expert "
                                 "or '__base__' first")
            self._experts.remove(name)
            del self._sources[name]

    # ------------------------------------------------------------------ routing
    @property
    def fallback(self) -> str:
        """The expert for queries the router is not confident about (``"__base__"``: the backbone alone)."""
        return self._fallback

    @fallback.setter
    def fallback(self, name: str) -> None:
        if name != BASE_ADAPTER:
            self._experts.check(name)
        self._fallback = name

    def route(self, query: str) -> Route:
        """The expert the router picks for ``query``, and why (``Route.reason``): :attr:`fallback` without a router
        (``"no_router"``), below the threshold (``"below_threshold"``) or far from every domain the router was
        trained on (``"out_of_distribution"``)."""
        return self._route_many([_check_query(query)])[0]

    def _route_many(self, queries: list[str]) -> list[Route]:
        if self.router is None:
            return [Route(self._fallback, {}, NO_ROUTER) for _ in queries]
        with self._lock:
            feats = self.router.encode(self.model, self.tokenizer, queries, batch_size=self.batch_size)
        return self.router.route_features(feats, self.threshold, self._fallback)

    def _instruction_for(self, expert: str) -> str:
        return (self._experts.instruction(expert) if expert != BASE_ADAPTER else None) or self.instruction

    # ------------------------------------------------------------------ scoring
    def _margins(self, queries: list[str], experts: list[str], docs_per_query: list[list[str]]) -> list[list[float]]:
        prefixes, rows, counts, n_cut = [], [], [], 0
        for qi, (query, expert, docs) in enumerate(zip(queries, experts, docs_per_query)):
            prefix, tails, cut = self.encoder.encode_counting_cuts(self._instruction_for(expert), query, docs)
            prefixes.append(prefix)
            rows.extend((qi, t) for t in tails)
            counts.append(len(tails))
            n_cut += cut
        if n_cut:  # once per call, with the count, so a caller sees every call that lost text
            logger.warning("%d of %d documents were longer than max_length=%d tokens allows beside the query and "
                           "the template, and were cut to fit; raise max_length or split long documents",
                           n_cut, len(rows), self.encoder.max_length)
        with self._lock, torch.inference_mode():
            if self.use_prefix_cache:
                flat = prefix_cached_margins(self.model, prefixes, experts, rows, self.tokenizer.pad_token_id,
                                             self.batch_size)
            else:
                flat = self._plain_margins(prefixes, experts, rows)
        out, start = [], 0
        for c in counts:
            out.append(flat[start : start + c])
            start += c
        return out

    def _plain_margins(self, prefixes, experts, rows) -> list[float]:
        order = sorted(range(len(rows)), key=lambda i: -(len(prefixes[rows[i][0]]) + len(rows[i][1])))
        flat = [0.0] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            seqs = [prefixes[rows[i][0]] + list(rows[i][1]) for i in chunk]
            names = [experts[rows[i][0]] for i in chunk]
            m = yes_no_margins(self.model, seqs, self.tokenizer.pad_token_id, adapter_names=names)
            for i, v in zip(chunk, m.tolist()):
                flat[i] = v
        return flat

    def _results(self, docs: list[str], margins: list[float], expert: str, top_n: int,
                 score_threshold: float | None = None) -> list[RerankResult]:
        pair = self.calibration.get(expert)
        results = [
            RerankResult(i, apply_calibration(m, pair), d, expert, float(m))
            for i, (d, m) in enumerate(zip(docs, margins))
        ]
        results.sort(key=lambda r: (-r.margin, r.index))
        results = results[:top_n]
        if score_threshold is not None:
            results = [r for r in results if r.score >= score_threshold]
        return results

    def rerank(self, query: str, documents: Sequence[str], top_n: int | None = None,
               expert: str | None = None, score_threshold: float | None = None) -> list[RerankResult]:
        """Score ``documents`` for ``query`` and return them best first (at most ``top_n``).

        ``score_threshold`` applies after ``top_n``: only documents whose score is at least the threshold are
        kept. The score is ``sigmoid(z_yes - z_no)``, through the expert's :attr:`calibration` where it has
        one; ``r2r calibrate`` fits it so that 0.5 means "as likely relevant as not" (the shipped default
        carries none yet).
        """
        return self.rerank_with_route(query, documents, top_n, expert, score_threshold)[1]

    def rerank_with_route(self, query: str, documents: Sequence[str], top_n: int | None = None,
                          expert: str | None = None, score_threshold: float | None = None
                          ) -> tuple[Route | None, list[RerankResult]]:
        """:meth:`rerank`, and the router's decision for ``query`` (None when ``expert`` fixed the expert or
        there were no documents)."""
        _check_query(query)
        docs = _check_documents(documents)
        n = _check_top_n(top_n, len(docs))
        threshold = _check_threshold(score_threshold)
        if expert is not None:
            self._experts.check(expert)
        if not docs:
            return None, []
        route = None
        if expert is None:
            route = self._route_many([query])[0]
            expert = route.expert
        margins = self._margins([query], [expert], [docs])[0]
        return route, self._results(docs, margins, expert, n, threshold)

    async def arerank(self, query: str, documents: Sequence[str], top_n: int | None = None,
                      expert: str | None = None, score_threshold: float | None = None) -> list[RerankResult]:
        """``rerank`` in a worker thread, so the event loop keeps running."""
        return await asyncio.to_thread(self.rerank, query, documents, top_n, expert, score_threshold)

    def score(self, query: str, documents: Sequence[str], expert: str | None = None) -> list[float]:
        """Sigmoid scores in input order."""
        return [r.score for r in sorted(self.rerank(query, documents, expert=expert), key=lambda r: r.index)]

    def rerank_batch(self, queries: Sequence[str], documents_per_query: Sequence[Sequence[str]],
                     top_n: int | None = None, experts: Sequence[str | None] | None = None,
                     score_threshold: float | None = None) -> list[list[RerankResult]]:
        """Rerank many queries at once; candidates of queries routed to different experts share batches.
        ``top_n`` and ``score_threshold`` apply per query, as in :meth:`rerank`."""
        return self.rerank_batch_with_routes(queries, documents_per_query, top_n, experts, score_threshold)[1]

    def rerank_batch_with_routes(self, queries: Sequence[str], documents_per_query: Sequence[Sequence[str]],
                                 top_n: int | None = None, experts: Sequence[str | None] | None = None,
                                 score_threshold: float | None = None
                                 ) -> tuple[list[Route | None], list[list[RerankResult]]]:
        """:meth:`rerank_batch`, and per query the router's decision (None where ``experts`` fixed the expert or
        the query had no documents)."""
        threshold = _check_threshold(score_threshold)
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise TypeError(f"`queries` must be a sequence of strings, got {type(queries).__name__}")
        if isinstance(documents_per_query, str) or len(documents_per_query) != len(queries):
            raise ValueError(f"`documents_per_query` must have one list per query ({len(queries)}), "
                             f"got {len(documents_per_query) if isinstance(documents_per_query, Sequence) else '?'}")
        if experts is not None and len(experts) != len(queries):
            raise ValueError(f"`experts` must have one entry per query ({len(queries)}), got {len(experts)}")
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"`queries[{i}]` must be a non-empty string, got {q!r}")
        docs = [_check_documents(d, f"documents_per_query[{i}]") for i, d in enumerate(documents_per_query)]
        top = [_check_top_n(top_n, len(d)) for d in docs]
        fixed = list(experts) if experts is not None else [None] * len(queries)
        for e in fixed:
            if e is not None:
                self._experts.check(e)
        need = [i for i, e in enumerate(fixed) if e is None and docs[i]]
        routed = dict(zip(need, self._route_many([queries[i] for i in need]))) if need else {}
        chosen = [fixed[i] if fixed[i] is not None else routed[i].expert if i in routed else BASE_ADAPTER
                  for i in range(len(queries))]
        live = [i for i in range(len(queries)) if docs[i]]
        margins = self._margins([queries[i] for i in live], [chosen[i] for i in live], [docs[i] for i in live])
        out: list[list[RerankResult]] = [[] for _ in queries]
        for i, m in zip(live, margins):
            out[i] = self._results(docs[i], m, chosen[i], top[i], threshold)
        return [routed.get(i) for i in range(len(queries))], out

    def __repr__(self) -> str:
        return (f"R2RReranker(base={self.backbone.model_id!r}, experts={self.experts}, "
                f"router={'yes' if self.router else 'no'}, device={self.backbone.device}, "
                f"dtype={self.backbone.dtype})")
