"""The R2R bundle: one directory that holds a routed reranker.

::

    r2r.json                 format version, base model id + fingerprint, template, instructions,
                             experts (name -> subfolder), router files, threshold, and max_length: the
                             prompt length the experts were trained at (optional; the reranker's default)
    experts/<name>/          a standard peft adapter folder (peft and vLLM load it directly)
    router.safetensors       the router head (+ router.json, its settings)

Loading validates every field and file, never unpickles, and refuses a bundle whose base fingerprint does
not match the backbone it is loaded on.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from r2r_core.calibration import check_calibration
from r2r_core.experts import EXPERT_META_FILE, validate_expert_name
from r2r_core.fsutil import current_umask, replace_dir
from r2r_core.router import ROUTER_CONFIG, ROUTER_WEIGHTS, LatentRouter
from r2r_core.runtime import DTYPES
from r2r_core.scoring import BASE_ADAPTER, check_max_length
from r2r_core.templates import PromptTemplate

__all__ = [
    "BUNDLE_FILE",
    "FORMAT_VERSION",
    "BundleConfig",
    "export_bundle",
    "is_bundle",
    "read_bundle",
    "write_bundle",
]


BUNDLE_FILE = "r2r.json"
FORMAT_VERSION = 1


@dataclass
class BundleConfig:
    """The contents of ``r2r.json``, validated on construction.

    ``max_length`` is the prompt length, in tokens, the experts were trained at: the reranker's default
    ``max_length``, since experts score best at the length they saw. None (bundles written before it was
    recorded) leaves the reranker's general default; it is not written to ``r2r.json`` then.
    ``calibration`` maps experts to the ``[scale, bias]`` of their score ``sigmoid(scale * margin + bias)``
    (:mod:`r2r_core.calibration`); an expert without one scores ``sigmoid(margin)``. Empty is not written.
    """

    base_model: str
    base_fingerprint: dict
    template: dict
    instruction: str | None = None
    expert_instructions: dict[str, str] = field(default_factory=dict)
    experts: dict[str, str] = field(default_factory=dict)
    router: dict | None = None  # {"weights": "router.safetensors", "config": "router.json"}
    threshold: float | None = None
    fallback: str = BASE_ADAPTER  # the expert for queries the router is not confident about
    max_length: int | None = None  # prompt length, in tokens, the experts were trained at; the reranker's default
    calibration: dict[str, list[float]] = field(default_factory=dict)  # expert -> [scale, bias] (calibration.py)
    format_version: int = FORMAT_VERSION
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version {self.format_version!r} is not supported (this r2r reads "
                             f"{FORMAT_VERSION})")
        if not isinstance(self.base_model, str) or not self.base_model:
            raise ValueError(f"base_model must be a non-empty string, got {self.base_model!r}")
        if not isinstance(self.base_fingerprint, dict) or "probe" not in self.base_fingerprint:
            raise ValueError("base_fingerprint must be the dict written by r2r_core.backbone.fingerprint_model")
        PromptTemplate.from_dict(self.template)
        for key in ("experts", "expert_instructions", "metadata"):
            if not isinstance(getattr(self, key), dict):
                raise ValueError(f"{key} must be a JSON object, got {type(getattr(self, key)).__name__}")
        for name, sub in self.experts.items():
            validate_expert_name(name)
            _check_inside(sub, f"expert {name!r}")
        unknown = sorted(set(self.expert_instructions) - set(self.experts))
        if unknown:
            raise ValueError(f"expert_instructions name experts that are not in `experts`: {unknown}")
        bad = {k: v for k, v in self.expert_instructions.items() if not isinstance(v, str)}
        if bad:
            raise ValueError(f"expert_instructions must map expert names to strings, got {bad!r}")
        if self.router is not None:
            if not isinstance(self.router, dict) or set(self.router) != {"weights", "config"}:
                raise ValueError(f"router must be {{'weights': ..., 'config': ...}} or null, got {self.router!r}")
            for key in ("weights", "config"):
                _check_inside(self.router[key], f"router {key}")
        if self.threshold is not None and not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold!r}")
        if self.fallback != BASE_ADAPTER and self.fallback not in self.experts:
            raise ValueError(f"fallback must be {BASE_ADAPTER!r} or one of the experts {sorted(self.experts)}, "
                             f"got {self.fallback!r}")
        if self.max_length is not None:
            check_max_length(self.max_length)
        self.calibration = check_calibration(self.calibration, list(self.experts))

    def to_json(self) -> str:
        data = asdict(self)
        if data["max_length"] is None:  # absent rather than null: the file stays what older readers know
            del data["max_length"]
        if not data["calibration"]:
            del data["calibration"]
        return json.dumps(data, indent=2, sort_keys=True)


def _check_inside(sub, what: str) -> None:
    """Refuse a path in r2r.json that could leave the bundle: not a string, absolute, or with a '..' part."""
    if not isinstance(sub, str) or not sub or Path(sub).is_absolute() or ".." in Path(sub).parts:
        raise ValueError(f"{what}: path must be relative inside the bundle (no '..'), got {sub!r}")


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / BUNDLE_FILE).is_file()


def read_bundle(path: str | Path) -> BundleConfig:
    """Read and validate ``r2r.json`` and check that every file it names exists."""
    root = Path(path)
    cfg_path = root / BUNDLE_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {root} is not an R2R bundle")
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object")
    try:
        config = BundleConfig(**data)
    except TypeError as exc:
        raise ValueError(f"{cfg_path}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{cfg_path}: {exc}") from exc
    for name, sub in config.experts.items():
        folder = root / sub
        for fname in ("adapter_config.json", "adapter_model.safetensors"):
            if not (folder / fname).is_file():
                raise FileNotFoundError(f"{folder / fname} (expert {name!r}) named in {cfg_path} not found")
    if config.router is not None:
        for key in ("weights", "config"):
            if not (root / config.router[key]).is_file():
                raise FileNotFoundError(f"{root / config.router[key]} (router {key}) named in {cfg_path} not found")
    return config


def write_bundle(path: str | Path, *, base_model: str, base_fingerprint: dict, template: PromptTemplate,
                 instruction: str | None = None, experts: dict[str, str | Path] | None = None,
                 router: LatentRouter | None = None, threshold: float | None = None,
                 expert_instructions: dict[str, str] | None = None, metadata: dict | None = None,
                 adapter_dtype: str | None = None, fallback: str = BASE_ADAPTER,
                 max_length: int | None = None, calibration: dict | None = None) -> Path:
    """Write a complete bundle atomically (built in a temporary folder, then moved into place).

    ``experts`` maps names to peft adapter folders, which are copied to ``experts/<name>/`` along with an
    ``r2r_expert.json`` recording the base model and its fingerprint. ``adapter_dtype`` ("bfloat16",
    "float16", "float32") stores the adapters' floating-point weights in that dtype instead of copying them
    as they are: bf16 halves an fp32 adapter; experts are cast back to the backbone's dtype on load.
    ``fallback`` names the expert for queries routed below the threshold (``"__base__"``: the backbone).
    ``max_length`` records the prompt length the experts were trained at, which loading then uses by default.
    ``calibration`` (``{expert: [scale, bias]}``) records each expert's score calibration.
    """
    root = Path(path)
    if adapter_dtype is not None and adapter_dtype not in DTYPES:
        raise ValueError(f"`adapter_dtype` must be None or one of {sorted(DTYPES)}, got {adapter_dtype!r}")
    experts = dict(experts or {})
    if root.exists() and any(root.iterdir()) and not is_bundle(root):
        raise FileExistsError(f"{root} exists and is not an R2R bundle; refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        sub_paths: dict[str, str] = {}
        for name, src in experts.items():
            validate_expert_name(name)
            src = Path(src)
            if not (src / "adapter_config.json").is_file() or not (src / "adapter_model.safetensors").is_file():
                raise FileNotFoundError(f"expert {name!r}: {src} is not a peft adapter folder with safetensors")
            dst = tmp / "experts" / name
            dst.mkdir(parents=True)
            shutil.copy2(src / "adapter_config.json", dst / "adapter_config.json")
            if adapter_dtype is None:
                shutil.copy2(src / "adapter_model.safetensors", dst / "adapter_model.safetensors")
            else:
                _cast_safetensors(src / "adapter_model.safetensors", dst / "adapter_model.safetensors", adapter_dtype)
            meta = {"base_model": base_model, "base_fingerprint": base_fingerprint}
            (dst / EXPERT_META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
            sub_paths[name] = f"experts/{name}"
        router_entry = None
        if router is not None:
            router.save(tmp)
            router_entry = {"weights": ROUTER_WEIGHTS, "config": ROUTER_CONFIG}
            unknown = sorted(set(router.labels) - set(experts))
            if unknown:
                raise ValueError(f"the router routes to {unknown}, which are not experts of this bundle")
        config = BundleConfig(
            base_model=base_model, base_fingerprint=base_fingerprint, template=template.to_dict(),
            instruction=instruction, expert_instructions=dict(expert_instructions or {}), experts=sub_paths,
            router=router_entry, threshold=threshold, fallback=fallback, max_length=max_length,
            calibration=dict(calibration or {}), metadata=dict(metadata or {}),
        )
        (tmp / BUNDLE_FILE).write_text(config.to_json(), encoding="utf-8")
        _make_readable(tmp)
        replace_dir(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _make_readable(root: Path) -> None:
    """Give the bundle the usual permissions (temporary files and folders are created private)."""
    umask = current_umask()
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _cast_safetensors(src: Path, dst: Path, dtype: str) -> None:
    """Copy a safetensors file with its floating-point tensors cast to ``dtype`` (file metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = DTYPES[dtype]
    tensors = {}
    with safe_open(str(src), framework="pt") as f:
        file_meta = f.metadata() or {}
        for key in f.keys():
            t = f.get_tensor(key)
            tensors[key] = t.to(target) if t.is_floating_point() else t
    save_file(tensors, str(dst), metadata={**file_meta, "format": "pt"})


def export_bundle(src: str | Path, dst: str | Path, *, adapter_dtype: str | None = None,
                  metadata: dict | None = None, router: LatentRouter | None = None,
                  calibration: dict | None = None) -> Path:
    """Copy the bundle at ``src`` to ``dst`` (atomically), optionally storing the adapters in ``adapter_dtype``.

    Works on files only: no model is loaded. The base fingerprint, template, instructions, router, threshold
    and recorded ``max_length`` are kept, unless ``router`` is given: it then replaces the router, and its
    ``threshold`` the bundle's. ``metadata`` entries are added to the bundle's metadata. ``calibration``, if
    given, replaces the bundle's score calibration (``{}`` removes it).
    """
    src = Path(src)
    config = read_bundle(src)
    if Path(dst).resolve() == src.resolve():
        raise ValueError(f"export_bundle needs a destination other than its source ({src})")
    threshold = config.threshold
    if router is not None:
        if not router.is_fitted:
            raise ValueError("export_bundle: the replacement router is not fitted")
        threshold = router.threshold
    elif config.router is not None:
        router = LatentRouter.load(src, config.router["weights"], config.router["config"])
    meta = dict(config.metadata)
    if adapter_dtype is not None:
        meta["adapter_dtype"] = str(DTYPES.get(adapter_dtype, adapter_dtype)).removeprefix("torch.")
    meta.update(metadata or {})
    return write_bundle(
        dst, base_model=config.base_model, base_fingerprint=config.base_fingerprint,
        template=PromptTemplate.from_dict(config.template), instruction=config.instruction,
        experts={name: src / sub for name, sub in config.experts.items()}, router=router,
        threshold=threshold, expert_instructions=config.expert_instructions, metadata=meta,
        adapter_dtype=adapter_dtype, fallback=config.fallback, max_length=config.max_length,
        calibration=config.calibration if calibration is None else calibration,
    )
