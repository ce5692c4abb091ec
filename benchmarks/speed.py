"""Inference speed of r2r's engine against a straightforward decoder reranker (issue #6).

One command, from a clean clone (after the README's set-up)::

    python benchmarks/speed.py --out benchmarks/speed_results.json --markdown benchmarks/speed_table.md

``--quick`` shrinks every workload (a few documents, 2 repetitions) to check that the script works in ~3 minutes;
its numbers are not results. A full run takes about 2-2.5 hours on a quiet 2-core CPU (equal1000 is over half of
it; the log prints an estimate after each workload); ``--workloads equal20,equal100,natural100,router,switch,memory``
covers every target in about 20-30 minutes. Run nothing else meanwhile: timings are medians of interleaved
repetitions, but a loaded machine (and OpenMP threads oversubscribing its cores) still distorts them.

Systems, compared in one process on the same backbone (the offline default SmolLM2-135M), dtype, thread count
and inputs:

* ``r2r``: ``R2RReranker.rerank`` / ``rerank_batch`` (prefix KV cache, yes/no-only LM head, length-sorted
  batches run side by side on the CPU threads, per-row LoRA experts, grouped-query attention folded into the
  sequence);
* ``reference``: what Qwen3-Reranker's model card does -- the whole prompt string per pair
  (``template.render``), tokenized with left padding and truncation to ``max_length``, a full forward
  (transformers' SDPA attention, torch's linear layers) with the full-vocabulary LM head of a separately
  loaded copy of the backbone, fixed-size batches in input order,
  ``logits[:, -1, yes] - logits[:, -1, no]``. Experts: in the one-query workloads ``r2r`` routes the query
  itself (the product path) and the reference has that expert merged into its weights (peft
  ``merge_and_unload``: the fastest way to serve one domain, so the strictest baseline); in ``batch64`` the
  reference switches peft adapters with ``set_adapter`` per expert group.

Experts come from the bundle (the shipped default has financial, legal and medical and a router); for a bare
``--backbone`` they are random rank-``--lora-rank`` adapters in a routed bundle built for the run.

Useful FLOPs count only work that must be done: ``2 * N * tokens + 4 * L * d_attn * attended_pairs``, with
``N`` the non-embedding parameters, ``tokens`` the prompt prefix once per query plus document and suffix tokens
of every candidate, and ``attended_pairs`` the causal (query token, key) pairs of those tokens. The same count
is used for both systems, so useful FLOP/s ratios equal throughput ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from a clean clone without an installed package too
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchmarks import FlopModel, PeakRss, matmul_peak, one_thread, peak_shapes, rss_mb, spearman, timed  # noqa: E402
from r2r_core import BASE_ADAPTER, DEFAULT_BASE, LatentRouter, R2RReranker  # noqa: E402
from r2r_core.backbone import load_backbone, offline_default_checkpoint  # noqa: E402
from r2r_core.runtime import resolve_dtype  # noqa: E402
from r2r_core.scoring import YesNoIds  # noqa: E402

logger = logging.getLogger("speed")

QUERY = "What are the common side effects of long-term metformin use in elderly patients with kidney disease?"
DOMAIN_QUERIES = {  # fit the router and seed the 64-query batch
    "legal": ["Can the licensee terminate the agreement for convenience?",
              "What does the privacy policy say about sharing data with third parties?",
              "Which court has jurisdiction over disputes under this contract?",
              "Is there a non-compete clause in the agreement?"],
    "medical": ["What are the side effects of metformin?", "How is type 2 diabetes diagnosed?",
                "What is the recommended dose of ibuprofen for adults?", "What causes high blood pressure?"],
    "financial": ["What was the company's revenue growth in 2019?",
                  "How much did operating expenses change year over year?",
                  "What is the net income attributable to shareholders?",
                  "What was the total debt at the end of the fiscal year?"],
}
EXPERTS = list(DOMAIN_QUERIES)
# workload -> (full size, quick size); batch64: (queries, docs per query)
SIZES = {"equal20": (20, 2), "equal100": (100, 4), "equal1000": (1000, 6), "natural100": (100, 3),
         "batch64": ((64, 8), (3, 1)), "router": (20, 4)}
SECTIONS = ["equal20", "equal100", "equal1000", "natural100", "batch64", "router", "switch", "memory"]
DOC_TOKENS = 150


# ----------------------------------------------------------------------------------------------- reference
class Reference:
    """Qwen3-Reranker's model-card recipe on a separately loaded backbone with its full LM head."""

    def __init__(self, model_id: str, dtype: torch.dtype, template, batch_size: int, max_length: int):
        backbone = load_backbone(model_id, device="cpu", dtype=dtype)
        backbone.model.set_attn_implementation("sdpa")  # transformers' default, as the model card loads it
        self.model, self.tokenizer, self.dtype = backbone.model, backbone.tokenizer, dtype
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "left", "right"
        self.template, self.batch_size, self.max_length = template, batch_size, max_length
        self.ids = YesNoIds.from_tokenizer(self.tokenizer, template)
        self.padded_batches: list[tuple[int, int]] = []  # (rows, width) of the last call, for executed FLOPs
        self.merged: str | None = None  # the expert merged into the weights, if any

    def merge_expert(self, name: str, path: Path) -> None:
        """Fold one expert into this copy's weights for good (peft ``merge_and_unload``): the fastest way to
        serve a single domain, and so the strictest baseline for workloads that use one expert."""
        from peft import PeftModel

        if self.merged is not None or isinstance(self.model, PeftModel):
            raise RuntimeError("this reference already carries experts")
        self.model = PeftModel.from_pretrained(self.model, str(path)).merge_and_unload().to(self.dtype).eval()
        self.merged = name

    def load_experts(self, adapters: dict[str, Path]) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            return
        if self.merged is not None:
            raise RuntimeError("this reference has an expert merged into its weights")
        for i, (name, path) in enumerate(adapters.items()):
            if i == 0:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            else:
                self.model.load_adapter(str(path), adapter_name=name)
        self.model.to(self.dtype).eval()

    def prompt(self, instruction: str, query: str, doc: str) -> str:
        bos = self.tokenizer.bos_token if self.template.add_bos else ""
        return bos + self.template.render(instruction, query, doc)

    @torch.inference_mode()
    def _score(self, texts: list[str]) -> list[float]:
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt", add_special_tokens=False)
            self.padded_batches.append(tuple(batch["input_ids"].shape))
            logits = self.model(**batch).logits[:, -1, :]
            out.extend((logits[:, self.ids.yes] - logits[:, self.ids.no]).float().tolist())
        return out

    def margins(self, instruction: str, queries: list[str], docs: list[list[str]],
                experts: list[str] | None = None) -> list[list[float]]:
        """Pairs grouped by expert (``set_adapter`` once per group), then fixed-size batches in input order."""
        self.padded_batches = []
        experts = experts or [BASE_ADAPTER] * len(queries)
        result: list[list[float]] = [[] for _ in queries]
        for expert in dict.fromkeys(experts):
            qs = [i for i, e in enumerate(experts) if e == expert]
            texts = [self.prompt(instruction, queries[i], d) for i in qs for d in docs[i]]
            if self.merged is not None or not hasattr(self.model, "disable_adapter"):  # one set of weights
                if expert != (self.merged or BASE_ADAPTER):
                    raise ValueError(f"this reference serves {self.merged or BASE_ADAPTER!r} only, not {expert!r}")
                flat = self._score(texts)
            elif expert == BASE_ADAPTER:
                with self.model.disable_adapter():
                    flat = self._score(texts)
            else:
                self.model.set_adapter(expert)
                flat = self._score(texts)
            for i in qs:
                result[i], flat = flat[: len(docs[i])], flat[len(docs[i]) :]
        return result


# ----------------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    queries: list[str]
    docs: list[list[str]]
    experts: list[str] | None = None
    note: str = ""
    tokens: dict = field(default_factory=dict)

    @property
    def n_docs(self) -> int:
        return sum(len(d) for d in self.docs)


def word_pool(tokenizer, doc_sep: str, seed: int = 0) -> list[str]:
    """Lower-case words that are one token each after ``doc_sep`` or a space."""
    words = sorted({t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isascii()
                    and t[1:].isalpha() and t[1:].islower() and 3 <= len(t) - 1 <= 9})
    ids = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    words = [w for w, i in zip(words, ids) if len(i) == 1]
    random.Random(seed).shuffle(words)
    return words[:8000]


def equal_docs(tokenizer, doc_sep: str, pool: list[str], n: int, n_tokens: int, seed: int) -> list[str]:
    """``n`` random-word documents, each exactly ``n_tokens`` tokens as the engine encodes them."""
    rng, docs = random.Random(seed), []
    for _ in range(n):
        words = [rng.choice(pool) for _ in range(n_tokens)]
        while True:
            length = len(tokenizer(doc_sep + " ".join(words), add_special_tokens=False)["input_ids"])
            if length == n_tokens:
                break
            words = words[:-1] if length > n_tokens else [*words, rng.choice(pool)]
        docs.append(" ".join(words))
    return docs


def natural_workload(rr: R2RReranker, n_docs: int, data_root: Path) -> Workload | None:
    """The MEDIQA dev query with the most answers; its answers, then other MEDIQA answers (run order) up to
    ``n_docs``; each cut so that the whole prompt fits ``max_length`` (no engine truncates)."""
    from r2r_core.data import load_beir

    root = data_root / "medical" / "mediqa"
    if not (root / "corpus.jsonl").is_file():
        return None
    ds = load_beir(root, "dev")
    qid = max(sorted(ds.run), key=lambda q: len(ds.run[q]))
    order = [d for d, _ in ds.run[qid]] + [d for q in sorted(ds.run) if q != qid for d, _ in ds.run[q]]
    order += sorted(ds.corpus)
    picked = list(dict.fromkeys(order))[:n_docs]
    tok, enc, query = rr.tokenizer, rr.encoder, ds.queries[qid].text
    sep = rr.template.doc_sep
    budget = enc.doc_budget(len(enc.prefix_ids(rr.instruction, query)), len(enc.suffix_ids(rr.instruction)))
    docs = []
    for did in picked:
        text = ds.corpus[did].full_text
        ids = full = tok(sep + text, add_special_tokens=False)["input_ids"]
        keep = budget
        while len(ids) > budget:  # re-encoding a decoded prefix may merge differently: check, cut further
            text = tok.decode(full[:keep]).removeprefix(sep)
            ids, keep = tok(sep + text, add_special_tokens=False)["input_ids"], keep - 1
        docs.append(text)
    return Workload("natural100", [query], [docs],
                    note=f"MEDIQA dev query {qid} ({len(ds.run[qid])} own answers, filled with other MEDIQA "
                         f"answers), documents cut to fit max_length={enc.max_length}")


def build_workloads(rr: R2RReranker, args, pool: list[str]) -> dict[str, Workload]:
    size = (lambda name: SIZES[name][1]) if args.quick else (lambda name: SIZES[name][0])
    tok, sep = rr.tokenizer, rr.template.doc_sep
    out = {}
    for name in ("equal20", "equal100", "equal1000"):
        if name in args.workloads:
            docs = equal_docs(tok, sep, pool, size(name), DOC_TOKENS, seed=len(out))
            out[name] = Workload(name, [QUERY], [docs], note=f"{DOC_TOKENS}-token random-word documents")
    if "natural100" in args.workloads:
        wl = natural_workload(rr, size("natural100"), Path(args.data_root))
        if wl is None:
            logger.warning("natural100 skipped: no MEDIQA data under %s (use --data-root)", args.data_root)
        else:
            out["natural100"] = wl
    if "batch64" in args.workloads:
        nq, per_q = size("batch64") if args.quick else (SIZES["batch64"][0][0], args.batch_docs)
        queries = [f"{DOMAIN_QUERIES[EXPERTS[i % 3]][(i // 3) % 4]} Case {i}." for i in range(nq)]
        docs = [equal_docs(tok, sep, pool, per_q, DOC_TOKENS, seed=1000 + i) for i in range(nq)]
        out["batch64"] = Workload("batch64", queries, docs, [EXPERTS[i % 3] for i in range(nq)],
                                  note=f"{nq} queries x {per_q} docs, experts fixed per query, 3 experts")
    for wl in out.values():  # token counts the engine actually processes
        prefix_lens, tails = [], []
        for q, d in zip(wl.queries, wl.docs):
            prefix, t = rr.encoder.encode(rr.instruction, q, d)
            prefix_lens.append(len(prefix))
            tails.append([len(x) for x in t])
        wl.tokens = {"prefix": prefix_lens, "tails": tails}
    return out


# ----------------------------------------------------------------------------------------------- adapters
def make_adapters(model_id: str, names: list[str], out_dir: Path, r: int, std: float = 0.02) -> dict[str, Path]:
    """Random, nonzero LoRA adapters (q/k/v/o, rank ``r``) on the backbone, in peft format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    checkpoint = offline_default_checkpoint() if model_id == DEFAULT_BASE else model_id
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    paths = {}
    for seed, name in enumerate(names, start=1):
        torch.manual_seed(seed)
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            init_lora_weights=False)
        model = get_peft_model(base, config)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.normal_(0, std)
        model.save_pretrained(out_dir / name)
        base = model.unload()
        paths[name] = out_dir / name
    del base
    gc.collect()
    return paths


def bundle_path(backbone: str) -> Path | None:
    """The bundle folder ``--backbone`` names (``"default"``: the shipped one), or None for a bare causal LM."""
    from r2r_core.bundle import is_bundle
    from r2r_core.reranker import DEFAULT_BUNDLE_DIR

    path = DEFAULT_BUNDLE_DIR if backbone == "default" else Path(backbone)
    return path if is_bundle(path) else None


def base_expert_dirs(backbone: str) -> dict[str, Path]:
    from r2r_core.bundle import read_bundle

    path = bundle_path(backbone)
    return {name: path / sub for name, sub in read_bundle(path).experts.items()}


def make_routed_bundle(rr: R2RReranker, adapters: dict[str, Path], path: Path) -> Path:
    from r2r_core.bundle import write_bundle

    router = LatentRouter(EXPERTS)
    queries = [q for qs in DOMAIN_QUERIES.values() for q in qs]
    labels = [d for d, qs in DOMAIN_QUERIES.items() for _ in qs]
    router.fit(router.encode(rr.model, rr.tokenizer, queries), labels, epochs=300)
    return write_bundle(path, base_model=rr.backbone.model_id, base_fingerprint=rr.backbone.fingerprint,
                        template=rr.template, instruction=rr.instruction,
                        experts={e: adapters[e] for e in EXPERTS}, router=router)


# ----------------------------------------------------------------------------------------------- running
def r2r_margins(rr: R2RReranker, wl: Workload) -> list[list[float]]:
    if len(wl.queries) == 1 and wl.experts is None:
        results = [rr.rerank(wl.queries[0], wl.docs[0])]
    else:
        results = rr.rerank_batch(wl.queries, wl.docs, experts=wl.experts)
    out = []
    for res in results:
        row = [0.0] * len(res)
        for r in res:
            row[r.index] = r.margin
        out.append(row)
    return out


@dataclass
class System:
    kind: str  # "r2r" or "reference"
    dtype: torch.dtype
    fn: object  # Workload -> margins per query, in input order
    reference: Reference | None = None


def run_workload(wl: Workload, systems: dict[str, System], reps: int,
                 flops: FlopModel, peaks: dict) -> dict:
    """Repetitions interleaved across systems (so load drift hits all alike); median time per system."""
    useful = sum(flops.useful(p, t) for p, t in zip(wl.tokens["prefix"], wl.tokens["tails"]))
    record = {"workload": wl.name, "note": wl.note, "queries": len(wl.queries), "documents": wl.n_docs,
              "prefix_tokens_mean": statistics.mean(wl.tokens["prefix"]),
              "tail_tokens_mean": statistics.mean(x for t in wl.tokens["tails"] for x in t),
              "tail_tokens_max": max(x for t in wl.tokens["tails"] for x in t),
              "useful_gflop": useful / 1e9, "systems": {}}
    times: dict[str, list[float]] = {k: [] for k in systems}
    margins, rss = {}, {k: (0.0, 0.0) for k in systems}
    for system in systems.values():  # warm-up on two documents
        system.fn(Workload(wl.name, wl.queries[:1], [wl.docs[0][:2]], wl.experts[:1] if wl.experts else None))
    for rep in range(reps):
        for key, system in systems.items():
            with PeakRss() as mem:
                t, out = timed(lambda fn=system.fn: fn(wl))
            times[key].append(t)
            margins[key] = out
            rss[key] = (max(rss[key][0], mem.peak), max(rss[key][1], mem.peak - mem.start))
            logger.info("%s %s rep %d/%d: %.2f s (%.1f docs/s)", wl.name, key, rep + 1, reps, t, wl.n_docs / t)
    for key, system in systems.items():
        med = statistics.median(times[key])
        dname = str(system.dtype).replace("torch.", "")
        entry = {"system": system.kind, "dtype": dname, "times_s": times[key], "median_s": med,
                 "docs_per_s": wl.n_docs / med, "useful_gflops_per_s": useful / med / 1e9,
                 "pct_of_matmul_peak": 100 * useful / med / 1e9 / peaks[dname]["gflops_peak"],
                 "peak_rss_mb": rss[key][0], "peak_rss_above_start_mb": rss[key][1]}
        if system.reference is not None and system.reference.padded_batches:
            shapes = system.reference.padded_batches
            entry["executed_gflops_per_s"] = sum(flops.executed_reference(r, w) for r, w in shapes) / med / 1e9
            entry["padded_tokens"] = sum(r * w for r, w in shapes)
        record["systems"][key] = entry
    ref_keys = [k for k in systems if systems[k].kind == "reference"]
    for key in systems:
        if systems[key].kind != "r2r":
            continue
        for rk in ref_keys:
            a = [x for row in margins[key] for x in row]
            b = [x for row in margins[rk] for x in row]
            record["systems"][key][f"vs_{rk}"] = {
                "speedup": statistics.median(times[rk]) / statistics.median(times[key]),
                "max_abs_margin_diff": max(abs(x - y) for x, y in zip(a, b)),
                "max_abs_score_diff": max(abs(torch.sigmoid(torch.tensor(x)) - torch.sigmoid(torch.tensor(y))).item()
                                          for x, y in zip(a, b)),
                "reference_margin_std": statistics.pstdev(b) if len(b) > 1 else 0.0,
                "spearman_per_query_mean": statistics.mean(spearman(x, y) for x, y in zip(margins[key], margins[rk])),
            }
    return record


def token_fidelity(rr: R2RReranker, ref: Reference, wl: Workload) -> int:
    """Pairs whose whole-prompt tokenization (reference) differs from the engine's prefix + tail ids."""
    bad = 0
    for q, docs in zip(wl.queries, wl.docs):
        prefix, tails = rr.encoder.encode(rr.instruction, q, docs)
        texts = [ref.prompt(rr.instruction, q, d) for d in docs]
        full = ref.tokenizer(texts, add_special_tokens=False)["input_ids"]
        bad += sum(prefix + t != f for t, f in zip(tails, full))
    return bad


def router_and_switch(rr: R2RReranker, docs: list[str], reps: int, switch_calls: int) -> dict:
    """route() vs rerank() of ``docs`` (rerank routes too), and :func:`switch_cost`."""
    rr.rerank(QUERY, docs[:2])
    route_t, rerank_t = [], []
    for _ in range(reps):
        route_t.append(timed(lambda: rr.route(QUERY))[0])
        rerank_t.append(timed(lambda: rr.rerank(QUERY, docs))[0])
    return {
        "documents": len(docs), "route_ms": 1e3 * statistics.median(route_t),
        "rerank_ms": 1e3 * statistics.median(rerank_t),
        "router_overhead_pct": 100 * statistics.median(route_t) / statistics.median(rerank_t),
        "router_layer": rr.router.layer if rr.router is not None else None,
        **switch_cost(rr, docs[0], switch_calls),
        "in_model": switch_cost_layer(rr, 15 * switch_calls),
    }


def switch_pattern(calls: int) -> list[str]:
    """Experts A A B B C C A A ...: call ``2k`` switches expert, call ``2k + 1`` repeats it."""
    return [EXPERTS[(i // 2) % 3] for i in range(calls)]


def paired_switch_cost(times: list[float]) -> tuple[float, float]:
    """Median over pairs of (switched call) minus (the next call, same expert again) for times taken in
    :func:`switch_pattern` order, and the standard error of that median (robust, from the MAD)."""
    diffs = [a - b for a, b in zip(times[2::2], times[3::2])]  # the first pair has no switch before it
    med = statistics.median(diffs)
    return med, 1.4826 * 1.2533 * statistics.median(abs(d - med) for d in diffs) / len(diffs) ** 0.5


def switch_cost(rr: R2RReranker, doc: str, calls: int) -> dict:
    """The cost of changing expert between consecutive queries: calls on experts A A B B C C ... (the same query
    and one short document, on one thread), and the median over pairs of (a call that switched expert) minus
    (the next call, same expert again), with the standard error of that median. Paired, so drift in machine
    load cancels; timed both in wall time and in the calling thread's CPU time, which leaves out the time the
    VM's core was taken away (this machine's largest noise). One thread runs every op in the calling thread."""
    small = " ".join(doc.split()[:12])
    pattern = switch_pattern(2 * calls)
    wall, cpu = [], []
    with one_thread():
        for expert in pattern[:6]:  # warm-up: every expert once
            rr.rerank(QUERY, [small], expert=expert)
        for expert in pattern:
            w0, c0 = time.perf_counter(), time.thread_time()
            rr.rerank(QUERY, [small], expert=expert)
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - w0)
    cost, noise = paired_switch_cost(wall)
    cpu_cost, cpu_noise = paired_switch_cost(cpu)
    return {
        "switch_call_ms": 1e3 * statistics.median(wall[2::2]), "same_call_ms": 1e3 * statistics.median(wall[3::2]),
        "switch_cost_ms": 1e3 * cost, "switch_noise_ms": 1e3 * noise, "pairs": len(wall) // 2 - 1,
        "switch_cost_cpu_ms": 1e3 * cpu_cost, "switch_noise_cpu_ms": 1e3 * cpu_noise,
    }


def switch_cost_layer(rr: R2RReranker, pairs: int) -> dict:
    """The switch cost inside the model, resolved far below a whole call's jitter: one decoder layer (its LoRA
    q/k/v/o experts folded per call, attention, MLP) run on the query's prompt prefix with experts A A B B C C
    ..., on one thread, ``2 * pairs`` times; the median paired difference (switched minus same expert again) per
    layer, and that times the layers of the two passes of a call (prefix, then documents) as the estimate for a
    call. The layer's weights stay in cache here; in a whole call every weight streams from memory whichever
    expert ran last, so a switch finds no colder data there either."""
    from r2r_core.lora_fold import thread_routing
    from r2r_core.router import _decoder

    decoder = _decoder(rr.model)
    layers = decoder.layers
    ids = rr.tokenizer(rr.template.render_prefix(rr.instruction, QUERY), add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids])
    position_ids = torch.arange(len(ids))[None]
    layer = layers[len(layers) // 2]
    pattern = switch_pattern(2 * pairs)
    times = []
    with one_thread(), torch.inference_mode():
        hidden = decoder.embed_tokens(input_ids)
        rope = decoder.rotary_emb(hidden, position_ids)

        def run(expert: str) -> None:
            with thread_routing([expert]):
                layer(hidden, position_ids=position_ids, position_embeddings=rope)

        for expert in pattern[:12]:
            run(expert)
        for expert in pattern:
            start = time.perf_counter()
            run(expert)
            times.append(time.perf_counter() - start)
    med, noise = paired_switch_cost(times)
    return {"tokens": len(ids), "pairs": len(times) // 2 - 1, "layer_ms": 1e3 * statistics.median(times[3::2]),
            "switch_cost_layer_us": 1e6 * med, "switch_noise_layer_us": 1e6 * noise, "layers": len(layers),
            "switch_cost_call_ms": 2e3 * med * len(layers), "switch_noise_call_ms": 2e3 * noise * len(layers)}


def memory_probe(backbone: str, adapters: dict[str, Path], dtype: str) -> dict:
    """RSS of a fresh process with the reranker and 0, 3 and 10 experts (run as a subprocess)."""
    from r2r_core.bundle import read_bundle
    from r2r_core.templates import get_template

    bundle = bundle_path(backbone)
    model_id = read_bundle(bundle).base_model if bundle else backbone
    rr = R2RReranker(load_backbone(model_id, device="cpu", dtype=dtype), get_template("qwen3"))  # no experts yet
    gc.collect()
    out = {"dtype": str(rr.backbone.dtype).replace("torch.", ""), "rss_mb": {0: rss_mb()}}
    names = list(adapters)
    for i, name in enumerate(names):
        rr.add_expert(name, adapters[name])
        if i + 1 in (3, 10):
            gc.collect()
            out["rss_mb"][i + 1] = rss_mb()
    first = names[0]
    out["adapter_mb_each"] = sum(p.numel() * p.element_size() for n, p in rr.model.named_parameters()
                                 if f".{first}." in n) / 2**20
    return out


# ----------------------------------------------------------------------------------------------- report
def targets(results: dict, default_dtype: str) -> list[dict]:
    """The issue's targets, each PASS / FAIL, or SKIP when its workload was not run."""
    wls = {w["workload"]: w["systems"] for w in results["workloads"]}

    def r2r(wl, dtype, key, ref="reference/float32"):
        entry = wls.get(wl, {}).get(f"r2r/{dtype}", {})
        return entry.get(key, entry.get(f"vs_{ref}", {}).get(key))

    big = "equal1000" if "equal1000" in wls else "equal100"
    diffs = [s["r2r/float32"]["vs_reference/float32"]["max_abs_margin_diff"] for s in wls.values()
             if "vs_reference/float32" in s.get("r2r/float32", {})]
    rows = [("fp32 speed-up, 100 equal-length docs", ">= 1.7x", r2r("equal100", "float32", "speedup"), 1.7, "{:.2f}x"),
            ("fp32 speed-up, 100 natural-length docs", ">= 2.5x", r2r("natural100", "float32", "speedup"), 2.5,
             "{:.2f}x"),
            (f"{default_dtype} (auto dtype) vs fp32 reference, 100 docs", ">= 4x",
             r2r("equal100", default_dtype, "speedup") if default_dtype != "float32" else None, 4, "{:.2f}x")]
    rows += [(f"useful FLOP/s, {d}, {big}", ">= 85% of matmul peak", r2r(big, d, "pct_of_matmul_peak"), 85, "{:.0f}%")
             for d in results["meta"]["dtypes"]]
    rows.append(("fp32 max |margin diff| vs reference, all workloads", "<= 1e-3", max(diffs) if diffs else None,
                 -1e-3, "{:.1e}"))
    for d, rs in results.get("router", {}).items():
        rows.append((f"router overhead, {rs['documents']} docs, {d}", "<= 3%", rs["router_overhead_pct"], -3,
                     "{:.2f}%"))
        if "in_model" in rs:
            rows.append((f"expert switch cost, {d}, in the model", "< 1 ms", rs["in_model"]["switch_cost_call_ms"], -1,
                         "{:.2f} ms"))
        rows.append((f"expert switch cost, {d}", "< 1 ms", rs.get("switch_cost_cpu_ms", rs["switch_cost_ms"]), -1,
                     "{:.2f} ms"))
    mem = results.get("memory", {})
    if "rss_mb" in mem:
        limit = 1.25 * mem["adapter_mb_each"] + 2
        rows.append(("RSS per expert (10 experts)", f"<= 1.25 x adapter weights ({mem['adapter_mb_each']:.1f} MiB) "
                     "+ 2 MiB", (mem["rss_mb"]["10"] - mem["rss_mb"]["0"]) / 10, -limit, "{:.1f} MiB"))
    # bound > 0: value must be >= bound; bound < 0: value must be <= -bound
    out = [{"target": name, "goal": goal, "measured": None if v is None else fmt.format(v),
            "status": "SKIP" if v is None else "PASS" if (v >= bound if bound > 0 else v <= -bound) else "FAIL"}
           for name, goal, v, bound, fmt in rows]
    for row in out:  # a switch cost measured with more than 1 ms of noise decides nothing
        d = row["target"].removeprefix("expert switch cost, ")
        if d == row["target"]:
            continue
        if d.endswith(", in the model"):
            rs = results["router"][d.removesuffix(", in the model")]["in_model"]
            noise = rs["switch_noise_call_ms"]
            row["measured"] += (f" (± {noise:.2f}; {rs['switch_cost_layer_us']:.1f} ± "
                                f"{rs['switch_noise_layer_us']:.1f} µs per layer)")
        else:  # a whole call: thread CPU time where measured, else wall time
            rs = results["router"][d]
            noise = rs.get("switch_noise_cpu_ms", rs["switch_noise_ms"])
            row["measured"] += f" (± {noise:.2f}, whole call, thread CPU time)" if "switch_noise_cpu_ms" in rs else ""
        if noise >= 1:
            row["status"] = "NOISY"
    return out


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"# r2r speed ({'QUICK MODE - not results' if m['quick'] else 'full run'})", "",
             f"{m['cpu']}; {m['threads']} threads; torch {m['torch']}; transformers {m['transformers']}; "
             f"backbone {m['backbone']}; batch size {m['batch_size']}; max_length {m['max_length']}; "
             f"median of {m['reps']} repetitions.", "",
             "Matmul peak (GFLOP/s, best run over a square and the model's own matmul shapes): " + ", ".join(
                 f"{d} {p['gflops_peak']:.0f} ({p['shape']})" for d, p in results["matmul_peak"].items()), "",
             f"Useful FLOPs: {m['flops_formula']}", "",
             "| workload | system | docs | median s | docs/s | speed-up vs ref fp32 | useful GFLOP/s | % peak "
             "| max abs margin diff vs ref fp32 | Spearman vs ref fp32 | peak RSS MiB (working) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in results["workloads"]:
        for key, s in w["systems"].items():
            v = s.get("vs_reference/float32", {})
            sp = f"{v['speedup']:.2f}x" if v else "1.00x" if key == "reference/float32" else ""
            diff = f"{v['max_abs_margin_diff']:.1e}" if v else ""
            rho = f"{v['spearman_per_query_mean']:.4f}" if v else ""
            lines.append(f"| {w['workload']} | {key} | {w['documents']} | {s['median_s']:.2f} | {s['docs_per_s']:.1f} "
                         f"| {sp} | {s['useful_gflops_per_s']:.1f} | {s['pct_of_matmul_peak']:.0f}% | {diff} | {rho} "
                         f"| {s['peak_rss_mb']:.0f} (+{s['peak_rss_above_start_mb']:.0f}) |")
    if results.get("router"):
        lines += ["", "| dtype | router layer | route() ms | rerank() ms (docs) | router overhead "
                  "| same-expert call ms | switching call ms | switch cost ms, wall (± noise) "
                  "| switch cost ms, thread CPU (± noise) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for d, r in results["router"].items():
            cpu = (f"{r['switch_cost_cpu_ms']:.2f} (± {r['switch_noise_cpu_ms']:.2f})" if "switch_cost_cpu_ms" in r
                   else "-")
            lines.append(f"| {d} | {r.get('router_layer', '-')} | {r['route_ms']:.1f} | {r['rerank_ms']:.0f} "
                         f"({r['documents']}) | {r['router_overhead_pct']:.2f}% | {r['same_call_ms']:.1f} "
                         f"| {r['switch_call_ms']:.1f} | {r['switch_cost_ms']:.2f} (± {r['switch_noise_ms']:.2f}) "
                         f"| {cpu} |")
        for d, r in results["router"].items():
            im = r.get("in_model")
            if im:
                lines.append(f"\nIn the model, {d}: one decoder layer on the {im['tokens']}-token prompt prefix, "
                             f"{im['pairs']} pairs on one thread: {im['layer_ms']:.2f} ms per layer, switch "
                             f"{im['switch_cost_layer_us']:.1f} ± {im['switch_noise_layer_us']:.1f} µs per layer, "
                             f"{im['switch_cost_call_ms']:.2f} ± {im['switch_noise_call_ms']:.2f} ms per call "
                             f"(2 passes x {im['layers']} layers).")
    mem = results.get("memory", {})
    if "error" in mem:
        lines += ["", f"Memory probe failed: {mem['error']}"]
    if "rss_mb" in mem:
        r = mem["rss_mb"]
        lines += ["", f"RSS ({mem['dtype']}, fresh process): 0 experts {r['0']:.0f} MiB, 3 experts {r['3']:.0f} MiB, "
                  f"10 experts {r['10']:.0f} MiB; one q/k/v/o LoRA adapter (rank {m['lora_rank']}) holds "
                  f"{mem['adapter_mb_each']:.1f} MiB."]
    lines += ["", "| target | goal | measured | status |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['goal']} | {t['measured'] or '-'} | {t['status']} |" for t in results["targets"]]
    notes = [f"- {w['workload']}: {w['note']}" for w in results["workloads"]] + [f"- {n}" for n in m["notes"]]
    return "\n".join([*lines, "", "Notes:", *notes, ""])


# ----------------------------------------------------------------------------------------------- main
def dtype_name(d) -> str:
    return str(resolve_dtype(d.strip() if isinstance(d, str) else d, torch.device("cpu"))).replace("torch.", "")


def parse_args(argv=None) -> argparse.Namespace:
    auto = dtype_name("auto")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="JSON results file")
    p.add_argument("--markdown", type=Path, help="markdown table file")
    p.add_argument("--quick", action="store_true", help="tiny workloads, 2 repetitions: checks the script only")
    p.add_argument("--reps", type=int, help="repetitions per measurement (default 5; quick 2)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    p.add_argument("--dtypes", default=",".join(dict.fromkeys(["float32", auto])),
                   help=f"r2r dtypes (default: float32 and this CPU's auto dtype, {auto})")
    p.add_argument("--reference-dtypes", default="float32", help="reference dtypes (float32 always runs)")
    p.add_argument("--workloads", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of both systems")
    p.add_argument("--batch-docs", type=int, default=SIZES["batch64"][0][1], help="documents per batch64 query")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--data-root", default=os.environ.get("R2R_DATA", "/work/shared/data"),
                   help="folder holding medical/mediqa (BEIR format) for natural100")
    p.add_argument("--backbone", default="default", help="'default' (SmolLM2-135M bundle) or a causal LM folder/id")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--work-dir", type=Path, help="where adapters and the bundle are written (default: a temp dir)")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.reps = args.reps or (2 if args.quick else 5)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if unknown := sorted(set(args.workloads) - set(SECTIONS)):
        p.error(f"unknown workloads {unknown}; choose from {SECTIONS}")
    args.dtypes = [dtype_name(d) for d in args.dtypes.split(",") if d.strip()]
    args.reference_dtypes = list(dict.fromkeys(["float32", *(dtype_name(d) for d in args.reference_dtypes.split(",")
                                                             if d.strip())]))
    args.default_dtype = auto
    return args


def memory_section(args, adapters: dict[str, Path]) -> dict:
    spec = json.dumps({"adapters": {k: str(v) for k, v in adapters.items()}, "dtype": args.default_dtype})
    proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--backbone", args.backbone,
                           "--memory-probe", spec], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-800:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for name in ("transformers", "peft", "r2r_core"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.memory_probe:  # internal: RSS measured in a fresh process
        spec = json.loads(args.memory_probe)
        adapters = {k: Path(v) for k, v in spec["adapters"].items()}
        print(json.dumps(memory_probe(args.backbone, adapters, spec["dtype"])))
        return 0
    import transformers

    t_start = time.perf_counter()
    work_ctx = tempfile.TemporaryDirectory(prefix="r2r-speed-") if args.work_dir is None else None
    work = Path(work_ctx.name) if work_ctx else args.work_dir
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    meta = {"quick": args.quick, "reps": args.reps, "threads": args.threads, "dtypes": args.dtypes,
            "reference_dtypes": args.reference_dtypes, "cpu": cpu, "torch": torch.__version__,
            "transformers": transformers.__version__, "batch_size": args.batch_size, "max_length": args.max_length,
            "lora_rank": args.lora_rank, "notes": [],
            "flops_formula": "2*N_nonemb*(prefix tokens once per query + doc and suffix tokens of every candidate) "
                             "+ 4*layers*d_attn*(causal token-key pairs of those tokens)"}
    results = {"meta": meta, "matmul_peak": {}, "workloads": []}
    load = dict(device="cpu", batch_size=args.batch_size, max_length=args.max_length)
    rrs = {d: R2RReranker.from_pretrained(args.backbone, dtype=d, **load) for d in args.dtypes}
    base_rr = rrs[args.dtypes[0]]
    shapes = peak_shapes(base_rr.model.config, args.batch_size * (DOC_TOKENS + 10))  # one batch of candidates
    for d in dict.fromkeys([*args.dtypes, *args.reference_dtypes]):
        results["matmul_peak"][d] = matmul_peak(getattr(torch, d), shapes, 3 if args.quick else 7)
        logger.info("matmul peak %s: %.1f GFLOP/s (%s)", d, results["matmul_peak"][d]["gflops_peak"],
                    results["matmul_peak"][d]["shape"])
    meta["backbone"] = base_rr.backbone.model_id
    flops = FlopModel.from_model(base_rr.model)
    meta["non_embedding_params"] = flops.non_embedding_params

    def reference(dtype: str, serves: str) -> Reference:
        """A reference for ``serves``: "peft" (every expert, switched with set_adapter), "__base__", or the name
        of the one expert merged into its weights."""
        ref = Reference(base_rr.backbone.model_id, getattr(torch, dtype), base_rr.template, args.batch_size,
                        args.max_length)
        if serves == "peft":
            ref.load_experts(expert_dirs)
        elif serves != BASE_ADAPTER:
            ref.merge_expert(serves, expert_dirs[serves])
        return ref

    pool = word_pool(base_rr.tokenizer, base_rr.template.doc_sep)
    workloads = build_workloads(base_rr, args, pool)
    if "natural100" in args.workloads and "natural100" not in workloads:
        meta["notes"].append(f"natural100 skipped: no MEDIQA data under {args.data_root} (use --data-root)")
    # Experts: the bundle's own when it has the three domains and a router (the shipped default does), else
    # random adapters in a routed bundle built here. Single-query workloads take the product path (rerank
    # routes the query); their reference has the routed expert merged into its weights.
    expert_dirs, routed = {}, {}
    if set(EXPERTS) <= set(base_rr.experts) and base_rr.router is not None:
        expert_dirs, routed = base_expert_dirs(args.backbone), rrs
    if "memory" in args.workloads:
        memory_adapters = make_adapters(base_rr.backbone.model_id, EXPERTS + [f"extra{i}" for i in range(3, 10)],
                                        work / "adapters", args.lora_rank)
    if not routed and {"batch64", "router", "switch"} & set(args.workloads):
        adapters = memory_adapters if "memory" in args.workloads else make_adapters(
            base_rr.backbone.model_id, EXPERTS, work / "adapters", args.lora_rank)
        expert_dirs = {e: adapters[e] for e in EXPERTS}
        bundle = make_routed_bundle(base_rr, expert_dirs, work / "bundle")
        routed = {d: R2RReranker.from_pretrained(bundle, dtype=d, **load) for d in args.dtypes}

    useful = {n: sum(flops.useful(p, t) for p, t in zip(w.tokens["prefix"], w.tokens["tails"])) / 1e9
              for n, w in workloads.items()}
    refs: dict[tuple[str, str], Reference] = {}  # (dtype, merged expert or "peft") -> reference
    for done, (name, wl) in enumerate(workloads.items()):
        if wl.experts is None:  # one query, routed by r2r itself
            key = routed[args.dtypes[0]].route(wl.queries[0]).expert if routed else BASE_ADAPTER
            record_expert = key
        else:
            key, record_expert = "peft", None
        systems = {}
        for d in args.reference_dtypes:
            if (d, key) not in refs:
                refs[(d, key)] = reference(d, key)
            ref = refs[(d, key)]
            systems[f"reference/{d}"] = System("reference", ref.dtype, lambda w, ref=ref, e=record_expert: ref.margins(
                base_rr.instruction, w.queries, w.docs, w.experts or [e]), ref)
        for d in args.dtypes:
            rr = routed[d] if routed else rrs[d]
            systems[f"r2r/{d}"] = System("r2r", getattr(torch, d), lambda w, rr=rr: r2r_margins(rr, w))
        logger.info("workload %s: %d queries, %d documents, %d reps, expert %s", name, len(wl.queries), wl.n_docs,
                    args.reps, record_expert or "per query")
        record = run_workload(wl, systems, args.reps, flops, results["matmul_peak"])
        record["expert"] = record_expert or "fixed per query"
        record["token_mismatches_vs_reference"] = token_fidelity(base_rr, refs[("float32", key)], wl)
        results["workloads"].append(record)
        per_gflop = sum(e["median_s"] for e in record["systems"].values()) / useful[name]
        left = per_gflop * args.reps * sum(useful[n] for n in list(workloads)[done + 1 :])
        logger.info("elapsed %.0f min; workloads left: about %.0f min", (time.perf_counter() - t_start) / 60, left / 60)

    if {"router", "switch"} & set(args.workloads):
        n = SIZES["router"][1 if args.quick else 0]
        docs = equal_docs(base_rr.tokenizer, base_rr.template.doc_sep, pool, n, DOC_TOKENS, seed=7)
        results["router"] = {d: router_and_switch(routed[d], docs, args.reps, 6 if args.quick else 200)
                             for d in args.dtypes}
    if "memory" in args.workloads:
        results["memory"] = memory_section(args, memory_adapters)
    results["targets"] = targets(results, args.default_dtype)
    meta["notes"].append("speed-ups and score differences compare each r2r dtype with the fp32 reference; the "
                         "reference takes fixed-size batches in input order (no length sorting)")
    meta["elapsed_min"] = (time.perf_counter() - t_start) / 60
    text = markdown(results)
    print(text)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    if work_ctx:
        work_ctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
