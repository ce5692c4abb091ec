"""The baseline of ``benchmarks/speed.py``: Qwen3-Reranker's model-card recipe, whole prompts per pair with the
full-vocabulary LM head, on a separately loaded copy of the backbone."""

from __future__ import annotations

from pathlib import Path

import torch

from r2r_core import BASE_ADAPTER
from r2r_core.backbone import load_backbone
from r2r_core.scoring import YesNoIds

__all__ = ["Reference"]


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
