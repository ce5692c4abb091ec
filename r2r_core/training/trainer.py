"""Contrastive LoRA training of one adapter, resumable and selected on dev data.

One call of :func:`train_adapter` trains one LoRA adapter on a list of :class:`TrainGroup` with the
group-wise InfoNCE loss (paper Eq. 5) on ``(z_yes - z_no) / tau``; the margins come from
:func:`r2r_core.training.group_forward.group_margins` (the group's shared prefix is run once; equal to
:func:`r2r_core.scoring.yes_no_margins` on the whole prompts, which ``shared_prefix=False`` uses).
EAG's two stages are two kinds of call (see :mod:`r2r_core.training.pipeline`): Stage 1 on abstracted
groups pooled over domains; Stage 2 per domain on the original groups, starting from Stage 1's weights
(``init_adapter``).

Defaults follow the paper: LoRA r=32, alpha=64, dropout 0.05 on q/k/v/o; AdamW lr 1e-4 with linear
warmup and linear decay, gradient clipping, gradient accumulation, bf16 autocast where the hardware runs
it fast, one seed for everything.

**Resuming.** ``run_dir`` holds ``checkpoint.pt`` (trainable weights, optimizer, scheduler, RNG states,
step, best score), ``best.safetensors`` (the best adapter so far), ``metrics.jsonl`` and, once finished,
``adapter/`` (a peft folder) and ``done.json``. Every file is written atomically. The data order is a
pure function of (seed, epoch), so the step counter is the data cursor; a killed run restarted with
``resume=True`` continues from its last checkpoint and ends with exactly the weights an uninterrupted run
gives (as long as no wall-clock budget cut it short).

**Weight averaging.** With ``average_every = N`` the run also keeps its LoRA weights every N steps (and at the
last) as ``snapshots/step<N>.safetensors`` (bf16), and its adapter is the mean of the last ``average_last`` of
them (:mod:`r2r_core.training.averaging`): late in a linear decay that mean beats any single checkpoint, on
dev measures finer than the trainer's own subsample (``benchmarks/RESULTS.md``). The mean is scored on dev and
reported beside the best single checkpoint (``average_metric``, ``best_metric`` in ``done.json``).
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from r2r_core.training.checkpoint import (
    atomic_json,
    atomic_save_tensors,
    load_checkpoint,
    replace_dir,
    restore_rng,
    save_checkpoint,
)
from r2r_core.training.curation import TrainGroup
from r2r_core.training.loss import group_loss
from r2r_core.training.selection import METRICS, DevQuery, evaluate_dev, metric_value

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_NAME", "LoraSettings", "RunMismatchError", "TrainConfig", "TrainResult", "check_run_settings",
    "resolve_precision", "train_adapter",
]

ADAPTER_NAME = "default"  # peft's adapter name inside a training run
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class LoraSettings:
    r: int = 32
    alpha: int = 64
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    top_layers: int | None = None  # adapt only the top N decoder layers (None: all); the rest run without autograd

    def __post_init__(self) -> None:
        if self.top_layers is not None and (
                isinstance(self.top_layers, bool) or not isinstance(self.top_layers, int) or self.top_layers < 1):
            raise ValueError(f"`lora.top_layers` must be an int >= 1 or unset, got {self.top_layers!r}")
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"`lora.r` must be an int >= 1, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"`lora.alpha` must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`lora.dropout` must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(m, str) for m in self.target_modules):
            raise ValueError(
                f"`lora.target_modules` must be a non-empty list of module names, got {self.target_modules!r}"
            )

    def layers(self, num_layers: int) -> list[int] | None:
        """The decoder layer indices that get LoRA for a model of ``num_layers`` layers (None: all)."""
        if self.top_layers is None or self.top_layers >= num_layers:
            return None
        return list(range(num_layers - self.top_layers, num_layers))

    def to_peft(self, num_layers: int | None = None):
        from peft import LoraConfig

        layers = self.layers(num_layers) if num_layers is not None else None
        if self.top_layers is not None and num_layers is None:
            raise ValueError("`lora.top_layers` needs the model's number of layers")
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=list(self.target_modules), task_type="CAUSAL_LM",
            layers_to_transform=layers,
        )


@dataclass
class TrainConfig:
    """One training run. ``steps`` counts optimizer steps of ``groups_per_batch * grad_accum`` groups."""

    steps: int = 200
    groups_per_batch: int = 2
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 256
    tau: float = 1.0
    bce_weight: float = 0.0  # weight of a pointwise BCE term on the margins beside InfoNCE (calibrates the score)
    precision: str = "auto"
    seed: int = 0
    eval_every: int = 50
    eval_at_start: bool = True
    save_every: int = 25
    metric: str = "ndcg@10"
    eval_batch_size: int = 16
    shared_prefix: bool = True
    max_time_s: float | None = None
    average_every: int | None = None  # keep the LoRA weights every that many steps in snapshots/ (None: off) ...
    average_last: int = 3  # ... and write as the run's adapter the mean of its last this many snapshots
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        for name in ("steps", "groups_per_batch", "grad_accum", "eval_every", "save_every", "eval_batch_size",
                     "average_last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio!r}")
        if not self.tau > 0:
            raise ValueError(f"`tau` must be > 0, got {self.tau!r}")
        if not isinstance(self.bce_weight, (int, float)) or isinstance(self.bce_weight, bool) or self.bce_weight < 0:
            raise ValueError(f"`bce_weight` must be a number >= 0, got {self.bce_weight!r}")
        if not isinstance(self.max_length, int) or self.max_length < 32:
            raise ValueError(f"`max_length` must be an int >= 32, got {self.max_length!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"`precision` must be one of {PRECISIONS}, got {self.precision!r}")
        if self.metric not in METRICS:
            raise ValueError(f"`metric` must be one of {METRICS}, got {self.metric!r}")
        if self.max_time_s is not None and not self.max_time_s > 0:
            raise ValueError(f"`max_time_s` must be > 0 or None, got {self.max_time_s!r}")
        if self.average_every is not None and (isinstance(self.average_every, bool)
                                               or not isinstance(self.average_every, int) or self.average_every < 1):
            raise ValueError(f"`average_every` must be an int >= 1 or unset, got {self.average_every!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"`max_grad_norm` must be > 0 or None, got {self.max_grad_norm!r}")


@dataclass
class TrainResult:
    name: str
    adapter_dir: str
    steps_done: int
    completed: bool
    best_step: int | None = None
    best_metric: float | None = None
    start_metric: float | None = None
    final_loss: float | None = None
    pairs_per_s: float | None = None
    train_s: float = 0.0
    stopped: str | None = None  # "time" when a wall-clock budget ended the run early
    best_eval: dict | None = None
    averaged_steps: list[int] | None = None  # the snapshots whose mean is the adapter (average_every)
    average_metric: float | None = None  # that mean's dev score


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (None = plain fp32)."""
    from r2r_core.runtime import cpu_has_fast_bf16

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return None


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _schedule(config: TrainConfig):
    warmup = int(round(config.warmup_ratio * config.steps))

    def factor(step: int) -> float:  # step = number of optimizer steps taken so far
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (config.steps - step) / max(1, config.steps - warmup))

    return factor


class _Batches:
    """Deterministic stream of groups: epoch ``e`` is a permutation seeded by (seed, e); no state but the cursor."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._cache = n, seed, {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=gen).tolist()}
        return self._cache[epoch]

    def take(self, cursor: int, count: int) -> list[int]:
        return [self._perm(i // self.n)[i % self.n] for i in range(cursor, cursor + count)]


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model, state: dict[str, torch.Tensor], source: str) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"{source}: weights for {len(missing)} trainable parameters are missing (e.g. {missing[0]})")
    with torch.no_grad():
        for n, t in state.items():
            if n in params:
                params[n].copy_(t.to(params[n].dtype))


def _truncate_log(path: Path, step: int) -> None:
    """Keep the records of ``metrics.jsonl`` up to ``step`` (those of the checkpoint resumed from). A line that
    is not JSON -- the last one, torn by a kill in the middle of a write -- is dropped."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            logger.warning("%s: dropping a torn record %.60r", path, line)
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


# Settings that may change between a run and its resumption: they do not change what is trained.
_RESUMABLE_KEYS = ("max_time_s", "eval_batch_size", "save_every")


def _run_settings(config: TrainConfig, groups: Sequence[TrainGroup], init_adapter) -> dict:
    """What a run folder was made with: the config, a digest of its data, and its starting adapter."""
    import hashlib

    settings = {k: v for k, v in asdict(config).items() if k not in _RESUMABLE_KEYS}
    ids = "\n".join(f"{g.group_id}\t{'|'.join(g.doc_ids)}" for g in groups)
    settings["data"] = hashlib.sha256(ids.encode()).hexdigest()[:16]
    settings["init_adapter"] = None if init_adapter is None else "/".join(Path(init_adapter).parts[-2:])
    return json.loads(json.dumps(settings))  # tuples -> lists, as read back from JSON


class RunMismatchError(ValueError):
    """A run folder holds a run made with other settings than the ones asked for."""


def check_run_settings(run_dir: Path, settings: dict) -> None:
    """Raise :class:`RunMismatchError` naming the differing keys if ``run_dir`` was made with other settings."""
    path = run_dir / "run_settings.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text(encoding="utf-8"))

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved), flat(settings)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if differ:
        detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differ[:8])
        raise RunMismatchError(
            f"{run_dir} was made with other settings ({detail}); resume would mix two runs. "
            "Use another output folder, or start fresh (resume=False / drop --resume)")


@dataclass
class _RunFiles:
    """The files of one run folder (see the module docstring)."""

    root: Path

    def __post_init__(self) -> None:
        self.done, self.checkpoint = self.root / "done.json", self.root / "checkpoint.pt"
        self.best, self.log = self.root / "best.safetensors", self.root / "metrics.jsonl"
        self.adapter, self.settings = self.root / "adapter", self.root / "run_settings.json"
        self.snapshots = self.root / "snapshots"

    def snapshot(self, step: int) -> Path:
        return self.snapshots / f"step{step}.safetensors"

    def snapshot_steps(self, upto: int) -> list[int]:
        """The steps, in order, of the snapshots kept so far, up to step ``upto`` (later ones are left by a run
        resumed from an earlier checkpoint, and are rewritten as it passes them)."""
        steps = []
        for path in self.snapshots.glob("step*.safetensors"):
            number = path.stem[len("step"):]
            if number.isdigit() and int(number) <= upto:
                steps.append(int(number))
        return sorted(steps)

    def append_log(self, record: dict) -> None:
        with open(self.log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _group_size(groups: Sequence[TrainGroup], name: str) -> int:
    if not groups:
        raise ValueError(f"run {name!r}: no training groups")
    sizes = {g.size for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"run {name!r}: every group must have the same size, got sizes {sorted(sizes)}")
    return sizes.pop()


def _prepare_run_dir(files: _RunFiles, settings: dict, resume: bool, name: str) -> TrainResult | None:
    """Make the run folder ready: the finished result when ``resume`` finds one made with these settings (a
    :class:`RunMismatchError` when they differ), else None, with a fresh run's old files removed."""
    files.root.mkdir(parents=True, exist_ok=True)
    if resume:
        check_run_settings(files.root, settings)
        if files.done.is_file() and (files.adapter / "adapter_model.safetensors").is_file():
            logger.info("run %s already finished; reusing %s", name, files.adapter)
            return TrainResult(**json.loads(files.done.read_text(encoding="utf-8")))
    else:
        import shutil

        for p in (files.done, files.checkpoint, files.best, files.log):
            p.unlink(missing_ok=True)
        shutil.rmtree(files.snapshots, ignore_errors=True)
    atomic_json(settings, files.settings)
    return None


class _TrainingRun:
    """One run's model, optimizer and progress, in named steps: :meth:`resume`, :meth:`step`, :meth:`evaluate`,
    :meth:`checkpoint` and :meth:`save`. ``peft_model`` carries the run's LoRA adapter (``ADAPTER_NAME``)."""

    def __init__(self, peft_model, tokenizer, template, instruction: str, groups: Sequence[TrainGroup],
                 config: TrainConfig, files: _RunFiles, name: str, dev: Sequence[DevQuery] | None,
                 init_adapter: str | Path | None):
        from r2r_core.scoring import PromptEncoder

        self.model, self.groups, self.config, self.files, self.name, self.dev = (
            peft_model, groups, config, files, name, dev)
        self.instruction = instruction
        self.group_size = _group_size(groups, name)
        self.device = next(peft_model.parameters()).device
        self.autocast_dtype = resolve_precision(config.precision, self.device)
        self.encoder = PromptEncoder(tokenizer, template, config.max_length)
        self.pad_id = tokenizer.pad_token_id
        if init_adapter is not None:
            self._load_init_adapter(Path(init_adapter))
        self.params = [p for p in peft_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(config))
        self.state = {"step": 0, "best_metric": None, "best_step": None, "start_metric": None, "best_eval": None,
                      "train_s": 0.0, "pairs": 0}
        self.per_step = config.groups_per_batch * config.grad_accum
        self._batches = _Batches(len(groups), config.seed)
        self._tokens: dict[int, tuple[list[int], list[list[int]]]] = {}

    def _load_init_adapter(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: the initial adapter (init_adapter) has no weights file")
        result = set_peft_model_state_dict(self.model, load_file(str(weights)), adapter_name=ADAPTER_NAME)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{weights}: unexpected keys {result.unexpected_keys[:3]}")

    # ---------------------------------------------------------------------------------------------- resume
    def resume(self) -> None:
        """Continue from ``checkpoint.pt`` if there is one: weights, optimizer, scheduler, RNG states and progress;
        the metrics log is cut back to the checkpoint's step."""
        path = self.files.checkpoint
        if not path.is_file():
            return
        ckpt = load_checkpoint(path)
        _load_trainable(self.model, ckpt["trainable"], str(path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        restore_rng(ckpt["rng"])
        self.state.update(ckpt["state"])
        _truncate_log(self.files.log, self.state["step"])
        logger.info("run %s: resumed at step %d from %s", self.name, self.state["step"], path)

    # ---------------------------------------------------------------------------------------------- step
    def _group_tokens(self, i: int) -> tuple[list[int], list[list[int]]]:
        if i not in self._tokens:
            g = self.groups[i]
            self._tokens[i] = self.encoder.encode(self.instruction, g.query, list(g.docs))
        return self._tokens[i]

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _micro_batch_loss(self, idx: list[int]) -> float:
        """Forward and backward of one micro-batch of groups; returns its share of the step's loss."""
        from r2r_core.scoring import yes_no_margins
        from r2r_core.training.group_forward import group_margins

        config, total = self.config, 0.0
        if config.shared_prefix:  # one forward per group, the prefix run once (same loss, fewer tokens)
            for i in idx:
                prefix, tails = self._group_tokens(i)
                with self._autocast():
                    margins = group_margins(self.model, prefix, tails, self.pad_id)
                loss = group_loss(margins.view(1, self.group_size), tau=config.tau,
                                  bce_weight=config.bce_weight) / (config.grad_accum * len(idx))
                loss.backward()
                total += loss.item()
            return total
        seqs = [prefix + t for prefix, tails in map(self._group_tokens, idx) for t in tails]
        with self._autocast():
            margins = yes_no_margins(self.model, seqs, self.pad_id)
        loss = group_loss(margins.view(len(idx), self.group_size), tau=config.tau,
                          bce_weight=config.bce_weight) / config.grad_accum
        loss.backward()
        return loss.item()

    def step(self) -> float:
        """One optimizer step over the next ``groups_per_batch * grad_accum`` groups of the data order; logs it
        and returns its loss."""
        config = self.config
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        cursor = self.state["step"] * self.per_step
        total = 0.0
        for micro in range(config.grad_accum):
            total += self._micro_batch_loss(
                self._batches.take(cursor + micro * config.groups_per_batch, config.groups_per_batch))
        grad_norm = None
        if config.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.state["step"] += 1
        dt = time.perf_counter() - t0
        self.state["train_s"] += dt
        self.state["pairs"] += self.per_step * self.group_size
        self.pairs_per_s = self.per_step * self.group_size / dt
        self.files.append_log({"step": self.state["step"], "loss": round(total, 5),
                               "lr": self.scheduler.get_last_lr()[0],
                               "grad_norm": None if grad_norm is None else round(grad_norm, 4),
                               "pairs_per_s": round(self.pairs_per_s, 3)})
        return total

    # ---------------------------------------------------------------------------------------------- evaluate
    def _score_dev(self) -> tuple[dict, float, float]:
        """The current weights on the dev queries: (results, the selection metric, seconds taken)."""
        t0 = time.perf_counter()
        res = evaluate_dev(self.model, self.encoder, self.instruction, self.dev, pad_token_id=self.pad_id,
                           batch_size=self.config.eval_batch_size, adapter_name=ADAPTER_NAME,
                           autocast_dtype=self.autocast_dtype)
        return res, metric_value(res, self.config.metric), round(time.perf_counter() - t0, 2)

    def evaluate(self, step: int) -> None:
        """Score the dev queries (nothing without them); keep the adapter in ``best.safetensors`` if it improved."""
        if not self.dev:
            return
        config, state = self.config, self.state
        res, value, eval_s = self._score_dev()
        if step == 0:
            state["start_metric"] = value
        improved = state["best_metric"] is None or value > state["best_metric"]
        if improved:
            state.update(best_metric=value, best_step=step, best_eval=res)
            atomic_save_tensors(_trainable_state(self.model), self.files.best)
        self.files.append_log({"step": step, "event": "eval", config.metric: value, "best": state["best_metric"],
                               "improved": improved, "eval_s": eval_s, **{
                                   f"dev_{k}": v for k, v in res["macro"].items()}})
        logger.info("run %s step %d: dev %s = %.4f (best %.4f at step %s)", self.name, step, config.metric,
                    value, state["best_metric"], state["best_step"])

    # ---------------------------------------------------------------------------------------------- save
    def snapshot(self, step: int) -> None:
        """Keep the current LoRA weights (bf16, as bundles store them) for the run's weight average."""
        self.files.snapshots.mkdir(exist_ok=True)
        atomic_save_tensors({k: v.to(torch.bfloat16) for k, v in _trainable_state(self.model).items()},
                            self.files.snapshot(step))

    def _average(self) -> tuple[list[int], float | None] | None:
        """Load into the model the mean of the last ``average_last`` snapshots and score it on dev; None (and a
        warning) when there are none."""
        from safetensors.torch import load_file

        from r2r_core.training.averaging import mean_tensors

        steps = self.files.snapshot_steps(self.state["step"])[-self.config.average_last:]
        if not steps:
            logger.warning("run %s: no snapshots to average (average_every=%d, %d steps done); writing the %s "
                           "adapter", self.name, self.config.average_every, self.state["step"],
                           "best" if self.dev else "last")
            return None
        paths = [self.files.snapshot(s) for s in steps]
        _load_trainable(self.model, mean_tensors([load_file(str(p)) for p in paths], names=[str(p) for p in paths]),
                        "the snapshots' mean")
        value = None
        if self.dev:
            _, value, eval_s = self._score_dev()
            self.files.append_log({"step": self.state["step"], "event": "average", "of_steps": steps,
                                   self.config.metric: value, "eval_s": eval_s})
            logger.info("run %s: the mean of steps %s scores dev %s = %.4f (best single %.4f at step %s)",
                        self.name, steps, self.config.metric, value, self.state["best_metric"],
                        self.state["best_step"])
        return steps, value

    def checkpoint(self) -> None:
        save_checkpoint(self.files.checkpoint, trainable=_trainable_state(self.model),
                        optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                        state=dict(self.state))

    def save(self, final_loss: float | None, stopped: str | None) -> TrainResult:
        """Write the run's adapter as ``adapter/`` and the result as ``done.json``: with ``average_every``, the mean
        of the last ``average_last`` snapshots (whatever dev says: it is scored and reported beside the best single
        checkpoint); otherwise the best adapter on dev (the last one without dev data)."""
        import shutil

        from safetensors.torch import load_file

        self.model.eval()
        averaged = self._average() if self.config.average_every else None
        if averaged is None and self.dev and self.files.best.is_file():
            _load_trainable(self.model, load_file(str(self.files.best)), str(self.files.best))
        tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=self.files.root))
        self.model.save_pretrained(str(tmp / "a"), selected_adapters=[ADAPTER_NAME])
        saved = tmp / "a"
        nested = saved / ADAPTER_NAME  # peft nests non-default adapter names; ours is "default"
        replace_dir(nested if nested.is_dir() else saved, self.files.adapter)
        shutil.rmtree(tmp, ignore_errors=True)
        state = self.state
        result = TrainResult(
            name=self.name, adapter_dir=str(self.files.adapter), steps_done=state["step"], completed=True,
            best_step=state["best_step"], best_metric=state["best_metric"], start_metric=state["start_metric"],
            final_loss=final_loss, pairs_per_s=(state["pairs"] / state["train_s"]) if state["train_s"] else None,
            train_s=round(state["train_s"], 2), stopped=stopped, best_eval=state["best_eval"],
            averaged_steps=None if averaged is None else averaged[0],
            average_metric=None if averaged is None else averaged[1],
        )
        atomic_json(asdict(result), self.files.done)
        return result


def _progress_bar(config: TrainConfig, name: str, initial: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=initial, desc=name, unit="step", dynamic_ncols=True)


def train_adapter(
    model,
    tokenizer,
    template,
    instruction: str,
    groups: Sequence[TrainGroup],
    config: TrainConfig,
    run_dir: str | Path,
    *,
    dev: Sequence[DevQuery] | None = None,
    init_adapter: str | Path | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    name: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train one LoRA adapter on ``groups``; writes ``run_dir/adapter`` (peft format) when finished.

    ``model`` is a plain causal LM (frozen); LoRA is injected for the run and removed afterwards, so the
    same backbone serves the next run. ``init_adapter`` (a peft folder) sets the starting weights (EAG
    Stage 2 starts from Stage 1). ``stop_after`` stops after that many steps as if the process were killed
    there (for tests of resuming); the result then has ``completed=False``.
    """
    from peft import get_peft_model

    from r2r_core.scoring import YesNoIds, install_yes_no_head

    files = _RunFiles(Path(run_dir))
    name = name or files.root.name
    _group_size(groups, name)
    finished = _prepare_run_dir(files, _run_settings(config, groups, init_adapter), resume, name)
    if finished is not None:
        return finished
    install_yes_no_head(model, YesNoIds.from_tokenizer(tokenizer, template))  # only the two answer rows
    _seed_all(config.seed)
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    peft_model = get_peft_model(model, config.lora.to_peft(num_layers), adapter_name=ADAPTER_NAME)
    try:
        run = _TrainingRun(peft_model, tokenizer, template, instruction, groups, config, files, name, dev,
                           init_adapter)
        if resume:
            run.resume()
        state = run.state
        if state["step"] == 0 and config.eval_at_start and dev:
            run.evaluate(0)
            run.checkpoint()
        bar = _progress_bar(config, name, state["step"], progress)
        peft_model.train()
        started = time.perf_counter()
        loss_ema = None
        stopped = None
        while state["step"] < config.steps:
            total = run.step()
            step = state["step"]
            loss_ema = total if loss_ema is None else 0.9 * loss_ema + 0.1 * total
            if bar is not None:
                bar.set_postfix(loss=f"{loss_ema:.3f}", pairs_s=f"{run.pairs_per_s:.2f}")
                bar.update(1)
            out_of_time = config.max_time_s is not None and time.perf_counter() - started > config.max_time_s
            if out_of_time and step < config.steps:
                stopped = "time"
            if step % config.eval_every == 0 or step == config.steps or stopped:
                run.evaluate(step)
            keep = config.average_every is not None and (step % config.average_every == 0 or step == config.steps)
            if keep:
                run.snapshot(step)
            if (keep or step % config.save_every == 0 or step % config.eval_every == 0 or step == config.steps
                    or stopped):
                run.checkpoint()
            if stopped:
                logger.warning("run %s: wall-clock budget of %.0fs reached at step %d of %d", name,
                               config.max_time_s, step, config.steps)
                break
            if stop_after is not None and step >= stop_after and step < config.steps:
                if bar is not None:
                    bar.close()
                return TrainResult(name, "", step, False, state["best_step"], state["best_metric"],
                                   state["start_metric"], total, None, state["train_s"])
        if bar is not None:
            bar.close()
        return run.save(loss_ema, stopped)
    finally:
        peft_model.unload()  # removes the LoRA layers: ``model`` is the plain backbone again
        model.eval()
