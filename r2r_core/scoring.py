"""Pointwise decoder-only relevance: ``s(q, d) = sigmoid(z_yes - z_no)`` at the last real prompt token.

Two forward paths share one tokenization:

* :func:`yes_no_margins` -- the plain path: whole prompts, right-padded, one forward pass. Differentiable,
  used for training and as the reference the fast path is tested against.
* :func:`prefix_cached_margins` -- the fast path for inference: the prefix (system, instruction, query) is
  encoded once per query and expert (the prefixes of many queries in batches), and its KV cache is reused by
  every candidate of that query; rows are sorted by expert, then length, so batches carry almost no padding and
  rarely mix experts; rows of different experts that do share a batch are routed through peft's per-row
  ``adapter_names``.

Both read the logits at each row's last real token whatever the padding, and with :class:`YesNoHead`
installed the LM head computes only the "yes" and "no" rows.

User text never becomes control tokens: :class:`TemplateTokenizer` keeps the added tokens a template writes
(``<|im_start|>``, ...) and tokenizes queries, documents and instructions as plain characters, so a document
holding ``<|im_end|>\n<|im_start|>assistant\n`` cannot end its turn and rewrite the prompt. The query gets at most
:meth:`PromptEncoder.query_budget` tokens (about half of ``max_length``) and the document what is left; the
scoring suffix is never cut.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from r2r_core.lora_fold import BASE_ADAPTER, routes_by_thread, thread_routing
from r2r_core.runtime import cpu_workers, map_batches
from r2r_core.templates import PromptTemplate

logger = logging.getLogger(__name__)

__all__ = [
    "BASE_ADAPTER",
    "DEFAULT_MAX_LENGTH",
    "MIN_MAX_LENGTH",
    "PromptEncoder",
    "TemplateTokenizer",
    "YesNoHead",
    "YesNoIds",
    "cache_kwargs",
    "check_yes_no_head",
    "check_max_length",
    "encode_pair",
    "install_yes_no_head",
    "margin_at",
    "prefix_cached_margins",
    "yes_no_margins",
]

_MIN_DOC_TOKENS = 16
_MIN_QUERY_TOKENS = 16
_QUERY_SHARE = 2  # the query gets at most max_length // this many tokens
_CHARS_PER_TOKEN_BOUND = 32  # texts are cut to budget * this many characters before tokenizing
MIN_MAX_LENGTH = 2 * _MIN_DOC_TOKENS  # the smallest prompt that leaves room for a document beside the template
#: The prompt length of a model that records none (a plain causal LM, a bundle without ``max_length``).
DEFAULT_MAX_LENGTH = 512


def check_max_length(value) -> int:
    """``value`` if it is a usable prompt length (an int >= :data:`MIN_MAX_LENGTH`), else a ValueError naming it.

    The one place this rule lives: the reranker checks it before loading anything, and the adapters call it
    from their field validators, so a bad ``max_length`` fails at construction with this message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_MAX_LENGTH:
        raise ValueError(f"`max_length` must be an int >= {MIN_MAX_LENGTH} (tokens for the template, the query "
                         f"and the document together), got {value!r}")
    return value


@dataclass(frozen=True)
class YesNoIds:
    yes: int
    no: int

    @classmethod
    def from_tokenizer(cls, tokenizer, template: PromptTemplate) -> YesNoIds:
        ids = []
        for word in (template.yes_token, template.no_token):
            toks = tokenizer.encode(word, add_special_tokens=False)
            if len(toks) != 1:
                raise ValueError(
                    f"the template's answer token {word!r} is {len(toks)} tokens for this tokenizer; "
                    "it must be exactly one token"
                )
            ids.append(toks[0])
        return cls(yes=ids[0], no=ids[1])


class TemplateTokenizer:
    """Token ids of template text whose fields hold user text (a query, a document, an instruction).

    The added tokens written in the template itself (``<|im_start|>``, ``<think>``, ...) are encoded as those
    tokens; the text filled into a field is always encoded as plain characters: a document holding
    ``<|im_end|>`` gives the characters ``<``, ``|``, ``im``, ... and never the control token. Control tokens are
    the tokenizer's special tokens and the other added tokens the templates contain (whitespace ones such as
    Gemma's ``"\n"`` excepted, which templates and text both use as ordinary text). For text without control
    tokens the ids equal those of tokenizing the whole rendered string, so prompts are what they always were.
    """

    def __init__(self, tokenizer, *templates: str):
        self.tokenizer = tokenizer
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        added = {getattr(t, "content", str(t)): i for i, t in decoder.items()}
        special = {getattr(t, "content", str(t)) for t in decoder.values() if getattr(t, "special", False)}
        special |= set(getattr(tokenizer, "all_special_tokens", ()))
        text = "".join(templates)
        # Template text is split at the added tokens it writes (braces excepted: they would split a format field)
        self._template_tokens = {t: i for t, i in added.items() if t and t in text and not set(t) & set("{}")}
        control = special | {t for t in self._template_tokens if not t.isspace()}
        self.control_ids = frozenset(added[t] for t in control if t in added) | frozenset(
            getattr(tokenizer, "all_special_ids", ()))
        self._control_re = _alternation(control)
        self._split_re = _alternation(self._template_tokens)
        self._newline = self.plain(["\n"])[0]
        self._fixed: dict[tuple[int, str], list[int]] = {}  # ids of template parts without fields

    def plain(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text as plain characters (no added token of the template or special token matched)."""
        if not texts:
            return []
        ids = self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        # split_special_tokens leaves non-special added tokens (such as Qwen's <think>) alone, and another user of
        # this tokenizer may flip its flag while we encode: any control token left is encoded again without them
        return [self._without_added(t) if self.control_ids.intersection(i) else i for t, i in zip(texts, ids)]

    def _without_added(self, text: str) -> list[int]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the normalizer, pre-tokenizer and model of a fast tokenizer, no added tokens
            if backend.normalizer is not None:
                text = backend.normalizer.normalize_str(text)
            splits = [text] if backend.pre_tokenizer is None else [
                s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
            return [tok.id for s in splits for tok in backend.model.tokenize(s)]
        # a slow tokenizer: the text between control tokens as it is, a control token's characters one by one
        pieces = self._control_re.split(text) if self._control_re is not None else [text]
        out: list[int] = []
        for k, piece in enumerate(pieces):
            if piece:
                texts = list(piece) if k % 2 else [piece]
                for ids in self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]:
                    out.extend(ids)
        return out

    def render(self, template: str, rows: Sequence[dict]) -> list[list[int]]:
        """Per row of field values, the ids of ``template.format(**row)``."""
        parts = self._split_re.split(template) if self._split_re is not None else [template]
        out: list[list[int]] = [[] for _ in rows]
        for k, part in enumerate(parts):
            if k % 2:
                for ids in out:
                    ids.append(self._template_tokens[part])
            elif part:
                fixed = "{" not in part and "}" not in part
                if fixed and (k, part) in self._fixed:
                    encoded = [self._fixed[k, part]] * len(rows)
                else:
                    encoded = self._encode_part(k, [part.format(**row) for row in rows])
                    if fixed and rows:
                        self._fixed[k, part] = encoded[0]
                for ids, e in zip(out, encoded):
                    ids.extend(e)
        return out

    def _encode_part(self, k: int, texts: list[str]) -> list[list[int]]:
        if k == 0:
            return self.plain(texts)
        # after an added token: encode after a newline, then drop it, so that SentencePiece does not add the
        # prefix space it adds at the start of a string (transformers encodes chats the same way)
        n = len(self._newline)
        return [e[n:] if e[:n] == self._newline else self.plain([t])[0]
                for t, e in zip(texts, self.plain(["\n" + t for t in texts]))]

    def truncate(self, texts: Sequence[str], budget: int) -> tuple[list[str], int]:
        """``texts`` cut to at most ``budget`` plain tokens each, and how many were cut. A text is read only as far
        as ``budget`` tokens can reach, so a megabyte of text costs no more than a short one."""
        limit = budget * _CHARS_PER_TOKEN_BOUND
        out, cut = [], 0
        for text, ids in zip(texts, self.plain([t[:limit] for t in texts])):
            if len(ids) > budget:
                text = self.tokenizer.decode(ids[:budget], skip_special_tokens=False,
                                             clean_up_tokenization_spaces=False)
                cut += 1
            elif len(text) > limit:
                text = text[:limit]
                cut += 1
            out.append(text)
        return out, cut


def _alternation(tokens) -> re.Pattern | None:
    """A regex matching any of ``tokens`` (the longest first), as a group, or None for none."""
    tokens = sorted((t for t in tokens if t), key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, tokens)) + ")") if tokens else None


class PromptEncoder:
    """Tokenizes prompts as ``prefix | doc_sep + document | suffix``; the query is cut to
    :meth:`query_budget` tokens, then the document to what is left; the suffix is never cut."""

    def __init__(self, tokenizer, template: PromptTemplate, max_length: int = DEFAULT_MAX_LENGTH):
        check_max_length(max_length)
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.text = TemplateTokenizer(tokenizer, template.prefix, template.suffix, template.doc_sep)
        self._suffix_cache: dict[str, list[int]] = {}
        self._budget_cache: dict[str, int] = {}
        self._warned_long_prefix = False
        self._warned_long_query = False

    def _prefix(self, instruction: str, query: str) -> list[int]:
        ids = self.text.render(self.template.prefix, [{"instruction": instruction, "query": query}])[0]
        if self.template.add_bos:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise ValueError(f"template {self.template.name!r} needs a BOS token; this tokenizer has none")
            ids = [bos, *ids]
        return ids

    def query_budget(self, instruction: str) -> int:
        """The most tokens a query keeps: half of ``max_length``, less where the template and instruction leave
        fewer than that beside the document's minimum, and never under a floor of its own."""
        if instruction not in self._budget_cache:
            fixed = len(self._prefix(instruction, "")) + len(self.suffix_ids(instruction))
            room = self.max_length - fixed - _MIN_DOC_TOKENS
            self._budget_cache[instruction] = max(_MIN_QUERY_TOKENS, min(self.max_length // _QUERY_SHARE, room))
        return self._budget_cache[instruction]

    def prefix_ids(self, instruction: str, query: str) -> list[int]:
        budget = self.query_budget(instruction)
        (query,), cut = self.text.truncate([query], budget)
        if cut and not self._warned_long_query:
            logger.warning("a query longer than its budget of %d tokens (max_length=%d) was cut to it; further "
                           "long queries are cut without a warning", budget, self.max_length)
            self._warned_long_query = True
        return self._prefix(instruction, query)

    def suffix_ids(self, instruction: str) -> list[int]:
        if instruction not in self._suffix_cache:
            self._suffix_cache[instruction] = self.text.render(
                self.template.suffix, [{"instruction": instruction, "query": ""}])[0]
        return self._suffix_cache[instruction]

    def doc_budget(self, prefix_len: int, suffix_len: int) -> int:
        budget = self.max_length - prefix_len - suffix_len
        if budget < _MIN_DOC_TOKENS:
            if not self._warned_long_prefix:
                logger.warning(
                    "query and template take %d of max_length=%d tokens; keeping %d document tokens anyway",
                    prefix_len + suffix_len, self.max_length, _MIN_DOC_TOKENS,
                )
                self._warned_long_prefix = True
            budget = _MIN_DOC_TOKENS
        return budget

    def document_ids(self, documents: Sequence[str], budget: int) -> list[list[int]]:
        return self._document_ids(documents, budget)[0]

    def _document_ids(self, documents: Sequence[str], budget: int) -> tuple[list[list[int]], int]:
        """Each document's ids cut to ``budget``, and how many documents lost text to the cut."""
        cut = budget * _CHARS_PER_TOKEN_BOUND
        texts = [self.template.doc_sep + doc[:cut] for doc in documents]
        ids = self.text.plain(texts)
        n_cut = sum(len(doc) > cut or len(i) > budget for doc, i in zip(documents, ids))
        return [i[:budget] for i in ids], n_cut

    def encode(self, instruction: str, query: str, documents: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """Prefix ids and, per document, ``document + suffix`` ids (the tail the prefix cache is extended by)."""
        return self.encode_counting_cuts(instruction, query, documents)[:2]

    def encode_counting_cuts(self, instruction: str, query: str, documents: Sequence[str]
                             ) -> tuple[list[int], list[list[int]], int]:
        """:meth:`encode`, and the number of documents that were cut to fit ``max_length``."""
        prefix = self.prefix_ids(instruction, query)
        suffix = self.suffix_ids(instruction)
        docs, n_cut = self._document_ids(documents, self.doc_budget(len(prefix), len(suffix)))
        return prefix, [d + suffix for d in docs], n_cut


def encode_pair(tokenizer, template: PromptTemplate, instruction: str, query: str, document: str,
                max_length: int = DEFAULT_MAX_LENGTH) -> list[int]:
    """Token ids of one whole prompt (prefix + truncated document + suffix)."""
    prefix, tails = PromptEncoder(tokenizer, template, max_length).encode(instruction, query, [document])
    return prefix + tails[0]


class YesNoHead(torch.nn.Module):
    """An LM head that computes only the "yes" and "no" rows of the output embedding: logits ``[..., 2]``."""

    def __init__(self, weight: torch.Tensor, yes_id: int, no_id: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.yes_id, self.no_id = yes_id, no_id
        self.weight = torch.nn.Parameter(weight[[yes_id, no_id]].detach().clone(), requires_grad=False)
        self.bias = None
        if bias is not None:
            self.bias = torch.nn.Parameter(bias[[yes_id, no_id]].detach().clone(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # In fp32 even for a bf16 backbone: z_yes and z_no are large (~30 for SmolLM2) while their difference is
        # small, and a bf16 logit is only good to 0.125 there. Two rows cost nothing to compute in fp32.
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.linear(hidden.float(), self.weight.float(), bias)


def install_yes_no_head(model: torch.nn.Module, ids: YesNoIds) -> None:
    """Replace the model's LM head by a two-row :class:`YesNoHead` (the model is then a scorer, not a generator).
    Safe to call twice with the same ids."""
    head = model.get_output_embeddings()
    if isinstance(head, YesNoHead):
        if (head.yes_id, head.no_id) != (ids.yes, ids.no):
            raise ValueError(
                f"a YesNoHead for ids {(head.yes_id, head.no_id)} is installed; cannot switch to {ids}"
            )
        return
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding to read yes/no logits from")
    model.config.tie_word_embeddings = False
    model.set_output_embeddings(YesNoHead(head.weight, ids.yes, ids.no, getattr(head, "bias", None)))


def check_yes_no_head(model) -> None:
    """A ValueError unless ``model`` scores with a :class:`YesNoHead` (:func:`install_yes_no_head`)."""
    if not isinstance(model.get_output_embeddings(), YesNoHead):
        raise ValueError(f"{type(model).__name__} has no YesNoHead: call install_yes_no_head(model, ids) first")


def margin_at(logits: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``z_yes - z_no`` of a :class:`YesNoHead`'s logits ``[rows, length, 2]`` at position ``last[r]`` of row ``r``
    (fp32)."""
    picked = logits[torch.arange(logits.shape[0], device=logits.device), last]
    return (picked[:, 0] - picked[:, 1]).float()


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _peft_kwargs(model, adapter_names: Sequence[str] | None) -> dict:
    if adapter_names is None:
        return {}
    if not hasattr(model, "peft_config"):
        if any(a != BASE_ADAPTER for a in adapter_names):
            raise KeyError(f"adapters {sorted(set(adapter_names))} requested but the model has no experts loaded")
        return {}
    return {"adapter_names": list(adapter_names)}


def yes_no_margins(model, input_ids: Sequence[Sequence[int]], pad_token_id: int,
                   adapter_names: Sequence[str] | None = None) -> torch.Tensor:
    """``z_yes - z_no`` at the last real token of each prompt (plain path, one batch, differentiable), for a model
    with a :class:`YesNoHead`. Right padding: a causal model's real tokens never see the pads, so each row's
    logits equal those of the row alone.
    """
    check_yes_no_head(model)
    if not input_ids:
        return torch.zeros(0)
    device = next(model.parameters()).device
    ids, mask = _right_pad(input_ids, pad_token_id, device)
    out = model(input_ids=ids, attention_mask=mask, use_cache=False, **_peft_kwargs(model, adapter_names))
    return margin_at(out.logits, mask.sum(dim=1) - 1)


def _layer_kv(out) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` of a forward's KV cache (``out.cache`` from transformers 5.24 on, before that
    ``out.past_key_values``)."""
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = out.past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


@lru_cache(maxsize=64)
def _cache_arg_name(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` under the name the model's forward takes a KV cache by: ``cache`` from transformers 5.24
    on (which warns about the old name), ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_arg_name(type(base)): cache}


def _routed_forward(model, adapter_names: Sequence[str], by_thread: bool, **inputs):
    """``model(**inputs)`` with row ``i`` on expert ``adapter_names[i]``: through the calling thread's routing
    when the model supports it (no hooks on shared modules, so batches may run in parallel), else through
    peft's ``adapter_names``."""
    kwargs = _peft_kwargs(model, adapter_names)  # validates the names either way
    if by_thread and kwargs:
        with thread_routing(adapter_names):
            return model(**inputs)
    return model(**inputs, **kwargs)


def _chunks(order: list[int], batch_size: int, workers: int) -> list[list[int]]:
    """``order`` cut into consecutive batches of near-equal size, at most ``batch_size`` each, and a multiple
    of ``workers`` of them where there are enough rows, so parallel workers finish together."""
    n = len(order)
    count = -(-n // batch_size)
    if workers > 1:
        count = min(n, -(-max(count, workers) // workers) * workers)
    bounds = [round(i * n / count) for i in range(count + 1)]
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


def _prefix_caches(model, prefixes, adapters, pad_token_id: int, batch_size: int, device, by_thread: bool):
    """Per prefix, its KV cache ``[(keys, values) per layer]``, each ``[1, kv_heads, len, head_dim]``. Prefixes are
    encoded ``batch_size`` at a time, right-padded (real tokens never see the pads of a causal model), each row
    with its own adapter: one pass over the weights per batch instead of one per query."""
    order = sorted(range(len(prefixes)), key=lambda i: (adapters[i], -len(prefixes[i])))  # as the rows below
    workers = cpu_workers(len(order), device) if by_thread else 1
    chunks = _chunks(order, batch_size, workers)

    def encode(c: int) -> list:
        chunk = chunks[c]
        ids, mask = _right_pad([prefixes[i] for i in chunk], pad_token_id, device)
        out = _routed_forward(model, [adapters[i] for i in chunk], by_thread, input_ids=ids, attention_mask=mask,
                              use_cache=True, logits_to_keep=1)
        layers = _layer_kv(out)
        return [[(k[r : r + 1, :, : len(prefixes[i])], v[r : r + 1, :, : len(prefixes[i])]) for k, v in layers]
                for r, i in enumerate(chunk)]

    caches: list = [None] * len(prefixes)
    for chunk, encoded in zip(chunks, map_batches(encode, len(chunks), workers)):
        for i, cache in zip(chunk, encoded):
            caches[i] = cache
    return caches


def _prefix_kv(caches, pidx: list[int], plens: list[int], device):
    """The prefix KV cache of one batch's rows and its attention mask (shorter prefixes left-padded)."""
    n, pmax = len(pidx), max(plens)
    if len(set(pidx)) == 1:
        kv = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in caches[pidx[0]]]
        return kv, torch.ones((n, pmax), dtype=torch.long, device=device)
    kv = []
    for layer in range(len(caches[pidx[0]])):
        k0, v0 = caches[pidx[0]][layer]
        k = k0.new_zeros((n, k0.shape[1], pmax, k0.shape[3]))
        v = v0.new_zeros((n, v0.shape[1], pmax, v0.shape[3]))
        for r, p in enumerate(pidx):
            pk, pv = caches[p][layer]
            k[r, :, pmax - pk.shape[2] :] = pk[0]
            v[r, :, pmax - pv.shape[2] :] = pv[0]
        kv.append((k, v))
    pmask = torch.zeros((n, pmax), dtype=torch.long, device=device)
    for r, plen in enumerate(plens):
        pmask[r, pmax - plen :] = 1
    return kv, pmask


@torch.inference_mode()
def prefix_cached_margins(model, prefixes: Sequence[Sequence[int]], prefix_adapters: Sequence[str],
                          rows: Sequence[tuple[int, Sequence[int]]], pad_token_id: int, batch_size: int
                          ) -> list[float]:
    """Margins for ``rows`` = ``[(prefix_index, tail_ids), ...]`` from a model with a :class:`YesNoHead`; each
    prefix is encoded once (with its adapter) and its KV cache extended by the tails of its rows. Returns margins
    in the order of ``rows``.

    On a CPU with several threads, batches run side by side on worker threads (:func:`runtime.map_batches`)
    when the model routes its experts by thread; the margins do not depend on that."""
    from transformers import DynamicCache

    check_yes_no_head(model)
    if not rows:
        return []
    device = next(model.parameters()).device
    by_thread = routes_by_thread(model)
    caches = _prefix_caches(model, prefixes, prefix_adapters, pad_token_id, batch_size, device, by_thread)
    # expert first, then length: batches rarely mix experts (so they fold, see lora_fold) and carry little padding
    order = sorted(range(len(rows)), key=lambda i: (prefix_adapters[rows[i][0]], -len(rows[i][1])))
    workers = cpu_workers(len(order), device) if by_thread else 1
    chunks = _chunks(order, batch_size, workers)

    def score(c: int) -> list[float]:
        chunk = chunks[c]
        pidx = [rows[i][0] for i in chunk]
        plens = [len(prefixes[p]) for p in pidx]
        kv, pmask = _prefix_kv(caches, pidx, plens, device)
        tail_ids, tail_mask = _right_pad([rows[i][1] for i in chunk], pad_token_id, device)
        width = tail_ids.shape[1]
        position_ids = torch.as_tensor(plens, device=device)[:, None] + torch.arange(width, device=device)[None]
        out = _routed_forward(
            model, [prefix_adapters[p] for p in pidx], by_thread,
            input_ids=tail_ids,
            attention_mask=torch.cat([pmask, tail_mask], dim=1),
            position_ids=position_ids,
            **cache_kwargs(model, DynamicCache(ddp_cache_data=kv, config=model.config)),
            use_cache=True,
        )
        return margin_at(out.logits, tail_mask.sum(dim=1) - 1).tolist()

    margins = [0.0] * len(rows)
    for chunk, values in zip(chunks, map_batches(score, len(chunks), workers)):
        for i, value in zip(chunk, values):
            margins[i] = value
    return margins
