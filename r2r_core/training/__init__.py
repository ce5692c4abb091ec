"""R2R training: curation (Procedure 1), entity abstraction (EAG Stage 1 data), contrastive LoRA training
(Stage 1 / Stage 2), router training, recipes and ``r2r train``.

Modules, one concept each:

* :mod:`~r2r_core.training.curation` -- candidates, positives, hard/random negatives, groups, balancing
* :mod:`~r2r_core.training.entities` -- the offline entity detector (patterns, names, gazetteer, cues)
* :mod:`~r2r_core.training.abstraction` -- type-consistent randomized placeholders per group, report
* :mod:`~r2r_core.training.loss` -- group-wise InfoNCE (paper Eq. 5)
* :mod:`~r2r_core.training.selection` -- dev subsample and metrics for checkpoint selection
* :mod:`~r2r_core.training.checkpoint` -- atomic files and RNG state for exact resuming
* :mod:`~r2r_core.training.trainer` -- one resumable LoRA training run
* :mod:`~r2r_core.training.router_training` -- fitting the Latent Semantic Router, threshold choice
* :mod:`~r2r_core.training.recipe` / :mod:`~r2r_core.training.pipeline` / :mod:`~r2r_core.training.cli`
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CurationConfig": "curation",
    "TrainGroup": "curation",
    "QrelsAnnotator": "curation",
    "curate": "curation",
    "AbstractionConfig": "abstraction",
    "Abstractor": "abstraction",
    "EntityDetector": "entities",
    "Mention": "entities",
    "group_infonce": "loss",
    "LoraSettings": "trainer",
    "TrainConfig": "trainer",
    "train_adapter": "trainer",
    "RouterConfig": "router_training",
    "train_router": "router_training",
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "run_recipe": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # imported lazily: `r2r --help` should not import torch-heavy modules
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
