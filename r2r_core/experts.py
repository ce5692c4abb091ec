"""Domain experts: LoRA adapters in the standard peft format, loaded once into one backbone.

Experts are never switched globally: every forward pass names the adapter of each row (``"__base__"`` for
the bare backbone), through the calling thread's routing (:func:`r2r_core.lora_fold.thread_routing`) or
peft's ``adapter_names``, so concurrent passes of different domains cannot see each other's expert. A batch
whose rows all use one expert runs it folded into the weights for that call only (:mod:`r2r_core.lora_fold`,
installed on the LoRA layers of the experts loaded here).
Each expert folder may carry ``r2r_expert.json`` with the fingerprint of the base weights it was trained on;
an expert made for a different base model is refused.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from r2r_core.backbone import fingerprints_match
from r2r_core.lora_fold import install_lora_folding
from r2r_core.scoring import BASE_ADAPTER

logger = logging.getLogger(__name__)

__all__ = ["EXPERT_META_FILE", "ExpertSet", "validate_expert_name"]

EXPERT_META_FILE = "r2r_expert.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def validate_expert_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == BASE_ADAPTER:
        raise ValueError(
            f"expert name must be 1-64 characters of letters, digits, '_', '.', '-' (not {BASE_ADAPTER!r}), "
            f"got {name!r}"
        )
    return name


class ExpertSet:
    """The backbone plus its LoRA experts. ``model`` is the plain causal LM until the first expert is added,
    then a ``peft.PeftModel`` holding every expert."""

    def __init__(self, model: torch.nn.Module, base_fingerprint: dict | None = None):
        from peft.tuners.lora import LoraLayer

        if any(isinstance(m, LoraLayer) for m in model.modules()):
            # Another reranker's experts live inside these modules; scoring "without an expert" here would
            # silently run them, and adding experts would mix the two sets.
            raise ValueError(
                "this backbone already carries LoRA experts of another reranker; load a fresh backbone "
                "(R2RReranker.from_pretrained) or share the existing reranker instead"
            )
        self.model = model
        self.base_fingerprint = base_fingerprint
        self._instructions: dict[str, str | None] = {}

    @property
    def names(self) -> list[str]:
        return list(self._instructions)

    def instruction(self, name: str) -> str | None:
        return self._instructions.get(name)

    def check(self, name: str) -> str:
        """Return ``name`` if it is ``"__base__"`` or a loaded expert; else a KeyError listing the options."""
        if name == BASE_ADAPTER or name in self._instructions:
            return name
        raise KeyError(f"unknown expert {name!r}; available: {[BASE_ADAPTER, *self.names]}")

    def _check_adapter_dir(self, adapter_dir: Path) -> None:
        if not (adapter_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter_dir / 'adapter_config.json'} not found: not a peft adapter folder")
        if not any((adapter_dir / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            raise FileNotFoundError(f"{adapter_dir / 'adapter_model.safetensors'} not found")
        if not (adapter_dir / "adapter_model.safetensors").is_file():
            raise ValueError(
                f"{adapter_dir}: only adapter_model.safetensors is accepted (pickled .bin adapters are never loaded)"
            )
        meta_path = adapter_dir / EXPERT_META_FILE
        if meta_path.is_file() and self.base_fingerprint is not None:
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{meta_path} is not valid JSON: {exc}") from exc
            expected = meta.get("base_fingerprint")
            if expected and not fingerprints_match(expected, self.base_fingerprint):
                raise ValueError(
                    f"the expert in {adapter_dir} was trained on a different base model "
                    f"({meta.get('base_model', 'unknown')!r}); its fingerprint does not match the loaded backbone"
                )

    def add(self, name: str, adapter_dir: str | Path, instruction: str | None = None) -> None:
        """Load a peft LoRA adapter folder as expert ``name`` (weights in the backbone's dtype).

        All or nothing: when the adapter cannot be loaded (a corrupt or truncated weights file, weights that do not
        fit its config), the LoRA layers already inserted for it are taken out again, the model scores exactly as
        before, and a ValueError names the file."""
        from peft import PeftModel
        from safetensors import SafetensorError, safe_open

        validate_expert_name(name)
        if name in self._instructions:
            raise ValueError(f"an expert named {name!r} is already loaded; remove it first")
        adapter_dir = Path(adapter_dir)
        self._check_adapter_dir(adapter_dir)
        weights = adapter_dir / "adapter_model.safetensors"
        try:  # the header names every tensor and its extent: a truncated file fails here, before the model changes
            with safe_open(str(weights), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"could not load the expert {name!r}: {weights} is not a valid safetensors file "
                             f"({exc})") from exc
        dtype = next(self.model.parameters()).dtype
        was_peft = isinstance(self.model, PeftModel)
        try:
            if was_peft:
                self.model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False,
                                        autocast_adapter_dtype=False, low_cpu_mem_usage=True)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=name,
                                                       is_trainable=False, autocast_adapter_dtype=False,
                                                       low_cpu_mem_usage=True)
        except Exception as exc:
            self._roll_back(name, was_peft)
            if isinstance(exc, (ValueError, RuntimeError, KeyError, TypeError, SafetensorError)):
                raise ValueError(f"could not load the expert {name!r} from {weights}: {exc}") from exc
            raise
        for pname, param in self.model.named_parameters():
            if f".{name}." in pname and param.dtype != dtype:
                param.data = param.data.to(dtype)
        install_lora_folding(self.model, [*self._instructions, name])
        self.model.eval()
        self._instructions[name] = instruction
        logger.info("Loaded expert %r from %s", name, adapter_dir)

    def _roll_back(self, name: str, was_peft: bool) -> None:
        """Undo a failed :meth:`add`: delete the half-loaded adapter from the peft model, or, for the first expert,
        take every LoRA layer out of the plain model again (it had none before, see ``__init__``)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        if was_peft:
            if name in getattr(self.model, "peft_config", {}):
                self.model.delete_adapter(name)
            return
        for mname, module in list(self.model.named_modules()):
            if mname and isinstance(module, BaseTunerLayer):
                parent, _, child = mname.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, module.get_base_layer())
        self.model.__dict__.pop("peft_config", None)  # set on the wrapped model by peft's tuner

    def remove(self, name: str) -> None:
        if name not in self._instructions:
            raise KeyError(f"unknown expert {name!r}; available: {self.names}")
        self.model.delete_adapter(name)
        del self._instructions[name]
