"""Training recipes: one TOML (or YAML) file that says everything ``r2r train`` does.

Sections (every key optional; unknown keys are errors naming the section and key)::

    [model]        base, template ("auto" = the tokenizer's chat template), instruction, device, dtype,
                   threads (CPU threads for torch; 1 is fastest on a CPU shared with other busy processes)
    [data]         paths (BEIR folders or roots holding several), train_split, dev_split
    [curation]     Procedure 1: retriever, depth, num_negatives, num_random_negatives, groups_per_query,
                   near_duplicate_threshold, max_groups_per_domain, max_groups_per_dataset, ...
    [abstraction]  EAG Stage 1 data: enabled, types, max_cues, cue_max_df, propagate, use_spacy, ...
    [dev]          checkpoint-selection subsample: max_queries_per_domain, depth, max_doc_chars
    [train]        shared trainer settings (steps, lr, groups_per_batch, grad_accum, max_length, tau,
                   precision, eval_every, save_every, metric, ...) and [train.lora] (r, alpha, dropout,
                   target_modules)
    [stage1]       overrides of [train] for EAG Stage 1 (abstracted data, all domains pooled)
    [stage2]       overrides of [train] for Stage 2 (one expert per domain; also used by direct-ft)
    [single_lora]  overrides of [train] for the single-LoRA ablation (all original data pooled)
    [router]       Latent Semantic Router: max_train_per_domain, epochs, lr, threshold_rule, keep_correct, ...
    [output]       dir, ablations (["single-lora", "direct-ft"]), time_budget_s

Relative data paths are resolved against the working directory, then against the recipe's folder.
``--set section.key=value`` on the command line overrides any key (the value is parsed as TOML).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import tomllib

from r2r_core.training.abstraction import AbstractionConfig
from r2r_core.training.curation import CurationConfig
from r2r_core.training.router_training import RouterConfig
from r2r_core.training.trainer import TrainConfig

__all__ = ["ABLATIONS", "Recipe", "load_recipe", "parse_override"]

ABLATIONS = ("single-lora", "direct-ft")


@dataclass
class ModelSection:
    base: str = "r2r/SmolLM2-135M-Instruct-Q4_1"
    template: str = "auto"
    instruction: str | None = None
    device: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    threads: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or not self.base:
            raise ValueError(f"`model.base` must be a model id or folder, got {self.base!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"`model.threads` must be an int >= 1 or unset, got {self.threads!r}")
        if self.device in ("", "auto"):
            self.device = None
        if self.instruction == "":
            self.instruction = None


@dataclass
class DataSection:
    paths: list[str] = field(default_factory=list)
    train_split: str = "train"
    dev_split: str | None = "dev"

    def __post_init__(self) -> None:
        if isinstance(self.paths, str):
            self.paths = [self.paths]
        if not all(isinstance(p, str) and p for p in self.paths):
            raise ValueError(f"`data.paths` must be a list of folder paths, got {self.paths!r}")
        if self.dev_split == "":
            self.dev_split = None


@dataclass
class DevSection:
    max_queries_per_domain: int = 60
    depth: int = 20
    max_doc_chars: int = 2000

    def __post_init__(self) -> None:
        for name in ("max_queries_per_domain", "depth", "max_doc_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`dev.{name}` must be an int >= 1, got {value!r}")


@dataclass
class OutputSection:
    dir: str = "runs/r2r"
    ablations: list[str] = field(default_factory=list)
    time_budget_s: float | None = None
    stage1: bool = True
    general_expert: bool = True  # ship Stage 1's adapter as the `general` expert, the router's fallback
    warm_start: bool = False  # Stage 1 (and single-lora) start from the shipped `general` expert when compatible
    init_adapter: str | None = None  # a PEFT adapter folder to start Stage 1 from instead (same LoRA settings)

    def __post_init__(self) -> None:
        bad = sorted(set(self.ablations) - set(ABLATIONS))
        if bad:
            raise ValueError(f"`output.ablations` may hold {list(ABLATIONS)}, got unknown {bad}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"`output.time_budget_s` must be > 0 or unset, got {self.time_budget_s!r}")
        if self.init_adapter is not None and not (isinstance(self.init_adapter, str) and self.init_adapter):
            raise ValueError(
                f"`output.init_adapter` must be an adapter folder path or unset, got {self.init_adapter!r}")


_SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "curation": CurationConfig,
    "abstraction": AbstractionConfig,
    "dev": DevSection,
    "train": TrainConfig,
    "router": RouterConfig,
    "output": OutputSection,
}
_STAGES = ("stage1", "stage2", "single_lora")


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    curation: CurationConfig = field(default_factory=CurationConfig)
    abstraction: AbstractionConfig = field(default_factory=AbstractionConfig)
    dev: DevSection = field(default_factory=DevSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage1: dict = field(default_factory=dict)
    stage2: dict = field(default_factory=dict)
    single_lora: dict = field(default_factory=dict)
    router: RouterConfig = field(default_factory=RouterConfig)
    output: OutputSection = field(default_factory=OutputSection)
    source: str | None = None

    def __post_init__(self) -> None:
        for stage in _STAGES:
            self.stage_config(stage)  # validates the overrides now, not mid-run

    def stage_config(self, stage: str) -> TrainConfig:
        """``[train]`` with the stage's overrides applied (``[train.lora]`` merged key by key)."""
        if stage not in _STAGES:
            raise ValueError(f"stage must be one of {_STAGES}, got {stage!r}")
        overrides = dict(getattr(self, stage))
        base = asdict(self.train)
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"[{stage}] has unknown keys {unknown}; allowed: {sorted(known)}")
        if "lora" in overrides:
            base["lora"] = {**base["lora"], **overrides.pop("lora")}
        base.update(overrides)
        return TrainConfig(**base)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("source")
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None) -> Recipe:
        where = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise ValueError(f"{where}a recipe must be a table of sections, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_SECTIONS) - set(_STAGES))
        if unknown:
            raise ValueError(f"{where}unknown sections {unknown}; allowed: {sorted([*_SECTIONS, *_STAGES])}")
        kwargs = {}
        for name, section_cls in _SECTIONS.items():
            values = data.get(name, {})
            if not isinstance(values, dict):
                raise ValueError(f"{where}[{name}] must be a table, got {values!r}")
            allowed = {f.name for f in fields(section_cls)}
            bad = sorted(set(values) - allowed)
            if bad:
                raise ValueError(f"{where}[{name}] has unknown keys {bad}; allowed: {sorted(allowed)}")
            try:
                kwargs[name] = section_cls(**values)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}[{name}]: {exc}") from exc
        for stage in _STAGES:
            kwargs[stage] = dict(data.get(stage, {}))
        try:
            return cls(**kwargs, source=source)
        except ValueError as exc:
            raise ValueError(f"{where}{exc}") from exc

    def with_overrides(self, overrides: list[str]) -> Recipe:
        """A copy with ``section.key=value`` overrides applied (values parsed as TOML, else strings)."""
        data = copy.deepcopy(self.to_dict())
        for item in overrides:
            section, keys, value = parse_override(item)
            target = data.setdefault(section, {})
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = value
        return Recipe.from_dict(data, source=self.source)

    def resolve_data_paths(self) -> list[Path]:
        base = Path(self.source).resolve().parent if self.source else None
        out = []
        for p in self.data.paths:
            path = Path(p).expanduser()
            if not path.is_absolute() and not path.exists() and base is not None and (base / path).exists():
                path = base / path
            if not path.exists():
                raise FileNotFoundError(f"data path {p!r} does not exist (from {self.source or 'the command line'})")
            out.append(path.resolve())
        return out


def parse_override(item: str) -> tuple[str, list[str], object]:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ValueError(f"an override must look like section.key=value, got {item!r}")
    path, raw = item.split("=", 1)
    section, *keys = path.strip().split(".")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, keys, value


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe from ``.toml`` or ``.yaml``/``.yml``; errors name the file (and line for TOML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover
            raise ImportError('YAML recipes need PyYAML: pip install "r2r-rerank[train]"') from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML: {exc}") from exc
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: invalid TOML: {exc}") from exc
    return Recipe.from_dict(data, source=str(path))


def replace_section(recipe: Recipe, section: str, **changes) -> Recipe:
    """A copy of ``recipe`` with fields of one section changed (validated)."""
    return dataclasses.replace(recipe, **{section: dataclasses.replace(getattr(recipe, section), **changes)})
